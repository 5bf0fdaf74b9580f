"""``sparsify(model)``: convert every eligible layer of any model to a masked layer with an exact budget."""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, Iterable, Union

import torch
from torch import nn

from ..allocation import AllocationError, round_exact, water_fill
from .masked import MaskedConv2d, MaskedLayer, MaskedLinear
from .units import check_mode, expand_units, num_units, unit_size

__all__ = ["sparsify", "masked_layers", "apply_masks", "paired_norm", "initial_unit_counts", "exclusion_predicate",
           "NORM_TYPES"]

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)
ExcludeSpec = Union[None, str, type, Callable[[str, nn.Module], bool], Iterable[Union[str, type]]]


def masked_layers(model: nn.Module) -> list[tuple[str, MaskedLayer]]:
    """All masked layers of ``model`` in registration order, as (qualified name, module)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedLayer)]


def sparsify(
    model: nn.Module,
    density: float = 0.05,
    mode: str = "irregular",
    init: str = "uniform",
    exclude: ExcludeSpec = None,
    *,
    prune_first: bool = True,
    prune_last: bool | None = None,
    generator: torch.Generator | None = None,
    resparsify: bool = False,
) -> nn.Module:
    """Replace every eligible ``nn.Conv2d`` / ``nn.Linear`` of ``model`` by a masked layer, in place.

    The initial masks hold exactly ``K = round(density * N)`` active weights in total (``N`` = all
    prunable weights of the converted layers); in channel mode, where whole output channels are the
    unit, ``K`` is the reachable weight count nearest to that. Every layer keeps at least one unit.
    Weights, devices, dtypes and requires_grad flags are kept; pruned weights are set to zero.

    Args:
        model: any ``nn.Module``.
        density: fraction of prunable weights kept, in (0, 1].
        mode: "irregular" (single weights) or "channel" (output channels: conv filters / linear rows).
            In channel mode each layer's following norm layer (BatchNorm/GroupNorm) is paired with it so
            that a pruned channel's scale and shift are masked too.
        init: "uniform" (same density in every layer) or "erk" (Erdos-Renyi-Kernel scaling).
        exclude: layers to leave dense and uncounted: a name or glob pattern ("fc", "layer4.*"), a
            module type, an iterable of those, or a callable ``(name, module) -> bool``.
        prune_first: prune the first eligible layer (default True, as in sparse momentum).
        prune_last: prune the last eligible layer; default True in irregular mode and False in channel
            mode (pruning the classifier's rows would delete classes).
        generator: torch.Generator for the random masks (CPU), for reproducibility.
        resparsify: a model that already has masked layers is refused (new random masks would throw
            away its trained sparse structure); True draws new masks for it anyway.

    Returns:
        ``model`` itself (modified in place).

    Raises:
        ValueError: bad arguments, or a model that is already sparsified (without ``resparsify``).
        TypeError: ``model`` or ``exclude`` of the wrong type.
    """
    mode = check_mode(mode)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0.0 < float(density) <= 1.0):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    if init not in ("uniform", "erk"):
        raise ValueError(f"init must be 'uniform' or 'erk', got {init!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if prune_last is None:
        prune_last = mode == "irregular"
    excluded = exclusion_predicate(exclude)
    already = masked_layers(model)
    if already and not resparsify:
        names = ", ".join(name or "<model>" for name, _ in already[:3]) + (", ..." if len(already) > 3 else "")
        raise ValueError(
            f"model {type(model).__name__} is already sparsified ({len(already)} masked layers: {names}); "
            "sparsify would replace its masks by new random ones. Pass resparsify=True to do that on purpose"
        )

    candidates = [(n, m) for n, m in model.named_modules() if _eligible(m)]
    if not candidates:
        raise ValueError(
            f"model {type(model).__name__} has no prunable layer: sparsify converts nn.Conv2d and nn.Linear "
            "modules and found none"
        )
    chosen = []
    for i, (name, module) in enumerate(candidates):
        if excluded(name, module):
            continue
        if i == 0 and not prune_first or i == len(candidates) - 1 and not prune_last and len(candidates) > 1:
            continue
        chosen.append((name, module))
    if not chosen:
        raise ValueError(
            f"every prunable layer of {type(model).__name__} is excluded (exclude={exclude!r}, "
            f"prune_first={prune_first}, prune_last={prune_last}); nothing left to sparsify"
        )

    norms = _pair_norm_layers(model, [n for n, _ in chosen]) if mode == "channel" else {}
    weights = [m.weight for _, m in chosen]
    counts = initial_unit_counts(weights, density, mode, init)

    # Build everything first, then swap: an error above leaves the model untouched.
    replacements = []
    for (name, module), count in zip(chosen, counts):
        layer = module if isinstance(module, MaskedLayer) else _masked_copy(module)
        units = torch.zeros(num_units(layer.weight, mode), dtype=torch.bool)
        units[torch.randperm(units.numel(), generator=generator)[:count]] = True
        layer.sparsity_mode = mode
        layer.dnr_name = name
        layer.norm_name = norms.get(name)
        replacements.append((name, layer, expand_units(units, layer.weight, mode)))
    for name, layer, mask in replacements:
        model.set_submodule(name, layer)
        layer.set_mask(mask)
    apply_masks(model)
    return model


def initial_unit_counts(weights: list[torch.Tensor], density: float, mode: str, init: str) -> list[int]:
    """Active units per layer for the initial masks, with an exact (or nearest, in channel mode) budget.

    Args:
        weights: the prunable weight tensors, one per layer.
        density: target global density in (0, 1].
        mode: "irregular" or "channel".
        init: "uniform" or "erk".
    """
    sizes = [unit_size(w, mode) for w in weights]
    units = [num_units(w, mode) for w in weights]
    numel = [int(w.numel()) for w in weights]
    budget = int(round(density * sum(numel)))
    if init == "uniform":
        shares = [density * n for n in numel]
    else:
        shares = water_fill([_erk_score(w) * n for w, n in zip(weights, numel)], numel, budget)
    targets = [s / c for s, c in zip(shares, sizes)]
    lo = [1] * len(weights)
    if mode == "irregular" and budget < len(weights):
        raise ValueError(
            f"density {density} keeps {budget} weights, fewer than the {len(weights)} layers to sparsify "
            "(each layer keeps at least one weight)"
        )
    try:
        return round_exact(targets, sizes, lo, units, budget, nearest=True)
    except AllocationError as err:  # pragma: no cover - nearest=True only fails for empty bitsets
        raise ValueError(f"cannot allocate density {density} over the layers: {err}") from err


def apply_masks(model: nn.Module) -> None:
    """Zero every pruned weight; in channel mode also the bias and norm scale/shift of dead channels.

    Call after anything that writes weights (the rewiring controller does it after every optimizer step).
    """
    modules = None
    with torch.no_grad():
        for name, layer in masked_layers(model):
            layer.apply_mask()
            if getattr(layer, "sparsity_mode", "irregular") != "channel":
                continue
            dead = ~layer.channel_mask
            if layer.bias is not None:
                layer.bias.masked_fill_(dead, 0)
            norm_name = getattr(layer, "norm_name", None)
            if norm_name is None:
                continue
            if modules is None:
                modules = dict(model.named_modules())
            norm = paired_norm(modules, name, layer, norm_name)
            if norm.weight is not None:
                norm.weight.masked_fill_(dead, 0)
            if norm.bias is not None:
                norm.bias.masked_fill_(dead, 0)


def paired_norm(modules: dict, name: str, layer, norm_name: str) -> nn.Module:
    """Find the paired norm layer, also after the model was wrapped (e.g. DDP's 'module.' prefix)."""
    if norm_name in modules:
        return modules[norm_name]
    own = getattr(layer, "dnr_name", name)
    if name.endswith(own):
        prefixed = name[: len(name) - len(own)] + norm_name
        if prefixed in modules:
            return modules[prefixed]
    raise RuntimeError(f"norm layer {norm_name!r} paired with masked layer {name!r} is not in the model any more")


def _eligible(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight is not None


def _masked_copy(module: nn.Module) -> MaskedLayer:
    if isinstance(module, nn.Conv2d):
        return MaskedConv2d.from_dense(module)
    return MaskedLinear.from_dense(module)




def exclusion_predicate(exclude: ExcludeSpec) -> Callable[[str, nn.Module], bool]:
    """``exclude`` of :func:`sparsify` (and :func:`dnr.nn.block_circulant.circulant`) as a predicate ``(name, module)
    -> bool``; a TypeError for anything that is not a name, glob pattern, module type, list of those or callable."""
    if exclude is None:
        return lambda name, module: False
    if callable(exclude) and not isinstance(exclude, type):
        return exclude
    if not isinstance(exclude, (str, type)) and not isinstance(exclude, Iterable):
        raise TypeError(
            f"exclude must be a layer name or glob pattern, a module type, a list of those, or a callable "
            f"(name, module) -> bool; got {exclude!r} ({type(exclude).__name__})"
        )
    items = [exclude] if isinstance(exclude, (str, type)) else list(exclude)
    for item in items:
        if not isinstance(item, (str, type)):
            raise TypeError(
                f"exclude entries must be layer names, glob patterns or module types, got {item!r}"
            )
    patterns = [i for i in items if isinstance(i, str)]
    types = tuple(i for i in items if isinstance(i, type))
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns) or (
        bool(types) and isinstance(module, types)
    )


def _erk_score(weight: torch.Tensor) -> float:
    """Erdos-Renyi-Kernel density scale: sum of the weight's dims over their product."""
    return sum(weight.shape) / math.prod(weight.shape)


def _pair_norm_layers(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Map each masked layer name to the norm layer that directly consumes its output (channel mode).

    Uses torch.fx when the model traces; otherwise the norm layer registered right after the layer
    with a matching channel count.
    """
    wanted = set(names)
    pairs: dict[str, str] = {}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # models with data-dependent control flow do not trace
        graph = None
    if graph is not None:
        modules = dict(model.named_modules())
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules.get(node.target), NORM_TYPES):
                continue
            src = node.args[0] if node.args else None
            if getattr(src, "op", None) == "call_module" and src.target in wanted:
                pairs[src.target] = node.target
        return {k: v for k, v in pairs.items() if _channels_match(modules[k], modules[v])}
    ordered = list(model.named_modules())
    for i, (name, module) in enumerate(ordered):
        if name not in wanted:
            continue
        for later_name, later in ordered[i + 1:]:
            if isinstance(later, NORM_TYPES):
                if _channels_match(module, later):
                    pairs[name] = later_name
                break
            if _eligible(later):
                break
    return pairs


def _channels_match(layer: nn.Module, norm: nn.Module) -> bool:
    out = layer.weight.shape[0]
    channels = norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features
    return channels == out
