"""The trainer's callbacks: everything around the training loop that is not training itself (progress
bars, the per-epoch evaluation, checkpoints, the run directory's files, TensorBoard, console lines).

The trainer (:func:`dnr.harness.trainer.train`) calls the hooks of its callbacks in this order; within one
hook, the callbacks run in the order of their list (see ``trainer.train``)::

    on_run_start(run)                    once: the parts are built, a checkpoint restored, nothing trained yet
    for each epoch (from the resumed one):
        on_epoch_start(run)
        for each optimizer step:
            [engine: attack, loss, optimizer step, LR step; method.after_step]
            on_method_record(run, record)    when method.after_step returned a record
            on_batch_end(run, stats)         run.step and run.batch count this step
        on_steps_end(run)                the epoch's steps are over (also when they stopped with an error)
        [method.epoch_end; the metrics row built]
        on_method_record(run, record)    when method.epoch_end returned a record
        [the row appended to run.rows; run's position moves to the start of the next epoch]
        on_epoch_end(run, row)           evaluation (fills the row's test columns), checkpoint, files, console
    [final evaluation, summary]
    on_run_end(run, summary)             model.pt, summary.json, report, TensorBoard closed

Every hook receives the :class:`TrainingRun`: the run's parts (read them, do not replace them) and its
position (the trainer's to change). Callbacks that write the run directory run on rank 0 only; the
ones that are collectives under data parallel (evaluation, checkpoints) run on every rank.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Any

import torch

from .. import distributed
from .._files import FileWriteError, atomic_open
from ..nn import masked_layers
from .checkpoint import rng_state, save_checkpoint
from .config import ConfigError
from .console import ConsoleLog
from .evaluate import final_evaluation

__all__ = ["TrainingRun", "Callback", "CallbackList", "ProgressBar", "EpochEvaluation", "StepDelay", "Checkpoints",
           "RunFiles", "TensorBoard", "ConsoleLines", "write_text_atomic", "CSV_COLUMNS", "write_metrics",
           "epoch_row", "epoch_line"]


@dataclasses.dataclass(eq=False)
class TrainingRun:
    """One process's run as its callbacks see it.

    Parts: ``cfg`` (the TrainConfig), ``run_dir``, ``log`` (console), ``model`` (the module that is
    evaluated and saved), ``method`` (the compression method), ``optimizer``, ``scheduler``, ``data_gen`` /
    ``loader_gen`` (the data streams a checkpoint restores), ``steps_per_epoch``, ``rank`` / ``world``,
    ``resumed`` (restored from a checkpoint), ``curriculum`` (the SAT curriculum the engine consults, None for
    clean training).

    Position: ``epoch`` (0-based: the epoch being trained; after an epoch's end, the next one), ``batch``
    (batches of that epoch done), ``step`` (optimizer steps done in the whole run), ``totals`` (the epoch's
    running sums {"loss", "clean_correct", "adv_correct", "n"} while it trains, else None), ``rows`` (the
    metrics rows of the finished epochs), ``elapsed`` (training seconds before this process, for a resumed
    run) and ``started`` (``time.perf_counter()`` when this process started training).
    """

    cfg: Any
    run_dir: str
    log: ConsoleLog
    model: torch.nn.Module
    method: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data_gen: torch.Generator
    loader_gen: torch.Generator
    steps_per_epoch: int
    rank: int = 0
    world: int = 1
    resumed: bool = False
    epoch: int = 0
    batch: int = 0
    step: int = 0
    totals: dict | None = None
    rows: list = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    curriculum: Any = None

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes the run directory."""
        return self.rank == 0

    def train_seconds(self) -> float:
        """Training time of the whole run so far (resumed runs included)."""
        return self.elapsed + time.perf_counter() - self.started


class Callback:
    """A trainer callback: override the hooks you need (each does nothing here). The module docstring
    gives the order in which the trainer calls them."""

    def on_run_start(self, run: TrainingRun) -> None:
        """Once, before the first epoch this process trains (after a checkpoint was restored)."""

    def on_epoch_start(self, run: TrainingRun) -> None:
        """Before the epoch's first step (``run.batch`` > 0 when a resume lands mid-epoch)."""

    def on_method_record(self, run: TrainingRun, record: dict) -> None:
        """A record returned by ``method.after_step`` or ``method.epoch_end`` (e.g. a rewiring)."""

    def on_batch_end(self, run: TrainingRun, stats: dict) -> None:
        """After every optimizer step; ``stats`` is the step's ``engine.adversarial_step`` record
        (``loss``, ``n``, ...)."""

    def on_steps_end(self, run: TrainingRun) -> None:
        """The epoch's optimizer steps are over, also when they stopped with an error (close bars)."""

    def on_epoch_end(self, run: TrainingRun, row: dict) -> None:
        """After the epoch: ``row`` is its metrics row, already the last of ``run.rows`` (a callback may
        add columns for the callbacks after it); ``run.epoch`` is the next epoch's index."""

    def on_run_end(self, run: TrainingRun, summary: dict) -> None:
        """After the final evaluation; ``summary`` is what ``fit`` returns (a callback may add keys)."""


class CallbackList(Callback):
    """Calls every hook of its callbacks, in list order."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    def on_run_start(self, run):
        for cb in self.callbacks:
            cb.on_run_start(run)

    def on_epoch_start(self, run):
        for cb in self.callbacks:
            cb.on_epoch_start(run)

    def on_method_record(self, run, record):
        for cb in self.callbacks:
            cb.on_method_record(run, record)

    def on_batch_end(self, run, stats):
        for cb in self.callbacks:
            cb.on_batch_end(run, stats)

    def on_steps_end(self, run):
        for cb in self.callbacks:
            cb.on_steps_end(run)

    def on_epoch_end(self, run, row):
        for cb in self.callbacks:
            cb.on_epoch_end(run, row)

    def on_run_end(self, run, summary):
        for cb in self.callbacks:
            cb.on_run_end(run, summary)


class ProgressBar(Callback):
    """A tqdm bar per epoch on stderr (when ``run.log`` has bars: see :class:`ConsoleLog`)."""

    def __init__(self):
        self.bar = None

    def on_epoch_start(self, run):
        self.bar = run.log.bar(total=run.steps_per_epoch, initial=run.batch,
                               desc=f"epoch {run.epoch + 1}/{run.cfg.epochs}")

    def on_batch_end(self, run, stats):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{stats['loss']:.3f}")

    def on_steps_end(self, run):
        if self.bar is not None:
            self.bar.close()
        self.bar = None


class EpochEvaluation(Callback):
    """Clean and PGD accuracy on ``loader`` (the run's ``eval_size`` test examples) every ``eval_every``
    epochs and after the last one, into the row's ``test_clean_acc`` / ``test_pgd_acc`` /
    ``eval_seconds``. A collective under data parallel (every rank evaluates its share)."""

    def __init__(self, loader):
        self.loader = loader

    def on_epoch_end(self, run, row):
        cfg, epoch = run.cfg, row["epoch"]  # 1-based: the epoch just finished
        if not cfg.eval_every or (epoch % cfg.eval_every != 0 and epoch != cfg.epochs):
            return
        t_eval = time.perf_counter()
        # seeded per epoch (seed + 3 + 0-based epoch), independent of the global RNG the training uses
        res = final_evaluation(run.model, self.loader, eps=cfg.resolved_eval_eps, alpha=cfg.resolved_eval_alpha,
                               steps=cfg.eval_steps, restarts=1, seed=cfg.seed + 3 + epoch - 1, log=run.log,
                               fgsm=False, desc=f"eval epoch {epoch}")
        row.update(test_clean_acc=res["clean"], test_pgd_acc=res["pgd"], eval_seconds=time.perf_counter() - t_eval)


class StepDelay(Callback):
    """Tests only: ``DNR_STEP_DELAY=SECONDS`` sleeps after every optimizer step (before its checkpoint), so
    a test can kill a run at a known point."""

    def __init__(self, seconds: float | None = None):
        self.seconds = float(os.environ.get("DNR_STEP_DELAY", "0") or 0) if seconds is None else seconds

    def on_batch_end(self, run, stats):
        if self.seconds:
            time.sleep(self.seconds)


class Checkpoints(Callback):
    """``checkpoints/last.pt``, the full training state for an exact resume (model, optimizer, scheduler,
    method state, every random stream, position, metrics rows), written atomically with the one before
    kept as ``previous.pt`` (a kill at any moment leaves a loadable checkpoint): at every epoch end and,
    inside an epoch, every ``every`` optimizer steps (0: never). At the run's end, ``model.pt``.

    A collective under data parallel: every rank calls ``save`` at the same step (the buffers are
    averaged and the ranks' streams gathered); rank 0 writes."""

    def __init__(self, path: str, every: int):
        self.path, self.every = path, every

    def on_batch_end(self, run, stats):
        if self.every and run.step % self.every == 0 and run.batch < run.steps_per_epoch:
            self.save(run)
            run.log(f"checkpoint step {run.step} (epoch {run.epoch + 1}, batch {run.batch}/{run.steps_per_epoch}): "
                    f"{self.path}")

    def on_epoch_end(self, run, row):
        self.save(run)

    def on_run_end(self, run, summary):
        if run.main:
            save_checkpoint(summary["model_path"], {
                "kind": "model", "config": run.cfg.to_dict(), "model": run.model.state_dict(),
                "summary": {k: v for k, v in summary.items() if k != "layers"}})

    def save(self, run: TrainingRun) -> None:
        """Write the training state at ``run``'s position."""
        streams = {"rng": rng_state(), "data_generator": run.data_gen.get_state(),
                   "loader_generator": run.loader_gen.get_state()}
        extra = {}
        if run.world > 1:
            distributed.average_buffers(run.model)
            extra = {"world_size": run.world, "ranks": distributed.all_gather_objects(streams)}
        if not run.main:
            return
        save_checkpoint(self.path, keep_previous=True, state={
            **extra, "kind": "train", "config": run.cfg.to_dict(), "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "method": run.method.state_dict(),
            "curriculum": run.curriculum.state_dict() if run.curriculum is not None else None, **streams, "epoch": run.epoch, "batch": run.batch,
            "step": run.step, "epoch_totals": dict(run.totals) if run.totals is not None else None,
            "metrics": run.rows, "elapsed": run.train_seconds(), "steps_per_epoch": run.steps_per_epoch,
        })


class RunFiles(Callback):
    """The run directory's files (rank 0): ``config.json`` and ``initial_density.json`` when a run starts
    (not on resume), ``metrics.jsonl`` / ``metrics.csv`` and the method's logs (``rewiring.jsonl``, and
    ``method.log_records()``) at every epoch end, ``summary.json`` and the report at the end."""

    def on_run_start(self, run):
        if run.resumed:
            return
        try:
            os.makedirs(os.path.join(run.run_dir, "checkpoints"), exist_ok=True)
        except OSError as err:
            raise FileWriteError(run.run_dir, err.strerror or str(err), err.errno) from None
        write_text_atomic(os.path.join(run.run_dir, "config.json"), json.dumps(run.cfg.to_dict(), indent=2) + "\n")
        initial = {name: layer.density for name, layer in masked_layers(run.model)}
        write_text_atomic(os.path.join(run.run_dir, "initial_density.json"), json.dumps(initial, indent=2) + "\n")

    def on_epoch_end(self, run, row):
        curriculum_logs = run.curriculum.log_records() if run.curriculum is not None else {}
        write_metrics(run.run_dir, run.rows, {"rewiring.jsonl": [], **run.method.log_records(), **curriculum_logs})

    def on_run_end(self, run, summary):
        summary_path = os.path.join(run.run_dir, "summary.json")
        write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
        if run.cfg.plots:
            from .report import write_report
            out = write_report(run.run_dir)
            summary.update(report=out["report"], plots=out["plots"], plots_dir=out["plots_dir"],
                           plots_note=out["note"])
            write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")


class TensorBoard(Callback):
    """``tensorboard/`` (rank 0): the loss of every step, the numeric columns of every metrics row, the
    final accuracies. Creating it checks that the tensorboard package is installed (before any work)."""

    def __init__(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("option --tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.summary_writer, self.writer = SummaryWriter, None

    def on_run_start(self, run):
        self.writer = self.summary_writer(os.path.join(run.run_dir, "tensorboard"))

    def on_batch_end(self, run, stats):
        self.writer.add_scalar("train/loss", stats["loss"], run.step)

    def on_epoch_end(self, run, row):
        for key in CSV_COLUMNS[2:]:
            if isinstance(row.get(key), (int, float)):
                self.writer.add_scalar(f"epoch/{key}", row[key], run.epoch)
        self.writer.flush()

    def on_run_end(self, run, summary):
        for key in ("clean", "fgsm", "pgd"):
            self.writer.add_scalar(f"final/{key}", summary[key], run.cfg.epochs)
        self.writer.close()


class ConsoleLines(Callback):
    """The console: the method's messages (``method.epoch_message``) and one line per epoch."""

    def on_method_record(self, run, record):
        message = run.method.epoch_message(record)
        if message:
            run.log(message)

    def on_epoch_end(self, run, row):
        run.log(epoch_line(run.cfg, row))


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (readers see the old or the new file, never a part)."""
    with atomic_open(path, "w") as f:
        f.write(text)


CSV_COLUMNS = ("epoch", "step", "lr", "loss", "train_clean_acc", "train_adv_acc", "test_clean_acc",
               "test_pgd_acc", "density", "active_weights", "prune_rate", "rewired_weights", "seconds",
               "images_per_s", "eval_seconds",
               # SAT curriculum (issue 15)
               "curriculum_lambda", "curriculum_eps", "effective_eps", "hessian_lambda_max")


def write_metrics(run_dir: str, rows: list[dict], logs: dict[str, list[dict]]) -> None:
    """Rewrite metrics.jsonl, metrics.csv and the method's log files (``logs``: file name -> records, e.g.
    ``rewiring.jsonl``, ``pruning.jsonl``) from the run's records (idempotent)."""
    write_text_atomic(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    with atomic_open(os.path.join(run_dir, "metrics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    for name, records in logs.items():
        if os.path.basename(name) != name or not name.endswith(".jsonl"):
            raise ValueError(f"method log file {name!r}: expected a file name ending in .jsonl")
        write_text_atomic(os.path.join(run_dir, name), "".join(json.dumps(r) + "\n" for r in records))


def epoch_row(cfg, model, method, lr, stats, epoch, step, first_step, curriculum=None) -> dict:
    """One metrics row; ``lr`` is the learning rate of the epoch's first step; the method fills its columns
    (DNR: ``prune_rate``, and ``rewired_weights`` summing the rewirings after optimizer steps
    ``first_step + 1 .. step``), the curriculum (when given) its own: ``curriculum_lambda``,
    ``curriculum_eps``, ``effective_eps``, ``hessian_lambda_max`` (:meth:`dnr.curriculum.Curriculum.epoch_metrics`)."""
    layers = {name: layer.density for name, layer in masked_layers(model)}
    active = sum(int(layer.mask.sum()) for _, layer in masked_layers(model))
    prunable = sum(layer.weight.numel() for _, layer in masked_layers(model))
    row = {
        "epoch": epoch + 1, "step": step, "lr": lr, "loss": stats["loss"],
        "train_clean_acc": stats["train_clean_acc"],
        "train_adv_acc": stats["train_adv_acc"] if cfg.adversarial else None,
        "test_clean_acc": None, "test_pgd_acc": None,
        "density": active / prunable if prunable else 1.0, "active_weights": active if prunable else None,
        "prune_rate": None, "rewired_weights": None,
        "seconds": stats["seconds"], "images_per_s": stats["images_per_s"], "eval_seconds": None,
        "layers": layers,
    }
    extra = method.epoch_metrics(first_step, step)
    unknown = set(extra) - {"prune_rate", "rewired_weights", "density"}
    if unknown:
        raise ValueError(f"{type(method).__name__}.epoch_metrics: unknown columns {sorted(unknown)}")
    row.update(extra)
    if curriculum is not None:
        row.update(curriculum.epoch_metrics())
    return row


def _pct(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def epoch_line(cfg, r) -> str:
    """The console line of a metrics row."""
    return (f"epoch {r['epoch']}/{cfg.epochs}  step {r['step']}  loss {r['loss']:.3f}  "
            f"train clean {_pct(r['train_clean_acc'])}  train PGD {_pct(r['train_adv_acc'])}  "
            f"test clean {_pct(r['test_clean_acc'])}  test PGD {_pct(r['test_pgd_acc'])}  "
            f"density {r['density']:.4f}  lr {r['lr']:.4g}  {r['seconds']:.1f} s  {r['images_per_s']:.0f} img/s")
