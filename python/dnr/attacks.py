"""L-infinity adversarial attacks (FGSM, PGD) and robust-accuracy evaluation.

Conventions (docs/method.md):

- Inputs are raw pixels ``x`` of shape ``[B, ...]`` inside ``clip = (lo, hi)`` (default ``[0, 1]``);
  mean/std normalisation is the model's first layer (:class:`dnr.nn.Normalize`).
- Only the gradient with respect to the input is computed, with ``torch.autograd.grad``:
  no parameter ``.grad`` is created or changed and weight gradients are not computed.
- ``bn_mode="eval"`` (default) runs the attack with the whole model in eval mode;
  ``bn_mode="train"`` runs it with the whole model in train mode (BatchNorm uses batch
  statistics) and restores every BatchNorm running statistic and ``num_batches_tracked``
  afterwards (snapshot + restore, so the attack leaves no trace whatever the momentum setting).
- Every submodule's ``training`` flag is restored afterwards, also when an exception is raised.
- The result is detached, with the dtype and device of ``x``; ``x`` itself is not modified.
"""
from __future__ import annotations

import math
import numbers
import sys
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops as _ops

__all__ = ["fgsm", "pgd", "evaluate", "attack_mode", "module_mode", "check_device", "check_clip_range"]

Scalar = Union[float, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

_BN_MODES = ("eval", "train")


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _check_model_and_inputs(fn: str, model: nn.Module, x: Tensor, y: Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a Tensor, got {type(x).__name__}")
    if not isinstance(y, Tensor):
        raise TypeError(f"{fn}: y must be a Tensor, got {type(y).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{fn}: x must have shape [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    if y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{fn}: x and y must have the same batch size, got x.shape[0]={x.shape[0]} "
            f"and y.shape={tuple(y.shape)}"
        )
    if y.device != x.device:
        raise ValueError(f"{fn}: y must be on x's device {x.device}, got y on {y.device}")
    for name, p in model.named_parameters():
        if p.device != x.device:
            raise ValueError(
                f"{fn}: x is on {x.device} but model parameter {name!r} is on {p.device}; "
                f"move the model or the data so that they match"
            )


def check_clip_range(fn: str, clip) -> Tuple[float, float]:
    """``clip`` as floats (lo, hi) with lo < hi, or a TypeError / ValueError naming it."""
    try:
        lo, hi = clip
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{fn}: clip must be a pair of floats (lo, hi), got clip={clip!r}") from exc
    if not (lo < hi):  # also rejects NaN
        raise ValueError(f"{fn}: clip must satisfy lo < hi, got clip=({lo}, {hi})")
    return lo, hi


def _check_clip(fn: str, clip: Tuple[float, float], x: Tensor) -> Tuple[float, float]:
    lo, hi = check_clip_range(fn, clip)
    # Tolerance: data stored in float16/bfloat16 or produced by a division can overshoot by an ulp.
    tol = max(1e-6, 4 * torch.finfo(x.dtype).eps) * max(1.0, abs(lo), abs(hi))
    xmin, xmax = float(x.detach().min()), float(x.detach().max())
    if not (math.isfinite(xmin) and math.isfinite(xmax)):
        raise ValueError(f"{fn}: x must be finite, got min={xmin}, max={xmax}")
    if xmin < lo - tol or xmax > hi + tol:
        raise ValueError(
            f"{fn}: x must lie in the clip range [{lo}, {hi}] (attacks work on raw pixels; put the "
            f"normalisation inside the model, e.g. dnr.nn.Normalize), got min={xmin:.6g}, max={xmax:.6g}"
        )
    return lo, hi


def _check_budget(fn: str, name: str, value: Scalar, x: Tensor, *, allow_zero: bool) -> Tensor:
    """Return ``value`` as a tensor of x's dtype/device with shape [] or [B]."""
    what = ">= 0" if allow_zero else "> 0"
    if isinstance(value, Tensor):
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{fn}: {name} must be a real number or a real tensor, got dtype {value.dtype}")
        t = value.detach()
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != x.shape[0]):
            raise ValueError(
                f"{fn}: {name} must be a number, a 0-d tensor or a per-sample tensor of shape "
                f"[B] = [{x.shape[0]}], got shape {tuple(t.shape)}"
            )
        t = t.to(device=x.device, dtype=x.dtype)
        bad = ~(t >= 0) if allow_zero else ~(t > 0)  # NaN fails both comparisons
        if bool(bad.any()) or not bool(torch.isfinite(t).all()):
            vals = t.flatten().tolist()
            shown = vals if len(vals) <= 8 else vals[:8] + ["..."]
            raise ValueError(f"{fn}: every {name} must be finite and {what}, got {name}={shown}")
        return t
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number or a tensor, got {value!r} ({type(value).__name__})")
    v = float(value)
    ok = (v >= 0 if allow_zero else v > 0) and math.isfinite(v)
    if not ok:
        raise ValueError(f"{fn}: {name} must be finite and {what}, got {name}={v!r}")
    return torch.tensor(v, device=x.device, dtype=x.dtype)


def _check_int(fn: str, name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {name}={value}")
    return int(value)


def _check_bn_mode(fn: str, bn_mode: str) -> str:
    if bn_mode not in _BN_MODES:
        raise ValueError(f"{fn}: bn_mode must be one of {_BN_MODES}, got bn_mode={bn_mode!r}")
    return bn_mode


def _check_loss_fn(fn: str, loss_fn: Optional[LossFn]) -> None:
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"{fn}: loss_fn must be callable or None, got {type(loss_fn).__name__}")


# --------------------------------------------------------------------------------------------
# model state handling
# --------------------------------------------------------------------------------------------
_NormBase = nn.modules.batchnorm._NormBase  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*


@contextmanager
def module_mode(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """Run ``model`` in eval mode (``bn_mode="eval"``) or train mode (``"train"``: BatchNorm on batch
    statistics, every running statistic and ``num_batches_tracked`` restored on exit, whatever the
    momentum); every submodule's ``training`` flag is restored on exit, also on errors. Used by the
    attacks and by :func:`dnr.analysis.hessian_top_eigenvalue`."""
    flags: List[Tuple[nn.Module, bool]] = [(m, m.training) for m in model.modules()]
    saved: List[Tuple[Tensor, Tensor]] = []
    if bn_mode == "train":
        # Snapshot every running statistic: exact restore, independent of momentum (None,
        # 0 or not) and of subclasses that update their buffers in their own way.
        for m in model.modules():
            if isinstance(m, _NormBase) and m.track_running_stats:
                for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                    if buf is not None:
                        saved.append((buf, buf.detach().clone()))
    try:
        model.train(bn_mode == "train")
        yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
        for m, flag in flags:
            m.training = flag


@contextmanager
def attack_mode(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """Put ``model`` in the mode the attack needs (:func:`module_mode`); restore flags (and BN buffers) on exit.

    The parameters stop requiring gradients meanwhile: an attack needs only the input gradient, and a
    custom op's backward (the compiled masked convolution) cannot see that ``autograd.grad`` asks for
    the input alone, so it would also compute the weight gradient of every layer.
    """
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        with module_mode(model, bn_mode):
            yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _default_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _per_sample_loss(loss_fn: Optional[LossFn], logits: Tensor, y: Tensor, fn: str) -> Tensor:
    """Loss of each example ``[B]`` (or a scalar for a user loss that reduces)."""
    loss = (loss_fn or _default_loss)(logits, y)
    if not isinstance(loss, Tensor) or not (loss.dim() == 0 or tuple(loss.shape) == (logits.shape[0],)):
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{fn}: loss_fn must return a scalar or per-sample losses of shape [B], got {shape}")
    return loss


def _input_grad(model: nn.Module, x_in: Tensor, y: Tensor, loss_fn: Optional[LossFn], fn: str,
                with_logits: bool = False):
    """d(sum of losses)/dx at ``x_in`` (a detached tensor), without touching parameter grads; with
    ``with_logits`` also the (detached) logits of that forward pass, as ``(grad, logits)``."""
    x_in = x_in.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_in)
        loss = _per_sample_loss(loss_fn, logits, y, fn).sum()
        if not loss.requires_grad:
            raise RuntimeError(f"{fn}: the loss does not depend on x (model output has no grad_fn)")
        (grad,) = torch.autograd.grad(loss, x_in, allow_unused=True)
    grad = torch.zeros_like(x_in) if grad is None else grad.detach()
    return (grad, logits.detach()) if with_logits else grad


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """Shape [] or [B] -> broadcastable against x [B, ...]."""
    return t.reshape((-1,) + (1,) * (x.dim() - 1)) if t.dim() == 1 else t


# --------------------------------------------------------------------------------------------
# FGSM
# --------------------------------------------------------------------------------------------
def fgsm(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: Scalar,
    *,
    loss_fn: Optional[LossFn] = None,
    clip: Tuple[float, float] = (0.0, 1.0),
    targeted: bool = False,
    bn_mode: str = "eval",
) -> Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015), L-inf.

    ``x_adv = clamp(x + eps * sign(grad_x loss(model(x), y)), lo, hi)``; with ``targeted=True``
    ``y`` holds the target labels and the step descends (``x - eps * sign(grad)``).

    Args:
        model: maps ``x [B, ...]`` to logits ``[B, K]``.
        x: clean inputs ``[B, ...]``, floating point, inside ``clip``.
        y: labels ``[B]`` (int64 for the default loss), on x's device.
        eps: L-inf radius, ``>= 0``: a number, a 0-d tensor or per-sample ``[B]``.
        loss_fn: ``loss_fn(logits [B, K], y [B]) -> [B] or []``; default per-sample cross-entropy.
            The gradient of its sum is used.
        clip: valid pixel range ``(lo, hi)``.
        targeted: see above.
        bn_mode: ``"eval"`` or ``"train"`` (see module docstring).

    Returns:
        ``x_adv`` ``[B, ...]``, detached, dtype/device of ``x``.
    """
    fn = "fgsm"
    _check_model_and_inputs(fn, model, x, y)
    lo, hi = _check_clip(fn, clip, x)
    eps_t = _check_budget(fn, "eps", eps, x, allow_zero=True)
    _check_bn_mode(fn, bn_mode)
    _check_loss_fn(fn, loss_fn)

    x0 = x.detach()
    with attack_mode(model, bn_mode):
        grad = _input_grad(model, x0, y, loss_fn, fn)
    step = _bcast(eps_t, x0) * grad.sign()
    x_adv = x0 - step if targeted else x0 + step
    return x_adv.clamp_(lo, hi).to(dtype=x.dtype)


# --------------------------------------------------------------------------------------------
# PGD
# --------------------------------------------------------------------------------------------
def _layout(x: Tensor) -> torch.memory_format:
    """Keep channels_last inputs channels_last (dnr.ops.pgd_step_ takes both dense layouts)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _pgd_once(model, x0, y, eps_t, alpha_t, steps, random_start, targeted, loss_fn, lo, hi,
              generator, fn, stop_prob=None, compact=False) -> Tensor:
    """One PGD run from one start; returns x_adv (detached, in x0's layout). With ``stop_prob`` ([] or
    [B]), an example stops moving (its step size becomes 0 in the fused op) from the first iterate whose
    softmax probability of class ``y`` is below its ``stop_prob``. With ``compact`` (the model treats
    every example on its own: eval mode) the stopped examples also leave the forward and backward passes:
    only the examples still moving are computed, and a stopped example's gradient, which its zero step
    size ignores, is left at 0."""
    eps_b = _bcast(eps_t, x0)
    fmt = _layout(x0)
    if random_start:
        # Draw on the generator's device (a CPU generator can seed a CUDA attack) then move.
        gen_device = generator.device if generator is not None else x0.device
        u = torch.rand(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        x_adv = (x0 + (2.0 * u - 1.0) * eps_b).clamp_(lo, hi)
    else:
        x_adv = x0.clone()
    # delta, x_adv, x and grad share one dense layout: pgd_step_ writes delta/x_adv in place.
    x_adv = x_adv.contiguous(memory_format=fmt)
    delta = (x_adv - x0).contiguous(memory_format=fmt)
    # Targeted attacks descend the loss towards y: a negative step size (dnr.ops contract).
    step = -alpha_t if targeted else alpha_t
    stopped = None
    n_stopped = 0  # examples stopped so far (read once per iteration: one host sync)
    for _ in range(steps):
        if stop_prob is None:
            grad = _input_grad(model, x_adv, y, loss_fn, fn)
        else:
            moving = None
            if compact and n_stopped > 0:
                moving = (~stopped).nonzero().squeeze(1)  # [M] indices of the examples still moving
                grad_m, logits = _input_grad(model, x_adv.index_select(0, moving), y.index_select(0, moving),
                                             loss_fn, fn, with_logits=True)
                grad = torch.zeros_like(x_adv, dtype=grad_m.dtype).index_copy_(0, moving, grad_m)
            else:
                grad, logits = _input_grad(model, x_adv, y, loss_fn, fn, with_logits=True)
            with torch.no_grad():
                y_m = y if moving is None else y.index_select(0, moving)
                # at least float32 (bf16 autocast logits), float64 stays float64
                p_true = (logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=1)
                          .gather(1, y_m.view(-1, 1)).squeeze(1))
                bound = stop_prob if moving is None else stop_prob.index_select(0, moving)
                below = p_true < bound.to(p_true.dtype)
                if moving is not None:  # back to the whole batch: a stopped example stays stopped
                    below = stopped.clone().index_copy_(0, moving, below)
                stopped = below if stopped is None else stopped | below  # once stopped, stays stopped
                n_stopped = int(stopped.sum())
                if n_stopped == stopped.numel():
                    break
                # per-sample step sizes: 0 freezes a stopped example (d = clamp(d, -eps, eps) = d)
                step = torch.where(stopped, x0.new_zeros(x0.shape[0]), alpha_t.expand(x0.shape[0]))
        grad = grad.to(dtype=x0.dtype).contiguous(memory_format=fmt)
        with torch.no_grad():
            _ops.pgd_step_(delta, x_adv, x0, grad, eps_t, step, lo, hi)
    return x_adv


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: Scalar,
    alpha: Scalar,
    steps: int,
    *,
    restarts: int = 1,
    random_start: bool = True,
    targeted: bool = False,
    loss_fn: Optional[LossFn] = None,
    clip: Tuple[float, float] = (0.0, 1.0),
    bn_mode: str = "eval",
    generator: Optional[torch.Generator] = None,
    stop_prob: Optional[Scalar] = None,
) -> Tensor:
    """Projected Gradient Descent (Madry et al. 2018), L-inf.

    From ``x_0 = clamp(x + U(-eps, eps), lo, hi)`` (or ``x`` when ``random_start=False``)::

        d_{k+1} = clamp(d_k + alpha * sign(grad_x loss(model(x_k), y)), -eps, eps)
        x_{k+1} = clamp(x + d_{k+1}, lo, hi);   d_{k+1} = x_{k+1} - x

    for ``steps`` steps (one fused in-place :func:`dnr.ops.pgd_step_` per step); the last iterate
    is the result. Contiguous and channels_last inputs keep their layout.
    With ``targeted=True`` ``y`` holds the target labels and the loss is descended.

    Restarts: each restart ``r = 0..restarts-1`` runs PGD from its own random start (the r-th
    ``torch.rand(x.shape)`` draw from ``generator``). Per sample, the result is the restart whose
    final example is best by the key (success, objective), compared lexicographically:
    ``success`` = misclassified (untargeted) / classified as the target (targeted), and
    ``objective`` = loss (untargeted) / -loss (targeted). So a successful example always beats an
    unsuccessful one, and among equals the highest loss wins; ties keep the earliest restart.

    Args:
        model: maps ``x [B, ...]`` to logits ``[B, K]``.
        x: clean inputs ``[B, ...]``, floating point, inside ``clip``.
        y: labels (or targets) ``[B]``, on x's device.
        eps: L-inf radius ``>= 0``: number, 0-d tensor or per-sample ``[B]``.
        alpha: step size ``> 0``: number, 0-d tensor or per-sample ``[B]``.
        steps: number of gradient steps, ``>= 1``.
        restarts: number of random restarts, ``>= 1``.
        random_start: start from a uniform point of the eps-ball (projected to ``clip``).
        targeted: see above.
        loss_fn: ``loss_fn(logits [B, K], y [B]) -> [B]``; default per-sample cross-entropy. The
            gradient of the sum is used; ``restarts > 1`` needs per-sample losses ``[B]``.
            Restart selection with a custom ``loss_fn`` calls ``argmax(logits)`` for ``success``.
        clip: valid pixel range ``(lo, hi)``.
        bn_mode: ``"eval"`` or ``"train"`` (see module docstring).
        generator: optional ``torch.Generator`` for the random starts (reproducibility).
        stop_prob: per-example early stopping (P-SAT's curriculum, :mod:`dnr.curriculum`): a number in
            [0, 1], a 0-d tensor or per-sample ``[B]``. Before each step, an example whose softmax
            probability of class ``y`` at the current iterate is below its ``stop_prob`` stops for good
            (its per-sample step size in :func:`dnr.ops.pgd_step_` becomes 0): 0 never stops (plain PGD),
            1 stops every example at its random start. Untargeted attacks only. None: plain PGD. With
            ``bn_mode="eval"`` the stopped examples also leave the later forward and backward passes (in
            eval mode an example's gradient is its own, so the moving ones get the same gradients), which
            is where early stopping saves time; with ``"train"`` they stay in the batch, whose statistics
            they are part of.

    Returns:
        ``x_adv`` ``[B, ...]``, detached, dtype/device of ``x``; ``|x_adv - x| <= eps`` and
        ``lo <= x_adv <= hi`` elementwise.
    """
    fn = "pgd"
    _check_model_and_inputs(fn, model, x, y)
    lo, hi = _check_clip(fn, clip, x)
    eps_t = _check_budget(fn, "eps", eps, x, allow_zero=True)
    alpha_t = _check_budget(fn, "alpha", alpha, x, allow_zero=False)
    steps = _check_int(fn, "steps", steps, 1)
    restarts = _check_int(fn, "restarts", restarts, 1)
    _check_bn_mode(fn, bn_mode)
    _check_loss_fn(fn, loss_fn)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if stop_prob is not None:
        if targeted:
            raise ValueError(f"{fn}: stop_prob (early stopping on the true class's probability) needs "
                             "targeted=False")
        stop_t = _check_budget(fn, "stop_prob", stop_prob, x, allow_zero=True)
        if bool((stop_t > 1).any()):
            raise ValueError(f"{fn}: every stop_prob must be in [0, 1], got stop_prob={stop_t.flatten().tolist()[:8]}")
        stop_prob = stop_t.expand(x.shape[0])

    x0 = x.detach()
    x0 = x0.contiguous(memory_format=_layout(x0))
    with attack_mode(model, bn_mode):
        best: Optional[Tensor] = None
        best_succ: Optional[Tensor] = None
        best_obj: Optional[Tensor] = None
        for _ in range(restarts):
            x_adv = _pgd_once(model, x0, y, eps_t, alpha_t, steps, random_start, targeted, loss_fn,
                              lo, hi, generator, fn, stop_prob, compact=bn_mode == "eval")
            if restarts == 1:
                best = x_adv
                break
            with torch.no_grad():
                logits = model(x_adv)
                loss = _per_sample_loss(loss_fn, logits, y, fn)
                if loss.dim() == 0:
                    raise ValueError(
                        f"{fn}: restarts={restarts} needs loss_fn to return per-sample losses of shape [B]"
                        f" to choose the best restart per sample, got a scalar"
                    )
                pred = logits.argmax(dim=1)
                succ = pred == y if targeted else pred != y
                obj = (-loss if targeted else loss).to(torch.float64)
            if best is None:
                best, best_succ, best_obj = x_adv, succ, obj
                continue
            better = (succ & ~best_succ) | ((succ == best_succ) & (obj > best_obj))
            best = torch.where(_bcast(better, x_adv), x_adv, best)
            best_succ = torch.where(better, succ, best_succ)
            best_obj = torch.where(better, obj, best_obj)
    assert best is not None
    return best.detach().to(dtype=x.dtype)


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
_fgsm_attack = fgsm
_pgd_attack = pgd


def check_device(fn: str, model: nn.Module, device) -> torch.device:
    """``device`` (default: the model's) after checking that every parameter is on it."""
    dev = torch.device(device) if device is not None else _model_device(model)
    for name, p in model.named_parameters():
        if p.device.type != dev.type or (dev.index is not None and p.device != dev):
            raise ValueError(
                f"{fn}: device={str(dev)!r} but model parameter {name!r} is on {p.device}; "
                f"move the model first ({fn} does not move it)"
            )
    return dev


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def evaluate(
    model: nn.Module,
    loader,
    *,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 7,
    restarts: int = 1,
    fgsm: bool = True,
    pgd: bool = True,
    device: Optional[Union[str, torch.device]] = None,
    max_batches: Optional[int] = None,
    progress: bool = False,
    clip: Tuple[float, float] = (0.0, 1.0),
    generator: Optional[torch.Generator] = None,
) -> Dict[str, object]:
    """Clean, FGSM and PGD accuracy of ``model`` over ``loader`` (model in eval mode).

    Args:
        model: classifier on raw pixels.
        loader: iterable of ``(x [B, ...], y [B])`` batches (e.g. a ``DataLoader``).
        eps, alpha, steps, restarts: attack settings (FGSM uses ``eps``; PGD uses all, with a
            random start drawn from ``generator``).
        fgsm, pgd: which attacks to run; a skipped attack reports ``None``.
        device: where to run; default the device of the model's parameters.
        max_batches: stop after this many batches (``None``: the whole loader).
        progress: print running accuracies to stderr after every batch.
        clip: valid pixel range.
        generator: optional ``torch.Generator`` for PGD's random starts.

    Returns:
        ``{"clean", "fgsm", "pgd"}`` accuracies in ``[0, 1]`` (``None`` for a skipped attack),
        ``"n"`` the number of examples, and the settings used: ``"eps"``, ``"alpha"``,
        ``"steps"``, ``"restarts"``, ``"random_start"``, ``"clip"``, ``"bn_mode"``.
    """
    fn = "evaluate"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("eps", eps), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f"{fn}: {name} must be a finite real number, got {value!r}")
    if eps < 0:
        raise ValueError(f"{fn}: eps must be >= 0, got eps={eps!r}")
    if alpha <= 0:
        raise ValueError(f"{fn}: alpha must be > 0, got alpha={alpha!r}")
    steps = _check_int(fn, "steps", steps, 1)
    restarts = _check_int(fn, "restarts", restarts, 1)
    if max_batches is not None:
        max_batches = _check_int(fn, "max_batches", max_batches, 1)
    lo, hi = check_clip_range(fn, clip)
    dev = check_device(fn, model, device)

    correct = {"clean": 0, "fgsm": 0, "pgd": 0}
    n = 0
    with attack_mode(model, "eval"):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(f"{fn}: loader must yield (x, y) pairs, got {type(batch).__name__}")
            x, y = batch[0].to(dev), batch[1].to(dev)
            with torch.no_grad():
                correct["clean"] += int((model(x).argmax(dim=1) == y).sum())
            if fgsm:
                x_adv = _fgsm_attack(model, x, y, eps, clip=(lo, hi), bn_mode="eval")
                with torch.no_grad():
                    correct["fgsm"] += int((model(x_adv).argmax(dim=1) == y).sum())
            if pgd:
                x_adv = _pgd_attack(model, x, y, eps, alpha, steps, restarts=restarts, clip=(lo, hi),
                                    bn_mode="eval", generator=generator)
                with torch.no_grad():
                    correct["pgd"] += int((model(x_adv).argmax(dim=1) == y).sum())
            n += int(y.shape[0])
            if progress:
                parts = [f"clean {correct['clean'] / n:.4f}"]
                if fgsm:
                    parts.append(f"fgsm {correct['fgsm'] / n:.4f}")
                if pgd:
                    parts.append(f"pgd {correct['pgd'] / n:.4f}")
                print(f"[dnr.evaluate] batch {i + 1}: n={n} " + " ".join(parts), file=sys.stderr, flush=True)
    if n == 0:
        raise ValueError(f"{fn}: loader yielded no examples")
    return {
        "clean": correct["clean"] / n,
        "fgsm": correct["fgsm"] / n if fgsm else None,
        "pgd": correct["pgd"] / n if pgd else None,
        "n": n,
        "eps": float(eps),
        "alpha": float(alpha),
        "steps": steps,
        "restarts": restarts,
        "random_start": True,
        "clip": (lo, hi),
        "bn_mode": "eval",
    }
