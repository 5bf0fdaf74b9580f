"""2x2 max pooling with a faster CPU path when no gradient is recorded.

PyTorch's CPU ``max_pool2d`` on NCHW tensors walks each window with scalar code and also computes the
argmax indices, even when nothing will read them: in a no-grad forward of dnr's CNNs on one core it costs
about as much as the convolutions. Evaluation is mostly such forwards: AutoAttack's Square attack spends
5,000 gradient-free queries on every example it has not broken, most of AutoAttack's time on a robust model. For the
2x2 window with stride 2 (every pool of dnr's CNNs) the same values are the elementwise maximum of four
strided views, which runs as vectorised elementwise kernels (benchmarks/bench_pooling.py, one core: the pool
3-8x faster, a no-grad forward of dnr's CNNs 1.2-1.8x, Square 1.7x).

The fast path is taken only where it returns exactly what ``max_pool2d`` returns and nothing differentiates
through it: a floating-point, contiguous NCHW CPU tensor of at least 2x2 that does not need a gradient here
(no grad mode or ``requires_grad=False``), outside ``torch.compile`` / ``torch.export``, tracing and scripting
(those see the plain op, so exported graphs hold a MaxPool node). Elsewhere, and always where autograd records
the pool (training, attacks), :class:`MaxPool2d` is ``nn.MaxPool2d``: the backward routes each window's gradient
to its first maximum, which the maximum-of-views form would not do with ties.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MaxPool2d", "max_pool2x2"]


def max_pool2x2(x: Tensor) -> Tensor:
    """Max over each 2x2 window with stride 2, floor mode: ``[B, C, H, W] -> [B, C, H // 2, W // 2]``; the
    values of ``F.max_pool2d(x, 2)`` (NaN where a window holds one). A trailing odd row / column is dropped,
    as in floor mode. Differentiable, but ties split the gradient (``torch.maximum``): use it where no
    gradient is taken."""
    if x.dim() != 4 or x.shape[-2] < 2 or x.shape[-1] < 2:
        raise ValueError(f"max_pool2x2: x must be [B, C, H, W] with H, W >= 2, got shape {tuple(x.shape)}")
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    v = x[..., : 2 * h, : 2 * w].unflatten(3, (w, 2)).unflatten(2, (h, 2))  # [B, C, h, 2, w, 2]
    return torch.maximum(torch.maximum(v[:, :, :, 0, :, 0], v[:, :, :, 0, :, 1]),
                         torch.maximum(v[:, :, :, 1, :, 0], v[:, :, :, 1, :, 1]))


def _pair_is(value, n: int) -> bool:
    """An nn.MaxPool2d size argument (an int or a pair) equal to n in both dimensions."""
    return value == n if isinstance(value, int) else tuple(value) == (n, n)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, state and results) whose 2x2 / stride-2 case runs
    :func:`max_pool2x2` on the CPU when no gradient is recorded through it (see the module docstring)."""

    def forward(self, input: Tensor) -> Tensor:
        if self._fast(input):
            return max_pool2x2(input)
        return super().forward(input)

    def _fast(self, x) -> bool:
        # type(x) is Tensor: not an fx Proxy, a subclass or a functorch wrapper; compile / export / tracing see
        # the plain op
        if type(x) is not torch.Tensor or torch.jit.is_scripting() or torch.jit.is_tracing():
            return False
        if torch.compiler.is_compiling():
            return False
        if x.requires_grad and torch.is_grad_enabled():
            return False
        return (x.device.type == "cpu" and x.dim() == 4 and x.is_floating_point() and x.is_contiguous()
                and x.shape[-2] >= 2 and x.shape[-1] >= 2 and _pair_is(self.kernel_size, 2)
                and _pair_is(self.stride, 2) and _pair_is(self.padding, 0) and _pair_is(self.dilation, 1)
                and not self.ceil_mode and not self.return_indices)
