"""Public dnr operators.

Each wrapper checks its arguments (``TypeError``/``ValueError`` naming the argument,
its value and what was expected; nothing is modified when a check fails), then runs
the extension's kernel for the input's device when there is one, else the PyTorch
reference in :mod:`dnr.reference`. :func:`backend` says which runs where.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from .. import reference
from ._registry import backend, use_kernel

__all__ = ["masked_conv2d", "masked_linear", "pgd_step_", "momentum_stats", "masked_sgd_step_", "max_pool2x2",
           "batch_norm_eval", "backend", "use_kernel", "sgd_kernel_fits"]


# ----------------------------------------------------------------------------- checks


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _bool_mask(name: str, mask, like: torch.Tensor, like_name: str) -> None:
    _tensor(name, mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a torch.bool tensor, got dtype {mask.dtype}")
    _same_shape(name, mask, like, like_name)
    _same_device(name, mask, like, like_name)


def _same_shape(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}")


def _same_device(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like_name}'s device {like.device}, got {t.device}")


def _same_dtype(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have {like_name}'s dtype {like.dtype}, got {t.dtype}")


def _real(name: str, value, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _int_pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _conv_padding(padding, weight: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """Explicit (pad_h, pad_w); 'valid' and 'same' (stride 1, symmetric) included."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride {stride}")
        totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        if any(t % 2 for t in totals):
            raise ValueError(
                f"padding='same' with kernel {tuple(weight.shape[2:])} and dilation {dilation} needs "
                f"asymmetric padding, which masked_conv2d does not support; pad the input instead"
            )
        return (totals[0] // 2, totals[1] // 2)
    if isinstance(padding, str):
        raise ValueError(f"padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    return _int_pair("padding", padding, minimum=0)


def _sequence(name: str, value) -> list:
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    return list(value)


# ---------------------------------------------------------------------------- masked layers


def masked_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    dense_weight_grad: bool = True,
) -> torch.Tensor:
    """``F.conv2d(input, weight * mask, bias, stride, padding, dilation, groups)``.

    Args:
        input: [B, C, H, W] (or unbatched [C, H, W]).
        weight: [O, C / groups, kH, kW].
        mask: bool, shape of weight; False marks a pruned weight.
        bias: [O] or None.
        stride, dilation: int or pair, >= 1. padding: int or pair >= 0, 'valid', or
            'same' (stride 1, symmetric padding only).
        dense_weight_grad: the gradient wrt weight is the gradient wrt the
            effective weight at every position, pruned ones included (what DNR's
            dense momentum needs); False multiplies it by mask.
    Returns:
        [B, O, H_out, W_out] (or [O, H_out, W_out]).
    """
    _tensor("input", input)
    _tensor("weight", weight)
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be [B, C, H, W] or [C, H, W], got shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be [O, C/groups, kH, kW], got shape {tuple(weight.shape)}")
    _floating("weight", weight)
    _bool_mask("mask", mask, weight, "weight")
    _same_device("input", input, weight, "weight")
    if not torch.is_autocast_enabled(input.device.type):  # autocast casts inside the conv
        _same_dtype("input", input, weight, "weight")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    out_channels = weight.shape[0]
    if input.shape[-3] != weight.shape[1] * groups:
        raise ValueError(
            f"input has {input.shape[-3]} channels but weight {tuple(weight.shape)} with groups={groups} "
            f"expects {weight.shape[1] * groups}"
        )
    if out_channels % groups:
        raise ValueError(f"weight's {out_channels} output channels are not divisible by groups={groups}")
    if bias is not None:
        _tensor("bias", bias)
        if bias.shape != (out_channels,):
            raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
        _same_device("bias", bias, weight, "weight")
        _same_dtype("bias", bias, weight, "weight")
    stride = _int_pair("stride", stride, minimum=1)
    dilation = _int_pair("dilation", dilation, minimum=1)
    padding = _conv_padding(padding, weight, stride, dilation)
    dense_weight_grad = _flag("dense_weight_grad", dense_weight_grad)

    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    if use_kernel("masked_conv2d", x.device) and _conv_kernel_pays(x, mask, groups):
        if torch.is_autocast_enabled(x.device.type):
            # the op has no autocast kernel: cast its inputs as autocast casts conv2d (the casts are
            # differentiable, so the weight gradient still arrives in the weight's dtype)
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        out = torch.ops.dnr.masked_conv2d(x, weight, mask, bias, stride, padding, dilation, groups, dense_weight_grad)
    else:
        out = reference.masked_conv2d(x, weight, mask, bias, stride, padding, dilation, groups, dense_weight_grad)
    return out.squeeze(0) if unbatched else out


def _conv_kernel_pays(x: torch.Tensor, mask: torch.Tensor, groups: int) -> bool:
    """Whether the compiled masked_conv2d beats the reference here (measured, see
    benchmarks/bench_masked_conv.py). On CPU it does the reference's work plus a
    Python-level backward, so it only pays when whole output channels are pruned
    (it then convolves the live filters alone). On CUDA and under torch.compile
    (one traceable op, no data-dependent branch) it is always used."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    return groups == 1 and not bool(mask.reshape(mask.shape[0], -1).any(dim=1).all())


def masked_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    dense_weight_grad: bool = True,
) -> torch.Tensor:
    """``F.linear(input, weight * mask, bias)``.

    Args:
        input: [*, in]. weight: [out, in]. mask: bool, shape of weight.
        bias: [out] or None. dense_weight_grad: as in :func:`masked_conv2d`.
    Returns:
        [*, out].
    """
    _tensor("input", input)
    _tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    _floating("weight", weight)
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input must be [*, {weight.shape[1]}] to match weight {tuple(weight.shape)}, got shape {tuple(input.shape)}")
    _bool_mask("mask", mask, weight, "weight")
    _same_device("input", input, weight, "weight")
    if not torch.is_autocast_enabled(input.device.type):
        _same_dtype("input", input, weight, "weight")
    if bias is not None:
        _tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        _same_device("bias", bias, weight, "weight")
        _same_dtype("bias", bias, weight, "weight")
    dense_weight_grad = _flag("dense_weight_grad", dense_weight_grad)
    return reference.masked_linear(input, weight, mask, bias, dense_weight_grad)


# ---------------------------------------------------------------------------------- attack


def _dense_layout(t: torch.Tensor) -> bool:
    """Contiguous, or channels_last for 4-D / 5-D: each sample is one block."""
    if t.is_contiguous():
        return True
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return t.dim() in formats and t.is_contiguous(memory_format=formats[t.dim()])


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(s == 1 or sa == sb for s, sa, sb in zip(a.shape, a.stride(), b.stride()))


def sgd_kernel_fits(params: Sequence[torch.Tensor], momentum_buffers: Sequence[torch.Tensor]) -> bool:
    """Whether the compiled masked_sgd_step_ can take these lists. It walks each param, grad, buffer and
    mask as one linear range: params dense (contiguous or channels_last) on one device, buffers in their
    memory order (grads and masks it reorders itself)."""
    return use_kernel("masked_sgd_step_", params[0].device) and all(
        p.device == params[0].device and _dense_layout(p) and _same_layout(b, p)
        for p, b in zip(params, momentum_buffers)
    )


def _per_sample(name: str, value, delta: torch.Tensor) -> torch.Tensor:
    """eps/alpha as a tensor of shape () or (B,) on delta's device."""
    compute = torch.float64 if delta.dtype == torch.float64 else torch.float32
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        # Made on the device: a host-to-device copy would synchronise every step.
        return torch.full((), float(value), dtype=compute, device=delta.device)
    t = _tensor(name, value)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
    batch = delta.shape[0]
    if not (t.dim() == 0 or (t.dim() == 1 and t.shape[0] == batch)):
        raise ValueError(f"{name} must have shape () or ({batch},) (one value per sample), got {tuple(t.shape)}")
    if t.device != delta.device:
        if t.dim() == 0 and t.device.type == "cpu":
            return torch.full((), t.item(), dtype=compute, device=delta.device)
        raise ValueError(f"{name} must be on delta's device {delta.device} (or be a 0-dim CPU tensor), got {t.device}")
    return t


def pgd_step_(
    delta: torch.Tensor,
    x_adv: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    eps,
    alpha,
    lo: float = 0.0,
    hi: float = 1.0,
) -> None:
    """One L-inf PGD step, in place (one pass over memory with the extension)::

        d = clamp(delta + alpha * sign(grad), -eps, eps)
        x_adv[:] = clamp(x + d, lo, hi)
        delta[:] = x_adv - x

    Args:
        delta, x_adv: [B, ...], written in place; contiguous or channels_last,
            both with the same layout.
        x, grad: [B, ...], same shape, dtype (floating) and device as delta.
        eps, alpha: tensors of shape () or (B,) (per sample), or numbers. A negative
            alpha steps against the gradient (targeted attacks).
        lo, hi: valid pixel range.
    Arithmetic is float32 for float16/bfloat16 data. ``sign(NaN) = 0``: an element
    whose gradient is NaN does not move (as with ``grad.sign()`` in torch's PGD code),
    +-inf steps like +-1; kernels and reference agree (tests/test_ops_pgd.py).
    """
    for name, t in (("delta", delta), ("x_adv", x_adv), ("x", x), ("grad", grad)):
        _tensor(name, t)
    if delta.dim() < 1:
        raise ValueError(f"delta must be [B, ...] with a batch dimension, got shape {tuple(delta.shape)}")
    _floating("delta", delta)
    for name, t in (("x_adv", x_adv), ("x", x), ("grad", grad)):
        _same_shape(name, t, delta, "delta")
        _same_dtype(name, t, delta, "delta")
        _same_device(name, t, delta, "delta")
    if not _dense_layout(delta):
        raise ValueError(f"delta must be contiguous or channels_last (it is written in place), got strides {delta.stride()}")
    if not _same_layout(x_adv, delta):
        raise ValueError(f"x_adv must have delta's memory layout (strides {delta.stride()}), got strides {x_adv.stride()}")
    eps = _per_sample("eps", eps, delta)
    alpha = _per_sample("alpha", alpha, delta)
    lo = _real("lo", lo)
    hi = _real("hi", hi)
    if lo > hi:
        raise ValueError(f"lo must be <= hi, got lo={lo}, hi={hi}")
    with torch.no_grad():
        if use_kernel("pgd_step_", delta.device):
            torch.ops.dnr.pgd_step_(delta, x_adv, x, grad, eps, alpha, lo, hi)
        else:
            reference.pgd_step_(delta, x_adv, x, grad, eps, alpha, lo, hi)


# ---------------------------------------------------------------------------------- rewiring


def momentum_stats(momenta: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-layer momentum statistic for rewiring, deterministic.

    Args:
        momenta: L floating tensors (momentum buffers), all on one device.
        masks: L bool tensors, masks[l] of momenta[l]'s shape and device.
    Returns:
        float64 [L, 2] on that device: row l = (sum of |momenta[l]| where masks[l]
        is True, number of True in masks[l]). Mean |v| of active weights is
        row[0] / row[1].
    """
    momenta = _sequence("momenta", momenta)
    masks = _sequence("masks", masks)
    if len(momenta) != len(masks):
        raise ValueError(f"momenta and masks must have the same length, got {len(momenta)} and {len(masks)}")
    if not momenta:
        return torch.zeros(0, 2, dtype=torch.float64)
    for i, (m, k) in enumerate(zip(momenta, masks)):
        _tensor(f"momenta[{i}]", m)
        _floating(f"momenta[{i}]", m)
        _same_device(f"momenta[{i}]", m, momenta[0], "momenta[0]")
        _bool_mask(f"masks[{i}]", k, m, f"momenta[{i}]")
    if use_kernel("momentum_stats", momenta[0].device):
        return torch.ops.dnr.momentum_stats(momenta, masks)
    return reference.momentum_stats(momenta, masks)


# --------------------------------------------------------------------------------- optimizer


def masked_sgd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first_step: bool = False,
) -> None:
    """``torch.optim.SGD``'s step with dense momentum, then pruned weights zeroed.

    For each i (in place on params and momentum_buffers)::

        g = grads[i] + weight_decay * params[i]
        buf = g  if first_step  else  momentum * buf + (1 - dampening) * g
        d = g + momentum * buf  if nesterov  else  buf
        params[i] -= lr * d;  params[i] *= masks[i]

    With momentum == 0, d = g and the buffers are neither read nor written.

    Args:
        params, grads, momentum_buffers: lists of floating tensors; entry i of each
            has one shape, dtype and device. The buffers are pre-allocated and stay
            dense (pruned weights keep accumulating momentum).
        masks: bool tensors of params[i]'s shape and device.
        lr, momentum, dampening, weight_decay, nesterov: as torch.optim.SGD.
        first_step: the buffers hold no history yet (SGD's first step).
    """
    params = _sequence("params", params)
    grads = _sequence("grads", grads)
    momentum_buffers = _sequence("momentum_buffers", momentum_buffers)
    masks = _sequence("masks", masks)
    lengths = {len(params), len(grads), len(momentum_buffers), len(masks)}
    if len(lengths) != 1:
        raise ValueError(
            f"params, grads, momentum_buffers and masks must have the same length, got "
            f"{len(params)}, {len(grads)}, {len(momentum_buffers)} and {len(masks)}"
        )
    for i, p in enumerate(params):
        _tensor(f"params[{i}]", p)
        _floating(f"params[{i}]", p)
        for name, t in ((f"grads[{i}]", grads[i]), (f"momentum_buffers[{i}]", momentum_buffers[i])):
            _tensor(name, t)
            if t.is_sparse:
                raise ValueError(f"{name} must be a dense tensor, got layout {t.layout}")
            _same_shape(name, t, p, f"params[{i}]")
            _same_dtype(name, t, p, f"params[{i}]")
            _same_device(name, t, p, f"params[{i}]")
        _bool_mask(f"masks[{i}]", masks[i], p, f"params[{i}]")
    lr = _real("lr", lr, minimum=0.0)
    momentum = _real("momentum", momentum, minimum=0.0)
    dampening = _real("dampening", dampening)
    weight_decay = _real("weight_decay", weight_decay, minimum=0.0)
    nesterov = _flag("nesterov", nesterov)
    first_step = _flag("first_step", first_step)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"nesterov needs momentum > 0 and dampening == 0, got momentum={momentum}, dampening={dampening}")
    if not params:
        return
    args = (params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay, nesterov, first_step)
    with torch.no_grad():
        if sgd_kernel_fits(params, momentum_buffers):
            torch.ops.dnr.masked_sgd_step_(*args)
        else:
            reference.masked_sgd_step_(*args)


# ---------------------------------------------------------------------------- pooling


def max_pool2x2(input: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(input, 2)``: the maximum of each 2x2 window, stride 2, floor mode (a trailing odd row /
    column is dropped), in values and in gradient (each window's gradient goes to its first maximum, or to its
    last NaN, as torch routes it; double backward too).

    Args:
        input: [B, C, H, W], floating point, H and W >= 2.
    Returns:
        [B, C, H // 2, W // 2].

    The compiled CPU kernel (csrc/cpu/max_pool2x2.cpp: a sweep over pairs of input rows, AVX2 for float32; no
    argmax indices stored, the backward recomputes them) runs for contiguous NCHW CPU input. Elsewhere torch's
    own op runs: on CUDA (cuDNN), for channels_last input (ATen's vectorised channels-last kernel), under
    torch.compile (Inductor generates the pool itself) and inside ``torch.func`` transforms (the op has no
    vmap rule).
    """
    _tensor("input", input)
    if input.dim() != 4 or input.shape[-2] < 2 or input.shape[-1] < 2:
        raise ValueError(f"max_pool2x2: input must be [B, C, H, W] with H, W >= 2, got shape {tuple(input.shape)}")
    _floating("input", input)
    if (use_kernel("max_pool2x2", input.device) and input.is_contiguous() and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(input)):
        return torch.ops.dnr.max_pool2x2(input)
    return reference.max_pool2x2(input)


# ---------------------------------------------------------------------------- batch norm


def batch_norm_eval(input: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    eps: float = 1e-5) -> torch.Tensor:
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training=False, eps=eps)`` in values
    and gradients: BatchNorm in eval mode, each channel normalised with its running statistics (which are
    read, never updated), then scaled and shifted.

    Args:
        input: [N, C, *], floating point.
        running_mean, running_var: [C], not requiring grad (as torch's op asks).
        weight, bias: [C] or None.
        eps: added to running_var before the square root.
    Returns:
        [N, C, *], the input's layout.

    The compiled CPU kernel (csrc/cpu/batch_norm_eval.cpp) runs for float32 / float64 CPU input, contiguous
    or channels_last, with parameters of its dtype: its forward is ATen's, its input gradient
    ``(grad_output * invstd) * weight`` is ATen's bit for bit but skips the per-channel sums that ATen's
    backward computes for the weight and bias gradients whether or not they are needed (the case of
    attacks, which freeze the parameters). Elsewhere torch's op runs: on CUDA (cuDNN), for other dtypes,
    under torch.compile and inside ``torch.func`` transforms (the op has no vmap rule).
    """
    _tensor("input", input)
    if input.dim() < 2:
        raise ValueError(f"batch_norm_eval: input must be [N, C, *], got shape {tuple(input.shape)}")
    _floating("input", input)
    channels = input.shape[1]
    params = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    for name, value in params.items():
        if value is None and name in ("weight", "bias"):
            continue
        _tensor(name, value)
        if tuple(value.shape) != (channels,):
            raise ValueError(f"batch_norm_eval: {name} must have shape ({channels},) (the input's channels), "
                             f"got {tuple(value.shape)}")
    for name in ("running_mean", "running_var"):
        if params[name].requires_grad:
            raise ValueError(f"batch_norm_eval: {name} must not require grad (running statistics take no "
                             "gradient, as in F.batch_norm)")
    present = [v for v in params.values() if v is not None]
    if (use_kernel("batch_norm_eval", input.device) and input.dtype in (torch.float32, torch.float64)
            and (input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last))
            and all(v.dtype == input.dtype and v.device == input.device for v in present)
            and not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(input)):
        return torch.ops.dnr.batch_norm_eval(input, weight, bias, running_mean, running_var, eps)
    return reference.batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
