"""A regrowth signal for pruned output channels: the loss gradient that reaches the channel's output.

Why this exists: in channel mode a pruned channel's filter, bias and norm scale/shift are zero, so its
output is exactly 0. Behind a ReLU (whose gradient at 0 is 0) nothing flows back into the channel: its
weight gradient, hence its momentum, is exactly zero, and "regrow the largest momentum" has no
information to rank pruned channels by. The gradient *does* reach the channel's output position in
the layers that consume it: ``dL/dx[:, c]`` at the input of the next conv (or at the block of a
flattened linear input that channel ``c`` fills) is what the loss would do with a non-zero activation
there. :class:`OutputGradientMeter` accumulates ``sum (dL/dx[:, c])^2`` over the training backward
passes between two rewirings, per producing layer and channel; the controller regrows the pruned
channels with the largest value (see ``docs/method.md``).

Consumers are found on the ``torch.fx`` graph: from the layer's paired norm (or the layer itself) the
walk follows channel-preserving operations (activations, pooling, dropout, residual additions,
flatten) to the conv / linear modules that read the channels. A layer whose output reaches anything
else (a concatenation, a reshape that mixes channels, a model that does not trace) has no consumer
entry and keeps momentum regrowth.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..nn.channel_graph import ChannelTracer, is_add, is_channelwise, is_flatten

__all__ = ["Consumer", "find_channel_consumers", "OutputGradientMeter"]



@dataclass(frozen=True)
class Consumer:
    """A module that reads a producer's channels: ``name``; ``block`` input features per channel
    (1 for a conv, ``in_features / channels`` for a linear layer after a flatten)."""

    name: str
    block: int


def find_channel_consumers(model: nn.Module, producers: dict[str, str | None]) -> dict[str, list[Consumer]]:
    """The conv / linear modules that read each producer's output channels.

    Args:
        model: the (sparsified) model; it must trace with ``torch.fx.symbolic_trace``.
        producers: masked layer name -> its paired norm layer's name (or None when it has none).

    Returns:
        producer name -> consumers, only for producers whose every path was understood (see module doc).
        Empty when the model does not trace.
    """
    try:
        graph = ChannelTracer().trace(model)
    except Exception:  # data-dependent control flow: no signal, momentum regrowth stays
        return {}
    modules = dict(model.named_modules())
    node_of = {n.target: n for n in graph.nodes if n.op == "call_module"}
    found: dict[str, list[Consumer]] = {}
    for name, norm in producers.items():
        start = node_of.get(norm if norm is not None else name)
        layer = modules.get(name)
        if start is None or layer is None:
            continue
        consumers = _walk(start, modules, int(layer.weight.shape[0]))
        if consumers:
            found[name] = consumers
    return found



def _walk(start, modules: dict, channels: int) -> list[Consumer] | None:
    """Consumers reached from ``start`` through channel-preserving nodes; None if a path is not understood."""
    consumers: dict[str, Consumer] = {}
    stack = [(user, False) for user in start.users]
    seen = set()
    while stack:
        node, flat = stack.pop()
        if (node, flat) in seen:
            continue
        seen.add((node, flat))
        target = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(target, nn.Conv2d) and not flat:
            if target.groups != 1 or target.in_channels != channels:
                return None
            consumers[node.target] = Consumer(node.target, 1)
            continue
        if isinstance(target, nn.Linear):
            if target.in_features % channels:
                return None
            if not flat and target.in_features != channels:
                return None
            consumers[node.target] = Consumer(node.target, target.in_features // channels)
            continue
        passes = is_channelwise(node, modules) or is_add(node)  # dnr.nn.channel_graph's table
        flattens = is_flatten(node, modules)
        if not (passes or flattens) or node.op == "output":
            return None
        stack.extend((user, flat or flattens) for user in node.users)
    return list(consumers.values())


class OutputGradientMeter:
    """Accumulates ``sum over batch and positions of (dL/dx[:, c])^2`` at each consumer's input.

    Only the training backward passes count: the forward pre-hook arms itself only when the consumer is
    in train mode, autograd is on and its weight requires a gradient (``dnr.attacks`` turn parameter
    gradients off while they run, so attack passes are not counted).

    Args:
        model: the model whose modules ``consumers`` names.
        consumers: producer -> consumers, from :func:`find_channel_consumers`.
    """

    def __init__(self, model: nn.Module, consumers: dict[str, list[Consumer]]):
        self.consumers = consumers
        modules = dict(model.named_modules())
        self._sums: dict[str, torch.Tensor] = {}
        self._blocks: dict[str, int] = {}
        self._handles = []
        for producer, items in consumers.items():
            for c in items:
                if c.name in self._blocks:
                    continue
                module = modules[c.name]
                width = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features // c.block
                self._blocks[c.name] = c.block
                self._sums[c.name] = torch.zeros(width, dtype=torch.float64, device=module.weight.device)
                self._handles.append(module.register_forward_pre_hook(partial(self._arm, c.name)))

    def scores(self, producer: str) -> torch.Tensor | None:
        """float64 [out_channels of ``producer``]: accumulated squared output gradient, or None if unknown."""
        items = self.consumers.get(producer)
        if not items:
            return None
        return sum(self._sums[c.name] for c in items)

    def reset(self) -> None:
        for s in self._sums.values():
            s.zero_()

    def all_reduce(self) -> None:
        """Sum the accumulators over the processes (torch.distributed), so every replica ranks alike."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for s in self._sums.values():
                torch.distributed.all_reduce(s)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: s.detach().cpu().clone() for name, s in self._sums.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, s in self._sums.items():
            if name in state:
                s.copy_(state[name].to(s))

    # ------------------------------------------------------------------ hooks
    def _arm(self, name: str, module: nn.Module, args) -> None:
        if not (module.training and torch.is_grad_enabled() and module.weight.requires_grad):
            return
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.requires_grad:
            x.register_hook(partial(self._accumulate, name))

    def _accumulate(self, name: str, grad: torch.Tensor) -> None:
        g = grad.detach().to(torch.float64)
        if g.dim() == 4:  # conv input [B, C, H, W]
            per_channel = g.pow(2).sum(dim=(0, 2, 3))
        else:  # linear input [B, C * block] (flattened channel-major)
            per_channel = g.pow(2).reshape(g.shape[0], -1, self._blocks[name]).sum(dim=(0, 2))
        self._sums[name] += per_channel
