"""A plain ``nn.Conv2d`` / ``nn.Linear`` standing in for a structured layer (masked, block-circulant): what
``dnr.export``'s ONNX form and ``densify_circulant`` put in a model so that it runs without dnr's layers."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["plain_layer"]


@torch.no_grad()
def plain_layer(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A plain layer with ``layer``'s geometry, bias and train/eval mode, holding ``weight``.

    Args:
        layer: a conv-like layer (``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``,
            ``dilation``; ``groups`` and ``padding_mode`` when it has them) or a linear-like one
            (``in_features``, ``out_features``); ``layer.bias`` may be None.
        weight: the dense weight, float ``[C_out, C_in / groups, kh, kw]`` or ``[out, in]``; its device and
            dtype are the new layer's.

    Returns:
        ``nn.Conv2d`` or ``nn.Linear`` with copies of ``weight`` and the bias.
    """
    factory = dict(device=weight.device, dtype=weight.dtype)
    bias = getattr(layer, "bias", None)
    if hasattr(layer, "kernel_size"):
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation, groups=getattr(layer, "groups", 1),
                          bias=bias is not None, padding_mode=getattr(layer, "padding_mode", "zeros"), **factory)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, **factory)
    plain.weight.copy_(weight)
    if bias is not None:
        plain.bias.copy_(bias)
    return plain.train(layer.training)
