"""The one place where the Python side of the ``dnr::*`` operators is registered.

When the extension is loaded this module registers a fake (meta) kernel for every
op, so that ``torch.compile`` and ``torch.library.opcheck`` can trace them, and
records which (op, device) pairs have a compiled kernel that may be used. The
public wrappers in ``dnr.ops`` ask :func:`use_kernel` and otherwise run the
reference in ``dnr.reference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext

# Every op of csrc/dnr.cpp, plus masked_linear (reference only: it is one GEMM).
OPS = ("masked_conv2d", "masked_linear", "pgd_step_", "momentum_stats", "channel_norms", "masked_sgd_step_")
DEVICES = ("cpu", "cuda")

# Ops whose inputs may require grad: a compiled kernel is used only once its
# backward is registered here (register_autograd); until then the reference,
# whose autograd is PyTorch's, runs instead.
_NEEDS_AUTOGRAD = {"masked_conv2d"}
_AUTOGRAD_REGISTERED: set[str] = set()


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _masked_conv2d_fake(input, weight, mask, bias, stride, padding, dilation, groups, dense_weight_grad):
    b, _, h, w = input.shape
    o, _, kh, kw = weight.shape
    h_out = _conv_out(h, kh, stride[0], padding[0], dilation[0])
    w_out = _conv_out(w, kw, stride[1], padding[1], dilation[1])
    return input.new_empty((b, o, h_out, w_out))


def _masked_conv2d_backward_fake(grad_output, input, weight, mask, stride, padding, dilation, groups,
                                 dense_weight_grad, output_mask):
    return (
        input.new_empty(input.shape) if output_mask[0] else None,
        weight.new_empty(weight.shape) if output_mask[1] else None,
        weight.new_empty((weight.shape[0],)) if output_mask[2] else None,
    )


def _pgd_step_fake(delta, x_adv, x, grad, eps, alpha, lo, hi):
    return None


def _momentum_stats_fake(momenta: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]):
    return momenta[0].new_empty((len(momenta), 2), dtype=torch.float64)


def _channel_norms_fake(tensors: Sequence[torch.Tensor]):
    return tensors[0].new_empty((sum(t.shape[0] for t in tensors),), dtype=torch.float32)


def _masked_sgd_step_fake(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay, nesterov, first_step):
    return None


_FAKES = {
    "masked_conv2d": _masked_conv2d_fake,
    "masked_conv2d_backward": _masked_conv2d_backward_fake,
    "pgd_step_": _pgd_step_fake,
    "momentum_stats": _momentum_stats_fake,
    "channel_norms": _channel_norms_fake,
    "masked_sgd_step_": _masked_sgd_step_fake,
}


def _masked_conv2d_setup_context(ctx, inputs, output):
    input, weight, mask, bias, stride, padding, dilation, groups, dense_weight_grad = inputs
    ctx.save_for_backward(input, weight, mask)
    ctx.conv = (stride, padding, dilation, groups, dense_weight_grad)
    ctx.has_bias = bias is not None


def _masked_conv2d_autograd(ctx, grad_output):
    input, weight, mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_input, grad_weight, grad_bias = torch.ops.dnr.masked_conv2d_backward(
        grad_output, input, weight, mask, *ctx.conv, [need[0], need[1], ctx.has_bias and need[3]]
    )
    return grad_input, grad_weight, None, grad_bias, None, None, None, None, None


def _register_autograd() -> None:
    torch.library.register_autograd(
        "dnr::masked_conv2d", _masked_conv2d_autograd, setup_context=_masked_conv2d_setup_context
    )
    _AUTOGRAD_REGISTERED.add("masked_conv2d")


def _has_schema(op: str) -> bool:
    """An extension built from older sources may lack newer ops: those run their reference."""
    try:
        torch._C._dispatch_find_schema_or_throw(f"dnr::{op}", "")
    except RuntimeError:
        return False
    return True


def _register() -> dict[tuple[str, str], bool]:
    """Register the fakes; return {(op, device): whether its kernel is used}."""
    usable = {(op, device): False for op in OPS for device in DEVICES}
    if not _ext.loaded():
        return usable
    present = {op for op in _FAKES if _has_schema(op)}
    for op in present:
        torch.library.register_fake(f"dnr::{op}", _FAKES[op])
    if {"masked_conv2d", "masked_conv2d_backward"} <= present:
        _register_autograd()
    for op in OPS:
        if op not in present:
            continue
        ready = op not in _NEEDS_AUTOGRAD or op in _AUTOGRAD_REGISTERED
        for device in DEVICES:
            usable[op, device] = ready and _ext.has_kernel(op, device)
    return usable


# Computed once at import: a plain dict lookup keeps the wrappers traceable.
_USABLE = _register()


def use_kernel(op: str, device: torch.device) -> bool:
    """True when ``op`` on ``device`` runs the extension's kernel."""
    return _USABLE.get((op, device.type), False)


def backend() -> dict:
    """{op: {"cpu": impl, "cuda": impl}} with impl "extension" or "reference", plus
    "extension_loaded" (bool) and, when not loaded, "reason" (str)."""
    table: dict = {
        op: {device: "extension" if _USABLE[op, device] else "reference" for device in DEVICES}
        for op in OPS
    }
    table["extension_loaded"] = _ext.loaded()
    if not _ext.loaded():
        table["reason"] = _ext.reason()
    return table
