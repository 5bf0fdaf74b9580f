"""Per-channel input normalisation as a model layer.

Attacks in :mod:`dnr.attacks` work on raw pixels in ``[0, 1]``; the mean/std normalisation
therefore lives inside the model, as its first layer, so that the eps-ball and the pixel-range
projection are taken in pixel space and the gradient flows through the normalisation.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["Normalize"]

_Stats = Union[float, Sequence[float], Tensor]


def _as_vector(value: _Stats, name: str) -> Tensor:
    """Turn a float, a sequence of floats or a tensor into a 1-D float tensor [C]."""
    if isinstance(value, bool):
        raise TypeError(f"Normalize: {name} must be a float, a sequence of floats or a tensor, got bool {value!r}")
    if isinstance(value, Tensor):
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"Normalize: {name} must be a real-valued tensor, got dtype {value.dtype}")
        dtype = value.dtype if value.is_floating_point() else torch.get_default_dtype()
        t = value.detach().to(dtype=dtype).clone()
    else:
        try:
            t = torch.as_tensor(value, dtype=torch.get_default_dtype())
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"Normalize: {name} must be a float, a sequence of floats or a tensor, got {value!r}"
            ) from exc
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(
            f"Normalize: {name} must be a scalar or a non-empty 1-D sequence (one value per channel), "
            f"got shape {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"Normalize: {name} must be finite, got {t.tolist()}")
    return t


class Normalize(nn.Module):
    """``y = (x - mean) / std`` per channel.

    Args:
        mean: per-channel mean, a float or a sequence/tensor of length ``C``.
        std: per-channel standard deviation, same length as ``mean``, every entry ``> 0``.

    Buffers ``mean`` and ``std`` have shape ``[C]`` (saved in the ``state_dict`` and moved by
    ``.to()``). Channels are dimension 1 of the input:

    - ``[B, C, H, W]`` (images) or any ``[B, C, *]``: ``mean`` is broadcast over the trailing dims;
    - ``[B, C]`` (feature vectors): per feature.

    A length-1 ``mean``/``std`` applies to any number of channels. Output has the input's shape
    and dtype.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: _Stats, std: _Stats) -> None:
        super().__init__()
        mean_t = _as_vector(mean, "mean")
        std_t = _as_vector(std, "std")
        if mean_t.numel() != std_t.numel():
            raise ValueError(
                f"Normalize: mean and std must have the same length, got len(mean)={mean_t.numel()} "
                f"and len(std)={std_t.numel()}"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"Normalize: every std must be > 0, got std={std_t.tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    @property
    def num_channels(self) -> int:
        return self.mean.numel()

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[B, C, *]`` -> same shape."""
        return _normalize(x, self.mean, self.std)

    def extra_repr(self) -> str:
        def fmt(t: Tensor) -> str:
            vals = [float(v) for v in t.tolist()]
            return "(" + ", ".join(f"{v:.4g}" if math.isfinite(v) else str(v) for v in vals) + ")"

        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"


@torch.fx.wrap
def _normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x - mean) / std per channel (dim 1). A leaf for torch.fx, so models with Normalize trace."""
    if x.dim() < 2:
        raise ValueError(
            f"Normalize: input must have shape [B, C, ...] (at least 2 dims), got shape {tuple(x.shape)}"
        )
    c = mean.numel()
    if c != 1 and x.shape[1] != c:
        raise ValueError(
            f"Normalize: input has {x.shape[1]} channels (dim 1 of shape {tuple(x.shape)}) but mean/std have {c}"
        )
    # Compute in the input's dtype so bf16/fp16 models are not silently upcast.
    view = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.to(dtype=x.dtype).view(view)) / std.to(dtype=x.dtype).view(view)
