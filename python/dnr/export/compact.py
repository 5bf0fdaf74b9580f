"""Exact channel compaction: turn a channel-pruned masked model into a physically smaller dense model.

``compact_model(model, input_size)`` traces ``model`` with torch.fx (masked layers and ``Normalize`` are
leaves), finds for every tensor which channels (dim 1) can be non-zero, and rebuilds the graph with
plain ``nn.Conv2d`` / ``nn.Linear`` / norm layers that hold only those channels. In eval mode the result
computes the same function (up to float summation order): every channel that is removed is exactly
zero in the masked model.

Design (two passes over the fx graph):

1. *Liveness.* ``live[n]`` is a bool vector over dim 1 of node ``n``: channel ``c`` may be non-zero.
   A conv/linear output channel is live when its (mask-)active weights read a live input channel or its
   bias is non-zero; BatchNorm ``y = s*x + t`` (eval) keeps a channel live when ``s != 0`` and the input
   is live, or ``t != 0``; GroupNorm works per group; zero-preserving ops (ReLU, pooling, dropout, ...)
   keep the set; a residual ``a + b`` is the union; ``cat`` concatenates; flatten maps channel ``c`` to
   features ``c*HW .. (c+1)*HW - 1``.
2. *Emission.* ``emit[n] ⊇ live[n]`` is the set of channels the compacted tensor physically holds.
   Convs, linears and residual adds choose it freely (= live, plus channels a consumer requires);
   every other op inherits its input's set and, where it needs more (a norm layer that turns a zero
   channel into a constant, a GroupNorm that needs whole groups, the network output that keeps every
   logit), pushes the requirement up to its producer, which then emits that channel as an exact zero
   channel. The loop runs to a fixed point.

Residual connections: each branch of ``a + b`` computes only its own live channels; the sum is over the
union ``emit[a+b] = live[a] | live[b]``, and an operand whose set differs is scattered into the union
layout by :class:`ExpandChannels` (a zero-padded ``index_select``) before the add. So a channel pruned
in ``conv2`` but live in the shortcut costs no weights in ``conv2``, and the parameter count of the
compacted model equals the effective count of :func:`dnr.nn.density_report`.

Anything the analysis does not model and that receives pruned channels (a grouped conv, a slice, an
elementwise product of two activations, ...) raises :class:`CompactionError` naming the node and why;
with ``strict=False`` such ops get every channel instead (correct, less compact).
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn

from ..nn.channel_graph import (ADD_FUNCTIONS, CHANNELWISE_FUNCTIONS, CHANNELWISE_METHODS, CHANNELWISE_MODULES,
                                FLATTEN_LIKE, MEAN_LIKE, ZERO_PRESERVING_FUNCTIONS, ZERO_PRESERVING_METHODS,
                                ZERO_PRESERVING_MODULES, node_channels, node_shape, replace_with_flatten,
                                trace_with_shapes)
from ..nn.masked import MaskedLayer

__all__ = ["CompactionError", "ExpandChannels", "compact_model", "check_channel_structure"]


class CompactionError(ValueError):
    """The model cannot be compacted; the message names the layer (fx node) and the reason."""


class ExpandChannels(nn.Module):
    """Scatter the channels of a compacted tensor into a larger channel layout, zeros elsewhere.

    Shapes: ``x`` [B, C_in, *] -> [B, len(index), *]; ``index[j]`` is the input channel that lands at
    output channel ``j``, or ``C_in`` for an all-zero channel.
    """

    index: torch.Tensor

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.to(torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(x.narrow(1, 0, 1))
        return torch.cat([x, zero], 1).index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"out_channels={self.index.numel()}"







def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if node_channels(a) is not None]


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"fx node {node.name!r} ({node.op} {target})"


def check_channel_structure(model: nn.Module) -> None:
    """Raise CompactionError unless every masked layer prunes whole output channels.

    A layer in irregular mode (``sparsity_mode == "irregular"``) or whose mask has an output channel
    that is only partly active cannot be compacted by removing channels.
    """
    for name, m in model.named_modules():
        if not isinstance(m, MaskedLayer):
            continue
        rows = m.mask.reshape(m.mask.shape[0], -1)
        partial = rows.any(1) & ~rows.all(1)
        mode = getattr(m, "sparsity_mode", None)
        if mode == "irregular" and not bool(rows.all()) or bool(partial.any()):
            bad = int(partial.nonzero()[0]) if bool(partial.any()) else None
            detail = (f"output channel {bad} is only partly active" if bad is not None
                      else f"its sparsity_mode is {mode!r}")
            raise CompactionError(
                f"layer {name!r} has irregular sparsity ({detail}); compaction removes whole output channels "
                "and needs a model sparsified with mode='channel'. For irregular sparsity use "
                "dnr.export.save_sparse (compressed storage) instead."
            )


class _Analysis:
    """Liveness and emission sets of every tensor node of a traced, shape-propagated graph."""

    def __init__(self, gm: fx.GraphModule, strict: bool) -> None:
        self.gm = gm
        self.strict = strict
        self.modules = dict(gm.named_modules())
        self.nodes = list(gm.graph.nodes)
        self.kind: dict[fx.Node, str] = {}
        self.live: dict[fx.Node, torch.Tensor] = {}
        self.required: dict[fx.Node, torch.Tensor] = {}
        self.emit: dict[fx.Node, torch.Tensor] = {}
        self.notes: list[str] = []
        self.noop: set[fx.Node] = set()
        for node in self.nodes:
            self._classify_and_live(node)
        self._solve_emission()

    # ---- pass 1: liveness -------------------------------------------------------------------
    def _classify_and_live(self, node: fx.Node) -> None:
        c = node_channels(node)
        if node.op == "output":
            self.kind[node] = "output"
            return
        if c is None:  # sizes, shapes, python values
            self.kind[node] = "value"
            return
        ones = torch.ones(c, dtype=torch.bool)
        if node.op in ("placeholder", "get_attr"):
            self.kind[node], self.live[node] = "source", ones
            return
        module = self.modules.get(node.target) if node.op == "call_module" else None
        ins = _tensor_inputs(node)
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if isinstance(module, nn.Conv2d):
            self.kind[node], self.live[node] = "conv", self._conv_live(node, module, src)
        elif isinstance(module, nn.Linear):
            self.kind[node], self.live[node] = "linear", self._linear_live(node, module, src)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self.kind[node], self.live[node] = "batchnorm", self._bn_live(module, self.live[src])
        elif isinstance(module, nn.GroupNorm):
            self.kind[node], self.live[node] = "groupnorm", self._gn_live(module, self.live[src])
        elif self._is_noop_reshape(node, src):  # rebuilt as the identity: its sizes may name channels
            self.kind[node], self.live[node] = "inherit", self.live[src].clone()
            self.noop.add(node)
        elif self._is_zero_preserving(node, module) and src in self.live and node_channels(src) == c:
            self.kind[node], self.live[node] = "inherit", self.live[src].clone()
        elif self._is_channelwise(node, module) and src in self.live and node_channels(src) == c:
            self.kind[node], self.live[node] = "inherit", ones
        elif self._is_flatten(node, src):
            hw = math.prod(node_shape(src)[2:])
            self.kind[node], self.live[node] = "flatten", self.live[src].repeat_interleave(hw)
        elif self._is_add(node):
            a, b = [x for x in node.args[:2]]
            self.kind[node], self.live[node] = "add", self.live[a] | self.live[b]
        elif self._is_cat(node):
            self.kind[node], self.live[node] = "cat", torch.cat([self.live[x] for x in node.args[0]])
        else:
            self._opaque(node, ins, "the compaction does not model this operation")
            self.live[node] = ones

    def _opaque(self, node: fx.Node, ins: list[fx.Node], why: str) -> None:
        """An op run on full tensors: fine when its inputs carry no pruned channel."""
        self.kind[node] = "opaque"
        pruned = [i for i in ins if i in self.live and not bool(self.live[i].all())]
        if pruned and self.strict:
            raise CompactionError(
                f"cannot compact through {_describe(node)}: {why}, and its input {pruned[0].name!r} has "
                f"{int((~self.live[pruned[0]]).sum())} pruned channel(s). Supported: Conv2d/Linear (masked or "
                "not, groups=1), BatchNorm, GroupNorm, zero-preserving activations, pooling, dropout, "
                "flatten/view to [B, features], residual add, cat on dim 1. Pass strict=False to keep "
                "every channel that reaches this op instead."
            )
        if pruned:
            self.notes.append(f"{_describe(node)}: {why}; kept all channels of its inputs")

    def _weight_nonzero(self, module: nn.Module) -> torch.Tensor:
        if isinstance(module, MaskedLayer):
            return module.mask.detach().cpu()
        return module.weight.detach().cpu() != 0

    def _conv_live(self, node, module: nn.Conv2d, src) -> torch.Tensor:
        live_in = self.live[src]
        if module.groups != 1:
            self._opaque(node, [src], f"grouped convolution (groups={module.groups})")
            self.kind[node] = "conv"
            return torch.ones(module.out_channels, dtype=torch.bool)
        reads = (self._weight_nonzero(module) & live_in[None, :, None, None]).flatten(1).any(1)
        return reads | self._bias_nonzero(module)

    def _linear_live(self, node, module: nn.Linear, src) -> torch.Tensor:
        if len(node_shape(src)) != 2:
            self._opaque(node, [src], f"linear layer on a rank-{len(node_shape(src))} input (only [B, features])")
            self.kind[node] = "linear"
            return torch.ones(module.out_features, dtype=torch.bool)
        reads = (self._weight_nonzero(module) & self.live[src][None, :]).any(1)
        return reads | self._bias_nonzero(module)

    @staticmethod
    def _bias_nonzero(module) -> torch.Tensor:
        if module.bias is None:
            return torch.zeros(module.weight.shape[0], dtype=torch.bool)
        return module.bias.detach().cpu() != 0

    @staticmethod
    def _affine_nonzero(norm) -> tuple[torch.Tensor, torch.Tensor]:
        c = norm.num_features if isinstance(norm, nn.modules.batchnorm._BatchNorm) else norm.num_channels
        scale = norm.weight.detach().cpu() != 0 if norm.weight is not None else torch.ones(c, dtype=torch.bool)
        shift = norm.bias.detach().cpu() != 0 if norm.bias is not None else torch.zeros(c, dtype=torch.bool)
        return scale, shift

    def _bn_live(self, bn, live_in: torch.Tensor) -> torch.Tensor:
        # eval: y = s*x + t with s = w/sqrt(var+eps), t = b - mean*s; a zero input channel gives t
        scale, shift = self._affine_nonzero(bn)
        if bn.track_running_stats and bn.running_mean is not None:
            shift = shift | (scale & (bn.running_mean.detach().cpu() != 0))
        return (live_in & scale) | shift

    def _gn_live(self, gn: nn.GroupNorm, live_in: torch.Tensor) -> torch.Tensor:
        scale, shift = self._affine_nonzero(gn)
        group_live = live_in.view(gn.num_groups, -1).any(1).repeat_interleave(gn.num_channels // gn.num_groups)
        return (group_live & scale) | shift

    def _is_zero_preserving(self, node, module) -> bool:
        if module is not None:
            return isinstance(module, ZERO_PRESERVING_MODULES)
        if node.op == "call_function":
            if node.target in ZERO_PRESERVING_FUNCTIONS:
                return True
            if node.target in (operator.mul, torch.mul, operator.truediv, torch.div):
                return len(_tensor_inputs(node)) == 1 and node.args[0] in self.live and not isinstance(
                    node.args[1], fx.Node)
        if node.op == "call_method" and node.target in ZERO_PRESERVING_METHODS:
            return True
        if (node.op, node.target) in MEAN_LIKE:
            src, out = node_shape(node.args[0]), node_shape(node)
            return src is not None and len(src) >= 3 and out[:2] == src[:2]
        return False

    def _is_channelwise(self, node, module) -> bool:
        if module is not None:
            return isinstance(module, CHANNELWISE_MODULES)
        if node.op == "call_function" and node.target in CHANNELWISE_FUNCTIONS:
            return True
        if node.op == "call_function" and node.target in (operator.add, torch.add, operator.sub, torch.sub):
            return len(_tensor_inputs(node)) == 1 and isinstance(node.args[0], fx.Node) and not isinstance(
                node.args[1], fx.Node)
        return node.op == "call_method" and node.target in CHANNELWISE_METHODS

    def _is_flatten(self, node, src) -> bool:
        flat = (isinstance(self.modules.get(node.target), nn.Flatten) if node.op == "call_module"
                else (node.op, node.target) in FLATTEN_LIKE)
        if not flat or src not in self.live:
            return False
        s_in, s_out = node_shape(src), node_shape(node)
        return len(s_in) >= 3 and s_out == (s_in[0], math.prod(s_in[1:]))

    def _is_noop_reshape(self, node, src) -> bool:
        flat = (isinstance(self.modules.get(node.target), nn.Flatten) if node.op == "call_module"
                else (node.op, node.target) in FLATTEN_LIKE)
        return flat and src in self.live and node_shape(src) == node_shape(node)

    def _is_add(self, node) -> bool:
        if node.op != "call_function" or node.target not in ADD_FUNCTIONS or len(node.args) != 2 or node.kwargs:
            return False
        a, b = node.args
        return (a in self.live and b in self.live and node_shape(a) is not None and node_shape(b) is not None
                and len(node_shape(a)) == len(node_shape(b)) and node_channels(a) == node_channels(b) == node_channels(node))

    def _is_cat(self, node) -> bool:
        if node.op != "call_function" or node.target is not torch.cat:
            return False
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = node.args[0]
        if not isinstance(parts, (list, tuple)) or not all(p in self.live for p in parts):
            return False
        rank = len(node_shape(node))
        return dim in (1, 1 - rank) and rank >= 2

    # ---- pass 2: emission -------------------------------------------------------------------
    def _solve_emission(self) -> None:
        for _ in range(4 * len(self.nodes) + 8):
            self.emit = {}
            changed = False
            for node in self.nodes:
                for src, need in self._emit_node(node):
                    if bool((need & ~self.emit[src]).any()):
                        old = self.required.get(src)
                        self.required[src] = need.clone() if old is None else old | need
                        changed = True
            if not changed:
                return
        raise RuntimeError("channel emission did not converge")  # pragma: no cover - monotone, bounded

    def _emit_node(self, node: fx.Node) -> list[tuple[fx.Node, torch.Tensor]]:
        """Set ``self.emit[node]``; return (producer, channels it must emit) requirements."""
        kind = self.kind[node]
        if kind == "value":
            return []
        if kind == "output":
            return [(n, torch.ones_like(self.emit[n])) for n in node.all_input_nodes if n in self.emit]
        need = self.live[node] | self.required.get(node, torch.zeros_like(self.live[node]))
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if kind in ("source", "opaque"):
            self.emit[node] = torch.ones_like(need)
            return [(i, torch.ones_like(self.emit[i])) for i in _tensor_inputs(node) if i in self.emit]
        if kind in ("conv", "linear"):
            module = self.modules[node.target]
            full = getattr(module, "groups", 1) != 1 or (kind == "linear" and len(node_shape(src)) != 2)
            emit = torch.ones_like(need) if full else need.clone()
            if not bool(emit.any()):
                emit[0] = True  # keep one (zero) channel: layers with no channel are not valid modules
            self.emit[node] = emit
            return [(src, torch.ones_like(self.emit[src]))] if full else []
        if kind == "add":
            emit = need.clone()
            if not bool(emit.any()):
                emit[0] = True
            self.emit[node] = emit
            return []
        if kind in ("inherit", "batchnorm"):
            self.emit[node] = self.emit[src]
            return [(src, need)]
        if kind == "groupnorm":
            gn = self.modules[node.target]
            per = gn.num_channels // gn.num_groups
            groups = (need | self.emit[src]).view(gn.num_groups, per).any(1).repeat_interleave(per)
            self.emit[node] = self.emit[src]
            return [(src, groups)]
        if kind == "flatten":
            hw = math.prod(node_shape(src)[2:])
            self.emit[node] = self.emit[src].repeat_interleave(hw)
            return [(src, need.view(-1, hw).any(1))]
        if kind == "cat":
            parts = node.args[0]
            self.emit[node] = torch.cat([self.emit[p] for p in parts])
            pushes, start = [], 0
            for p in parts:
                n = self.emit[p].numel()
                pushes.append((p, need[start:start + n]))
                start += n
            return pushes
        raise AssertionError(kind)  # pragma: no cover




def _index(mask: torch.Tensor, device) -> torch.Tensor:
    return mask.nonzero().flatten().to(device)


@torch.no_grad()
def _sliced_conv(m: nn.Conv2d, out_idx, in_idx) -> nn.Conv2d:
    w = m.weight * m.mask if isinstance(m, MaskedLayer) else m.weight
    if m.groups == 1:
        w = w.index_select(0, out_idx).index_select(1, in_idx)
    new = nn.Conv2d(w.shape[1] * m.groups, w.shape[0], m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
                    device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if m.bias is not None:
        new.bias.copy_(m.bias.index_select(0, out_idx) if m.groups == 1 else m.bias)
    return new


@torch.no_grad()
def _sliced_linear(m: nn.Linear, out_idx, in_idx) -> nn.Linear:
    w = m.weight * m.mask if isinstance(m, MaskedLayer) else m.weight
    w = w.index_select(0, out_idx).index_select(1, in_idx)
    new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if m.bias is not None:
        new.bias.copy_(m.bias.index_select(0, out_idx))
    return new


@torch.no_grad()
def _sliced_batchnorm(m, idx):
    new = copy.deepcopy(m)
    new.num_features = idx.numel()
    for name in ("weight", "bias"):
        p = getattr(m, name)
        if p is not None:
            setattr(new, name, nn.Parameter(p.index_select(0, idx).clone(), requires_grad=p.requires_grad))
    for name in ("running_mean", "running_var"):
        b = getattr(m, name)
        if b is not None:
            setattr(new, name, b.index_select(0, idx).clone())
    return new


@torch.no_grad()
def _sliced_groupnorm(m: nn.GroupNorm, idx):
    per = m.num_channels // m.num_groups
    new = nn.GroupNorm(idx.numel() // per, idx.numel(), eps=m.eps, affine=m.affine,
                       device=idx.device if m.weight is None else m.weight.device,
                       dtype=None if m.weight is None else m.weight.dtype)
    if m.affine:
        new.weight.copy_(m.weight.index_select(0, idx))
        new.bias.copy_(m.bias.index_select(0, idx))
    return new


_SLICED = ("conv", "linear", "batchnorm", "groupnorm")



@torch.no_grad()
def compact_model(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    example_input: torch.Tensor | None = None,
    strict: bool = True,
) -> fx.GraphModule:
    """Build a physically smaller dense copy of a channel-pruned model, with identical eval outputs.

    Args:
        model: a model sparsified with ``mode="channel"`` (masked layers whose mask rows are all-on or
            all-off; plain layers are kept dense) after :func:`dnr.nn.apply_masks`. Not modified.
        input_size: shape of ONE input without the batch dim, e.g. (3, 32, 32); needed to map conv
            channels to the features of a flattened linear head.
        example_input: a batch [B, *input_size] to trace shapes with instead of ``input_size``.
        strict: raise CompactionError at ops the analysis does not model when pruned channels reach
            them (default); False keeps every channel that reaches such an op.

    Returns:
        ``torch.fx.GraphModule`` in eval mode, built from plain ``nn.Conv2d``/``nn.Linear``/norm layers
        (masks multiplied in, dead channels removed) with the model's submodule names; input
        [B, *input_size] -> the model's output shape. ``result.dnr_compaction`` maps each conv/linear/
        norm layer to its kept channel counts.

    Raises:
        CompactionError: irregular sparsity, an untraceable forward, or an unsupported op (named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_channel_structure(model)
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    if example_input is None:
        if input_size is None:
            raise ValueError("compact_model needs input_size (one example's shape, e.g. (3, 32, 32)) or "
                             "example_input")
        input_size = tuple(int(s) for s in input_size)
        if not input_size or any(s < 1 for s in input_size):
            raise ValueError(f"input_size must be a non-empty sequence of positive ints, got {input_size}")
        example_input = torch.zeros((1, *input_size), device=device, dtype=dtype)
    work = copy.deepcopy(model).eval()
    gm = trace_with_shapes(work, example_input.to(device), error=CompactionError, purpose="compaction")
    analysis = _Analysis(gm, strict)
    plan: dict[str, dict] = {}
    module_use: dict[str, tuple] = {}
    graph = gm.graph
    expand_count = 0
    # input sets taken before the graph is edited (a flatten node below is replaced by a new node)
    in_emit = {n: analysis.emit[n.args[0]] for n in graph.nodes if analysis.kind.get(n) in _SLICED}
    add_emits = {n: [analysis.emit[a] for a in n.args] for n in graph.nodes if analysis.kind.get(n) == "add"}
    for node in list(graph.nodes):
        kind = analysis.kind.get(node)
        if kind in _SLICED:
            key = (tuple(analysis.emit[node].tolist()), tuple(in_emit[node].tolist()))
            if module_use.setdefault(node.target, key) != key:
                raise CompactionError(f"module {node.target!r} is called more than once with different live "
                                      "channels; compaction needs one copy per call site")
            out_idx, in_idx = _index(analysis.emit[node], device), _index(in_emit[node], device)
            old = gm.get_submodule(node.target)
            if kind == "conv":
                new = _sliced_conv(old, out_idx, in_idx)
            elif kind == "linear":
                new = _sliced_linear(old, out_idx, in_idx)
            elif kind == "batchnorm":
                new = _sliced_batchnorm(old, out_idx)
            else:
                new = _sliced_groupnorm(old, out_idx)
            new.train(False)
            gm.set_submodule(node.target, new)
            plan[node.target] = {"kind": kind, "out": int(out_idx.numel()), "out_total": analysis.emit[node].numel(),
                                 "in": int(in_idx.numel()), "in_total": in_emit[node].numel()}
        elif kind == "add":
            out = analysis.emit[node]
            new_args = []
            for a, emit_a in zip(node.args, add_emits[node]):
                if torch.equal(emit_a, out):
                    new_args.append(a)
                    continue
                # position of each union channel inside operand a's compact layout (or the zero slot)
                pos = torch.full((out.numel(),), int(emit_a.sum()), dtype=torch.long)
                pos[emit_a] = torch.arange(int(emit_a.sum()))
                name = f"dnr_expand_{expand_count}"
                expand_count += 1
                gm.add_submodule(name, ExpandChannels(pos[out].to(device)))
                with graph.inserting_before(node):
                    new_args.append(graph.call_module(name, (a,)))
            node.args = tuple(new_args)
            if node.target is operator.iadd:
                node.target = operator.add  # never write into an operand that may be a scattered copy
        elif node in analysis.noop:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif kind == "flatten":
            replace_with_flatten(graph, node)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.eval()
    gm.dnr_compaction = plan
    gm.dnr_compaction_notes = list(analysis.notes)
    return gm
