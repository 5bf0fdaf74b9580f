"""``BatchLoader``: training batches straight from an in-memory :class:`ImageDataset`, one gather per batch.

A ``DataLoader`` over an ``ImageDataset`` converts and augments every image on its own in Python (33 ms
per batch of 256 CIFAR-shaped images with crop + flip on one CPU core, ``benchmarks/bench_batch_loader.py``:
most of engineering.md's 47 ms bf16 ResNet-18 PGD-7 step on an H200). ``BatchLoader`` indexes the uint8 images once per batch, augments the whole batch with the
same crop and flip (:mod:`dnr.data.augment`), and converts it once; on a GPU it keeps the images there
(when they fit under ``max_device_bytes``), so a batch costs a few kernels and no host transfer.

Without augmentation it yields exactly the tensors a ``DataLoader`` with the same batch sampler does.
With augmentation every example gets its own crop offset and flip as before, drawn per batch from the
dataset's generator (dy for the batch, dx for the batch, then the flips), so the draws differ from
the per-item path's order but follow the same generator: a checkpointed generator resumes exactly.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import Subset

from .dataset import ImageDataset

__all__ = ["BatchLoader"]

DEFAULT_MAX_DEVICE_BYTES = 8 * 1024 ** 3


def _unwrap(dataset) -> tuple[ImageDataset, Tensor | None] | None:
    """The ImageDataset under ``dataset`` (through any Subsets) and the index map into it, or None."""
    index = None
    while isinstance(dataset, Subset):
        outer = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        index = outer if index is None else outer[index]
        dataset = dataset.dataset
    if isinstance(dataset, ImageDataset):
        return dataset, index
    return None


class BatchLoader:
    """Iterate ``(x float32 [B, C, H, W] in [0, 1], y int64 [B])`` on ``device`` for each index list that
    ``batch_sampler`` yields.

    Args:
        dataset: an :class:`ImageDataset` or a (chain of) ``Subset`` of one (see :meth:`supports`).
        batch_sampler: iterable of lists of dataset indices, with ``len``.
        device: where the batches are delivered.
        max_device_bytes: on CUDA the images move to the GPU when they take at most this many bytes;
            otherwise they stay in (pinned) host memory and each batch is copied over.
    """

    def __init__(self, dataset, batch_sampler: Iterable, device: torch.device | str = "cpu",
                 max_device_bytes: int = DEFAULT_MAX_DEVICE_BYTES):
        found = _unwrap(dataset)
        if found is None:
            raise TypeError(f"BatchLoader: dataset must be an ImageDataset or a Subset of one, got "
                            f"{type(dataset).__name__}")
        base, self.index = found
        self.batch_sampler = batch_sampler
        self.device = torch.device(device)
        self._pixel_scale = torch.tensor(255.0, device=self.device)  # uint8 -> [0, 1] (see __iter__)
        self.augmentation = base.augmentation
        self.generator = base.generator
        images, labels = base.images, base.labels
        if self.index is not None:  # keep only the subset's examples (a copy: Subsets are small or whole)
            images, labels = images[self.index], labels[self.index]
        on_device = self.device.type != "cpu" and images.numel() * images.element_size() <= max_device_bytes
        if on_device:
            images = images.to(self.device)
        elif self.device.type == "cuda":
            images = images.pin_memory()
        self.images, self.labels = images, labels.to(self.device)

    @staticmethod
    def supports(dataset) -> bool:
        """Whether ``dataset`` is an ImageDataset (possibly under Subsets) that BatchLoader can serve."""
        return _unwrap(dataset) is not None

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for indices in self.batch_sampler:
            idx = torch.as_tensor(indices, dtype=torch.int64)
            x = self.images[idx.to(self.images.device)]
            x = x.to(self.device, non_blocking=True)
            if self.augmentation is not None:
                x = self.augmentation(x, self.generator)
            # Divide by a 255 on the batch's device: CUDA divides by a CPU scalar as a multiplication by
            # its reciprocal, 1 ulp off the CPU's true division for some pixels; this way every device
            # yields exactly the DataLoader's (CPU) values.
            yield x.to(torch.float32).div_(self._pixel_scale), self.labels[idx.to(self.device)]
