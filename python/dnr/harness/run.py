"""``fit(config, out_dir)``: the one training driver (used by ``dnr train`` and ``python -m dnr.quickstart``).

A run directory holds::

    config.json          the resolved TrainConfig
    initial_density.json the per-layer density of the initial mask
    metrics.jsonl/.csv   one row per epoch: losses, train/test clean and PGD accuracy, density, prune
                         rate, lr, seconds, images/s (the JSONL rows also hold the per-layer densities)
    rewiring.jsonl       one record per DNR rewiring (per-layer density, mu, pruned and regrown counts)
    pruning.jsonl        baselines (oneshot, admm, rsr): ADMM updates and the prune (dnr.harness.methods)
    checkpoints/last.pt  the full training state (atomic; every epoch end and every --checkpoint-every steps)
    checkpoints/previous.pt  the one before it (a resume falls back to it, with a warning, when last.pt is damaged)
    model.pt             the final model (state dict with masks + config + summary)
    summary.json         the final evaluation, density and FLOPs
    report.md, plots/    written by :mod:`dnr.harness.report`
    tensorboard/         with --tensorboard

Exact resume: the data order of epoch e is a permutation drawn from a generator seeded with (seed, e),
so a resume at batch b of epoch e skips the first b batches of the same order; the model, optimizer
(momentum), LR scheduler, DNR controller, the torch/numpy/python RNGs and the dataset's augmentation
generator are restored from the checkpoint, so (with ``deterministic``) the resumed run is bitwise the
uninterrupted one.

Under torchrun (``WORLD_SIZE`` > 1) every process runs ``fit`` as a data-parallel replica (see
:mod:`dnr.distributed`): each trains on its slice of every global batch, rank 0 writes the run directory,
and the checkpoint holds each rank's random streams, so the same exactness holds for the same number of
processes.

Environment (tests only): ``DNR_STEP_DELAY=SECONDS`` sleeps after every optimizer step, so a test can
kill a run at a known point.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, Subset

from .. import attacks, distributed
from .._files import FileWriteError, atomic_open, read_json
from ..data.loader import BatchLoader
from ..nn import apply_masks, density_report, masked_layers, sparsify
from ..ops._registry import use_kernel
from ..optim import MaskedSGD
from ..rewiring import DNR
from ..train import train_epoch
from .checkpoint import (CheckpointError, CheckpointFallbackWarning, load_checkpoint, load_model_state,
                         previous_checkpoint_path, rng_state, save_checkpoint, set_rng_state)
from .config import ConfigError, TrainConfig
from .methods import PhasedMethod

__all__ = ["fit", "TrainingDiverged", "RunError", "build_model_for", "load_trained_model", "dataset_meta",
           "make_optimizer",
           "make_test_loader", "final_evaluation", "lr_factor"]

CHECKPOINT = os.path.join("checkpoints", "last.pt")
# options that may change when a run is resumed: they do not change the numbers it computes
RESUME_MUTABLE = ("threads", "device", "tensorboard", "plots")


class RunError(RuntimeError):
    """A run that cannot start or continue (e.g. an occupied run directory); one-line message."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the optimizer step and the last good checkpoint."""


# ---------------------------------------------------------------------------------------- data / model
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


def _build_dataset(cfg: TrainConfig, split: str, generator: torch.Generator | None):
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
    _build_dataset(cfg, "train", None)
    _build_dataset(cfg, "test", None)
    build_model_for(cfg)


def build_model_for(cfg: TrainConfig, *, generator_seed: int | None = None) -> torch.nn.Module:
    """The architecture of ``cfg`` (sparsified for static/dnr), on the CPU, freshly initialised."""
    from ..models import build_model
    num_classes, in_channels, input_size, mean, std, _ = dataset_meta(cfg.dataset)
    try:
        model = build_model(cfg.model, num_classes, in_channels, input_size, mean, std)
    except ValueError as err:
        raise ConfigError(f"option --model: {err}") from None
    if cfg.sparse:
        seed = cfg.seed if generator_seed is None else generator_seed
        sparsify(model, density=_initial_density(cfg), mode=cfg.mode, init=cfg.init, prune_first=cfg.prune_first,
                 prune_last=cfg.prune_last, generator=torch.Generator().manual_seed(seed))
    return model


def _initial_density(cfg: TrainConfig) -> float:
    """The density of the initial mask: the target, or 1 for the baselines that prune after a dense phase."""
    return 1.0 if cfg.phased else cfg.density


def _prepare_user_model(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """A user's model for ``cfg``: sparsified as configured unless it already has masks."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"fit: model must be an nn.Module, got {type(model).__name__}")
    if cfg.sparse and not masked_layers(model):
        sparsify(model, density=_initial_density(cfg), mode=cfg.mode, init=cfg.init, prune_first=cfg.prune_first,
                 prune_last=cfg.prune_last, generator=torch.Generator().manual_seed(cfg.seed))
    return model


def load_trained_model(path: str, device: str = "cpu") -> tuple[torch.nn.Module, TrainConfig, dict]:
    """Rebuild the model of a checkpoint (training or final) and load its weights and masks."""
    state = load_checkpoint(path)
    try:
        cfg = TrainConfig(**state["config"]).validate()
    except (TypeError, ConfigError) as err:
        raise CheckpointError(f"checkpoint {state['path']!r} has an invalid config: {err}") from None
    model = build_model_for(cfg)
    load_model_state(model, state)
    return model.to(device).eval(), cfg, state


def make_test_loader(cfg: TrainConfig, limit: int | None = None, dataset=None) -> DataLoader:
    ds = dataset if dataset is not None else _build_dataset(cfg, "test", None)
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


# ---------------------------------------------------------------------------------------- schedules
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
        return (step + 1) / warmup
    if cfg.lr_schedule == "cosine":
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    if cfg.lr_schedule == "step":
        return cfg.lr_gamma ** sum(step >= m * total_steps for m in cfg.lr_milestones)
    return 1.0


# ---------------------------------------------------------------------------------------- output helpers
class _Log:
    """Progress lines on stdout (off in quiet mode) and tqdm bars on stderr (when tqdm is installed and
    stderr is a terminal: redirected logs get the per-epoch lines only)."""

    def __init__(self, quiet: bool, progress: bool):
        self.quiet = quiet
        self.tqdm = None
        if progress and not quiet and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
                self.tqdm = tqdm
            except ImportError:
                pass

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def bar(self, **kwargs):
        if self.tqdm is None:
            return None
        return self.tqdm(file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)


def _write_text_atomic(path: str, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


CSV_COLUMNS = ("epoch", "step", "lr", "loss", "train_clean_acc", "train_adv_acc", "test_clean_acc",
               "test_pgd_acc", "density", "active_weights", "prune_rate", "rewired_weights", "seconds",
               "images_per_s", "eval_seconds")


def _write_metrics(run_dir: str, rows: list[dict], history: list[dict], pruning: list[dict] | None = None) -> None:
    """Rewrite metrics.jsonl, metrics.csv, rewiring.jsonl (and pruning.jsonl for the baselines) from the
    run's records (idempotent)."""
    _write_text_atomic(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    with atomic_open(os.path.join(run_dir, "metrics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    _write_text_atomic(os.path.join(run_dir, "rewiring.jsonl"), "".join(json.dumps(r) + "\n" for r in history))
    if pruning is not None:
        _write_text_atomic(os.path.join(run_dir, "pruning.jsonl"), "".join(json.dumps(r) + "\n" for r in pruning))


# ---------------------------------------------------------------------------------------- evaluation
def final_evaluation(model, loader, *, eps, alpha, steps, restarts, seed, log: _Log | None = None,
                     fgsm=True, pgd=True, desc="eval") -> dict:
    """Clean / FGSM / PGD accuracy with a seeded PGD generator (does not touch the global RNG).

    With several processes each rank evaluates every ``world_size``-th batch (its PGD starts drawn from
    its own seed) and the correct counts are summed over the ranks.
    """
    world = distributed.world_size()
    if world > 1:
        return _sharded_evaluation(model, loader, eps=eps, alpha=alpha, steps=steps, restarts=restarts, seed=seed,
                                   fgsm=fgsm, pgd=pgd)
    bar = log.bar(total=len(loader), desc=desc) if log is not None else None
    wrapped = loader
    if bar is not None:
        def wrapped_iter():
            for batch in loader:
                yield batch
                bar.update(1)
        wrapped = wrapped_iter()
    try:
        return attacks.evaluate(model, wrapped, eps=eps, alpha=alpha, steps=steps, restarts=restarts, fgsm=fgsm,
                                pgd=pgd, generator=torch.Generator().manual_seed(seed))
    finally:
        if bar is not None:
            bar.close()


def _sharded_evaluation(model, loader, *, eps, alpha, steps, restarts, seed, fgsm, pgd) -> dict:
    """final_evaluation over several processes: rank r takes batches r, r + world, ...; counts are summed."""
    rank, world = distributed.rank(), distributed.world_size()
    size, n_data = loader.batch_size, len(loader.dataset)
    batches = [list(range(i * size, min(n_data, (i + 1) * size))) for i in range(rank, len(loader), world)]
    res = None
    if batches:
        res = attacks.evaluate(model, DataLoader(loader.dataset, batch_sampler=batches), eps=eps, alpha=alpha,
                               steps=steps, restarts=restarts, fgsm=fgsm, pgd=pgd,
                               generator=torch.Generator().manual_seed(distributed.rank_seed(seed, rank)))
    keys = [k for k, on in (("clean", True), ("fgsm", fgsm), ("pgd", pgd)) if on]
    n = res["n"] if res else 0
    # each accuracy is a count divided by n: round back to the count before summing
    total = distributed.all_reduce_sum([n] + [round(res[k] * n) if res else 0 for k in keys])
    n_all = int(round(total[0]))
    out = dict(res) if res else {}
    out.update(clean=None, fgsm=None, pgd=None, n=n_all)
    out.update({k: total[1 + i] / n_all for i, k in enumerate(keys)})
    return out


# ---------------------------------------------------------------------------------------- the driver
def _stopped_before_first_checkpoint(run_dir: str) -> bool:
    """A run directory with its config.json but no checkpoint at all (nor a final model): the run died
    before its first checkpoint."""
    if not os.path.isdir(run_dir) or not os.path.isfile(os.path.join(run_dir, "config.json")):
        return False
    last = os.path.join(run_dir, CHECKPOINT)
    return not any(os.path.exists(p) for p in (last, previous_checkpoint_path(last), os.path.join(run_dir, "model.pt")))


def _setup_runtime(cfg: TrainConfig) -> distributed.Context:
    """Threads, determinism, device and process group of ``cfg`` (process-wide settings; ``fit`` restores
    them and leaves the process group it joined)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        return distributed.setup(cfg.device)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def fit(cfg: TrainConfig | None, out_dir: str | None, *, resume: str | None = None, quiet: bool = False,
        progress: bool = True, overrides_on_resume: dict | None = None, model: torch.nn.Module | None = None,
        train_data=None, test_data=None) -> dict:
    """Train (or resume) a run and evaluate it; returns the summary dict (see ``summary.json``).

    Launched by torchrun, each process calls ``fit`` with the same arguments and trains its share of
    every batch (see :mod:`dnr.distributed`); every rank returns the summary, rank 0 writes the files.

    Any user model and data work too: pass ``model`` (a plain model is sparsified as ``cfg`` says for
    the static and dnr methods; an already sparsified one keeps its masks) and/or ``train_data`` /
    ``test_data`` (datasets of (float [C, H, W] in [0, 1], int64 label)); they replace ``cfg.model``
    and ``cfg.dataset``. Resume such a run by passing the same kind of model and data again.

    Args:
        cfg: the validated config (ignored when ``resume`` is given: the run's saved config is used).
        out_dir: the run directory to create (must not already hold a run); None with ``resume``.
        resume: a run directory (or checkpoint file) to continue exactly where it stopped: from
            ``checkpoints/last.pt``, or from ``previous.pt`` with a CheckpointFallbackWarning when last.pt
            fails its check; a run directory with no checkpoint yet starts afresh from its config.json
            (also with that warning).
        quiet: print nothing but errors (the caller prints the summary).
        progress: tqdm bars on stderr (when tqdm is installed).
        overrides_on_resume: options of RESUME_MUTABLE to change for the resumed run.
        model, train_data, test_data: user model / datasets instead of the config's named ones.

    Raises:
        ConfigError, RunError, CheckpointError: before any file is written or changed.
        TrainingDiverged: NaN/inf loss; the last checkpoint is left as it was.
        FileWriteError: a checkpoint or run file could not be written (disk full, read-only file
            system); one line naming the file; the last good checkpoint is left as it was.
    """
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.benchmark)
    try:
        return _fit(cfg, out_dir, resume=resume, quiet=quiet, progress=progress,
                    overrides_on_resume=overrides_on_resume, user_model=model, train_data=train_data,
                    test_data=test_data)
    finally:  # threads and determinism are process-wide: leave them as the caller had them
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.benchmark = saved[2]


def _fit(cfg, out_dir, *, resume, quiet, progress, overrides_on_resume, user_model=None, train_data=None,
         test_data=None) -> dict:
    log = _Log(quiet, progress)
    state = None
    if resume is not None:
        bad = sorted(set(overrides_on_resume or {}) - set(RESUME_MUTABLE))
        if bad:
            raise ConfigError(f"--resume continues the run with its saved config; only "
                              f"{', '.join('--' + m for m in RESUME_MUTABLE)} may be given, got "
                              f"{', '.join('--' + b.replace('_', '-') for b in bad)}")
        if _stopped_before_first_checkpoint(resume):
            # nothing to continue, but the saved config says what to run: start it again (not a dead end)
            run_dir = os.path.abspath(resume)
            config_path = os.path.join(run_dir, "config.json")
            saved, where = read_json(config_path), config_path
            warnings.warn(f"run directory {resume!r} holds no checkpoint (the run stopped before its first one): "
                          "starting it afresh from its saved config.json", CheckpointFallbackWarning, stacklevel=3)
        else:
            state = load_checkpoint(resume, kind="train")
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(state["path"])))
            saved, where = state["config"], f"checkpoint {state['path']!r}"
        try:
            cfg = TrainConfig(**{**saved, **(overrides_on_resume or {})}).validate()
        except (TypeError, ConfigError) as err:
            raise CheckpointError(f"{where} has an invalid config: {err}") from None
    else:
        if cfg is None or out_dir is None:
            raise ValueError("fit: cfg and out_dir are required unless resume is given")
        run_dir = os.path.abspath(out_dir)
        if os.path.exists(os.path.join(run_dir, "config.json")) or os.path.exists(os.path.join(run_dir, CHECKPOINT)):
            raise RunError(f"run directory {out_dir!r} already holds a run: continue it with "
                           f"--resume {out_dir}, or choose another --out")
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise RunError(f"option --out: {out_dir!r} is a regular file, expected a folder")
    ctx = _setup_runtime(cfg)
    try:
        return _train(cfg, ctx, run_dir, state, log, user_model, train_data, test_data)
    finally:
        distributed.teardown(ctx)


def _train(cfg, ctx, run_dir, state, log, user_model, train_data, test_data) -> dict:
    """The training loop of ``fit`` on this process (rank ``ctx.rank`` of ``ctx.world_size``)."""
    device, rank, world = ctx.device, ctx.rank, ctx.world_size
    main = rank == 0  # rank 0 prints and writes the run directory
    if not main:
        log = _Log(True, False)
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("option --tensorboard needs the tensorboard package: pip install tensorboard") from None

    # Everything that can fail on bad input happens before the run directory is touched.
    data_gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed + 1, rank))
    train_set = train_data if train_data is not None else _build_dataset(cfg, "train", data_gen)
    test_loader = make_test_loader(cfg, dataset=test_data)
    eval_loader = make_test_loader(cfg, cfg.eval_size, dataset=test_data)
    input_shape = tuple(train_set[0][0].shape)
    if len(train_set) < cfg.batch_size:
        raise ConfigError(f"option --batch-size: got {cfg.batch_size}, larger than the {len(train_set)} training "
                          "examples (the last partial batch is dropped)")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = (_prepare_user_model(user_model, cfg) if user_model is not None else build_model_for(cfg)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    sampler = EpochBatchSampler(len(train_set), cfg.batch_size, cfg.seed, rank, world)
    if world > 1:
        distributed.broadcast_module(model)  # a user's model may be initialised differently on each rank
        # each rank's own stream for PGD starts and noise (rank 0 keeps the one-process stream)
        torch.manual_seed(distributed.rank_seed(cfg.seed, rank))
    # the loader's own generator: creating its iterator every epoch must not draw from the global RNG
    loader_gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed + 4, rank))
    if BatchLoader.supports(train_set):  # in-memory images: one gather (and augmentation) per batch
        loader = BatchLoader(train_set, sampler, device)
    else:
        loader = DataLoader(train_set, batch_sampler=sampler, num_workers=0, pin_memory=device.type == "cuda",
                            generator=loader_gen)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(cfg, model, device)
    # before the scheduler: RSR adds its noise scales to the optimizer as a second parameter group
    method = PhasedMethod(cfg, model, optimizer, steps_per_epoch) if cfg.phased else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(cfg, k, total_steps, steps_per_epoch))
    controller = None
    if cfg.method == "dnr":
        controller = DNR(model, optimizer, total_steps=total_steps, **cfg.rewiring_settings,
                         generator=torch.Generator().manual_seed(cfg.seed + 2))
    elif cfg.method == "static":  # a fixed mask still has to be re-applied after every step
        optimizer.register_step_post_hook(lambda *_: apply_masks(model))

    grad_sync = distributed.GradientSync(optimizer) if world > 1 else None
    # the training steps run the compiled module (same parameters and buffers); evaluation, checkpoints and
    # the rewiring use the model itself
    train_model = model if cfg.compile == "off" else torch.compile(model, mode=cfg.compile)
    # the model parameters are compared by check_replicas via the model's state dict
    model_params = {id(p) for p in model.parameters()}

    def replica_state() -> dict:
        """Optimizer tensors outside the model's state dict that every rank must hold bitwise alike."""
        out = {}
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) not in model_params:
                    out[f"optimizer.group{gi}.param{pi}"] = p
                for key, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.numel() > 1:
                        out[f"optimizer.group{gi}.param{pi}.{key}"] = value
        return out

    epoch, batch, step, rows, totals, elapsed = 0, 0, 0, [], None, 0.0
    if state is not None:
        if state.get("world_size", 1) != world:
            raise CheckpointError(f"checkpoint {state['path']!r} was written by {state.get('world_size', 1)} "
                                  f"processes; resume it with as many (this is {world}): each one's random "
                                  "streams are part of the exact resume")
        if state.get("steps_per_epoch") != steps_per_epoch:
            raise CheckpointError(f"checkpoint {state['path']!r} was written with {state.get('steps_per_epoch')} "
                                  f"steps per epoch but the data now gives {steps_per_epoch}: the training set changed")
        load_model_state(model, state)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if controller is not None:
                controller.load_state_dict(state["controller"])
            if method is not None:
                method.load_state_dict(state["method"])
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {state['path']!r}: cannot restore the training state ({err})") from None
        streams = state["ranks"][rank] if world > 1 else state
        data_gen.set_state(streams["data_generator"])
        loader_gen.set_state(streams["loader_generator"])
        set_rng_state(streams["rng"])
        epoch, batch, step = state["epoch"], state["batch"], state["step"]
        rows, totals, elapsed = list(state["metrics"]), state["epoch_totals"], state["elapsed"]
        log(f"resuming {run_dir} at epoch {epoch + 1}, batch {batch}/{steps_per_epoch} (optimizer step {step})")
    # every rank has passed the checks above on an untouched run directory before rank 0 writes to it
    distributed.barrier()
    if state is None and main:
        try:
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        except OSError as err:
            raise FileWriteError(run_dir, err.strerror or str(err), err.errno) from None
        _write_text_atomic(os.path.join(run_dir, "config.json"), json.dumps(cfg.to_dict(), indent=2) + "\n")
        initial = {name: layer.density for name, layer in masked_layers(model)}
        _write_text_atomic(os.path.join(run_dir, "initial_density.json"), json.dumps(initial, indent=2) + "\n")
    writer = SummaryWriter(os.path.join(run_dir, "tensorboard")) if cfg.tensorboard and main else None
    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    delay = float(os.environ.get("DNR_STEP_DELAY", "0") or 0)

    def save(epoch_: int, batch_: int, totals_: dict | None) -> None:
        """Write the training state (rank 0; a collective: every rank calls it at the same step)."""
        streams = {"rng": rng_state(), "data_generator": data_gen.get_state(),
                   "loader_generator": loader_gen.get_state()}
        extra = {}
        if world > 1:
            distributed.average_buffers(model)
            extra = {"world_size": world, "ranks": distributed.all_gather_objects(streams)}
        if not main:
            return
        save_checkpoint(ckpt_path, keep_previous=True, state={**extra,
            "kind": "train", "config": cfg.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "controller": controller.state_dict() if controller is not None else None,
            "method": method.state_dict() if method is not None else None,
            **streams, "epoch": epoch_, "batch": batch_,
            "step": step, "epoch_totals": dict(totals_) if totals_ is not None else None, "metrics": rows,
            "elapsed": elapsed + time.perf_counter() - t0, "steps_per_epoch": steps_per_epoch,
        })

    t0 = time.perf_counter()
    attack = dict(eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps, beta=cfg.beta if cfg.adversarial else 1.0,
                  attack_bn_mode=cfg.attack_bn_mode, channels_last=cfg.channels_last,
                  autocast_dtype=torch.bfloat16 if cfg.precision == "bf16" else None)
    while epoch < cfg.epochs:
        sampler.set_epoch(epoch, batch)
        epoch_totals = totals if totals is not None else {"loss": 0.0, "clean_correct": 0, "adv_correct": 0, "n": 0}
        bar = log.bar(total=steps_per_epoch, initial=batch, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        start_batch = batch
        lr_at_start = cfg.lr * lr_factor(cfg, epoch * steps_per_epoch, total_steps, steps_per_epoch)
        done = [batch]  # batches of this epoch finished so far

        def on_batch(i: int, out: dict) -> None:
            nonlocal step
            step += 1
            b = start_batch + i + 1
            done[0] = b
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.3f}")
            if writer is not None:
                writer.add_scalar("train/loss", out["loss"], step)
            if delay:
                time.sleep(delay)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and b < steps_per_epoch:
                save(epoch, b, epoch_totals)
                log(f"checkpoint step {step} (epoch {epoch + 1}, batch {b}/{steps_per_epoch}): {ckpt_path}")

        try:
            stats = train_epoch(train_model, loader, optimizer, controller=controller, last_epoch=epoch == cfg.epochs - 1,
                                device=device, lr_scheduler=scheduler, progress=on_batch, totals=epoch_totals,
                                penalty=method.penalty if method is not None else None, grad_sync=grad_sync,
                                **attack)
        except FloatingPointError as err:
            b = done[0] + 1
            last = ckpt_path if os.path.exists(ckpt_path) else "none written yet"
            raise TrainingDiverged(
                f"training stopped: non-finite loss at optimizer step {step + 1} (epoch {epoch + 1}, batch "
                f"{b}/{steps_per_epoch}): {str(err).split(':')[0]}; last good checkpoint: {last}") from None
        finally:
            if bar is not None:
                bar.close()
        pruned = method.end_epoch(epoch) if method is not None else None
        if world > 1:  # evaluate and save one model: the ranks' BatchNorm statistics averaged, all else equal
            distributed.average_buffers(model)
            distributed.check_replicas(model, replica_state())
        row = _epoch_row(cfg, model, controller, lr_at_start, stats, epoch, step, epoch * steps_per_epoch)
        if pruned is not None:
            log(f"epoch {epoch + 1}: {cfg.method} pruned to density {pruned['density']:.4f} "
                f"({pruned['active']} weights, scope {pruned['scope']}); fine-tuning with the mask fixed")
        if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            t_eval = time.perf_counter()
            res = final_evaluation(model, eval_loader, eps=cfg.resolved_eval_eps, alpha=cfg.resolved_eval_alpha,
                                   steps=cfg.eval_steps, restarts=1, seed=cfg.seed + 3 + epoch, log=log, fgsm=False,
                                   desc=f"eval epoch {epoch + 1}")
            row.update(test_clean_acc=res["clean"], test_pgd_acc=res["pgd"], eval_seconds=time.perf_counter() - t_eval)
        rows.append(row)
        epoch, batch, totals = epoch + 1, 0, None
        save(epoch, 0, None)
        if main:
            _write_metrics(run_dir, rows, controller.history if controller is not None else [],
                           method.log if method is not None else None)
        if writer is not None:
            for key in CSV_COLUMNS[2:]:
                if isinstance(row.get(key), (int, float)):
                    writer.add_scalar(f"epoch/{key}", row[key], epoch)
            writer.flush()
        log(_epoch_line(cfg, row))
    train_seconds = elapsed + time.perf_counter() - t0
    return _finish(cfg, model, run_dir, test_loader, train_seconds, log, writer, input_shape,
                   user_model is not None, world)


def _epoch_row(cfg, model, controller, lr, stats, epoch, step, first_step) -> dict:
    """One metrics row; ``lr`` is the learning rate of the epoch's first step; ``rewired_weights`` sums the
    rewirings after optimizer steps ``first_step + 1 .. step`` (every few steps, or the one at the epoch's end)."""
    layers = {name: layer.density for name, layer in masked_layers(model)}
    active = sum(int(layer.mask.sum()) for _, layer in masked_layers(model))
    prunable = sum(layer.weight.numel() for _, layer in masked_layers(model))
    moved = [r["pruned"] for r in controller.history if first_step < r["step"] <= step] if controller else []
    return {
        "epoch": epoch + 1, "step": step, "lr": lr, "loss": stats["loss"],
        "train_clean_acc": stats["train_clean_acc"],
        "train_adv_acc": stats["train_adv_acc"] if cfg.adversarial else None,
        "test_clean_acc": None, "test_pgd_acc": None,
        "density": active / prunable if prunable else 1.0, "active_weights": active if prunable else None,
        "prune_rate": controller.prune_rate if controller is not None else None,
        "rewired_weights": sum(moved) if moved else None,
        "seconds": stats["seconds"], "images_per_s": stats["images_per_s"], "eval_seconds": None,
        "layers": layers,
    }


def _pct(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _epoch_line(cfg, r) -> str:
    return (f"epoch {r['epoch']}/{cfg.epochs}  step {r['step']}  loss {r['loss']:.3f}  "
            f"train clean {_pct(r['train_clean_acc'])}  train PGD {_pct(r['train_adv_acc'])}  "
            f"test clean {_pct(r['test_clean_acc'])}  test PGD {_pct(r['test_pgd_acc'])}  "
            f"density {r['density']:.4f}  lr {r['lr']:.4g}  {r['seconds']:.1f} s  {r['images_per_s']:.0f} img/s")


def _finish(cfg, model, run_dir, test_loader, train_seconds, log, writer, input_shape, user_model,
            world: int = 1) -> dict:
    """Final evaluation on the test set, model.pt, summary.json and the report (written by rank 0 only)."""
    log(f"final evaluation on {len(test_loader.dataset)} test examples (clean, FGSM, PGD-{cfg.eval_steps})")
    res = final_evaluation(model, test_loader, eps=cfg.resolved_eval_eps, alpha=cfg.resolved_eval_alpha,
                           steps=cfg.eval_steps, restarts=cfg.eval_restarts, seed=cfg.seed, log=log)
    report = density_report(model, input_size=input_shape)
    summary = {
        "method": cfg.method, "mode": cfg.mode, "model": type(model).__name__ if user_model else cfg.model,
        "dataset": cfg.dataset,
        "density": report.density, "effective_density": report.effective_density,
        "compression": report.compression if report.prunable else 1.0, "epochs": cfg.epochs,
        "eps": cfg.resolved_eval_eps,
        "alpha": cfg.resolved_eval_alpha, "clean": res["clean"], "fgsm": res["fgsm"], "pgd": res["pgd"],
        "pgd_steps": cfg.eval_steps, "pgd_restarts": cfg.eval_restarts, "test_examples": res["n"],
        "flops_dense": report.flops_dense, "flops_effective": report.flops_effective,
        "train_seconds": train_seconds, "seed": cfg.seed, "processes": world, "run_dir": run_dir,
        "model_path": os.path.join(run_dir, "model.pt"),
        "layers": [{"name": l.name, "density": l.density, "active": l.active, "prunable": l.prunable,
                    "masked": l.masked} for l in report.layers],
    }
    if not distributed.is_main():
        return summary
    save_checkpoint(summary["model_path"], {"kind": "model", "config": cfg.to_dict(), "model": model.state_dict(),
                                            "summary": {k: v for k, v in summary.items() if k != "layers"}})
    if writer is not None:
        for key in ("clean", "fgsm", "pgd"):
            writer.add_scalar(f"final/{key}", res[key], cfg.epochs)
        writer.close()
    summary_path = os.path.join(run_dir, "summary.json")
    _write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    if cfg.plots:
        from .report import write_report
        out = write_report(run_dir)
        summary.update(report=out["report"], plots=out["plots"], plots_dir=out["plots_dir"],
                       plots_note=out["note"])
        _write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    return summary
