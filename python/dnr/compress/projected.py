"""Build the projected network of a :class:`~dnr.compress.spaces.SpacePlan` for given projections.

For a projected space with P (c x r, orthonormal columns):

- each producer's weight W [c, ...] and bias b, with its BatchNorm folded in (eval form
  ``y = s * x + t``: W_f = s W, b_f = s b + t), become P^T W_f [r, ...] and P^T b_f; the BatchNorm is
  removed from the graph;
- each consumer's weight V [o, c, ...] becomes V P [o, r, ...]; a linear consumer reading the space
  flattened ([B, c*H*W], channel-major) has V viewed as [o, c, H*W] and multiplied along c.

Channel-wise ops between the pair then act on the r projected channels. That is exact for pooling,
dropout and any P that is a permutation, and an approximation for the activations (a ReLU does not
commute with a rotation), which the projection's training and the fine-tuning compensate.

``keep_norms`` keeps a fresh BatchNorm on the r projected channels of the named norms (still folded
into the weights first) instead of removing it; :func:`calibrate_norms` sets its statistics and affine
so that it is the identity on the calibration data. The network then computes the same function, but
fine-tuning it trains with the normalisation the dense model had: without it, the folded network's
weights carry the BatchNorm's scales, and SGD at the dense model's learning rate can diverge within a
few steps (docs/cap/README.md, "Fine-tuning with the BatchNorms kept").

Two forms: :func:`build_projected` with ``differentiable=True`` gives :class:`ProjectedLayer` modules
that recompute their weights from the shared projection tensors at every call (for training the
projections); ``False`` gives plain ``nn.Conv2d`` / ``nn.Linear`` layers holding the products (the
result that is trained on and exported).
"""

from __future__ import annotations

import copy
from typing import Collection, Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn.channel_graph import replace_with_flatten
from .spaces import ProjectionError, SpacePlan

__all__ = ["ProjectedLayer", "build_projected", "calibrate_norms", "folded_weight", "predict_cost", "layer_flops"]


@torch.no_grad()
def folded_weight(layer: nn.Module, norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer``'s weight and bias with the eval-mode BatchNorm ``norm`` folded in (copies).

    Returns (W [out, ...], b [out] or None when the layer has no bias and there is no norm)."""
    w = layer.weight.detach().clone()
    b = layer.bias.detach().clone() if layer.bias is not None else None
    if norm is None:
        return w, b
    s = norm.running_var.detach().add(norm.eps).rsqrt()
    if norm.weight is not None:
        s = s * norm.weight.detach()
    t = -norm.running_mean.detach() * s
    if norm.bias is not None:
        t = t + norm.bias.detach()
    w = w * s.view(-1, *([1] * (w.dim() - 1)))
    b = t if b is None else b * s + t
    return w, b


def _project(w: torch.Tensor, b: torch.Tensor | None, p_out: torch.Tensor | None, p_in: torch.Tensor | None,
             hw: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(P_out^T W P_in, P_out^T b): the output side along dim 0, the input side along dim 1 (a flattened
    input [c*hw] viewed as [c, hw])."""
    if p_in is not None:
        if w.dim() == 2 and hw > 1:
            o = w.shape[0]
            w = torch.einsum("och,cr->orh", w.view(o, -1, hw), p_in).reshape(o, -1)
        else:
            w = torch.einsum("oi...,ir->or...", w, p_in)
    if p_out is not None:
        w = torch.einsum("o...,or->r...", w, p_out)
        b = b @ p_out if b is not None else None
    return w, b


class ProjectedLayer(nn.Module):
    """A conv or linear layer whose weight is P_out^T W P_in, recomputed from the shared projection
    tensors at every call (gradients reach the projections; W and b are fixed buffers).

    Shapes: conv [B, r_in, H, W] -> [B, r_out, H', W']; linear [B, r_in * hw] -> [B, r_out].
    """

    def __init__(self, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                 p_out: torch.Tensor | None, p_in: torch.Tensor | None, hw: int):
        super().__init__()
        self.register_buffer("base_weight", weight)
        self.register_buffer("base_bias", bias)
        self.p_out, self.p_in, self.hw = p_out, p_in, hw
        self.conv = copy.deepcopy(layer) if isinstance(layer, nn.Conv2d) else None
        if self.conv is not None:  # only its hyper-parameters are used
            del self.conv.weight, self.conv.bias

    def projected(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the projected layer."""
        return _project(self.base_weight, self.base_bias, self.p_out, self.p_in, self.hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.projected()
        if self.conv is None:
            return F.linear(x, w, b)
        c = self.conv
        if c.padding_mode != "zeros":
            x = F.pad(x, c._reversed_padding_repeated_twice, mode=c.padding_mode)
            return F.conv2d(x, w, b, c.stride, 0, c.dilation, c.groups)
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def to_plain(self) -> nn.Module:
        """A plain ``nn.Conv2d`` / ``nn.Linear`` holding the current projected weight and bias."""
        with torch.no_grad():
            w, b = self.projected()
            if self.conv is None:
                new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            else:
                c = self.conv
                new = nn.Conv2d(w.shape[1], w.shape[0], c.kernel_size, stride=c.stride, padding=c.padding,
                                dilation=c.dilation, groups=c.groups, bias=b is not None, padding_mode=c.padding_mode,
                                device=w.device, dtype=w.dtype)
            new.weight.copy_(w)
            if b is not None:
                new.bias.copy_(b)
        return new



def build_projected(plan: SpacePlan, projections: Mapping[str, torch.Tensor], *,
                    differentiable: bool = False, keep_norms: Collection[str] = ()) -> fx.GraphModule:
    """The network of ``plan`` with each space in ``projections`` (space name -> P [c, r]) projected.

    Spaces not in ``projections`` keep their layers and BatchNorms as they are. The returned
    GraphModule has the model's submodule names (projected BatchNorms removed, except those named in
    ``keep_norms``: each is folded all the same and replaced by a fresh BatchNorm of its type on the r
    projected channels, with its eps and momentum; set its statistics with :func:`calibrate_norms`),
    eval mode, and input [B, *input_size] -> the model's output. ``differentiable=True`` keeps
    :class:`ProjectedLayer`s that read the given tensors (train them, then call again with False for
    plain layers).
    """
    gm = copy.deepcopy(plan.gm)
    modules = dict(plan.gm.named_modules())
    touched: set[str] = set()
    for name, p in projections.items():
        space = plan.spaces[name]
        touched.update(space.producers)
        touched.update(space.consumers)
    for layer in sorted(touched):
        out_space = plan.output_space.get(layer)
        in_space = plan.input_space.get(layer)
        p_out = projections.get(out_space) if out_space is not None else None
        p_in = projections.get(in_space) if in_space is not None else None
        norm_name = plan.spaces[out_space].norms.get(layer) if p_out is not None else None
        w, b = folded_weight(modules[layer], modules[norm_name] if norm_name else None)
        hw = plan.spaces[in_space].flat.get(layer, 1) if p_in is not None else 1
        new = ProjectedLayer(modules[layer], w, b, p_out, p_in, hw)
        gm.set_submodule(layer, new if differentiable else new.to_plain())
    graph = gm.graph
    folded = plan.folded_norms(projections)  # norm -> its projected space
    unknown = sorted(set(keep_norms) - set(folded))
    if unknown:
        raise ProjectionError(f"build_projected: keep_norms names {unknown[0]!r}, which is not the BatchNorm of a "
                              f"projected producer (those are: {sorted(folded)})")
    for norm in keep_norms:
        old = modules[norm]
        if not isinstance(old, (nn.BatchNorm1d, nn.BatchNorm2d)) or not old.affine or not old.track_running_stats:
            raise ProjectionError(f"build_projected: keep_norms names {norm!r}, a {type(old).__name__}; expected an "
                                  "affine BatchNorm1d / BatchNorm2d that tracks running statistics")
        rank = projections[folded[norm]].shape[1]
        ref = old.running_mean
        gm.set_submodule(norm, type(old)(rank, eps=old.eps, momentum=old.momentum, device=ref.device, dtype=ref.dtype))
    removed = set(folded) - set(keep_norms)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in removed:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op in ("call_method", "call_function") and (node.op, node.target) in {
                ("call_method", "view"), ("call_method", "reshape"), ("call_function", torch.reshape)}:
            # a view with literal channel counts would break on fewer channels: flatten instead
            shape = node.meta.get("dnr_shape")
            src = node.args[0].meta.get("dnr_shape") if isinstance(node.args[0], fx.Node) else None
            if shape is not None and src is not None and len(shape) == 2 and shape[0] == src[0]:
                replace_with_flatten(graph, node)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval()


@torch.no_grad()
def calibrate_norms(net: nn.Module, names: Collection[str], x: torch.Tensor) -> None:
    """Make each named BatchNorm of ``net`` the identity on the batch ``x`` [N, *input_size], in place.

    One eval-mode pass over ``x``: each norm, just before it runs, takes its input's per-channel mean m and
    (biased) variance v over the batch (and the pixels) as its running statistics, weight sqrt(v + eps)
    and bias m. Its eval output then equals its input exactly, so ``net`` computes what it computed
    without the norms, and in training mode a batch like ``x`` passes nearly unchanged. Layers are met in
    the order the forward pass runs them, so each norm sees the inputs the calibrated network gives it.
    """
    reached: set[str] = set()

    def calibrate(module, args, name):
        reached.add(name)
        a = args[0]
        dims = [0, *range(2, a.dim())]
        var, mean = torch.var_mean(a, dim=dims, correction=0)
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
        module.weight.copy_((var + module.eps).sqrt())
        module.bias.copy_(mean)
        module.num_batches_tracked.zero_()

    was = net.training
    handles = [net.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: calibrate(module, args, name)) for name in names]
    try:
        net.eval()(x)
    finally:
        for h in handles:
            h.remove()
        net.train(was)
    missed = sorted(set(names) - reached)
    if missed:  # left as it was: not the identity, so the network would not compute what it did
        raise ProjectionError(f"calibrate_norms: {missed[0]!r} did not run in the forward pass over x, so it "
                              "could not be calibrated")


def layer_flops(module: nn.Module, out_shape: tuple, in_channels: int, out_channels: int) -> int:
    """2 x multiply-accumulates of one example through a conv / linear layer with ``in_channels`` inputs
    (features, for a linear layer) and ``out_channels`` outputs; ``out_shape`` is its output shape."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return 2 * out_channels * (in_channels // module.groups) * kh * kw * out_shape[2] * out_shape[3]
    return 2 * out_channels * in_channels


def predict_cost(plan: SpacePlan, ranks: Mapping[str, int], keep_norms: Collection[str] = ()) -> dict:
    """FLOPs per example and parameters of the network projected to ``ranks`` (space name -> r), from the
    shapes alone; the norms named in ``keep_norms`` count as kept on the r channels (see build_projected).
    Returns ``{"flops", "params", "flops_dense", "params_dense", "layers": {name: {...}}}``; FLOPs count
    the conv and linear layers (2 x multiply-accumulates), parameters count every parameter.
    """
    modules = dict(plan.gm.named_modules())
    nodes = {n.target: n for n in plan.gm.graph.nodes if n.op == "call_module"}
    folded = plan.folded_norms(ranks)
    params = sum(p.numel() for p in plan.gm.parameters())
    params_dense, flops, flops_dense, layers = params, 0, 0, {}
    for name, m in modules.items():
        if name in folded:
            params -= sum(p.numel() for p in m.parameters(recurse=False))
            if name in keep_norms:
                params += 2 * ranks[folded[name]]  # the kept norm's weight and bias on r channels
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or name not in nodes:
            continue
        out_shape = nodes[name].meta["dnr_shape"]
        c_out = m.weight.shape[0]
        c_in = m.weight.shape[1] * (m.groups if isinstance(m, nn.Conv2d) else 1)
        out_space, in_space = plan.output_space.get(name), plan.input_space.get(name)
        r_out = ranks.get(out_space, c_out) if out_space is not None else c_out
        r_in = c_in
        if in_space is not None and in_space in ranks:
            hw = plan.spaces[in_space].flat.get(name, 1)
            r_in = ranks[in_space] * hw
        k = m.weight[0, 0].numel() if isinstance(m, nn.Conv2d) else 1
        groups = m.groups if isinstance(m, nn.Conv2d) else 1
        has_bias = m.bias is not None or (out_space in ranks and name in plan.spaces[out_space].norms)
        new_params = r_out * (r_in // groups) * k + (r_out if has_bias else 0)
        params += new_params - sum(p.numel() for p in m.parameters(recurse=False))
        f_dense = layer_flops(m, out_shape, c_in, c_out)
        f = layer_flops(m, out_shape, r_in, r_out)
        flops, flops_dense = flops + f, flops_dense + f_dense
        layers[name] = {"in": r_in, "out": r_out, "flops": f, "flops_dense": f_dense, "params": new_params}
    return {"flops": flops, "params": params, "flops_dense": flops_dense, "params_dense": params_dense,
            "layers": layers}
