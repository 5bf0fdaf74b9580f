"""2x2 max pooling with dnr's CPU kernel.

PyTorch's CPU ``max_pool2d`` on NCHW tensors walks each window with generic scalar code (any kernel size,
stride, padding, dilation) and writes int64 argmax indices: on one core it was about a quarter of a
``wide_cnn`` PGD-7 training step and half of a no-grad forward (AutoAttack's Square attack spends 5,000
gradient-free queries on every example it has not broken). Every pool of dnr's CNNs is a 2x2 window with
stride 2, for which :func:`dnr.ops.max_pool2x2` runs a vectorised kernel (csrc/cpu/max_pool2x2.cpp) forwards
and backwards, with torch's values and gradients bit for bit (``benchmarks/bench_pooling.py``).

:class:`MaxPool2d` takes that path for a floating-point, contiguous NCHW CPU tensor of at least 2x2, outside
``torch.compile`` / ``torch.export``, tracing, scripting and ``torch.func`` transforms (those see the plain
op, so exported graphs hold a MaxPool node). Elsewhere (CUDA, channels_last, other window configurations,
``return_indices``) it is ``nn.MaxPool2d``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import ops
from .eager import is_plain_eager_tensor

__all__ = ["MaxPool2d", "max_pool2x2"]

#: ``max_pool2x2(x [B, C, H, W]) -> [B, C, H // 2, W // 2]``: ``F.max_pool2d(x, 2)`` in values and gradients,
#: with the CPU kernel where it applies (see :func:`dnr.ops.max_pool2x2`).
max_pool2x2 = ops.max_pool2x2


def _pair_is(value, n: int) -> bool:
    """An nn.MaxPool2d size argument (an int or a pair) equal to n in both dimensions."""
    return value == n if isinstance(value, int) else tuple(value) == (n, n)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, state and results) whose 2x2 / stride-2 case runs
    :func:`max_pool2x2` on the CPU (see the module docstring)."""

    def forward(self, input: Tensor) -> Tensor:
        if self._fast(input):
            return max_pool2x2(input)
        return super().forward(input)

    def _fast(self, x) -> bool:
        # graphs (compile / export / tracing / fx) and torch.func transforms see torch's pool
        if not is_plain_eager_tensor(x):
            return False
        return (x.device.type == "cpu" and x.dim() == 4 and x.is_floating_point() and x.is_contiguous()
                and x.shape[-2] >= 2 and x.shape[-1] >= 2 and _pair_is(self.kernel_size, 2)
                and _pair_is(self.stride, 2) and _pair_is(self.padding, 0) and _pair_is(self.dilation, 1)
                and not self.ceil_mode and not self.return_indices)
