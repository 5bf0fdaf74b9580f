"""What keeps channel c in channel c on a ``torch.fx`` graph: the one table that channel compaction
(``dnr.export.compact``), the cascaded projection (``dnr.compress.spaces``) and DNR's channel regrowth
signal (``dnr.rewiring.channel_signal``) all walk by, and the one shape-recording trace they share.

Three kinds of node carry a producer's channels to the layers that read them:

- **zero-preserving channel-wise ops** (``f(0) == 0``, channel c depends only on channel c): activations
  of the ReLU family, tanh, dropout, pooling, the identity. A dead channel stays dead through them, and a
  projection or a gradient passes them channel by channel;
- **channel-wise ops with f(0) != 0** (sigmoid, softplus, ``Normalize``): still channel c to channel c,
  but a dead channel comes back to life (compaction must keep it);
- **flattens** (``[B, C, H, W] -> [B, C*H*W]``, channel-major) and **residual additions** (two operands
  of the same channels).

A node that is none of these (a concatenation, a product of two tensors, a reshape that mixes channels)
is where a walk must stop: each user decides what that means for it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .masked import MaskedLayer
from .normalize import Normalize
from .pooling import MaxPool2d

__all__ = ["ZERO_PRESERVING_MODULES", "ZERO_PRESERVING_FUNCTIONS", "ZERO_PRESERVING_METHODS",
           "CHANNELWISE_MODULES", "CHANNELWISE_FUNCTIONS", "CHANNELWISE_METHODS", "FLATTEN_LIKE", "ADD_FUNCTIONS",
           "ADD_METHODS", "MEAN_LIKE", "ChannelTracer", "trace_with_shapes", "node_shape", "node_channels",
           "is_zero_preserving", "is_channelwise", "is_flatten", "is_add", "replace_with_flatten"]

ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
ZERO_PRESERVING_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, torch.tanh,
    F.hardtanh, F.hardswish, F.dropout, F.dropout2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.relu_, torch.relu_,
}
ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "detach"}
CHANNELWISE_MODULES = (nn.Sigmoid, nn.Softplus, nn.Hardsigmoid, Normalize)
CHANNELWISE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.softplus, F.hardsigmoid}
CHANNELWISE_METHODS = {"sigmoid"}
#: (op, target) pairs that may flatten [B, C, H, W] to [B, C*H*W]; whether one does is a shape question
FLATTEN_LIKE = {("call_function", torch.flatten), ("call_method", "flatten"), ("call_method", "view"),
                ("call_method", "reshape"), ("call_function", torch.reshape)}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
MEAN_LIKE = {("call_function", torch.mean), ("call_method", "mean")}


def _module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def is_zero_preserving(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A channel-wise node with f(0) == 0 (see the module docstring)."""
    module = _module(node, modules)
    if module is not None:
        return isinstance(module, ZERO_PRESERVING_MODULES)
    return ((node.op == "call_function" and node.target in ZERO_PRESERVING_FUNCTIONS)
            or (node.op == "call_method" and node.target in ZERO_PRESERVING_METHODS))


def is_channelwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Any channel-wise node: zero-preserving or not."""
    if is_zero_preserving(node, modules):
        return True
    module = _module(node, modules)
    if module is not None:
        return isinstance(module, CHANNELWISE_MODULES)
    return ((node.op == "call_function" and node.target in CHANNELWISE_FUNCTIONS)
            or (node.op == "call_method" and node.target in CHANNELWISE_METHODS))


def is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An ``nn.Flatten`` or a flatten / view / reshape call (which may or may not flatten: check shapes)."""
    module = _module(node, modules)
    if module is not None:
        return isinstance(module, nn.Flatten)
    return (node.op, node.target) in FLATTEN_LIKE


def is_add(node: fx.Node) -> bool:
    """A binary addition (a residual sum when both operands carry the same channels)."""
    return ((node.op == "call_function" and node.target in ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ADD_METHODS))


class ChannelTracer(fx.Tracer):
    """fx tracer that keeps the package's masked layers (whose mask checks are Python control flow),
    ``Normalize`` and ``MaxPool2d`` (an ``nn.MaxPool2d``) as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (MaskedLayer, Normalize, MaxPool2d)) or super().is_leaf_module(m, qualname)


class _RecordShapes(fx.Interpreter):
    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["dnr_shape"] = tuple(result.shape)
        return result


def trace_with_shapes(model: nn.Module, example: torch.Tensor, *, error: type[Exception] = ValueError,
                      purpose: str = "this analysis") -> fx.GraphModule:
    """``model`` traced with :class:`ChannelTracer`, each tensor node's shape recorded in
    ``node.meta["dnr_shape"]`` (see :func:`node_shape`) by one no-grad run on ``example`` ([B, ...]).

    Raises ``error`` (one line: the model, the tracer's complaint and ``purpose``) when the forward does not
    trace. The graph module shares ``model``'s submodules and the shape run uses their current mode: pass a
    model in eval mode (or a copy) to leave BatchNorm statistics untouched."""
    try:
        graph = ChannelTracer().trace(model)
    except Exception as err:
        raise error(f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); {purpose} "
                    "needs a forward without data-dependent Python control flow") from err
    gm = fx.GraphModule(model, graph)
    with torch.no_grad():
        _RecordShapes(gm).run(example)
    return gm


def node_shape(node) -> tuple | None:
    """Shape of an fx node's tensor output in :func:`trace_with_shapes`'s run; None for anything else."""
    return node.meta.get("dnr_shape") if isinstance(node, fx.Node) else None


def node_channels(node) -> int | None:
    """Dimension 1 of the node's recorded shape (its channels), None when unknown or rank < 2."""
    shape = node_shape(node)
    return shape[1] if shape is not None and len(shape) >= 2 else None


def replace_with_flatten(graph: fx.Graph, node: fx.Node) -> None:
    """Replace ``node`` (a view / reshape / flatten of its first argument to [B, features]) by
    ``torch.flatten(x, 1)``: a view with literal channel counts would break once a network has fewer channels."""
    with graph.inserting_before(node):
        flat = graph.call_function(torch.flatten, (node.args[0], 1))
    node.replace_all_uses_with(flat)
    graph.erase_node(node)
