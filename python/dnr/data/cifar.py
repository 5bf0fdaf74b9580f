"""CIFAR-10 and CIFAR-100 readers for the "python version" folders (no download, no torchvision).

The pickles are read with a restricted unpickler that only accepts plain containers and numpy
arrays, so a malicious file cannot run code. Each data pickle is a dict with (bytes or str keys)
``data``: uint8 ndarray [N, 3072] (1024 red, 1024 green, 1024 blue values, each a row-major 32x32
plane) and ``labels`` (CIFAR-10) / ``fine_labels`` (CIFAR-100): N ints.
"""

from __future__ import annotations

import io
import os
import pickle

import numpy as np

from ._common import check_split, check_subset, resolve_root, take_subset

__all__ = ["read_cifar", "CIFAR_LAYOUTS", "CIFAR10_CLASSES"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# dataset -> folder, split files, label key, meta file, meta key of the class names, number of classes
_SPECS = {
    "cifar10": dict(folder="cifar-10-batches-py",
                    files={"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                    label_key="labels", meta="batches.meta", names_key="label_names", num_classes=10),
    "cifar100": dict(folder="cifar-100-python", files={"train": ["train"], "test": ["test"]},
                     label_key="fine_labels", meta="meta", names_key="fine_label_names", num_classes=100),
}

CIFAR_LAYOUTS = {
    "cifar10": """  <root>/cifar-10-batches-py/     (cifar-10-python.tar.gz extracted; or <root> is this folder)
      data_batch_1 ... data_batch_5  pickled dict: b"data" uint8 [10000, 3072], b"labels" [10000]
      test_batch                     same keys
      batches.meta                   b"label_names" (optional: class names)""",
    "cifar100": """  <root>/cifar-100-python/        (cifar-100-python.tar.gz extracted; or <root> is this folder)
      train                          pickled dict: b"data" uint8 [50000, 3072], b"fine_labels" [50000]
      test                           same keys
      meta                           b"fine_label_names" (optional: class names)""",
}

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("builtins", "bytearray"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only numpy arrays and plain containers)")


def _load_pickle(path: str, dataset: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        # encoding="bytes": the original files were written by Python 2 (str keys come back as bytes).
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a malformed file
        raise ValueError(f"{dataset}: {path!r} is not a readable CIFAR pickle: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{dataset}: {path!r} must hold a pickled dict, found {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _class_names(folder: str, spec: dict, dataset: str) -> tuple[str, ...]:
    path = os.path.join(folder, spec["meta"])
    n = spec["num_classes"]
    if not os.path.isfile(path):
        return CIFAR10_CLASSES if dataset == "cifar10" else tuple(str(i) for i in range(n))
    names = _load_pickle(path, dataset).get(spec["names_key"])
    if not isinstance(names, (list, tuple)) or len(names) != n:
        raise ValueError(f"{dataset}: {path!r} must hold {spec['names_key']!r}, a list of {n} class names; "
                         f"found {type(names).__name__ if names is None else len(names)}")
    return tuple(x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in names)


def read_cifar(dataset: str, split: str, root, subset: int | None = None):
    """Read one split of CIFAR-10 (``dataset="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels).

    Args:
        dataset: "cifar10" or "cifar100".
        split: "train" (data_batch_1..5 / train) or "test" (test_batch / test).
        root: the extracted folder (cifar-10-batches-py / cifar-100-python) or its parent.
        subset: None for all, or n >= 1 for the first n examples in file order.

    Returns:
        (images uint8 ndarray [N, 3, 32, 32], labels int64 ndarray [N], class names tuple).

    Raises:
        FileNotFoundError: missing folder or file (the message shows the expected layout).
        ValueError: malformed pickle, wrong keys/shapes/dtypes, labels out of range, bad split/subset.
    """
    if dataset not in _SPECS:
        raise ValueError(f"read_cifar: dataset must be 'cifar10' or 'cifar100', got {dataset!r}")
    spec = _SPECS[dataset]
    layout = CIFAR_LAYOUTS[dataset]
    check_split(dataset, split)
    subset = check_subset(dataset, subset)
    folder = resolve_root(dataset, root, spec["folder"], spec["files"]["test"][0], layout)
    images, labels = [], []
    for name in spec["files"][split]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{dataset}: {name} not found in {folder!r}; expected layout:\n{layout}")
        d = _load_pickle(path, dataset)
        data, lab = d.get("data"), d.get(spec["label_key"])
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            found = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
            raise ValueError(f"{dataset}: {path!r} key 'data' must be a uint8 array [N, 3072], found {found}")
        if lab is None:
            raise ValueError(f"{dataset}: {path!r} has no {spec['label_key']!r} key (found keys {sorted(d)})")
        lab = np.asarray(lab)
        if lab.ndim != 1 or len(lab) != len(data) or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"{dataset}: {path!r} must hold {len(data)} integer {spec['label_key']!r} "
                             f"(one per image), found {lab.dtype} {list(lab.shape)}")
        if lab.size and (lab.min() < 0 or lab.max() >= spec["num_classes"]):
            bad = int(lab.min()) if lab.min() < 0 else int(lab.max())
            raise ValueError(f"{dataset}: {path!r} has label {bad}; expected values 0..{spec['num_classes'] - 1}")
        images.append(data)
        labels.append(lab.astype(np.int64))
        if subset is not None and sum(len(x) for x in images) >= subset:
            break  # the rest of the files is not needed
    images_np = np.concatenate(images)
    labels_np = np.concatenate(labels)
    n = take_subset(dataset, len(images_np), subset, split, repr(folder))
    images_np = np.ascontiguousarray(images_np[:n].reshape(n, 3, 32, 32))
    return images_np, labels_np[:n], _class_names(folder, spec, dataset)
