"""Standard image augmentation in pure torch: random crop with zero padding and horizontal flip.

Works on one image [C, H, W] or a batch [B, C, H, W] of any dtype (uint8 or float) on any device;
the output has the input's shape, dtype and device. Randomness comes from ``generator`` (a
torch.Generator; its device is where the random numbers are drawn, CPU by default) or, when None,
from torch's global RNG, so a seeded generator gives reproducible results.

Per example, in this order (as torchvision's RandomCrop(S, padding=p) then RandomHorizontalFlip()):
1. crop: pad p zeros on every side, then take the S x S window at offset (dy, dx), dy and dx
   uniform in 0..2p (p = 0: unchanged);
2. flip: mirror left-right (the last dim) with probability 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Augmentation", "random_crop", "random_hflip"]


def _as_batch(x: Tensor, fn: str) -> tuple[Tensor, bool]:
    if not isinstance(x, Tensor) or x.dim() not in (3, 4):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be an image [C, H, W] or a batch [B, C, H, W], got {shape}")
    return (x.unsqueeze(0), True) if x.dim() == 3 else (x, False)


def _draw(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device)


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad by ``padding`` on every side and crop back to the input size at a random offset.

    Args:
        x: [C, H, W] or [B, C, H, W]; each example of a batch gets its own offset.
        padding: p >= 0; offsets (dy, dx) are uniform in 0..2p (drawn dy for all examples, then dx).
        generator: source of randomness (None: global RNG).

    Returns:
        Same shape/dtype/device as ``x``: ``out[b] = pad(x[b])[:, dy:dy+H, dx:dx+W]``.
    """
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"random_crop: padding must be an int >= 0, got {padding!r}")
    xb, single = _as_batch(x, "random_crop")
    if padding == 0:
        return x.clone()
    b, c, h, w = xb.shape
    dy = _draw(2 * padding + 1, b, generator, xb.device)
    dx = _draw(2 * padding + 1, b, generator, xb.device)
    padded = torch.nn.functional.pad(xb, (padding, padding, padding, padding))  # zero padding
    if b == 1:  # one image (the per-item path of a Dataset): plain slicing is twice as fast
        y0, x0 = int(dy[0]), int(dx[0])
        out = padded[:, :, y0:y0 + h, x0:x0 + w].clone()
        return out[0] if single else out
    # two gathers (rows, then columns) crop every example at its own offset: a few kernels for the
    # whole batch on any device, as fast on the CPU as slicing one offset at a time
    rows = (dy[:, None] + torch.arange(h, device=xb.device))[:, None, :, None].expand(b, c, h, w + 2 * padding)
    cols = (dx[:, None] + torch.arange(w, device=xb.device))[:, None, None, :].expand(b, c, h, w)
    out = padded.gather(2, rows).gather(3, cols)
    return out[0] if single else out


def random_hflip(x: Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> Tensor:
    """Mirror each example left-right (last dim) with probability ``p``.

    Args:
        x: [C, H, W] or [B, C, H, W].
        generator: source of randomness (None: global RNG); one uniform draw per example.
        p: flip probability in [0, 1].
    """
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"random_hflip: p must be in [0, 1], got {p!r}")
    xb, single = _as_batch(x, "random_hflip")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    flip = (torch.rand(xb.shape[0], generator=generator, device=gen_device) < p).to(xb.device)
    if xb.shape[0] == 1:  # one image: no gather
        out = xb.flip(-1) if bool(flip[0]) else xb.clone()
    else:
        out = xb.clone()
        sel = flip.nonzero().squeeze(1)
        out.index_copy_(0, sel, xb.index_select(0, sel).flip(-1))
    return out[0] if single else out


@dataclass(frozen=True)
class Augmentation:
    """Random crop (``padding`` > 0) then random horizontal flip (``flip``), see the module docstring.

    ``aug(x, generator)`` takes [C, H, W] or [B, C, H, W] and returns the same shape; use it per
    sample (what ``build_dataset(..., augment=True)`` does) or per batch on the GPU.
    """

    padding: int = 0
    flip: bool = False

    def __post_init__(self):
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"Augmentation: padding must be an int >= 0, got {self.padding!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"Augmentation: flip must be a bool, got {self.flip!r}")

    @property
    def is_identity(self) -> bool:
        return self.padding == 0 and not self.flip

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.padding:
            x = random_crop(x, self.padding, generator)
        if self.flip:
            x = random_hflip(x, generator)
        return x
