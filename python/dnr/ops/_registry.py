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
OPS = ("masked_conv2d", "masked_linear", "pgd_step_", "momentum_stats", "masked_sgd_step_", "max_pool2x2",
       "batch_norm_eval")
DEVICES = ("cpu", "cuda")

# Ops whose inputs may require grad (the keys of _AUTOGRAD below): a compiled kernel
# is used only once its backward is registered (register_autograd); until then the
# reference, whose autograd is PyTorch's, runs instead.
_AUTOGRAD_REGISTERED: set[str] = set()


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _is_channels_last(t: torch.Tensor) -> bool:
    """Strictly channels_last (a tensor whose strides are also contiguous is not)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def conv_memory_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """Layout of dnr::masked_conv2d's output and of its input/weight gradients:
    channels_last when input or weight is, else contiguous. The kernels
    (csrc/masked_conv2d.cpp, conv_layout) apply the same rule on every path."""
    return torch.channels_last if _is_channels_last(input) or _is_channels_last(weight) else torch.contiguous_format


def _empty(shape, like: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


def _masked_conv2d_fake(input, weight, mask, bias, stride, padding, dilation, groups, dense_weight_grad):
    b, _, h, w = input.shape
    o, _, kh, kw = weight.shape
    h_out = _conv_out(h, kh, stride[0], padding[0], dilation[0])
    w_out = _conv_out(w, kw, stride[1], padding[1], dilation[1])
    return _empty((b, o, h_out, w_out), input, conv_memory_format(input, weight))


def _masked_conv2d_backward_fake(grad_output, input, weight, mask, stride, padding, dilation, groups,
                                 dense_weight_grad, output_mask):
    layout = conv_memory_format(input, weight)
    return (
        _empty(input.shape, input, layout) if output_mask[0] else None,
        _empty(weight.shape, weight, layout) if output_mask[1] else None,
        weight.new_empty((weight.shape[0],)) if output_mask[2] else None,
    )


def _pgd_step_fake(delta, x_adv, x, grad, eps, alpha, lo, hi):
    return None


def _momentum_stats_fake(momenta: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]):
    return momenta[0].new_empty((len(momenta), 2), dtype=torch.float64)


def _masked_sgd_step_fake(params, grads, momentum_buffers, masks, lr, momentum, dampening, weight_decay, nesterov, first_step):
    return None


def _max_pool2x2_fake(input):
    b, c, h, w = input.shape
    return input.new_empty((b, c, h // 2, w // 2))


def _max_pool2x2_backward_fake(grad_output, input):
    return input.new_empty(input.shape)


def _batch_norm_eval_fake(input, weight, bias, running_mean, running_var, eps):
    # ATen's native_batch_norm: the output takes the input's suggested layout
    layout = torch.channels_last if _is_channels_last(input) else torch.contiguous_format
    return _empty(input.shape, input, layout)


def _batch_norm_eval_backward_fake(grad_output, weight, running_var, eps):
    layout = torch.channels_last if _is_channels_last(grad_output) else torch.contiguous_format
    return _empty(grad_output.shape, grad_output, layout)


_FAKES = {
    "masked_conv2d": _masked_conv2d_fake,
    "masked_conv2d_backward": _masked_conv2d_backward_fake,
    "pgd_step_": _pgd_step_fake,
    "momentum_stats": _momentum_stats_fake,
    "masked_sgd_step_": _masked_sgd_step_fake,
    "max_pool2x2": _max_pool2x2_fake,
    "max_pool2x2_backward": _max_pool2x2_backward_fake,
    "batch_norm_eval": _batch_norm_eval_fake,
    "batch_norm_eval_backward": _batch_norm_eval_backward_fake,
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


def _masked_conv2d_backward_setup_context(ctx, inputs, output):
    grad_output, input, weight, mask, stride, padding, dilation, groups, dense_weight_grad, output_mask = inputs
    ctx.save_for_backward(grad_output, input, weight, mask)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.dense_weight_grad = dense_weight_grad


def _masked_conv2d_double_backward(ctx, grad_grad_input, grad_grad_weight, grad_grad_bias):
    """Backward of masked_conv2d_backward, so that create_graph=True (gradient penalties,
    Hessian-vector products) differentiates the kernel path exactly as it does the reference.

    With w = weight * mask, the backward computes gi = conv_input_grad(go, w),
    gw = conv_weight_grad(x, go) (times mask unless dense) and gb = go.sum((0, 2, 3)), each
    linear in each argument; the adjoints of those maps are convolutions again. Written with
    ATen's differentiable convolution ops, so higher orders work too. As in the reference,
    d(w)/d(weight) is the identity when dense_weight_grad (else mask).
    """
    grad_output, input, weight, mask = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    dense = ctx.dense_weight_grad
    need_go, need_x, need_w = ctx.needs_input_grad[:3]
    w = weight * mask
    # the weight gradient's cotangent, as a cotangent of the effective weight's gradient
    ggw = grad_grad_weight if grad_grad_weight is None or dense else grad_grad_weight * mask
    conv = lambda x, k: torch.ops.aten.convolution(x, k, None, stride, padding, dilation, False, [0, 0], groups)  # noqa: E731

    def conv_backward(go, x, k, need_input, need_weight):
        return torch.ops.aten.convolution_backward(
            go, x, k, None, stride, padding, dilation, False, [0, 0], groups, [need_input, need_weight, False]
        )

    d_go = d_x = d_w = None
    if need_go:
        terms = []
        if grad_grad_input is not None:
            terms.append(conv(grad_grad_input, w))
        if ggw is not None:
            terms.append(conv(input, ggw))
        if grad_grad_bias is not None:
            terms.append(grad_grad_bias.view(1, -1, 1, 1).expand_as(grad_output))
        d_go = sum(terms[1:], terms[0]) if terms else None
    if need_x and ggw is not None:
        d_x = conv_backward(grad_output, input, ggw, True, False)[0]
    if need_w and grad_grad_input is not None:
        d_w = conv_backward(grad_output, grad_grad_input, w, False, True)[1]
        d_w = d_w if dense else d_w * mask
    return d_go, d_x, d_w, None, None, None, None, None, None, None


def _max_pool2x2_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _max_pool2x2_autograd(ctx, grad_output):
    (input,) = ctx.saved_tensors
    return torch.ops.dnr.max_pool2x2_backward(grad_output, input)


def _max_pool2x2_backward_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _max_pool2x2_double_backward(ctx, grad_grad_input):
    """The backward is linear in grad_output (it places it at each window's argmax), so its adjoint
    reads grad_grad_input at those positions; piecewise constant in input (no gradient), as ATen's
    max_pool2d_with_indices_backward. The argmax comes from ATen's forward, whose rule the kernel
    follows (csrc/cpu/max_pool2x2.cpp): a rare path (Hessian-vector products), kept simple."""
    (input,) = ctx.saved_tensors
    _, indices = torch.ops.aten.max_pool2d_with_indices(input, [2, 2], [2, 2])
    d_go = grad_grad_input.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)
    return d_go, None


def _channel_dims(t: torch.Tensor) -> list[int]:
    """The dims a per-channel reduction sums over: all but dim 1 of [N, C, *]."""
    return [0, *range(2, t.dim())]


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[C] -> broadcastable against [N, C, *]."""
    return v.view(1, -1, *([1] * (like.dim() - 2)))


def _invstd(running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(running_var + eps), computed in float64 and rounded once, as the kernel and ATen do."""
    return (1 / (running_var.double() + eps).sqrt()).to(running_var.dtype)


def _batch_norm_eval_setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, eps = inputs
    ctx.save_for_backward(input, weight, running_mean, running_var)
    ctx.eps = eps
    ctx.has_bias = bias is not None


def _batch_norm_eval_autograd(ctx, grad_output):
    """Input gradient by the kernel; the weight and bias gradients (rare here: the fast path is for frozen
    parameters) by torch ops. The running statistics take no gradient, as in F.batch_norm, which refuses
    running statistics that require grad (the wrapper sends those to it)."""
    input, weight, running_mean, running_var = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_input = grad_weight = grad_bias = None
    if need[0]:
        grad_input = torch.ops.dnr.batch_norm_eval_backward(grad_output, weight, running_var, ctx.eps)
    if weight is not None and need[1]:
        x_hat = (input - _per_channel(running_mean, input)) * _per_channel(_invstd(running_var, ctx.eps), input)
        grad_weight = (grad_output * x_hat).sum(_channel_dims(grad_output))
    if ctx.has_bias and need[2]:
        grad_bias = grad_output.sum(_channel_dims(grad_output))
    return grad_input, grad_weight, grad_bias, None, None, None


def _batch_norm_eval_backward_setup_context(ctx, inputs, output):
    grad_output, weight, running_var, eps = inputs
    ctx.save_for_backward(grad_output, weight, running_var)
    ctx.eps = eps


def _batch_norm_eval_double_backward(ctx, grad_grad_input):
    """The backward is (grad_output * invstd) * weight per channel: linear in grad_output (its adjoint is the
    same scaling) and in weight (its adjoint sums grad_output * invstd * grad_grad_input per channel)."""
    grad_output, weight, running_var = ctx.saved_tensors
    need_go, need_w = ctx.needs_input_grad[:2]
    d_go = d_w = None
    if need_go:
        d_go = torch.ops.dnr.batch_norm_eval_backward(grad_grad_input, weight, running_var, ctx.eps)
    if weight is not None and need_w:
        scaled = grad_output * _per_channel(_invstd(running_var, ctx.eps), grad_output)
        d_w = (scaled * grad_grad_input).sum(_channel_dims(grad_output))
    return d_go, d_w, None, None


# op -> ((backward, setup_context), (double backward, its setup_context)): each op that takes gradients has a
# dnr::<op>_backward op whose own autograd is the double backward (create_graph=True: gradient penalties,
# Hessian-vector products).
_AUTOGRAD = {
    "masked_conv2d": ((_masked_conv2d_autograd, _masked_conv2d_setup_context),
                      (_masked_conv2d_double_backward, _masked_conv2d_backward_setup_context)),
    "max_pool2x2": ((_max_pool2x2_autograd, _max_pool2x2_setup_context),
                    (_max_pool2x2_double_backward, _max_pool2x2_backward_setup_context)),
    "batch_norm_eval": ((_batch_norm_eval_autograd, _batch_norm_eval_setup_context),
                        (_batch_norm_eval_double_backward, _batch_norm_eval_backward_setup_context)),
}


def _register_autograd(op: str) -> None:
    (backward, setup), (double_backward, double_setup) = _AUTOGRAD[op]
    torch.library.register_autograd(f"dnr::{op}", backward, setup_context=setup)
    torch.library.register_autograd(f"dnr::{op}_backward", double_backward, setup_context=double_setup)
    _AUTOGRAD_REGISTERED.add(op)


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
    for op in _AUTOGRAD:
        if {op, f"{op}_backward"} <= present:
            _register_autograd(op)
    for op in OPS:
        if op not in present:
            continue
        ready = op not in _AUTOGRAD or op in _AUTOGRAD_REGISTERED
        for device in DEVICES:
            usable[op, device] = ready and _ext.has_kernel(op, device)
    return usable


# Computed once at import: a plain dict lookup keeps the wrappers traceable.
_USABLE = _register()


def use_kernel(op: str, device: torch.device) -> bool:
    """True when ``op`` on ``device`` runs the extension's kernel: built and registered
    and, on a GPU, with a kernel image for that GPU's architecture."""
    if not _USABLE.get((op, device.type), False):
        return False
    if device.type == "cuda":
        return _ext.cuda_kernels_run_on(device.index if device.index is not None else torch.cuda.current_device())
    return True


def backend() -> dict:
    """{op: {"cpu": impl, "cuda": impl}} with impl "extension" or "reference", plus
    "extension_loaded" (bool) and, when not loaded, "reason" (str). With a GPU, "cuda"
    is for the current one (the reference runs on a GPU the binary has no image for)."""
    gpu = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    runs = {("cpu", op): use_kernel(op, torch.device("cpu")) for op in OPS}
    runs |= {("cuda", op): use_kernel(op, gpu) if gpu is not None else _USABLE[op, "cuda"] for op in OPS}
    table: dict = {
        op: {device: "extension" if runs[device, op] else "reference" for device in DEVICES}
        for op in OPS
    }
    table["extension_loaded"] = _ext.loaded()
    if not _ext.loaded():
        table["reason"] = _ext.reason()
    return table
