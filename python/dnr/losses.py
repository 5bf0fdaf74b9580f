"""Training losses.

The DNR objective (docs/method.md) mixes the cross-entropy on clean inputs with the
cross-entropy on their adversarial counterparts::

    L = beta * CE(f(x), y) + (1 - beta) * CE(f(x_adv), y)

``beta = 1`` is plain (clean) training, ``beta = 0`` is pure adversarial training (Madry et al.),
the default ``beta = 0.5`` is the paper's setting.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["hybrid_loss", "HybridLoss"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_beta(beta: float) -> float:
    if isinstance(beta, Tensor):
        if beta.numel() != 1:
            raise ValueError(f"hybrid_loss: beta must be a scalar in [0, 1], got a tensor of shape {tuple(beta.shape)}")
        beta = beta.item()
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"hybrid_loss: beta must be a real number in [0, 1], got {beta!r} ({type(beta).__name__})")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:  # also rejects NaN
        raise ValueError(f"hybrid_loss: beta must be in [0, 1], got beta={beta!r}")
    return beta


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"hybrid_loss: reduction must be one of {_REDUCTIONS}, got reduction={reduction!r}")
    return reduction


def hybrid_loss(
    clean_logits: Tensor,
    adv_logits: Tensor,
    target: Tensor,
    beta: float = 0.5,
    reduction: str = "mean",
) -> Tensor:
    """``beta * CE(clean_logits, target) + (1 - beta) * CE(adv_logits, target)``.

    Args:
        clean_logits: ``[B, K]`` logits of the clean inputs.
        adv_logits: ``[B, K]`` logits of the adversarial inputs (same shape as ``clean_logits``).
        target: ``[B]`` int64 class indices in ``[0, K)``.
        beta: weight of the clean term, a real number in ``[0, 1]``.
        reduction: ``"mean"`` (default) or ``"sum"`` over the batch -> scalar ``[]``;
            ``"none"`` -> per-example losses ``[B]``.

    Returns:
        The loss, shape ``[]`` or ``[B]``; dtype of the logits.

    A term whose weight is exactly 0 is not evaluated, so ``beta=1`` returns exactly
    ``F.cross_entropy(clean_logits, target)`` (and ``beta=0`` the adversarial CE), also when the
    unused logits are not finite.
    """
    beta = _check_beta(beta)
    reduction = _check_reduction(reduction)
    for name, t in (("clean_logits", clean_logits), ("adv_logits", adv_logits), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"hybrid_loss: {name} must be a Tensor, got {type(t).__name__}")
    if clean_logits.dim() != 2:
        raise ValueError(
            f"hybrid_loss: clean_logits must have shape [B, K], got shape {tuple(clean_logits.shape)}"
        )
    if adv_logits.shape != clean_logits.shape:
        raise ValueError(
            f"hybrid_loss: adv_logits must have the shape of clean_logits {tuple(clean_logits.shape)}, "
            f"got shape {tuple(adv_logits.shape)}"
        )
    if target.dim() != 1 or target.shape[0] != clean_logits.shape[0]:
        raise ValueError(
            f"hybrid_loss: target must have shape [B] = [{clean_logits.shape[0]}], got shape {tuple(target.shape)}"
        )
    if target.dtype != torch.long:
        raise TypeError(f"hybrid_loss: target must hold int64 class indices, got dtype {target.dtype}")

    if beta == 1.0:
        return F.cross_entropy(clean_logits, target, reduction=reduction)
    if beta == 0.0:
        return F.cross_entropy(adv_logits, target, reduction=reduction)
    clean = F.cross_entropy(clean_logits, target, reduction=reduction)
    adv = F.cross_entropy(adv_logits, target, reduction=reduction)
    return beta * clean + (1.0 - beta) * adv


class HybridLoss(nn.Module):
    """Module form of :func:`hybrid_loss`.

    ``HybridLoss(beta=0.5, reduction="mean")(clean_logits [B, K], adv_logits [B, K], target [B])``
    -> ``[]`` (or ``[B]`` with ``reduction="none"``).
    """

    def __init__(self, beta: float = 0.5, reduction: str = "mean") -> None:
        super().__init__()
        self.beta = _check_beta(beta)
        self.reduction = _check_reduction(reduction)

    def forward(self, clean_logits: Tensor, adv_logits: Tensor, target: Tensor) -> Tensor:
        return hybrid_loss(clean_logits, adv_logits, target, beta=self.beta, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}"
