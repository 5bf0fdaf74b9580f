"""Argument checks and folder lookup shared by the dataset readers."""

from __future__ import annotations

import os

import numpy as np

SPLITS = ("train", "test")


def check_split(dataset: str, split, allowed=SPLITS) -> str:
    if not isinstance(split, str) or split not in allowed:
        raise ValueError(f"{dataset}: split must be one of {', '.join(map(repr, allowed))}, got {split!r}")
    return split


def check_subset(dataset: str, subset) -> int | None:
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < 1):
        raise ValueError(f"{dataset}: subset must be None or a positive int, got {subset!r}")
    return None if subset is None else int(subset)


def take_subset(dataset: str, n_available: int, subset: int | None, split: str, where: str) -> int:
    """Number of examples to keep: all, or the first ``subset`` (which must not exceed what is there)."""
    if subset is None:
        return n_available
    if subset > n_available:
        raise ValueError(f"{dataset}: subset={subset} exceeds the {n_available} examples of split {split!r} in {where}")
    return subset


def resolve_root(dataset: str, root, folder: str, marker: str, layout: str) -> str:
    """The data folder: ``<root>/<folder>`` if that exists, else ``root`` itself if it holds ``marker``.

    Raises FileNotFoundError (showing ``layout``) when neither is a folder, TypeError for a bad root type.
    """
    if root is None:
        raise ValueError(f"{dataset}: root is required (nothing can be downloaded); pass the folder holding\n{layout}")
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"{dataset}: root must be a str or os.PathLike, got {type(root).__name__}")
    root = os.fspath(root)
    nested = os.path.join(root, folder)
    if os.path.isdir(nested):
        return nested
    if os.path.exists(os.path.join(root, marker)):
        return root
    what = "is not an existing folder" if not os.path.isdir(root) else f"holds neither {folder}/ nor {marker}"
    raise FileNotFoundError(f"{dataset}: root={root!r} {what}; expected layout:\n{layout}")
