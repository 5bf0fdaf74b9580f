"""The top eigenvalue of a loss's Hessian with respect to the model's parameters, by power iteration on
Hessian-vector products (double backward: ``torch.autograd.grad`` of the gradient, so the masked layers'
ops must be twice differentiable, which ``dnr.ops`` guarantees and tests with gradgradcheck)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..attacks import module_mode

__all__ = ["hessian_vector_product", "hessian_top_eigenvalue"]


def _trainable(model: nn.Module, params) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not params:
        raise ValueError("hessian_top_eigenvalue: the model has no parameters that require gradients")
    return params


def hessian_vector_product(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                           vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """H v for the loss whose ``grads`` (made with ``create_graph=True``) w.r.t. ``params`` are given; ``vector``
    has one tensor per parameter (same shapes). Parameters the gradient does not depend on get zeros."""
    hv = torch.autograd.grad(grads, params, grad_outputs=list(vector), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)]


def _power_iteration(grads, params, iters, tol, generator, shift: float = 0.0) -> float:
    """The eigenvalue of largest magnitude of H - shift * I (Rayleigh quotient of the last unit vector)."""
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    value = None
    for _ in range(iters):
        norm = torch.sqrt(sum((t * t).sum() for t in v))
        v = [t / norm for t in v]
        hv = hessian_vector_product(grads, params, v)
        if shift:
            hv = [h - shift * t for h, t in zip(hv, v)]
        new = float(sum((a * b).sum() for a, b in zip(v, hv)))
        v = [h.detach() for h in hv]
        converged = value is not None and abs(new - value) <= tol * abs(new)
        value = new
        if converged or not any(bool(h.any()) for h in v):
            break
    return value


def hessian_top_eigenvalue(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           batch, iters: int = 20, *, params=None, tol: float = 0.0,
                           generator: torch.Generator | None = None, bn_mode: str = "eval") -> float:
    """lambda_max, the largest (algebraic) eigenvalue of the Hessian of ``loss_fn(model(x), y)`` w.r.t.
    ``params`` (default: every parameter that requires gradients), by power iteration on Hessian-vector
    products: ``v <- H v / |H v|`` from a standard normal ``v``, ``iters`` times, giving the Rayleigh
    quotient ``mu`` of the eigenvalue of largest magnitude. When ``mu < 0`` (a non-convex point, e.g. at
    initialisation, where the most negative eigenvalue can dominate) a second power iteration on the
    shifted ``H - mu I`` (whose eigenvalues are >= 0, the largest being ``lambda_max - mu``) gives
    lambda_max. Each estimate is a Rayleigh quotient, so with few ``iters`` it is a lower bound of
    lambda_max that tightens as ``iters`` grows.

    Args:
        loss_fn: ``loss_fn(logits, y) -> scalar`` (e.g. ``torch.nn.functional.cross_entropy``).
        batch: ``(x [B, ...], y [B])``.
        iters: power-iteration steps (Hessian-vector products) per power iteration, >= 1.
        tol: stop early once the estimate changes by at most ``tol`` relative (0: run all ``iters``).
        generator: the start vectors' random stream (a CPU generator; default the global one).
        bn_mode: "eval" (default) or "train" (BatchNorm on batch statistics; its running statistics are
            restored afterwards), as in :func:`dnr.attacks.module_mode`. Every module's mode is restored.

    No parameter's ``.grad`` is created or changed.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"hessian_top_eigenvalue: iters must be an integer >= 1, got {iters!r}")
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"hessian_top_eigenvalue: bn_mode must be 'eval' or 'train', got {bn_mode!r}")
    if not (tol >= 0):
        raise ValueError(f"hessian_top_eigenvalue: tol must be >= 0, got {tol!r}")
    x, y = batch
    params = _trainable(model, params)
    with module_mode(model, bn_mode), torch.enable_grad():
        loss = loss_fn(model(x), y)
        if loss.dim() != 0:
            raise ValueError(f"hessian_top_eigenvalue: loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        keep = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not keep:
            return 0.0  # a loss linear in every parameter: H = 0
        grads = [grads[i] for i in keep]
        params = [params[i] for i in keep]
        mu = _power_iteration(grads, params, iters, tol, generator)
        if mu >= 0:
            return mu
        return _power_iteration(grads, params, iters, tol, generator, shift=mu) + mu
