"""Argument checks and the input-normalisation layer shared by the model builders."""

from __future__ import annotations

from torch import nn

from ..nn.normalize import Normalize


def input_normalization(mean, std, in_channels: int, model: str) -> nn.Module:
    """``Normalize(mean, std)`` (or ``nn.Identity`` when both are None) for ``in_channels`` inputs.

    A length-1 mean/std applies to every channel; otherwise the length must equal ``in_channels``.
    """
    if mean is None and std is None:
        return nn.Identity()
    if mean is None or std is None:
        raise ValueError(f"{model}: pass both mean and std or neither, got mean={mean!r}, std={std!r}")
    norm = Normalize(mean, std)
    if norm.num_channels not in (1, in_channels):
        raise ValueError(
            f"{model}: mean/std have {norm.num_channels} values but in_channels={in_channels}; "
            f"expected 1 or {in_channels}"
        )
    return norm


def check_positive_int(value, name: str, model: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{model}: {name} must be a positive int, got {value!r}")
    return value


def init_weights(model: nn.Module) -> None:
    # Kaiming-normal (fan_out) for convs as in torchvision's VGG/ResNet; BN starts at identity.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
