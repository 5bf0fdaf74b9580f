"""``ImageDataset``: a whole split held in memory as uint8, served as float32 in [0, 1]."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from .augment import Augmentation

__all__ = ["ImageDataset"]


class ImageDataset(Dataset):
    """Images uint8 [N, C, H, W] and labels int64 [N]; item i is ``(float32 [C, H, W] in [0, 1], int64 [])``.

    Args:
        images: uint8 tensor [N, C, H, W] (kept as is, not copied).
        labels: int64 tensor [N] with values in 0..num_classes-1.
        classes: class names, index = label.
        augmentation: applied per item to the uint8 image before the conversion (None: none).
        generator: randomness of the augmentation (None: torch's global RNG). In DataLoader workers
            each worker uses its own generator seeded from this one's initial seed and the worker's
            seed, so workers do not repeat each other and results still follow the loader's seed.

    Attributes ``images``, ``labels``, ``classes``, ``augmentation`` are public: a trainer may move
    ``images`` to the GPU and apply ``augmentation`` per batch instead of going through items.
    """

    def __init__(self, images: Tensor, labels: Tensor, classes: Sequence[str],
                 augmentation: Augmentation | None = None, generator: torch.Generator | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"ImageDataset: images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{list(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(f"ImageDataset: labels must be int64 [{images.shape[0]}], got {labels.dtype} "
                             f"{list(labels.shape)}")
        self.images = images
        self.labels = labels
        self.classes = tuple(classes)
        self.augmentation = None if augmentation is None or augmentation.is_identity else augmentation
        self.generator = generator
        self._worker: tuple[int, torch.Generator] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def _rng(self) -> torch.Generator | None:
        info = get_worker_info()
        if info is None or self.generator is None:
            return self.generator  # None in a worker: DataLoader seeds the global RNG per worker
        if self._worker is None or self._worker[0] != info.seed:
            seed = (self.generator.initial_seed() * 1_000_003 + info.seed) % (2 ** 63)
            self._worker = (info.seed, torch.Generator().manual_seed(seed))
        return self._worker[1]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.images[index]
        if self.augmentation is not None:
            x = self.augmentation(x, self._rng())
        return x.to(torch.float32).div_(255.0), self.labels[index]

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return (f"ImageDataset(n={n}, shape=[{c}, {h}, {w}], classes={len(self.classes)}, "
                f"augmentation={self.augmentation})")
