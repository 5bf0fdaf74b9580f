"""Masked layers: drop-in replacements for ``nn.Conv2d`` and ``nn.Linear``.

Each layer holds a boolean ``mask`` buffer with the weight's shape (it is part of the state dict).
The forward pass uses ``weight * mask``; by default the weight gradient is the DENSE gradient (the
gradient with respect to the effective weight at every position, pruned ones included), because DNR's
momentum-based regrowth needs momentum at pruned positions. Set ``dense_weight_grad = False`` on a
layer to get the masked gradient instead.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops

__all__ = ["MaskedConv2d", "MaskedLinear", "MaskedLayer", "is_masked"]


class MaskedLayer:
    """Mixin with the mask handling shared by the masked layers.

    Attributes:
        mask: bool tensor, same shape as ``weight``; True = active weight.
        dense_weight_grad: whether ``weight.grad`` is dense (default) or masked.
    """

    mask: torch.Tensor
    weight: nn.Parameter
    dense_weight_grad: bool

    def _init_mask(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.dense_weight_grad = True

    @property
    def num_prunable(self) -> int:
        """Number of prunable weights N_l (the weight's element count)."""
        return self.weight.numel()

    @property
    def num_active(self) -> int:
        """Number of active (unmasked) weights."""
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        return self.num_active / max(1, self.num_prunable)

    @property
    def channel_mask(self) -> torch.Tensor:
        """bool [out_features]: True for output channels that hold at least one active weight."""
        return self.mask.reshape(self.mask.shape[0], -1).any(dim=1)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (copied into the buffer) and zero the weights it prunes.

        Args:
            mask: bool (or 0/1) tensor with the weight's shape, on any device.
        """
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}, expected the weight's shape {tuple(self.weight.shape)}"
            )
        if mask.dtype != torch.bool:
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("mask must be boolean or hold only 0 and 1 values")
            mask = mask != 0
        with torch.no_grad():
            self.mask.copy_(mask.to(self.mask.device))
            self.apply_mask()

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the pruned weights in place (and the bias of fully pruned output channels)."""
        self.weight.mul_(self.mask)

    def _copy_from(self, dense: nn.Module):
        """Copy weight, bias, requires_grad flags and train/eval mode from the dense layer; returns self."""
        with torch.no_grad():
            self.weight.copy_(dense.weight)
            if dense.bias is not None:
                self.bias.copy_(dense.bias)
        self.weight.requires_grad_(dense.weight.requires_grad)
        if dense.bias is not None:
            self.bias.requires_grad_(dense.bias.requires_grad)
        self.train(dense.training)
        return self

    def _check_mask(self) -> None:
        # A mask assigned or loaded with the wrong shape would silently broadcast; refuse it.
        if self.mask.shape != self.weight.shape:
            raise ValueError(
                f"{type(self).__name__}.mask has shape {tuple(self.mask.shape)}, "
                f"expected the weight's shape {tuple(self.weight.shape)}"
            )
        if self.mask.device != self.weight.device:
            raise ValueError(
                f"{type(self).__name__}.mask is on {self.mask.device} but weight is on {self.weight.device}; "
                "move the whole module with .to(device)"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "mask"
        if key in state_dict:
            m = state_dict[key]
            if tuple(m.shape) != tuple(self.weight.shape):
                error_msgs.append(
                    f"size mismatch for {key}: checkpoint mask has shape {tuple(m.shape)}, "
                    f"expected {tuple(self.weight.shape)}"
                )
                return
            if m.dtype != torch.bool:
                state_dict[key] = m != 0
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    """``nn.Conv2d`` with a weight mask. Same constructor arguments as ``nn.Conv2d``.

    Shapes: input [B, C_in, H, W] -> output [B, C_out, H', W']; ``weight`` and ``mask``
    [C_out, C_in / groups, kH, kW].
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask()

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> "MaskedConv2d":
        """Build a masked copy of ``conv`` sharing its device and dtype, with an all-ones mask."""
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        return layer._copy_from(conv)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_mask()
        padding = self.padding
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        elif isinstance(padding, str):
            padding = _resolve_same_padding(padding, self.kernel_size, self.dilation)
            if padding is None:  # asymmetric 'same' padding: pad explicitly as nn.Conv2d does
                input = nn.functional.pad(input, self._reversed_padding_repeated_twice)
                padding = 0
        return ops.masked_conv2d(
            input, self.weight, self.mask, self.bias, stride=self.stride, padding=padding,
            dilation=self.dilation, groups=self.groups, dense_weight_grad=self.dense_weight_grad,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", density={self.density:.4f}"


class MaskedLinear(MaskedLayer, nn.Linear):
    """``nn.Linear`` with a weight mask. Same constructor arguments as ``nn.Linear``.

    Shapes: input [..., in_features] -> output [..., out_features]; ``weight`` and ``mask``
    [out_features, in_features].
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask()

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> "MaskedLinear":
        """Build a masked copy of ``linear`` sharing its device and dtype, with an all-ones mask."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        return layer._copy_from(linear)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_mask()
        return ops.masked_linear(input, self.weight, self.mask, self.bias,
                                 dense_weight_grad=self.dense_weight_grad)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", density={self.density:.4f}"


def is_masked(module: nn.Module) -> bool:
    """True for the package's masked layers."""
    return isinstance(module, MaskedLayer)


def _resolve_same_padding(padding: str, kernel_size, dilation):
    """Symmetric padding for padding='same'/'valid'; None when 'same' needs asymmetric padding."""
    if padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return tuple(pads)
