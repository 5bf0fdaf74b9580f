"""A deterministic synthetic image classification set for smoke runs (no files needed).

Each class c has a fixed smooth random pattern P_c (a 4x4 grid of uniform values per channel,
bilinearly upsampled to the image size); an example of class c is
``clamp(0.2 + 0.6 * P_c + noise * N(0, 1), 0, 1)`` quantised to uint8. Patterns depend only on
``seed``; the noise also on the split, so train and test are different draws of the same classes.
Labels are balanced (``arange(N) % num_classes``, shuffled). A nearest-class-mean classifier already
separates the classes at the default noise, so any model can learn them.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["make_synthetic", "SYNTHETIC_DEFAULTS"]

SYNTHETIC_DEFAULTS = dict(num_classes=10, in_channels=3, input_size=32, seed=0, noise=0.15)
_DEFAULT_SIZE = {"train": 1024, "test": 256}


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"synthetic: {name} must be an int >= {minimum}, got {value!r}")
    return value


def make_synthetic(split: str, size: int | None = None, num_classes: int = 10, in_channels: int = 3,
                   input_size: int = 32, seed: int = 0, noise: float = 0.15):
    """Generate one split.

    Args:
        split: "train" or "test" (different noise/label draws, same class patterns).
        size: number of examples (None: 1024 train, 256 test).
        num_classes, in_channels, input_size: label count and image shape [in_channels, S, S].
        seed: determines everything (same arguments -> identical tensors).
        noise: std of the per-pixel Gaussian noise (in [0, 1] pixel units), >= 0.

    Returns:
        (images uint8 tensor [N, C, S, S], labels int64 tensor [N], class names ("0", "1", ...)).
    """
    if split not in _DEFAULT_SIZE:
        raise ValueError(f"synthetic: split must be 'train' or 'test', got {split!r}")
    size = _DEFAULT_SIZE[split] if size is None else _check_int("size", size, 1)
    _check_int("num_classes", num_classes, 2)
    _check_int("in_channels", in_channels, 1)
    _check_int("input_size", input_size, 4)
    _check_int("seed", seed, 0)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"synthetic: noise must be a number >= 0, got {noise!r}")
    proto_gen = torch.Generator().manual_seed(seed)
    grid = torch.rand(num_classes, in_channels, 4, 4, generator=proto_gen, dtype=torch.float64)
    patterns = F.interpolate(grid, size=(input_size, input_size), mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(seed * 2 + 1 + (split == "test"))
    labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=gen)]
    x = 0.2 + 0.6 * patterns[labels]
    x += noise * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    images = x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return images, labels, tuple(str(i) for i in range(num_classes))
