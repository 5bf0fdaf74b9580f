"""Datasets: ``build_dataset(name, split, ...)`` / ``dataset_info(name)`` over Fashion-MNIST, MNIST (IDX),
CIFAR-10/100 (python pickles), Tiny-ImageNet (JPEG folders) and a synthetic set; pure-torch
augmentation and a batched loader (``BatchLoader``); the IDX reader/writer and the embedded Fashion-MNIST subset."""

from .augment import Augmentation, random_crop, random_hflip
from .cifar import read_cifar
from .dataset import ImageDataset
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    default_fashion_mnist_root,
    embedded_root,
    fashion_mnist,
    mnist,
)
from .idx import read_idx, write_idx
from .loader import BatchLoader
from .registry import DATASET_NAMES, DatasetInfo, build_dataset, dataset_info, default_augmentation
from .synthetic import make_synthetic
from .tiny_imagenet import read_tiny_imagenet

__all__ = [
    "Augmentation",
    "BatchLoader",
    "DATASET_NAMES",
    "DatasetInfo",
    "FASHION_MNIST_CLASSES",
    "ImageDataset",
    "MNIST_CLASSES",
    "build_dataset",
    "dataset_info",
    "default_augmentation",
    "default_fashion_mnist_root",
    "embedded_root",
    "fashion_mnist",
    "make_synthetic",
    "mnist",
    "random_crop",
    "random_hflip",
    "read_cifar",
    "read_idx",
    "read_tiny_imagenet",
    "write_idx",
]
