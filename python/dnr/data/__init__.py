"""Datasets: IDX reader/writer, Fashion-MNIST (full or the embedded subset) and MNIST loaders."""

from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    default_fashion_mnist_root,
    embedded_root,
    fashion_mnist,
    mnist,
)
from .idx import read_idx, write_idx

__all__ = [
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "default_fashion_mnist_root",
    "embedded_root",
    "fashion_mnist",
    "mnist",
    "read_idx",
    "write_idx",
]
