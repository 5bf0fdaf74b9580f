"""Masked layers, ``sparsify(model)``, ``density_report(model)`` and the input ``Normalize`` layer."""

from .masked import MaskedConv2d, MaskedLayer, MaskedLinear, is_masked
from .normalize import Normalize
from .report import DensityReport, LayerDensity, density_report
from .sparsify import apply_masks, masked_layers, sparsify

__all__ = ["MaskedConv2d", "MaskedLinear", "MaskedLayer", "is_masked", "Normalize", "sparsify",
           "masked_layers", "apply_masks", "density_report", "DensityReport", "LayerDensity"]
