"""Tiny-ImageNet-200 reader for the standard extracted folder (JPEGs decoded with Pillow).

The whole split is decoded once into a uint8 array (train: 100,000 x 3 x 64 x 64 = 1.2 GB, about a
minute on a few cores; val: 10,000 images, 123 MB) by a thread pool -- Pillow releases the GIL while
decoding. Progress goes to stderr for splits of 10,000 images or more. Grey-scale JPEGs (a few in
the train set) are converted to RGB. Labels index the sorted wnids (the order ImageFolder uses).
The official test/ folder has no labels; split "test" reads val/ (also accepted as "val").
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._common import check_split, check_subset, resolve_root, take_subset

__all__ = ["read_tiny_imagenet", "TINY_IMAGENET_LAYOUT"]

TINY_IMAGENET_LAYOUT = """  <root>/tiny-imagenet-200/       (tiny-imagenet-200.zip extracted; or <root> is this folder)
      wnids.txt                      200 class ids (n01443537 ...), one per line
      train/<wnid>/images/*.JPEG     500 RGB 64x64 images per class
      val/images/*.JPEG              10,000 RGB 64x64 images
      val/val_annotations.txt        lines "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>\""""
_JPEG = (".jpeg", ".jpg")
_PROGRESS_MIN = 10_000


def _image_module():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("tiny-imagenet: decoding the JPEGs needs Pillow, which is not installed; "
                          "install it with `pip install Pillow` (or the extra `dnr[images]`)") from e
    return Image


def _read_wnids(folder: str) -> list[str]:
    path = os.path.join(folder, "wnids.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tiny-imagenet: wnids.txt not found in {folder!r}; expected layout:\n"
                                f"{TINY_IMAGENET_LAYOUT}")
    with open(path) as f:
        wnids = [line.strip() for line in f if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise ValueError(f"tiny-imagenet: {path!r} must list distinct class ids, one per line; "
                         f"found {len(wnids)} lines, {len(set(wnids))} distinct")
    return sorted(wnids)


def _list_images(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(_JPEG))


def _train_files(folder: str, wnids: list[str]) -> list[tuple[str, int]]:
    per_class = []
    for label, wnid in enumerate(wnids):
        d = os.path.join(folder, "train", wnid, "images")
        if not os.path.isdir(d):
            raise FileNotFoundError(f"tiny-imagenet: class folder {d!r} (wnid {wnid} from wnids.txt) is missing; "
                                    f"expected layout:\n{TINY_IMAGENET_LAYOUT}")
        files = _list_images(d)
        if not files:
            raise ValueError(f"tiny-imagenet: {d!r} holds no .JPEG image")
        per_class.append([(os.path.join(d, n), label) for n in files])
    # Round-robin over the classes, so that the first n examples (subset=n) are class-balanced.
    out = []
    for i in range(max(len(c) for c in per_class)):
        out += [c[i] for c in per_class if i < len(c)]
    return out


def _val_files(folder: str, wnids: list[str]) -> list[tuple[str, int]]:
    ann = os.path.join(folder, "val", "val_annotations.txt")
    if not os.path.isfile(ann):
        raise FileNotFoundError(f"tiny-imagenet: {ann!r} not found; expected layout:\n{TINY_IMAGENET_LAYOUT}")
    index = {w: i for i, w in enumerate(wnids)}
    out = []
    with open(ann) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise ValueError(f"tiny-imagenet: {ann!r} line {lineno} must be '<file>\\t<wnid>\\t...' with a wnid "
                                 f"from wnids.txt, found {line.rstrip()!r}")
            out.append((os.path.join(folder, "val", "images", fields[0]), index[fields[1]]))
    if not out:
        raise ValueError(f"tiny-imagenet: {ann!r} lists no image")
    return out


def _decode(path: str, image_module) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tiny-imagenet: image {path!r} is missing; expected layout:\n{TINY_IMAGENET_LAYOUT}")
    try:
        with image_module.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except OSError as e:
        raise ValueError(f"tiny-imagenet: {path!r} is not a readable image: {e}") from None
    if arr.shape != (64, 64, 3):
        raise ValueError(f"tiny-imagenet: {path!r} must be a 64x64 image, found {arr.shape[1]}x{arr.shape[0]}")
    return arr.transpose(2, 0, 1)


def read_tiny_imagenet(split: str, root, subset: int | None = None, workers: int | None = None,
                       progress: bool = True):
    """Read and decode one split of Tiny-ImageNet-200.

    Args:
        split: "train", or "test" / "val" (both read val/, the labelled held-out set).
        root: the tiny-imagenet-200 folder or its parent.
        subset: None for all, or n >= 1 for the first n examples: train is ordered round-robin over
            the classes (class-balanced prefix), val in val_annotations.txt order. Only these are decoded.
        workers: decoding threads (None: os.cpu_count()).
        progress: report progress on stderr for 10,000 images or more.

    Returns:
        (images uint8 ndarray [N, 3, 64, 64], labels int64 ndarray [N], wnids tuple (sorted; index = label)).

    Raises:
        FileNotFoundError: missing folder, wnids.txt, class folder, annotation file or image (with the layout).
        ValueError: malformed wnids/annotations, undecodable image or one that is not 64x64.
        ImportError: Pillow is not installed.
    """
    check_split("tiny-imagenet", split, ("train", "test", "val"))
    subset = check_subset("tiny-imagenet", subset)
    folder = resolve_root("tiny-imagenet", root, "tiny-imagenet-200", "wnids.txt", TINY_IMAGENET_LAYOUT)
    wnids = _read_wnids(folder)
    files = _train_files(folder, wnids) if split == "train" else _val_files(folder, wnids)
    n = take_subset("tiny-imagenet", len(files), subset, split, repr(folder))
    files = files[:n]
    image_module = _image_module()
    images = np.empty((n, 3, 64, 64), dtype=np.uint8)
    labels = np.array([label for _, label in files], dtype=np.int64)
    report = progress and n >= _PROGRESS_MIN

    def work(i: int) -> None:
        images[i] = _decode(files[i][0], image_module)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        chunk = 5_000
        for start in range(0, n, chunk):
            list(pool.map(work, range(start, min(start + chunk, n))))  # list(): re-raises the first error
            if report:
                print(f"tiny-imagenet: decoded {min(start + chunk, n)}/{n} {split} images from {folder}",
                      file=sys.stderr, flush=True)
    return images, labels, tuple(wnids)
