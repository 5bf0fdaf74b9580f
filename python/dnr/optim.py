"""``MaskedSGD``: torch.optim.SGD whose masked weights step in one fused pass.

For every parameter that has a mask, one call of :func:`dnr.ops.masked_sgd_step_`
per param group does weight decay, the (dense) momentum update, the weight update
and the mask re-application in one pass over memory (one launch on CUDA). The
other parameters take torch's own SGD update (``torch.optim.sgd.sgd``).

Masks come from one of:
  * ``model=``: the masked layers of the model (``dnr.nn.masked_layers``), looked up
    at every step, so new masks from rewiring and buffers moved by ``model.to()``
    are always the current ones;
  * ``masks={param: bool mask}``: fixed tensors, read at every step (update them in
    place to change the pattern).

It is a ``torch.optim.SGD`` subclass with the same param-group keys and state
(``"momentum_buffer"``, dense at pruned positions), so LR schedulers, state dicts
and the DNR controller (``dnr.DNR``) treat it as SGD. ``maximize``, ``foreach``,
``fused`` and ``differentiable`` are not offered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.optim.sgd import sgd as _sgd  # torch's own functional SGD update

from . import ops
from .nn import masked_layers

__all__ = ["MaskedSGD"]


class MaskedSGD(torch.optim.SGD):
    """SGD with momentum, weight decay and Nesterov as ``torch.optim.SGD``, followed by
    ``param.mul_(mask)`` for masked parameters, fused into one pass.

    Args:
        params: parameters or param groups, as for ``torch.optim.SGD``.
        lr, momentum, dampening, weight_decay, nesterov: as ``torch.optim.SGD``.
        masks: {parameter: bool tensor of its shape and device}. Exclusive with model.
        model: a module whose masked layers give ``{layer.weight: layer.mask}``.
    Without masks and model it is plain SGD.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        masks: Mapping[torch.Tensor, torch.Tensor] | None = None,
        model: nn.Module | None = None,
    ):
        if masks is not None and model is not None:
            raise ValueError("pass masks or model, not both")
        if masks is not None and not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a dict {{parameter: bool mask}}, got {type(masks).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=False, foreach=None, differentiable=False, fused=None)
        self._masks = dict(masks) if masks is not None else None
        self._model = model
        optimized = {p for group in self.param_groups for p in group["params"]}
        for i, (p, mask) in enumerate(self._current_masks().items()):
            if p not in optimized:
                raise ValueError(f"masks entry {i} (shape {tuple(p.shape)}) is not a parameter of this optimizer")
            self._check_mask(p, mask)

    def _current_masks(self) -> dict[torch.Tensor, torch.Tensor]:
        if self._model is not None:
            return {layer.weight: layer.mask for _, layer in masked_layers(self._model)}
        return self._masks or {}

    @staticmethod
    def _check_mask(p: torch.Tensor, mask) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"the mask of a parameter of shape {tuple(p.shape)} must be a bool tensor, got {got}")
        if mask.shape != p.shape or mask.device != p.device:
            raise ValueError(
                f"the mask of a parameter of shape {tuple(p.shape)} on {p.device} must match it, got shape "
                f"{tuple(mask.shape)} on {mask.device}"
            )

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; returns closure() when given (evaluated with grad enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masks = self._current_masks()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            lr = float(lr) if isinstance(lr, torch.Tensor) else lr
            hyper = dict(lr=lr, momentum=momentum, dampening=group["dampening"],
                         weight_decay=group["weight_decay"], nesterov=group["nesterov"])
            plain = ([], [], [])  # params, grads, momentum buffers (None: first step)
            fused = {True: ([], [], [], []), False: ([], [], [], [])}  # first_step -> params, grads, bufs, masks
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MaskedSGD does not support sparse gradients")
                buf = self.state[p].get("momentum_buffer") if momentum != 0 else None
                mask = masks.get(p)
                if mask is not None:
                    self._check_mask(p, mask)  # before anything is modified
                if mask is None or momentum == 0:
                    # no mask, or no buffer to fuse: torch's SGD, then the mask
                    plain[0].append(p), plain[1].append(p.grad), plain[2].append(buf)
                    continue
                first = buf is None
                if first:
                    buf = torch.empty_like(p)  # p's memory order (e.g. channels_last): what the kernel walks
                    self.state[p]["momentum_buffer"] = buf
                for lst, t in zip(fused[first], (p, p.grad, buf, mask)):
                    lst.append(t)
            for first, (params, grads, bufs, ms) in fused.items():
                if not params:
                    continue
                if ops.sgd_kernel_fits(params, bufs):
                    # Everything the wrapper checks holds by construction here (the kernel checks
                    # again in C++): skipping its per-tensor Python checks saves ~L x 10 us per step.
                    torch.ops.dnr.masked_sgd_step_(params, grads, bufs, ms, hyper["lr"], hyper["momentum"],
                                                   hyper["dampening"], hyper["weight_decay"], hyper["nesterov"], first)
                else:
                    ops.masked_sgd_step_(params, grads, bufs, ms, first_step=first, **hyper)
            if plain[0]:
                _sgd(plain[0], plain[1], plain[2], maximize=False, **hyper)
                for p, buf in zip(plain[0], plain[2]):
                    if momentum != 0:
                        self.state[p]["momentum_buffer"] = buf
                    mask = masks.get(p)
                    if mask is not None:
                        p.mul_(mask)
        return loss
