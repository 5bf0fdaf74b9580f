"""Regenerate the embedded Fashion-MNIST subset shipped in dnr/data/_embedded/fashion-mnist/.

    python -m dnr.data.make_embedded_subset --source /usr/share/datasets/fashion-mnist

Per class c, ``numpy.random.default_rng(seed).choice`` picks ``--train-per-class`` training
and ``--test-per-class`` test indices among the examples labelled c (without replacement,
train first then test, classes 0..9 in order, one generator). The chosen indices are
sorted, so the subset keeps the real files' (shuffled) order, and written with write_idx
(gzip, mtime=0: byte-reproducible) under the real file names. ``indices.json`` records the
seed, the source files' SHA-256 and, for each split, the source index of every subset
example (subset row i == source row indices[split][i]). LICENSE and README.md in the
destination are static files and are not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .._files import sha256_file
from .fashion_mnist import SPLIT_FILES, find_split_file, default_fashion_mnist_root, embedded_root
from .idx import read_idx, write_idx

NUM_CLASSES = 10


def select_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted int64 indices [NUM_CLASSES * per_class]: per_class random examples of each class."""
    picked = []
    for c in range(NUM_CLASSES):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise ValueError(f"class {c} has {len(pool)} examples, fewer than per_class={per_class}")
        picked.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def make_subset(source: str, dest: str, seed: int = 0, train_per_class: int = 600,
                test_per_class: int = 100) -> dict:
    """Write the subset files into ``dest`` (created if needed); returns the indices.json dict."""
    rng = np.random.default_rng(seed)
    record = {
        "description": "Class-balanced subset of Fashion-MNIST; subset row i of split s is "
                       "row indices[s][i] of the source file.",
        "generator": "python -m dnr.data.make_embedded_subset",
        "seed": seed,
        "per_class": {"train": train_per_class, "test": test_per_class},
        "source_sha256": {},
        "indices": {},
    }
    os.makedirs(dest, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        img_name, lab_name = SPLIT_FILES[split]
        img_src = find_split_file(source, img_name, "make_embedded_subset")
        lab_src = find_split_file(source, lab_name, "make_embedded_subset")
        images, labels = read_idx(img_src), read_idx(lab_src)
        idx = select_indices(labels, per_class, rng)
        write_idx(os.path.join(dest, img_name + ".gz"), images[idx])
        write_idx(os.path.join(dest, lab_name + ".gz"), labels[idx])
        for p in (img_src, lab_src):
            record["source_sha256"][os.path.basename(p)] = sha256_file(p)
        record["indices"][split] = idx.tolist()
    with open(os.path.join(dest, "indices.json"), "w") as f:
        # Metadata one key per line; each index list on a single line (7000 ints).
        f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items())
                + "\n}\n")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=default_fashion_mnist_root(),
                    help="folder with the full Fashion-MNIST IDX files "
                         "(default: /usr/share/datasets/fashion-mnist if present)")
    ap.add_argument("--dest", default=embedded_root(), help="output folder (default: the package's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-per-class", type=int, default=600)
    ap.add_argument("--test-per-class", type=int, default=100)
    args = ap.parse_args(argv)
    if args.source is None:
        ap.error("--source is required (no /usr/share/datasets/fashion-mnist here)")
    rec = make_subset(args.source, args.dest, args.seed, args.train_per_class, args.test_per_class)
    total = sum(os.path.getsize(os.path.join(args.dest, f)) for f in os.listdir(args.dest))
    print(f"wrote {len(rec['indices']['train'])} train / {len(rec['indices']['test'])} test "
          f"examples to {args.dest} ({total} bytes in the folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
