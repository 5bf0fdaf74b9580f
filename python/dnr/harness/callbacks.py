"""What the trainer reports while it runs: console lines and progress bars, the metrics rows and the run
directory's metrics and method log files (all written atomically)."""

from __future__ import annotations

import csv
import json
import os
import sys

from .._files import atomic_open
from ..nn import masked_layers

__all__ = ["ConsoleLog", "write_text_atomic", "CSV_COLUMNS", "write_metrics", "epoch_row", "epoch_line"]


class ConsoleLog:
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


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (readers see the old or the new file, never a part)."""
    with atomic_open(path, "w") as f:
        f.write(text)


CSV_COLUMNS = ("epoch", "step", "lr", "loss", "train_clean_acc", "train_adv_acc", "test_clean_acc",
               "test_pgd_acc", "density", "active_weights", "prune_rate", "rewired_weights", "seconds",
               "images_per_s", "eval_seconds")


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


def epoch_row(cfg, model, method, lr, stats, epoch, step, first_step) -> dict:
    """One metrics row; ``lr`` is the learning rate of the epoch's first step; the method fills its columns
    (DNR: ``prune_rate``, and ``rewired_weights`` summing the rewirings after optimizer steps
    ``first_step + 1 .. step``)."""
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
    unknown = set(extra) - {"prune_rate", "rewired_weights"}
    if unknown:
        raise ValueError(f"{type(method).__name__}.epoch_metrics: unknown columns {sorted(unknown)}")
    row.update(extra)
    return row


def _pct(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def epoch_line(cfg, r) -> str:
    """The console line of a metrics row."""
    return (f"epoch {r['epoch']}/{cfg.epochs}  step {r['step']}  loss {r['loss']:.3f}  "
            f"train clean {_pct(r['train_clean_acc'])}  train PGD {_pct(r['train_adv_acc'])}  "
            f"test clean {_pct(r['test_clean_acc'])}  test PGD {_pct(r['test_pgd_acc'])}  "
            f"density {r['density']:.4f}  lr {r['lr']:.4g}  {r['seconds']:.1f} s  {r['images_per_s']:.0f} img/s")
