"""Magnitude pruning to an exact budget: the selection shared by one-shot pruning, ADMM's projection and RSR.

A *unit* is a single weight (irregular mode) or a whole output channel (channel mode); see
:mod:`dnr.nn.units`. The budget is the one ``dnr.sparsify`` and the DNR controller use:
``K = round(density * N)`` weights over the ``N`` prunable weights (in channel mode the reachable
weight count nearest to ``K``), every layer keeping at least one unit.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..allocation import round_exact
from ..nn.sparsify import apply_masks, initial_unit_counts, masked_layers
from ..nn.units import expand_units, num_units, unit_scores, unit_size

__all__ = ["SCOPES", "unit_counts", "magnitude_masks", "prune_by_magnitude", "model_mode"]

SCOPES = ("layer", "global")


def unit_counts(tensors: Sequence[torch.Tensor], density: float, mode: str, scope: str,
                init: str = "uniform") -> list[int]:
    """Units to keep per layer so that the total is the exact global budget.

    Args:
        tensors: one tensor per layer with the weight's shape (the weights, or ADMM's ``W + U``).
        density: global fraction of weights kept, in (0, 1].
        mode: "irregular" or "channel".
        scope: "layer": the per-layer counts of ``dnr.sparsify``'s initial mask (``init`` says how the
            budget is split: "uniform" or "erk"), independent of the values; "global": the largest
            magnitudes over all layers compete for the budget (channels by their RMS, so filters of
            different fan-in compare), every layer keeping its best unit.
        init: the per-layer split for ``scope="layer"``.

    Returns:
        list of ints, one per layer, each in [1, units of the layer].
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "layer":
        return initial_unit_counts(list(tensors), density, mode, init)
    sizes = [unit_size(t, mode) for t in tensors]
    units = [num_units(t, mode) for t in tensors]
    budget = int(round(density * sum(int(t.numel()) for t in tensors)))
    if budget < len(tensors):
        raise ValueError(f"density {density} keeps {budget} weights, fewer than the {len(tensors)} layers "
                         "(each layer keeps at least one unit)")
    # per-weight comparable scores: |w| (irregular) or the channel's RMS = L2 norm / sqrt(size)
    scores = [unit_scores(t, mode) / math.sqrt(s) for t, s in zip(tensors, sizes)]
    layer_of = torch.cat([torch.full((len(sc),), i, dtype=torch.long) for i, sc in enumerate(scores)])
    flat = torch.cat(scores)
    best = torch.zeros_like(flat, dtype=torch.bool)  # every layer's top unit is reserved
    offset = 0
    for sc in scores:
        best[offset + int(torch.argmax(sc))] = True
        offset += len(sc)
    order = torch.argsort(torch.where(best, torch.full_like(flat, math.inf), flat), descending=True,
                          stable=True)
    unit_weights = torch.tensor(sizes, dtype=torch.long)[layer_of[order]]
    # greedy in score order: the largest units whose weights fit in the budget
    taken = order[torch.cumsum(unit_weights, 0) <= budget]
    targets = torch.bincount(layer_of[taken], minlength=len(tensors)).tolist()
    targets = [max(1, t) for t in targets]
    if all(s == 1 for s in sizes):
        return targets  # irregular: the greedy prefix is exactly K weights
    return round_exact([float(t) for t in targets], sizes, [1] * len(sizes), units, budget, nearest=True)


def magnitude_masks(tensors: Sequence[torch.Tensor], counts: Sequence[int], mode: str) -> list[torch.Tensor]:
    """Keep the ``counts[l]`` units of largest magnitude in each tensor.

    Args:
        tensors: one tensor per layer (any shape; channel mode: dim 0 is the output channel).
        counts: units kept per layer.
        mode: "irregular" (|w|) or "channel" (L2 norm of each output channel).

    Returns:
        bool masks with the tensors' shapes; ties are broken by position (stable sort).
    """
    masks = []
    for t, k in zip(tensors, counts):
        scores = unit_scores(t, mode)
        keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        keep[torch.argsort(scores, descending=True, stable=True)[:int(k)]] = True
        masks.append(expand_units(keep, t, mode))
    return masks


def model_mode(model: nn.Module) -> str:
    """The sparsity mode shared by all masked layers of ``model``."""
    layers = masked_layers(model)
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no masked layer: call dnr.sparsify(model, ...) first")
    modes = {getattr(layer, "sparsity_mode", "irregular") for _, layer in layers}
    if len(modes) != 1:
        raise ValueError(f"all masked layers must use one sparsity mode, found {sorted(modes)}")
    return modes.pop()


@torch.no_grad()
def prune_by_magnitude(model: nn.Module, density: float, *, scope: str = "layer", init: str = "uniform") -> dict:
    """One-shot magnitude pruning of a (dense-masked) model to exactly the global budget, in place.

    Sets every masked layer's mask to its largest-magnitude units, zeroes the pruned weights and, in
    channel mode, the bias and norm scale/shift of pruned channels (``dnr.apply_masks``).

    Args:
        model: a model converted with ``dnr.sparsify`` (its current masks are replaced).
        density: global fraction of weights kept, in (0, 1].
        scope: "layer" or "global" (see :func:`unit_counts`).
        init: the per-layer split for ``scope="layer"``: "uniform" or "erk".

    Returns:
        dict: "event" "prune", "scope", "active" (weights kept), "density", "layers" {name: density}.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    mode = model_mode(model)
    layers = masked_layers(model)
    weights = [layer.weight.detach() * layer.mask for _, layer in layers]
    counts = unit_counts(weights, density, mode, scope, init)
    for (_, layer), mask in zip(layers, magnitude_masks(weights, counts, mode)):
        layer.set_mask(mask)
    apply_masks(model)
    active = sum(int(layer.mask.sum()) for _, layer in layers)
    total = sum(layer.weight.numel() for _, layer in layers)
    return {"event": "prune", "scope": scope, "active": active, "density": active / total,
            "layers": {name: layer.density for name, layer in layers}}
