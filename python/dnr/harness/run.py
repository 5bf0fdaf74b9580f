"""``fit(config, out_dir)``: the one training driver (used by ``dnr train``, ``dnr compare`` and
``python -m dnr.quickstart``): what to train or resume, the process settings; the training itself is
:mod:`dnr.harness.trainer`'s.

A run directory holds::

    config.json          the resolved TrainConfig
    initial_density.json the per-layer density of the initial mask
    metrics.jsonl/.csv   one row per epoch: losses, train/test clean and PGD accuracy, density, prune
                         rate, lr, seconds, images/s (the JSONL rows also hold the per-layer densities)
    rewiring.jsonl       one record per DNR rewiring (per-layer density, mu, pruned and regrown counts); a
                         compression method may write more such logs (CompressionMethod.log_records)
    pruning.jsonl        baselines (oneshot, admm, rsr): ADMM updates and the prune (dnr.methods.phased)
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
"""

from __future__ import annotations

import os
import warnings

import torch

from .. import distributed, methods
from .._files import read_json
from .builders import build_model_for, dataset_meta
from .callbacks import Callback
from .console import ConsoleLog
from .checkpoint import (CheckpointError, CheckpointFallbackWarning, load_checkpoint, load_model_state,
                         previous_checkpoint_path)
from .config import ConfigError, TrainConfig
from .errors import RunError, TrainingDiverged
from .trainer import CHECKPOINT, train

__all__ = ["fit", "load_trained_model", "setup_runtime", "RunError", "TrainingDiverged", "CHECKPOINT",
           "RESUME_MUTABLE"]

# options that may change when a run is resumed: they do not change the numbers it computes
RESUME_MUTABLE = ("threads", "device", "tensorboard", "plots")


def load_trained_model(path: str, device: str = "cpu") -> tuple[torch.nn.Module, TrainConfig, dict]:
    """Rebuild the model of a checkpoint (training or final) and load its weights and masks."""
    state = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_saved(state["config"])
    except (TypeError, ConfigError) as err:
        raise CheckpointError(f"checkpoint {state['path']!r} has an invalid config: {err}") from None
    model = build_model_for(cfg)
    _, in_channels, side, _, _, _ = dataset_meta(cfg.dataset)
    # a method that changed the architecture during training (CaP) rebuilds it from the saved shapes
    methods.create(cfg).restructure(model, state["model"], input_size=(in_channels, side, side))
    load_model_state(model, state)
    return model.to(device).eval(), cfg, state


def _stopped_before_first_checkpoint(run_dir: str) -> bool:
    """A run directory with its config.json but no checkpoint at all (nor a final model): the run died
    before its first checkpoint."""
    if not os.path.isdir(run_dir) or not os.path.isfile(os.path.join(run_dir, "config.json")):
        return False
    last = os.path.join(run_dir, CHECKPOINT)
    return not any(os.path.exists(p) for p in (last, previous_checkpoint_path(last), os.path.join(run_dir, "model.pt")))


def setup_runtime(cfg: TrainConfig) -> distributed.Context:
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
        train_data=None, test_data=None, callbacks=()) -> dict:
    """Train (or resume) a run and evaluate it; returns the summary dict (see ``summary.json``).

    Launched by torchrun, each process calls ``fit`` with the same arguments and trains its share of
    every batch (see :mod:`dnr.distributed`); every rank returns the summary, rank 0 writes the files.

    Any user model and data work too: pass ``model`` (prepared by the compression method: a plain model
    is sparsified as ``cfg`` says for the masked methods; an already sparsified one keeps its masks) and/or ``train_data`` /
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
        callbacks: your own :class:`dnr.harness.callbacks.Callback` objects. Each hook runs them in this order,
            after the per-epoch evaluation (so ``on_epoch_end`` sees the row's test accuracies) and before the
            checkpoint and the run files (so a column added to the row, or a key added to the summary, is
            saved with it). They are not checkpointed: a callback that keeps state across epochs rebuilds it
            from ``run.rows`` in ``on_run_start`` (``run.resumed`` says whether the run was resumed).

    Raises:
        ConfigError, RunError, CheckpointError: before any file is written or changed.
        TrainingDiverged: NaN/inf loss; the last checkpoint is left as it was.
        FileWriteError: a checkpoint or run file could not be written (disk full, read-only file
            system); one line naming the file; the last good checkpoint is left as it was.
    """
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.benchmark)
    callbacks = list(callbacks)
    for i, c in enumerate(callbacks):  # before any work: a wrong object would fail only at its first hook
        if not isinstance(c, Callback):
            raise TypeError(f"fit: callbacks[{i}] is a {type(c).__name__}, expected a dnr.harness.callbacks.Callback")
    try:
        return _fit(cfg, out_dir, resume=resume, quiet=quiet, progress=progress,
                    overrides_on_resume=overrides_on_resume, user_model=model, train_data=train_data,
                    test_data=test_data, user_callbacks=callbacks)
    finally:  # threads and determinism are process-wide: leave them as the caller had them
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.benchmark = saved[2]


def _fit(cfg, out_dir, *, resume, quiet, progress, overrides_on_resume, user_model=None, train_data=None,
         test_data=None, user_callbacks=()) -> dict:
    log = ConsoleLog(quiet, progress)
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
            cfg = TrainConfig.from_saved({**saved, **(overrides_on_resume or {})})
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
    ctx = setup_runtime(cfg)
    try:
        return train(cfg, ctx, run_dir, state, log, user_model, train_data, test_data, user_callbacks)
    finally:
        distributed.teardown(ctx)
