"""Masked layers, ``sparsify(model)``, ``density_report(model)``, the input ``Normalize`` layer, the models'
``MaxPool2d`` and ``BatchNorm2d`` (CPU kernels for the 2x2 pool and the eval-mode BatchNorm gradient), and the block-circulant layers with
``circulant(model, block_size)``."""

from .batchnorm import BatchNorm2d
from .block_circulant import (BlockCirculantConv2d, BlockCirculantLayer, BlockCirculantLinear, block_circulant_conv2d,
                              block_circulant_dense, block_circulant_matmul, circulant, circulant_layers,
                              circulant_report, densify_circulant, set_circulant_impl)
from .masked import MaskedConv2d, MaskedLayer, MaskedLinear, is_masked
from .normalize import Normalize
from .pooling import MaxPool2d, max_pool2x2
from .recurrent import BlockCirculantGRU, BlockCirculantLSTM  # E-RNN recurrent layers (issue 17)
from .report import DensityReport, LayerDensity, density_report
from .sparsify import apply_masks, masked_layers, sparsify
from .torch_layers import torch_layers

__all__ = ["MaskedConv2d", "MaskedLinear", "MaskedLayer", "is_masked", "Normalize", "MaxPool2d", "max_pool2x2",
           "BatchNorm2d", "torch_layers", "sparsify", "masked_layers", "apply_masks", "density_report", "DensityReport", "LayerDensity",
           "BlockCirculantLinear", "BlockCirculantConv2d", "BlockCirculantLayer", "block_circulant_matmul",
           "block_circulant_conv2d", "block_circulant_dense", "circulant", "circulant_layers", "circulant_report",
           "densify_circulant", "set_circulant_impl",
           "BlockCirculantLSTM", "BlockCirculantGRU"]
