"""Builders of a run's parts from its config: dataset, model (prepared by the compression method), data
order, optimizer and learning-rate schedule. No training happens here; :mod:`dnr.harness.trainer` wires
the parts together.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Sampler, Subset

from .. import methods
from ..ops import use_kernel
from ..optim import MaskedSGD
from .config import ConfigError, TrainConfig
from .errors import RunError

__all__ = ["dataset_meta", "build_dataset", "check_data", "build_model_for", "prepare_user_model",
           "make_test_loader", "EpochBatchSampler", "make_optimizer", "lr_factor"]


def dataset_meta(name: str) -> tuple:
    """(num_classes, in_channels, input_size, mean, std, default_root) of dataset ``name``."""
    from .. import data
    if hasattr(data, "dataset_info"):
        try:
            info = data.dataset_info(name)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"option --dataset: {err}") from None
        return tuple(info)
    if name != "fashion-mnist":  # registry not available: only the embedded Fashion-MNIST
        raise ConfigError(f"option --dataset: got {name!r}, expected 'fashion-mnist' (dnr.data.dataset_info missing)")
    from ..models.small_cnn import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return (10, 1, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD, None)


def build_dataset(cfg: TrainConfig, split: str, generator: torch.Generator | None):
    """The split as a Dataset of (float [C, H, W] in [0, 1], int64), cut to train_size / test_size."""
    from .. import data
    augment = cfg.augment and split == "train"
    root = data.embedded_root() if cfg.data_root == "embedded" else cfg.data_root
    try:
        if hasattr(data, "build_dataset"):
            ds = data.build_dataset(cfg.dataset, split, root=root, augment=augment, generator=generator)
        else:
            ds = data.fashion_mnist(split, root=root)
    except FileNotFoundError as err:
        raise RunError(f"dataset {cfg.dataset!r} ({split} split) not found: {' '.join(str(err).split())}") from None
    except ValueError as err:  # e.g. a required root not given, or malformed files
        raise RunError(f"dataset {cfg.dataset!r} ({split} split): {' '.join(str(err).split())}") from None
    limit = cfg.train_size if split == "train" else cfg.test_size
    if limit is not None:
        if limit > len(ds):
            raise ConfigError(f"option --{split}-size: got {limit}, but the {split} split of {cfg.dataset!r} has "
                              f"only {len(ds)} examples")
        ds = Subset(ds, range(limit))
    return ds


def check_data(cfg: TrainConfig) -> None:
    """Load both splits and build the model once: raises what ``fit`` would raise on bad data or model."""
    build_dataset(cfg, "train", None)
    build_dataset(cfg, "test", None)
    build_model_for(cfg)


def build_model_for(cfg: TrainConfig, *, generator_seed: int | None = None) -> torch.nn.Module:
    """The architecture of ``cfg`` prepared by its compression method (e.g. sparsified), on the CPU,
    freshly initialised; ``generator_seed`` (default ``cfg.seed``) seeds the method's preparation."""
    from ..models import build_model
    num_classes, in_channels, input_size, mean, std, _ = dataset_meta(cfg.dataset)
    try:
        model = build_model(cfg.model, num_classes, in_channels, input_size, mean, std)
    except ValueError as err:
        raise ConfigError(f"option --model: {err}") from None
    seed = cfg.seed if generator_seed is None else generator_seed
    try:
        return methods.create(cfg).prepare_model(model, seed=seed)
    except ValueError as err:  # a method option that does not fit this model (e.g. a block size): before any work
        raise ConfigError(f"{err}") from None


def prepare_user_model(model: torch.nn.Module, cfg: TrainConfig, method: methods.CompressionMethod) -> torch.nn.Module:
    """A user's model prepared by ``method`` (a plain one is sparsified as configured; one that already
    has masks keeps them)."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"fit: model must be an nn.Module, got {type(model).__name__}")
    return method.prepare_model(model, seed=cfg.seed)


def make_test_loader(cfg: TrainConfig, limit: int | None = None, dataset=None) -> DataLoader:
    """The test split (or ``dataset``) in order, first ``limit`` examples, ``cfg.eval_batch_size`` batches."""
    ds = dataset if dataset is not None else build_dataset(cfg, "test", None)
    if limit is not None and limit < len(ds):
        ds = Subset(ds, range(limit))
    return DataLoader(ds, batch_size=cfg.eval_batch_size, shuffle=False)


class EpochBatchSampler(Sampler):
    """Batches of a per-epoch permutation drawn from (seed, epoch); drops the last partial batch.

    ``set_epoch(e, start)`` selects epoch ``e`` and skips its first ``start`` batches (exact resume).
    With ``world_size`` > 1, rank ``rank`` gets the ``rank``-th contiguous slice (``batch_size //
    world_size`` indices) of every global batch, so the global batches do not depend on the world size.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ConfigError(f"option --batch-size: got {batch_size}, which {world_size} processes cannot split "
                              f"evenly; give a multiple of {world_size} (the global batch size)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        local = self.batch_size // self.world_size
        for b in range(self.start, self.batches_per_epoch):
            first = b * self.batch_size + self.rank * local
            yield perm[first:first + local]


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.SGD:
    """SGD with the config's momentum, Nesterov and weight decay. Sparse runs take the fused masked step
    (``dnr.optim.MaskedSGD``: momentum, weight and mask update in one pass) where the extension's kernel
    runs on ``device``; its updates are bitwise those of ``torch.optim.SGD`` followed by the mask."""
    kwargs = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.sparse and use_kernel("masked_sgd_step_", device):
        return MaskedSGD(model.parameters(), model=model, **kwargs)
    return torch.optim.SGD(model.parameters(), **kwargs)


def warmup_factor(step: int, warmup: int) -> float:
    """Multiplier of the peak lr for 0-based ``step`` of a linear warm-up over ``warmup`` steps: (step + 1) / warmup
    during it (the first step already moves the weights), 1 from step ``warmup`` on (and always for ``warmup`` 0)."""
    return (step + 1) / warmup if step < warmup else 1.0


def lr_factor(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up, then the schedule.

    The phased baselines restart the schedule (without warm-up) at the prune: learning-rate rewinding."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.phased:
        boundary = cfg.pre_epochs * steps_per_epoch
        if step >= boundary:
            step, total_steps, warmup = step - boundary, total_steps - boundary, 0
        else:
            total_steps = boundary
    if step < warmup:
        return warmup_factor(step, warmup)
    if cfg.lr_schedule == "cosine":
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    if cfg.lr_schedule == "step":
        return cfg.lr_gamma ** sum(step >= m * total_steps for m in cfg.lr_milestones)
    return 1.0
