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
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from ..nn.channel_graph import ADD_FUNCTIONS, is_flatten, is_zero_preserving, node_shape, trace_with_shapes
from ..nn.masked import MaskedLayer

__all__ = ["ProjectionError", "ProjectionSpace", "SpacePlan", "find_projection_spaces"]


class ProjectionError(ValueError):
    """A rank, ratio or structure that the cascaded projection cannot take; the message names the layer."""


# The projection passes the zero-preserving channel-wise ops of dnr.nn.channel_graph (exactly for pooling,
# dropout and the identity; approximately for the activations, which the projection's training compensates)
# and not those with f(0) != 0 (sigmoid, softplus): a projected channel mixes several, so an offset would not
# stay in its channel.


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

    def folded_norms(self, names: Iterable[str]) -> dict[str, str]:
        """The BatchNorms that projecting the spaces ``names`` folds into their producers: norm -> space name."""
        return {norm: name for name in names for norm in self.spaces[name].norms.values()}

    def space_for_layer(self, layer: str) -> ProjectionSpace:
        """The space produced by layer ``layer``; ProjectionError naming the layer if there is none."""
        if layer in self.output_space:
            return self.spaces[self.output_space[layer]]
        convs = [n for n, m in self.gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        raise ProjectionError(f"layer {layer!r}: not a conv/linear layer of the model whose output can be "
                              f"projected; layers: {convs}")




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
    gm = trace_with_shapes(work, example, error=ProjectionError, purpose="the cascaded projection")
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
                elif isinstance(module, nn.Linear) and len(node_shape(src)) != 2:
                    spoil(src_space, f"it is read by the linear layer {name!r} on a rank-{len(node_shape(src))} input")
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
        if src_space is not None and node_shape(node) is not None and is_zero_preserving(node, modules) \
                and node_shape(src)[1:2] == node_shape(node)[1:2]:
            node_space[node] = src_space
            if src in flat_hw:
                flat_hw[node] = flat_hw[src]
            continue
        flat = is_flatten(node, modules)
        if flat and src_space is not None and node_shape(src) is not None and node_shape(node) is not None:
            s_in, s_out = node_shape(src), node_shape(node)
            if len(s_in) >= 3 and s_out == (s_in[0], math.prod(s_in[1:])) and src not in flat_hw:
                node_space[node] = src_space
                flat_hw[node] = math.prod(s_in[2:])
                continue
            if s_in == s_out:
                node_space[node] = src_space
                continue
        if node.op == "call_function" and node.target in ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if a in node_space and b in node_space and node_shape(a) == node_shape(b) and a not in flat_hw:
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
            spaces[root] = ProjectionSpace(name=name, channels=node_shape(out_node)[1])
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
