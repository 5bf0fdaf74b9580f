"""BatchNorm2d whose eval-mode input gradient runs dnr's CPU kernel.

Adversarial training and robustness evaluation spend most of their time in attacks: PGD, APGD and
AutoAttack differentiate the loss with respect to the input, with the model in eval mode and its
parameters frozen. There BatchNorm is a fixed per-channel affine map and its input gradient is
``grad_output * invstd * weight``, but PyTorch's CPU backward first sweeps the input and the output
gradient for the per-channel sums of the weight and bias gradients, needed or not: on one core it was 18%
of a ``small_cnn`` PGD-7 training step. :func:`dnr.ops.batch_norm_eval` (csrc/cpu/batch_norm_eval.cpp)
computes the same input gradient bit for bit in one pass (``benchmarks/bench_batch_norm.py``).

:class:`BatchNorm2d` takes that path in eval mode (with running statistics) for a float32 / float64 CPU
tensor that requires grad while the layer's weight and bias do not (the attack's case), in eager mode
(:func:`dnr.nn.eager.is_plain_eager_tensor`). Everywhere else, training mode, trainable affine parameters
(whose gradients ATen's backward computes in the same pass), CUDA, no-grad evaluation, compile / export /
tracing / fx and ``torch.func``, it is ``nn.BatchNorm2d``: the same arguments, state dict and values.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from .. import ops
from .eager import is_plain_eager_tensor

__all__ = ["BatchNorm2d"]


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same arguments, state and results) whose eval-mode input gradient runs
    :func:`dnr.ops.batch_norm_eval` on the CPU when the parameters are frozen (see the module docstring).
    Input and output: [N, C, H, W]."""

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            # fx leaves only modules defined in torch.nn; record this one as the single call_module node that
            # nn.BatchNorm2d would be, so that traced graphs keep following train() / eval()
            return input.tracer.create_proxy("call_module", input.tracer.path_of_module(self), (input,), {})
        if self._fast(input):
            self._check_input_dim(input)
            return ops.batch_norm_eval(input, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
        return super().forward(input)

    def _fast(self, x) -> bool:
        if self.training or self.running_mean is None or self.running_var is None:
            return False  # batch statistics: ATen's kernels
        if not is_plain_eager_tensor(x) or not (x.requires_grad and torch.is_grad_enabled()):
            return False  # graphs see torch's op; without an input gradient there is nothing to gain
        # trainable affine parameters: ATen's backward produces their gradients with the input's, bit for bit
        # as before; the kernel path is for the attacks' frozen model
        if any(p is not None and p.requires_grad for p in (self.weight, self.bias)):
            return False
        return x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
