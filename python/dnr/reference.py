"""Pure-PyTorch implementations of every dnr op.

They run wherever the extension has no kernel (see ``dnr.ops.backend()``) and define
what the kernels must compute. They take the arguments already checked and
normalised by the public wrappers in ``dnr.ops``; call those, not these.

Shapes: B batch, C/O input/output channels, H/W spatial, kH/kW kernel size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# momentum_stats sums in blocks of this many elements, then sums the block sums:
# a fixed summation tree, so the result does not depend on the thread count.
_SUM_CHUNK = 16384


def _effective_weight(weight: torch.Tensor, mask: torch.Tensor, dense_weight_grad: bool) -> torch.Tensor:
    """weight * mask in value. Its gradient reaches ``weight`` at every position
    (identity, "dense") when dense_weight_grad, else only where mask is True."""
    if dense_weight_grad:
        # weight - (weight where pruned): exactly weight * mask, and the subtracted
        # part is detached, so d(out)/d(weight) is the identity.
        return weight - torch.where(mask, 0, weight).detach()
    return weight * mask


def masked_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    dense_weight_grad: bool,
) -> torch.Tensor:
    """conv2d(input, weight * mask, bias, ...).

    input [B, C, H, W]; weight and mask (bool) [O, C/groups, kH, kW]; bias [O] or None.
    Returns [B, O, H_out, W_out]. The gradient wrt weight is dense (the gradient wrt
    the effective weight, pruned positions included) when dense_weight_grad, else
    masked.
    """
    w = _effective_weight(weight, mask, dense_weight_grad)
    return F.conv2d(input, w, bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def masked_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None,
    dense_weight_grad: bool,
) -> torch.Tensor:
    """linear(input, weight * mask, bias).

    input [*, in]; weight and mask (bool) [out, in]; bias [out] or None. Returns
    [*, out]. Weight gradient dense or masked as in masked_conv2d.
    """
    return F.linear(input, _effective_weight(weight, mask, dense_weight_grad), bias)


def pgd_step_(
    delta: torch.Tensor,
    x_adv: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    eps: torch.Tensor,
    alpha: torch.Tensor,
    lo: float,
    hi: float,
) -> None:
    """One L-inf PGD step, in place on delta and x_adv.

    delta, x_adv, x, grad [B, ...], one dtype; eps, alpha [] or [B] (per sample).
        d = clamp(delta + alpha * sign(grad), -eps, eps)
        x_adv[:] = clamp(x + d, lo, hi)
        delta[:] = x_adv - x
    Arithmetic in float32 for float16/bfloat16 data (in the data's dtype otherwise);
    delta is computed from x_adv after rounding, so x + delta == x_adv. sign(NaN) is
    0 (an element with a NaN gradient does not move), as in the kernels.
    """
    compute = torch.promote_types(delta.dtype, torch.float32)
    view = (-1,) + (1,) * (delta.dim() - 1)  # [B] -> [B, 1, ...]; [] stays []
    e = eps.to(device=delta.device, dtype=compute)
    a = alpha.to(device=delta.device, dtype=compute)
    if e.dim() == 1:
        e = e.view(view)
    if a.dim() == 1:
        a = a.view(view)
    xc = x.to(compute)
    g = grad.to(compute)
    # sign with sign(NaN) = 0 written out, as the kernels compute it: torch.sign's NaN
    # result is not part of its documented contract.
    sign = (g > 0).to(compute) - (g < 0).to(compute)
    step = delta.to(compute) + a * sign
    d = torch.minimum(torch.maximum(step, -e), e)
    x_adv.copy_(torch.clamp(xc + d, lo, hi))
    delta.copy_(x_adv.to(compute) - xc)


def _deterministic_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a 1-D float64 tensor along a fixed tree (blocks, then block sums)."""
    pad = (-values.numel()) % _SUM_CHUNK
    blocks = F.pad(values, (0, pad)).view(-1, _SUM_CHUNK)
    return blocks.sum(dim=1).sum()


def momentum_stats(momenta: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-layer momentum statistic of the rewiring step.

    momenta[l] any shape, floating; masks[l] bool, same shape. Returns float64 [L, 2]
    on momenta[0]'s device: row l = (sum of |momenta[l]| where masks[l] is True,
    number of True in masks[l]). Deterministic: fixed summation order in float64.
    """
    if len(momenta) == 0:
        return torch.zeros(0, 2, dtype=torch.float64)
    rows = []
    for m, k in zip(momenta, masks):
        active = torch.where(k, m.abs(), 0).to(torch.float64).reshape(-1)
        rows.append(torch.stack([_deterministic_sum(active), k.sum().to(torch.float64)]))
    return torch.stack(rows).to(momenta[0].device)


def masked_sgd_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    first_step: bool,
) -> None:
    """torch.optim.SGD's step with dense momentum, then pruned weights set to zero.

    params[i], grads[i], momentum_buffers[i] one shape and dtype; masks[i] bool, same
    shape. In place on params and momentum_buffers; for each i:
        g = grads[i] + weight_decay * params[i]
        buf = g                                        if first_step
        buf = momentum * buf + (1 - dampening) * g     otherwise
        d = g + momentum * buf if nesterov else buf
        params[i] -= lr * d;  params[i] *= masks[i]
    With momentum == 0, d = g and the buffers are neither read nor written.
    The buffers are never masked: pruned weights keep accumulating momentum.
    The op sequence is SGD's own (foreach=False), so results match it bit for bit.
    """
    with torch.no_grad():
        for p, grad, buf, mask in zip(params, grads, momentum_buffers, masks):
            g = grad if weight_decay == 0 else grad.add(p, alpha=weight_decay)
            if momentum != 0 and first_step:
                buf.copy_(g)
            elif momentum != 0:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            if momentum == 0:
                d = g  # SGD without momentum ignores the buffer
            elif nesterov:
                d = g.add(buf, alpha=momentum)
            else:
                d = buf
            p.add_(d, alpha=-lr)
            p.mul_(mask)


def max_pool2x2(input: torch.Tensor) -> torch.Tensor:
    """max_pool2d(input, 2): input [B, C, H, W] -> [B, C, H // 2, W // 2]; torch's op, whose argmax rule
    (the first maximum of a window, the last NaN) sets where the gradient goes."""
    return F.max_pool2d(input, 2)


def batch_norm_eval(input: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm in eval mode: input [N, C, *] normalised per channel with the running statistics [C] (which
    are not updated), then scaled by weight [C] and shifted by bias [C]; torch's op."""
    return F.batch_norm(input, running_mean, running_var, weight, bias, training=False, eps=eps)
