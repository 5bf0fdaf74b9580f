"""The models' drop-in layers back to torch's own classes.

``dnr.nn.MaxPool2d`` and ``dnr.nn.BatchNorm2d`` subclass ``nn.MaxPool2d`` and ``nn.BatchNorm2d`` (same
arguments, state dict and results; a CPU kernel inside). ``isinstance`` checks see torch's layers, but a tool
that matches exact types does not: ``torch.ao.quantization.fuse_modules`` finds no fuser for
``(Conv2d, dnr BatchNorm2d, ReLU)`` and ``torch.fx.experimental.optimization.fuse`` leaves such BatchNorms
unfolded. :func:`torch_layers` gives such tools the model with torch's classes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from .batchnorm import BatchNorm2d
from .pooling import MaxPool2d

__all__ = ["torch_layers"]


def _torch_batch_norm(layer: BatchNorm2d) -> nn.BatchNorm2d:
    # the floating-point tensors' dtype and device (None: neither weights nor running statistics)
    ref = next((t for t in (layer.weight, layer.running_var) if t is not None), None)
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    plain = nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
                           **factory)
    plain.load_state_dict(layer.state_dict())
    for name, p in layer.named_parameters(recurse=False):
        getattr(plain, name).requires_grad_(p.requires_grad)
    return plain.train(layer.training)


def _torch_max_pool(layer: MaxPool2d) -> nn.MaxPool2d:
    return nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                        return_indices=layer.return_indices, ceil_mode=layer.ceil_mode)


_TORCH_CLASS = {BatchNorm2d: _torch_batch_norm, MaxPool2d: _torch_max_pool}


def torch_layers(model: nn.Module, inplace: bool = False, kinds: Sequence[type] = (BatchNorm2d, MaxPool2d)) -> nn.Module:
    """``model`` with every ``dnr.nn.BatchNorm2d`` / ``dnr.nn.MaxPool2d`` replaced by ``nn.BatchNorm2d`` /
    ``nn.MaxPool2d`` with the same arguments, state (dtype and device included), mode and ``requires_grad``:
    the same outputs, torch's classes. A copy unless ``inplace``; the model itself may be such a layer.
    ``kinds`` limits the replacement to some of the two classes (the benchmarks compare one at a time)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"torch_layers: model must be an nn.Module, got {type(model).__name__}")
    unknown = [k for k in kinds if k not in _TORCH_CLASS]
    if unknown:
        raise ValueError(f"torch_layers: kinds must be among dnr.nn.BatchNorm2d, dnr.nn.MaxPool2d, got {unknown}")
    replace = [(kind, _TORCH_CLASS[kind]) for kind in kinds]
    if not inplace:
        model = copy.deepcopy(model)
    for kind, make in replace:
        if isinstance(model, kind):
            return make(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            for kind, make in replace:
                if isinstance(child, kind):
                    setattr(parent, name, make(child))
                    break
    return model
