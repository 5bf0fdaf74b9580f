"""The channel spaces of a network that a cascaded projection can compress, found with torch.fx.

A *space* is a set of tensors that carry the same channels: the output of one or more conv / linear
layers (the *producers*), followed by the BatchNorm that each producer feeds directly (folded into the
producer when the space is projected), channel-wise ops that the projection passes through (ReLU and
its kin, pooling, dropout, flatten to a linear head) and residual sums, which unite their operands'
spaces (so the channels feeding a sum share one projection). The conv / linear layers that read a
space are its *consumers*. Projecting a space with P (c x r, orthonormal columns) replaces each
producer's folded weight W by P^T W and each consumer's weight V by V P.

Anything else that a space's channels reach (a concatenation, an elementwise product of two tensors, a
grouped conv, a norm layer that does not directly follow a producer, the network output, a layer
called twice) makes the space unprojectable; the space records why (``problem``), and asking for a rank
there raises an error that names the layer and the reason.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn.masked import MaskedLayer
from ..nn.normalize import Normalize

__all__ = ["ProjectionError", "ProjectionSpace", "SpacePlan", "find_projection_spaces", "CHANNELWISE_PASS_MODULES"]


class ProjectionError(ValueError):
    """A rank, ratio or structure that the cascaded projection cannot take; the message names the layer."""


#: channel-wise modules that map a projected tensor to a projected tensor of the same channels
#: (exactly for pooling, dropout and the identity; approximately for the activations, which the
#: projection's training compensates)
CHANNELWISE_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Hardtanh,
    nn.Hardswish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, torch.tanh,
                   F.hardtanh, F.hardswish, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                   F.adaptive_max_pool2d, torch.relu_, F.relu_}
_PASS_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone"}
_FLATTEN = {("call_function", torch.flatten), ("call_method", "flatten"), ("call_method", "view"),
            ("call_method", "reshape"), ("call_function", torch.reshape)}
_ADD = {operator.add, operator.iadd, torch.add}


@dataclass
class ProjectionSpace:
    """One channel space (see the module docstring).

    Attributes:
        name: the space's name: its first producer's module name (ranks are given by producer name).
        channels: c, the number of channels.
        producers: conv / linear module names whose output channels are the space.
        norms: producer -> the BatchNorm module it feeds directly (folded when projected).
        consumers: conv / linear module names that read the space.
        flat: consumer -> H*W when it reads the space flattened ([B, c*H*W], channel-major), else 1.
        taps: fx node names of the consumers' inputs (the features that PCA and the reconstruction read).
        problem: why the space cannot be projected (None when it can).
    """

    name: str
    channels: int
    producers: list[str] = field(default_factory=list)
    norms: dict[str, str] = field(default_factory=dict)
    consumers: list[str] = field(default_factory=list)
    flat: dict[str, int] = field(default_factory=dict)
    taps: dict[str, str] = field(default_factory=dict)
    problem: str | None = None


@dataclass
class SpacePlan:
    """The spaces of a traced model. ``gm`` is the traced copy (eval mode) with each tensor node's shape in
    ``node.meta["dnr_shape"]``; ``space_of`` maps a producer or consumer module name to its space name
    (``("out", name)`` / ``("in", name)``)."""

    gm: fx.GraphModule
    spaces: dict[str, ProjectionSpace]
    output_space: dict[str, str]
    input_space: dict[str, str]

    def projectable(self) -> list[ProjectionSpace]:
        return [s for s in self.spaces.values() if s.problem is None]

    def space_for_layer(self, layer: str) -> ProjectionSpace:
        """The space produced by layer ``layer``; ProjectionError naming the layer if there is none."""
        if layer in self.output_space:
            return self.spaces[self.output_space[layer]]
        convs = [n for n, m in self.gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        raise ProjectionError(f"layer {layer!r}: not a conv/linear layer of the model whose output can be "
                              f"projected; layers: {convs}")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (MaskedLayer, Normalize)) or super().is_leaf_module(m, qualname)


class _Shapes(fx.Interpreter):
    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["dnr_shape"] = tuple(result.shape)
        return result


def trace_with_shapes(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``model`` traced with torch.fx (masked layers and Normalize as leaves), each tensor node's shape
    recorded by one eval-mode run on ``example``. Raises ProjectionError for an untraceable forward."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:
        raise ProjectionError(f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
                              "the cascaded projection needs a forward without data-dependent control flow") from err
    gm = fx.GraphModule(model, graph)
    gm.eval()
    with torch.no_grad():
        _Shapes(gm).run(example)
    return gm


def _shape(node) -> tuple | None:
    return node.meta.get("dnr_shape") if isinstance(node, fx.Node) else None


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target!r} (fx node {node.name!r})"


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def add(self, a: str) -> None:
        self.parent.setdefault(a, a)

    def find(self, a: str) -> str:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> str:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        return ra


def find_projection_spaces(model: nn.Module, example: torch.Tensor) -> SpacePlan:
    """Trace ``model`` on ``example`` ([B, *input_size]) and find its channel spaces.

    The model itself is not modified (a deep copy is traced). Raises ProjectionError when the model
    cannot be traced; structures that a space cannot pass are recorded in that space's ``problem``.
    """
    work = copy.deepcopy(model).eval()
    gm = trace_with_shapes(work, example)
    modules = dict(gm.named_modules())
    uf = _UnionFind()
    node_space: dict[fx.Node, str] = {}   # tensor node -> space id (a producer name before union)
    flat_hw: dict[fx.Node, int] = {}      # a node holding a flattened space -> H*W
    producers: dict[str, str] = {}        # producer module -> its space id
    norms: dict[str, str] = {}
    consumers: list[tuple[str, fx.Node]] = []
    problems: dict[str, str] = {}
    calls: dict[str, int] = {}

    def spoil(space: str, why: str) -> None:
        problems.setdefault(uf.find(space), why)

    def spoil_inputs(node: fx.Node, why: str) -> None:
        for a in node.all_input_nodes:
            if a in node_space:
                spoil(node_space[a], why)

    for node in gm.graph.nodes:
        if node.op == "output":
            spoil_inputs(node, "it is the network's output")
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is not None:
            calls[node.target] = calls.get(node.target, 0) + 1
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        src_space = node_space.get(src) if src is not None else None
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            name = node.target
            if src_space is not None:  # a consumer of its input's space
                if isinstance(module, nn.Conv2d) and module.groups != 1:
                    spoil(src_space, f"it is read by the grouped conv {name!r} (groups={module.groups})")
                elif isinstance(module, nn.Linear) and len(_shape(src)) != 2:
                    spoil(src_space, f"it is read by the linear layer {name!r} on a rank-{len(_shape(src))} input")
                else:
                    consumers.append((name, src))
            uf.add(name)
            producers[name] = name
            node_space[node] = name
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                spoil(name, f"its producer {name!r} is a grouped conv (groups={module.groups})")
            if isinstance(module, MaskedLayer):
                spoil(name, f"its producer {name!r} is a masked layer; project a dense (or compacted) model")
            users = list(node.users)
            if len(users) == 1 and isinstance(modules.get(users[0].target), (nn.BatchNorm1d, nn.BatchNorm2d)) \
                    and users[0].op == "call_module":
                norms[name] = users[0].target
            continue
        if src_space is None and not any(a in node_space for a in node.all_input_nodes):
            continue  # a tensor no producer reaches (the input, Normalize, shapes, ...)
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            producer = src.target if src is not None and src.op == "call_module" else None
            if producer in norms and norms[producer] == node.target:
                node_space[node] = src_space
            else:
                spoil(src_space, f"the BatchNorm {node.target!r} does not directly follow a conv/linear layer "
                                 "that only it reads, so it cannot be folded")
            continue
        if module is not None and isinstance(module, CHANNELWISE_PASS_MODULES) and src_space is not None \
                and _shape(src)[1:2] == _shape(node)[1:2]:
            node_space[node] = src_space
            if src in flat_hw:
                flat_hw[node] = flat_hw[src]
            continue
        if module is None and src_space is not None and _shape(node) is not None and \
                _shape(src)[1:2] == _shape(node)[1:2] and (
                (node.op == "call_function" and node.target in _PASS_FUNCTIONS)
                or (node.op == "call_method" and node.target in _PASS_METHODS)):
            node_space[node] = src_space
            if src in flat_hw:
                flat_hw[node] = flat_hw[src]
            continue
        flat = (isinstance(module, nn.Flatten) if module is not None else (node.op, node.target) in _FLATTEN)
        if flat and src_space is not None and _shape(src) is not None and _shape(node) is not None:
            s_in, s_out = _shape(src), _shape(node)
            if len(s_in) >= 3 and s_out == (s_in[0], math.prod(s_in[1:])) and src not in flat_hw:
                node_space[node] = src_space
                flat_hw[node] = math.prod(s_in[2:])
                continue
            if s_in == s_out:
                node_space[node] = src_space
                continue
        if node.op == "call_function" and node.target in _ADD and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if a in node_space and b in node_space and _shape(a) == _shape(b) and a not in flat_hw:
                node_space[node] = uf.union(node_space[a], node_space[b])
                continue
            if a in node_space and b in node_space:
                spoil_inputs(node, f"it reaches the sum {_describe(node)} with operands of different shapes")
            else:
                spoil_inputs(node, f"it is added at {_describe(node)} to a tensor that no conv/linear layer "
                                   "produces, which a projection cannot follow")
            continue
        spoil_inputs(node, f"it reaches {_describe(node)}, which a projection cannot pass (supported: BatchNorm "
                           "after its conv, channel-wise activations, pooling, dropout, flatten, residual add)")

    for name, count in calls.items():
        if count > 1 and name in producers:
            spoil(producers[name], f"the layer {name!r} is called {count} times")

    spaces: dict[str, ProjectionSpace] = {}
    for name in producers:  # registration order = graph order: a space's name is its first producer
        root = uf.find(name)
        if root not in spaces:
            out_node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
            spaces[root] = ProjectionSpace(name=name, channels=_shape(out_node)[1])
        sp = spaces[root]
        sp.producers.append(name)
        if name in norms:
            sp.norms[name] = norms[name]
    for root, why in problems.items():
        spaces[uf.find(root)].problem = spaces[uf.find(root)].problem or why
    for name, src in consumers:
        sp = spaces[uf.find(node_space[src])]
        sp.consumers.append(name)
        sp.flat[name] = flat_hw.get(src, 1)
        sp.taps[name] = src.name
    by_root = {root: sp for root, sp in spaces.items()}
    renamed = {sp.name: sp for sp in by_root.values()}
    output_space = {p: by_root[uf.find(p)].name for p in producers}
    input_space = {c: by_root[uf.find(node_space[src])].name for c, src in consumers}
    return SpacePlan(gm=gm, spaces=renamed, output_space=output_space, input_space=input_space)
