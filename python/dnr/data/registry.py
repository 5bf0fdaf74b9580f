"""``build_dataset(name, split, ...)`` and ``dataset_info(name)``: every data set of the package by name.

Default augmentation (``augment=True``; override with ``padding=`` / ``flip=``):

=============== ========== ======= ===========================================================
name            crop pad   flip    why
=============== ========== ======= ===========================================================
fashion-mnist   2          no      mild shift; mirrored clothes/digits change meaning
mnist           2          no
cifar10/100     4          yes     the standard CIFAR recipe (RandomCrop(32, 4) + flip)
tiny-imagenet   4          yes     what most robust-training code uses (RandomCrop(64, 4) + flip)
synthetic       S // 8     no      patterns are not mirror-symmetric; same relative shift as CIFAR
=============== ========== ======= ===========================================================
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from . import stats
from .augment import Augmentation
from .cifar import read_cifar
from .dataset import ImageDataset
from .fashion_mnist import (FASHION_MNIST_CLASSES, MNIST_CLASSES, default_fashion_mnist_root, embedded_root, mnist,
                            read_split)
from .synthetic import SYNTHETIC_DEFAULTS, make_synthetic
from .tiny_imagenet import read_tiny_imagenet

__all__ = ["DATASET_NAMES", "DatasetInfo", "build_dataset", "dataset_info", "default_augmentation"]

DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "tiny-imagenet", "synthetic")


class DatasetInfo(NamedTuple):
    """What a model needs to know about a data set.

    num_classes: labels are 0..num_classes-1. in_channels, input_size: images are [in_channels, S, S].
    mean, std: per-channel tuples for the model's Normalize layer (training-set statistics).
    default_root: the folder ``root=None`` reads, or None when ``root`` is required (or not used).
    """

    num_classes: int
    in_channels: int
    input_size: int
    mean: tuple
    std: tuple
    default_root: str | None


# Extra keywords each data set accepts in build_dataset (besides padding/flip).
_KEYWORDS = {
    "fashion-mnist": {"subset"}, "mnist": {"subset"}, "cifar10": {"subset"}, "cifar100": {"subset"},
    "tiny-imagenet": {"subset", "workers", "progress"},
    "synthetic": {"size", "num_classes", "in_channels", "input_size", "seed", "noise"},
}
_AUG_KEYWORDS = {"padding", "flip"}


def _check_name(name) -> str:
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset name {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    return name


def _check_keywords(name: str, kw: dict, allowed: set) -> None:
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise TypeError(f"{name}: unexpected keyword(s) {', '.join(unknown)}; accepted: "
                        f"{', '.join(sorted(allowed)) or 'none'}")


def _fashion_root() -> str:
    return default_fashion_mnist_root() or embedded_root()


def dataset_info(name: str, **kw) -> DatasetInfo:
    """Shape, classes and normalisation statistics of data set ``name`` (one of DATASET_NAMES).

    For "synthetic" the keywords num_classes, in_channels, input_size (as given to build_dataset)
    set the shape; mean/std are then (0.5,) * C and (0.2,) * C. Other build_dataset keywords are
    accepted and ignored, so ``dataset_info(name, **kw)`` and ``build_dataset(name, split, **kw)``
    can share ``kw``.
    """
    _check_name(name)
    _check_keywords(name, kw, _KEYWORDS[name] | _AUG_KEYWORDS)
    if name == "fashion-mnist":
        return DatasetInfo(10, 1, 28, stats.FASHION_MNIST_MEAN, stats.FASHION_MNIST_STD, _fashion_root())
    if name == "mnist":
        return DatasetInfo(10, 1, 28, stats.MNIST_MEAN, stats.MNIST_STD, None)
    if name == "cifar10":
        return DatasetInfo(10, 3, 32, stats.CIFAR10_MEAN, stats.CIFAR10_STD, None)
    if name == "cifar100":
        return DatasetInfo(100, 3, 32, stats.CIFAR100_MEAN, stats.CIFAR100_STD, None)
    if name == "tiny-imagenet":
        return DatasetInfo(200, 3, 64, stats.TINY_IMAGENET_MEAN, stats.TINY_IMAGENET_STD, None)
    shape = {k: kw.get(k, SYNTHETIC_DEFAULTS[k]) for k in ("num_classes", "in_channels", "input_size")}
    c = shape["in_channels"]
    return DatasetInfo(shape["num_classes"], c, shape["input_size"], (0.5,) * c, (0.2,) * c, None)


def default_augmentation(name: str, input_size: int | None = None) -> Augmentation:
    """The augmentation ``build_dataset(name, "train", augment=True)`` uses (see the module table).

    ``input_size`` only matters for "synthetic" (default 32).
    """
    _check_name(name)
    if name in ("fashion-mnist", "mnist"):
        return Augmentation(padding=2, flip=False)
    if name == "synthetic":
        return Augmentation(padding=(input_size or SYNTHETIC_DEFAULTS["input_size"]) // 8, flip=False)
    return Augmentation(padding=4, flip=True)


def build_dataset(name: str, split: str, root=None, augment: bool = False,
                  generator: torch.Generator | None = None, **kw) -> ImageDataset:
    """Load split ``split`` of data set ``name``; items are (float32 [C, S, S] in [0, 1], int64 label).

    Nothing is ever downloaded. Whole splits are held in memory as uint8 (``.images``).

    Args:
        name: one of DATASET_NAMES.
        split: "train" or "test" ("val" is accepted for tiny-imagenet, the same as "test").
        root: folder of the data set in its standard layout (the messages of a missing/malformed
            folder show it). None: fashion-mnist reads /usr/share/datasets/fashion-mnist when it
            exists, else the embedded 6000/1000 subset; "synthetic" needs none; the others require it.
        augment: apply the default augmentation of ``name`` (module table) per item.
        generator: torch.Generator for the augmentation (None: global RNG).
        **kw: padding=int / flip=bool override the augmentation (need augment=True);
            subset=n (not synthetic): the first n examples; tiny-imagenet: workers=, progress=
            (see read_tiny_imagenet); synthetic: size, num_classes, in_channels, input_size, seed,
            noise (see make_synthetic).

    Raises:
        ValueError: unknown name (lists DATASET_NAMES), bad split or argument, malformed files.
        TypeError: a keyword the data set does not take.
        FileNotFoundError: missing folder or file.
    """
    _check_name(name)
    _check_keywords(name, kw, _KEYWORDS[name] | _AUG_KEYWORDS)
    aug_kw = {k: kw.pop(k) for k in _AUG_KEYWORDS & set(kw)}
    if not isinstance(augment, bool):
        raise ValueError(f"{name}: augment must be a bool, got {augment!r}")
    if aug_kw and not augment:
        raise ValueError(f"{name}: {', '.join(sorted(aug_kw))} only apply with augment=True")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if name == "synthetic":
        if root is not None:
            raise ValueError(f"synthetic: takes no root (the data is generated), got root={root!r}")
        images, labels, classes = make_synthetic(split, **kw)
    else:
        if name in ("fashion-mnist", "mnist"):
            if root is None and name == "fashion-mnist":
                root = _fashion_root()
            elif root is None:
                mnist(split, None)  # raises its "root is required" error, which shows the layout
            img, lab = read_split(name, split, root, kw.get("subset"))
            img = img[:, None]
            classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else MNIST_CLASSES
        elif name in ("cifar10", "cifar100"):
            img, lab, classes = read_cifar(name, split, root, kw.get("subset"))
        else:
            img, lab, classes = read_tiny_imagenet(split, root, **kw)
        images = torch.from_numpy(np.ascontiguousarray(img))
        labels = torch.from_numpy(np.asarray(lab, dtype=np.int64))
    augmentation = None
    if augment:
        base = default_augmentation(name, images.shape[-1])
        augmentation = Augmentation(padding=aug_kw.get("padding", base.padding), flip=aug_kw.get("flip", base.flip))
    return ImageDataset(images, labels, classes, augmentation, generator)
