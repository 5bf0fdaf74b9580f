"""Views of a masked layer in pruning units: single weights (irregular) or output channels (channel).

In channel mode a unit is one output channel (a conv filter or a linear row) holding
``weight[0].numel()`` weights; its mask row is all True or all False.
"""

from __future__ import annotations

import torch

MODES = ("irregular", "channel")

__all__ = ["MODES", "check_mode", "unit_size", "num_units", "active_units", "expand_units", "unit_scores"]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def unit_size(weight: torch.Tensor, mode: str) -> int:
    """Weights per unit: 1 (irregular) or in_ch/groups * kh * kw (channel)."""
    return 1 if mode == "irregular" else int(weight[0].numel())


def num_units(weight: torch.Tensor, mode: str) -> int:
    """Units in the layer: weight.numel() (irregular) or out_channels (channel)."""
    return int(weight.numel()) if mode == "irregular" else int(weight.shape[0])


def active_units(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """bool [num_units]: which units are active. A channel counts as active if any weight in it is."""
    if mode == "irregular":
        return mask.reshape(-1)
    return mask.reshape(mask.shape[0], -1).any(dim=1)


def expand_units(units: torch.Tensor, like: torch.Tensor, mode: str) -> torch.Tensor:
    """Inverse of ``active_units``: bool [num_units] -> bool mask with ``like``'s shape."""
    if mode == "irregular":
        return units.reshape(like.shape)
    return units.reshape(-1, *([1] * (like.dim() - 1))).expand(like.shape).clone()


def unit_scores(tensor: torch.Tensor, mode: str) -> torch.Tensor:
    """float32 [num_units]: |t| per weight (irregular) or the L2 norm of each output channel (channel)."""
    t = tensor.detach()
    if mode == "irregular":
        return t.reshape(-1).abs().float()
    return t.reshape(t.shape[0], -1).float().norm(dim=1)
