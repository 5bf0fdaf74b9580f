"""Fashion-MNIST and MNIST loaders (IDX files from a folder, or the embedded Fashion-MNIST subset).

Expected folder layout (the files as distributed; each may be gzip ``.gz`` or uncompressed)::

    <root>/train-images-idx3-ubyte[.gz]   uint8 [N_train, 28, 28]
    <root>/train-labels-idx1-ubyte[.gz]   uint8 [N_train], values 0..9
    <root>/t10k-images-idx3-ubyte[.gz]    uint8 [N_test, 28, 28]
    <root>/t10k-labels-idx1-ubyte[.gz]    uint8 [N_test], values 0..9
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .idx import read_idx

__all__ = [
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "SPLIT_FILES",
    "default_fashion_mnist_root",
    "embedded_root",
    "fashion_mnist",
    "find_split_file",
    "mnist",
    "read_split",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(i) for i in range(10))

# split -> (images file, labels file), names without the optional ".gz".
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"


def embedded_root() -> str:
    """Folder of the Fashion-MNIST subset shipped inside the package.

    It holds the four standard files with 6000 training images (600 per class) and
    1000 test images (100 per class) taken from the real dataset; see its README.md.
    """
    return str(Path(__file__).resolve().parent / "_embedded" / "fashion-mnist")


def default_fashion_mnist_root() -> str | None:
    """``"/usr/share/datasets/fashion-mnist"`` (Debian package dataset-fashion-mnist) if that
    folder exists, else None."""
    return _DEBIAN_ROOT if os.path.isdir(_DEBIAN_ROOT) else None


def _layout() -> str:
    names = [n for pair in SPLIT_FILES.values() for n in pair]
    return "expected layout: " + ", ".join(f"<root>/{n}[.gz]" for n in names)


def find_split_file(root: str, name: str, dataset: str) -> str:
    """The path of IDX file ``name`` in ``root`` (``name.gz`` or ``name``); FileNotFoundError naming
    ``dataset`` and the expected layout when neither exists."""
    # .gz first: that is how the datasets are distributed.
    for candidate in (name + ".gz", name):
        p = os.path.join(root, candidate)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(
        f"{dataset}: neither {name}.gz nor {name} found in root={root!r}; {_layout()}"
    )


def read_split(dataset: str, split, root, subset) -> tuple[np.ndarray, np.ndarray]:
    """Validated raw arrays of one split: uint8 images [N, 28, 28] and uint8 labels [N] in 0..9.

    ``dataset`` names the data set in error messages; the other arguments and the errors are as in
    :func:`fashion_mnist` (``root`` required here).
    """
    if not isinstance(split, str) or split not in SPLIT_FILES:
        raise ValueError(f"{dataset}: split must be 'train' or 'test', got {split!r}")
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"{dataset}: root must be a str or os.PathLike, got {type(root).__name__}")
    if subset is not None and (
        isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < 1
    ):
        raise ValueError(f"{dataset}: subset must be None or a positive int, got {subset!r}")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{dataset}: root={root!r} is not an existing folder; {_layout()}")

    img_path = find_split_file(root, SPLIT_FILES[split][0], dataset)
    lab_path = find_split_file(root, SPLIT_FILES[split][1], dataset)
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{dataset}: {img_path!r} must hold uint8 images [N, 28, 28], "
            f"found {images.dtype} {list(images.shape)}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{dataset}: {lab_path!r} must hold uint8 labels [N], "
            f"found {labels.dtype} {list(labels.shape)}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{dataset}: image/label count mismatch in split {split!r}: {img_path!r} has "
            f"{len(images)} images, {lab_path!r} has {len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(
            f"{dataset}: {lab_path!r} has label {int(labels.max())}; expected values 0..9"
        )
    if subset is not None:
        if subset > len(images):
            raise ValueError(
                f"{dataset}: subset={subset} exceeds the {len(images)} examples of split "
                f"{split!r} in root={root!r}"
            )
        images, labels = images[:subset], labels[:subset]
    return images, labels


def _load(dataset: str, split, root, subset) -> TensorDataset:
    images, labels = read_split(dataset, split, root, subset)
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(torch.float32).div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def fashion_mnist(split: str = "train", root=None, subset: int | None = None) -> TensorDataset:
    """Fashion-MNIST as a TensorDataset of (images, labels).

    Args:
        split: ``"train"`` or ``"test"`` (the ``t10k-*`` files).
        root: folder with the four standard IDX files (``.gz`` or uncompressed; see the
            module docstring). None -> the embedded subset shipped in the package
            (:func:`embedded_root`: 6000 train / 1000 test, class-balanced). For the full
            dataset pass e.g. :func:`default_fashion_mnist_root`.
        subset: None for every example, or n >= 1 for the first n examples in file
            order (deterministic; not re-balanced -- both the real files and the embedded
            subset are in shuffled order, so the first n are roughly class-balanced).

    Returns:
        TensorDataset with ``tensors[0]`` float32 ``[N, 1, 28, 28]`` in [0, 1] (pixel/255)
        and ``tensors[1]`` int64 ``[N]`` in 0..9 (indices into FASHION_MNIST_CLASSES).

    Raises:
        ValueError: bad ``split`` or ``subset``; image/label count mismatch; malformed file.
        TypeError: ``root`` is neither None, str nor PathLike.
        FileNotFoundError: ``root`` or one of the split's files is missing (the message
            shows the expected layout).
    """
    return _load("fashion_mnist", split, embedded_root() if root is None else root, subset)


def mnist(split: str, root, subset: int | None = None) -> TensorDataset:
    """MNIST from ``root`` (same file names and layout as Fashion-MNIST; no embedded copy).

    Args/returns/raises as :func:`fashion_mnist`, except that ``root`` is required
    (None -> ValueError). Labels index MNIST_CLASSES ("0".."9").
    """
    if root is None:
        raise ValueError(
            "mnist: root is required (no embedded MNIST copy); pass a folder holding "
            + _layout()
        )
    return _load("mnist", split, root, subset)
