"""``dnr explore``: E-RNN's design exploration (Phase I) over cell type x hidden size x block size.

Every configuration of the grid (a recurrent classifier of ``dnr.models.recurrent``: cell "lstm" / "gru",
hidden size, block size k; k = 1 is the dense model) is trained under the same short budget of ``budget_epochs``
epochs (clean training, SGD with a cosine schedule, at the recurrent models' default learning rate and gradient
clipping of ``dnr train`` unless the config sets ``lr`` / ``max_grad_norm``, and the block-circulant vectors'
"mean" gradient rule of the circulant methods unless ``circulant_gradient`` is "sum") and its test accuracy is
measured after every epoch.

Early stopping (the rule): from epoch ``check_epoch = max(2, ceil(check_fraction * budget_epochs))`` on, after
epoch e a configuration is stopped when even an optimistic extrapolation of its learning curve misses the
requirement::

    bound_e = acc_e + max(0, acc_e - acc_{e-1}, acc_{e-1} - acc_{e-2}) * (budget_epochs - e) < requirement

i.e. every remaining epoch is credited with the larger of the last two per-epoch gains. For a concave learning
curve (per-epoch gains that do not grow) the bound is an upper bound of the accuracy at the end of the budget,
so a stopped configuration could not have met the requirement; taking two gains instead of the last one keeps
a single noisy dip from stopping a configuration. The epochs a stopped configuration did not train are the
trials saved.

Output (``run_explore``): ``explore.json`` (every configuration's curve, parameters, FLOPs per sequence, whether
and when it was stopped, the bound), ``explore.md`` (the table, the Pareto front of accuracy against parameters
and against FLOPs, the smallest model that meets the requirement, the epochs saved) and ``explore.png``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ._files import check_output_dir, read_json, write_json
from .harness.config import ConfigError, check_choice, check_list, check_number, load_config_file, require
from .data import DATASET_NAMES
from .models import default_lr, default_max_grad_norm
from .models.recurrent import CELLS, READINGS, SequenceClassifier
from .nn.block_circulant import CIRCULANT_GRADIENTS, BlockCirculantLinear, average_circulant_gradients, fft_flops

__all__ = ["ExploreSpec", "explore", "config_name", "stop_bound", "pareto_front", "sequence_flops", "train_curve",
           "run_explore", "load_explore_spec"]


@dataclasses.dataclass
class ExploreSpec:
    """An exploration: the requirement, the grid and the training budget (every field is a config key)."""

    requirement: float                       # test accuracy to reach, in (0, 1]
    cells: list = ("lstm", "gru")
    hidden_sizes: list = (64, 128)
    block_sizes: list = (1, 4, 8, 16)        # 1: dense
    budget_epochs: int = 4
    check_fraction: float = 0.5              # the rule applies from ceil(fraction * budget) (at least epoch 2)
    dataset: str = "fashion-mnist"
    data_root: str | None = "embedded"
    reading: str = "rows"
    train_size: int | None = 2000
    test_size: int | None = 500
    batch_size: int = 64
    lr: float | None = None                  # None: the cell's dnr.models.default_lr, as dnr train (0.5)
    max_grad_norm: float | None = None       # None: the cell's default_max_grad_norm (1); 0: never clip
    circulant_gradient: str = "mean"         # the vectors' gradient rule, as the circulant methods' (mean / sum)
    seed: int = 0
    title: str = "E-RNN design exploration"

    @property
    def check_epoch(self) -> int:
        return max(2, math.ceil(self.check_fraction * self.budget_epochs))

    def optimizer_settings(self, cell: str) -> tuple[float, float]:
        """(learning rate, gradient-norm bound; 0 = no clipping) of a ``cell`` configuration: the config's, else
        what ``dnr train`` uses for that cell's models (the recurrent presets share one default)."""
        lr = default_lr(cell) if self.lr is None else self.lr
        bound = default_max_grad_norm(cell) if self.max_grad_norm is None else self.max_grad_norm
        return lr, bound

    def configurations(self) -> list[dict]:
        return [{"cell": c, "hidden_size": h, "block_size": k}
                for c, h, k in itertools.product(self.cells, self.hidden_sizes, self.block_sizes)]

    def validate(self) -> "ExploreSpec":
        key = lambda name: f"explore config key {name!r}"  # noqa: E731
        check_number(key("requirement"), self.requirement, float, lo=0.0, hi=1.0, lo_open=True)
        self.cells = [check_choice(key("cells"), c, tuple(CELLS)) for c in check_list(key("cells"), self.cells)]
        self.hidden_sizes = [check_number(key("hidden_sizes"), h, int, lo=1)
                             for h in check_list(key("hidden_sizes"), self.hidden_sizes)]
        self.block_sizes = [check_number(key("block_sizes"), k, int, lo=1)
                            for k in check_list(key("block_sizes"), self.block_sizes)]
        check_number(key("budget_epochs"), self.budget_epochs, int, lo=2)
        check_number(key("check_fraction"), self.check_fraction, float, lo=0.0, hi=1.0, lo_open=True)
        check_choice(key("reading"), self.reading, READINGS)
        check_choice(key("circulant_gradient"), self.circulant_gradient, CIRCULANT_GRADIENTS)
        check_choice(key("dataset"), self.dataset, DATASET_NAMES)
        check_number(key("batch_size"), self.batch_size, int, lo=1)
        if self.lr is not None:
            check_number(key("lr"), self.lr, float, lo=0.0, lo_open=True)
        if self.max_grad_norm is not None:
            check_number(key("max_grad_norm"), self.max_grad_norm, float, lo=0.0)
        for name in ("train_size", "test_size"):
            if getattr(self, name) is not None:
                check_number(key(name), getattr(self, name), int, lo=1)
        for h, k in itertools.product(self.hidden_sizes, self.block_sizes):
            require(key("block_sizes"), k, k <= 4 * h, f"at most 4 x the hidden size {h} (the gate matrices' rows)")
        return self


def load_explore_spec(path: str) -> ExploreSpec:
    """An :class:`ExploreSpec` from a YAML / JSON file; unknown keys and bad values are one-line ConfigErrors."""
    raw = load_config_file(path)
    require(f"explore config {path!r}", raw, isinstance(raw, dict), "a mapping of key: value")
    fields = {f.name for f in dataclasses.fields(ExploreSpec)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"explore config {path!r}: unknown key(s) {', '.join(unknown)}; expected "
                          f"{', '.join(sorted(fields))}")
    if "requirement" not in raw:
        raise ConfigError(f"explore config {path!r}: key 'requirement' is missing (the test accuracy to reach)")
    return ExploreSpec(**raw).validate()


# ---------------------------------------------------------------------------------------- the rule
def stop_bound(curve: list[float], budget_epochs: int) -> float:
    """The optimistic end-of-budget accuracy of the module docstring after ``len(curve)`` epochs (>= 2)."""
    gains = [b - a for a, b in zip(curve[:-1], curve[1:])][-2:]
    return curve[-1] + max(0.0, max(gains)) * (budget_epochs - len(curve))


def config_name(config: dict) -> str:
    """A configuration's name in the tables: ``{cell}-h{hidden_size}-k{block_size}``."""
    return f"{config['cell']}-h{config['hidden_size']}-k{config['block_size']}"


def explore(spec: ExploreSpec, trial: Callable[[dict], Iterator[float]], *, done: dict[str, dict] | None = None,
            on_row: Callable[[dict, int, int], None] | None = None) -> dict:
    """Run every configuration of ``spec`` through ``trial`` (config -> iterator of per-epoch test accuracies),
    applying the early-stopping rule; ``trial`` must also be able to describe the model (``trial.describe(config)``
    -> {"params", "flops"}). Returns the JSON-ready result (see :func:`summarise`).

    Args:
        done: rows of configurations already explored (name -> row, from an interrupted run): reused, not
            retrained. Every configuration is seeded on its own, so a resumed exploration equals an
            uninterrupted one (up to the ``seconds`` column).
        on_row: called after each configuration with (row, its 1-based index, the number of configurations),
            e.g. to print progress or save the rows so far.
    """
    rows = []
    configs = spec.configurations()
    for index, config in enumerate(configs, start=1):
        name = config_name(config)
        if done and name in done:
            rows.append(done[name])
            continue
        curve, stopped, bound = [], False, None
        start = time.perf_counter()
        for acc in trial(config):
            curve.append(float(acc))
            if len(curve) >= spec.budget_epochs:
                break
            if len(curve) >= spec.check_epoch:
                bound = stop_bound(curve, spec.budget_epochs)
                if bound < spec.requirement:
                    stopped = True
                    break
        rows.append({**config, **trial.describe(config), "name": name, "curve": curve, "accuracy": curve[-1],
                     "stopped": stopped, "epochs": len(curve), "bound": bound,
                     "seconds": time.perf_counter() - start})
        if on_row is not None:
            on_row(rows[-1], index, len(configs))
    return summarise(spec, rows)


def pareto_front(rows: list[dict], cost: str) -> list[dict]:
    """The rows no other row beats: none with cost <= and accuracy >= (one strictly). Sorted by cost."""
    front = [r for r in rows if not any(o[cost] <= r[cost] and o["accuracy"] >= r["accuracy"]
                                        and (o[cost] < r[cost] or o["accuracy"] > r["accuracy"]) for o in rows)]
    return sorted(front, key=lambda r: (r[cost], -r["accuracy"]))


def summarise(spec: ExploreSpec, rows: list[dict]) -> dict:
    """The result: the rows, both Pareto fronts (configurations trained to the end), the smallest meeting the
    requirement (fewest parameters, then FLOPs) and the epochs / trials saved by early stopping."""
    finished = [r for r in rows if not r["stopped"]]
    meeting = sorted((r for r in finished if r["accuracy"] >= spec.requirement), key=lambda r: (r["params"], r["flops"]))
    saved = sum(spec.budget_epochs - r["epochs"] for r in rows)
    return {"spec": dataclasses.asdict(spec), "check_epoch": spec.check_epoch, "rows": rows,
            "pareto_params": [r["name"] for r in pareto_front(finished, "params")],
            "pareto_flops": [r["name"] for r in pareto_front(finished, "flops")],
            "smallest": meeting[0]["name"] if meeting else None,
            "stopped": sum(r["stopped"] for r in rows), "epochs_saved": saved,
            "epochs_total": spec.budget_epochs * len(rows),
            "optimizer": {cell: spec.optimizer_settings(cell) for cell in spec.cells}}  # resolved: lr, clip bound


# ---------------------------------------------------------------------------------------- the real trial
def sequence_flops(model: SequenceClassifier) -> int:
    """Floating-point operations of one sequence: every time step's input and hidden projections (2 m n dense,
    :func:`dnr.nn.block_circulant.fft_flops` for block-circulant ones) and the head once; gate nonlinearities are
    not counted."""
    def cost(layer: nn.Module) -> int:
        if isinstance(layer, BlockCirculantLinear):
            return fft_flops(layer.out_features, layer.in_features, layer.block_size)
        return 2 * layer.weight.numel()
    steps = model.steps
    rnn = sum(steps * (cost(cell.ih) + cost(cell.hh)) for cell in model.rnn.layers)
    return rnn + cost(model.classifier)


class RecurrentTrial:
    """The default ``trial`` of :func:`explore`: builds the configuration's classifier (block-circulant
    projections from the start, head dense) and yields its test accuracy after every epoch of clean SGD training
    (momentum 0.9, cosine over the budget, ``spec.optimizer_settings``; the same seed, data order and
    initialisation stream for every config)."""

    def __init__(self, spec: ExploreSpec):
        from .data import build_dataset, dataset_info
        self.spec = spec
        root = None if spec.dataset == "synthetic" else spec.data_root
        if root == "embedded":  # the Fashion-MNIST subset shipped with dnr, as dnr train's data_root
            from .data.fashion_mnist import embedded_root
            root = embedded_root()
        self.info = dataset_info(spec.dataset)
        self.train_set = build_dataset(spec.dataset, "train", root=root)
        self.test_set = build_dataset(spec.dataset, "test", root=root)

    def build(self, config: dict) -> SequenceClassifier:
        info = self.info
        k = config["block_size"]
        return SequenceClassifier(config["cell"], self.spec.reading, info.num_classes, info.in_channels,
                                  info.input_size, hidden_size=config["hidden_size"],
                                  block_size=None if k == 1 else k, mean=info.mean, std=info.std)

    def describe(self, config: dict) -> dict:
        torch.manual_seed(self.spec.seed)
        model = self.build(config)
        return {"params": sum(p.numel() for p in model.parameters()), "flops": sequence_flops(model)}

    def _tensors(self, ds, size):
        n = len(ds) if size is None else min(size, len(ds))
        return ds.images[:n].float().div_(255), ds.labels[:n]

    def __call__(self, config: dict) -> Iterator[float]:
        lr, max_grad_norm = self.spec.optimizer_settings(config["cell"])
        return train_curve(self.build_seeded(config), *self._tensors(self.train_set, self.spec.train_size),
                           *self._tensors(self.test_set, self.spec.test_size), self.spec, lr=lr,
                           max_grad_norm=max_grad_norm)

    def build_seeded(self, config: dict) -> SequenceClassifier:
        torch.manual_seed(self.spec.seed)
        return self.build(config)


def train_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                spec: ExploreSpec, *, lr: float, max_grad_norm: float = 0.0) -> Iterator[float]:
    """Yield the test accuracy after each of ``spec.budget_epochs`` epochs of clean SGD training of ``model``
    (x [N, C, S, S] in [0, 1], y [N]) at peak learning rate ``lr``, each step's gradients clipped to global norm
    ``max_grad_norm`` (0: not clipped) and the block-circulant vectors' gradients averaged when
    ``spec.circulant_gradient`` is "mean" (:func:`dnr.nn.block_circulant.average_circulant_gradients`); the
    caller stops consuming to stop training."""
    steps_per_epoch = max(1, x.shape[0] // spec.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec.budget_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(spec.seed)
    for _ in range(spec.budget_epochs):
        model.train()
        order = torch.randperm(x.shape[0], generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * spec.batch_size:(b + 1) * spec.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            if spec.circulant_gradient == "mean":  # after clipping, as the circulant methods' step pre-hook
                average_circulant_gradients(model)
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x_test[i:i + 256]).argmax(1) == y_test[i:i + 256]).sum())
                          for i in range(0, x_test.shape[0], 256))
        yield correct / x_test.shape[0]


# ---------------------------------------------------------------------------------------- files
def write_markdown(result: dict, path: str) -> None:
    spec = result["spec"]
    lines = [f"# {spec['title']}", "",
             f"Requirement: test accuracy >= {spec['requirement']}; budget {spec['budget_epochs']} epochs per "
             f"configuration; early-stopping rule from epoch {result['check_epoch']}: stop when acc_e + (the larger "
             "of the last two per-epoch gains) x (epochs left) < requirement.", "",
             f"**Smallest model meeting the requirement:** {result['smallest'] or 'none'}", "",
             f"Early stopping: {result['stopped']} of {len(result['rows'])} configurations stopped; "
             f"{result['epochs_saved']} of {result['epochs_total']} training epochs saved.", "",
             "Training (clean SGD, momentum 0.9, cosine): " + "; ".join(
                 f"{cell} lr {lr:g}, gradients clipped to norm {bound:g}" if bound else f"{cell} lr {lr:g}, no clipping"
                 for cell, (lr, bound) in result["optimizer"].items())
             + f"; block-circulant vectors' gradient rule: {spec['circulant_gradient']}.", "",
             "| configuration | params | FLOPs / sequence | accuracy | epochs | stopped | bound | Pareto (params / FLOPs) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: r["params"]):
        pareto = "/".join(("yes" if r["name"] in result[k] else "-") for k in ("pareto_params", "pareto_flops"))
        bound = "-" if r["bound"] is None else f"{r['bound']:.4f}"
        lines.append(f"| {r['name']} | {r['params']:,} | {r['flops']:,} | {r['accuracy']:.4f} | {r['epochs']} | "
                     f"{'yes' if r['stopped'] else 'no'} | {bound} | {pareto} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(result: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, cost, front in ((axes[0], "params", "pareto_params"), (axes[1], "flops", "pareto_flops")):
        for r in result["rows"]:
            ax.scatter(r[cost], r["accuracy"], marker="x" if r["stopped"] else "o",
                       color="tab:red" if r["name"] in result[front] else "tab:gray")
        pts = sorted((r[cost], r["accuracy"]) for r in result["rows"] if r["name"] in result[front])
        if pts:
            ax.plot(*zip(*pts), color="tab:red", lw=1)
        ax.axhline(result["spec"]["requirement"], ls="--", color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(cost + (" per sequence" if cost == "flops" else ""))
        ax.set_ylabel("test accuracy")
    fig.suptitle("Pareto front (red), stopped early (x), requirement (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


PARTIAL = "explore_partial.json"


def run_explore(spec: ExploreSpec, out: str, trial: Callable | None = None,
                progress: Callable[[str], None] | None = None) -> dict:
    """Explore ``spec`` (the real training unless ``trial`` is given) and write explore.json / .md / .png into
    ``out`` (created; an existing explore.json there is refused, nothing is overwritten).

    The rows are saved to ``out/explore_partial.json`` (atomically) after every configuration, so an interrupted
    exploration resumes where it stopped when run again with the same config and ``out``: the finished
    configurations are reused, not retrained; a partial file of another config is refused. ``progress`` gets one
    line per configuration (the CLI prints them)."""
    check_output_dir(out, argument="--out")
    if os.path.exists(os.path.join(out, "explore.json")):
        raise ConfigError(f"--out: {out!r} already holds an exploration (explore.json); choose a new folder")
    partial = os.path.join(out, PARTIAL)
    spec_json = json.loads(json.dumps(dataclasses.asdict(spec)))  # lists, as read back from the file
    done: dict[str, dict] = {}
    if os.path.exists(partial):
        saved = read_json(partial)
        saved_spec = saved.get("spec") if isinstance(saved, dict) else None
        if saved_spec != spec_json:
            differ = sorted(k for k in spec_json if (saved_spec or {}).get(k) != spec_json[k])
            raise ConfigError(f"--out: {out!r} holds an interrupted exploration of another config (keys "
                              f"{', '.join(differ)} differ); use the same config to resume it, or a new folder")
        done = {r["name"]: r for r in saved["rows"]}
        if progress is not None:
            progress(f"resuming: {len(done)} of {len(spec.configurations())} configurations already explored")
    trial = trial if trial is not None else RecurrentTrial(spec)
    os.makedirs(out, exist_ok=True)
    rows_so_far = list(done.values())

    def on_row(row: dict, index: int, total: int) -> None:
        rows_so_far.append(row)
        write_json(partial, {"spec": spec_json, "rows": rows_so_far})
        if progress is not None:
            how = f"stopped after epoch {row['epochs']} (bound {row['bound']:.4f})" if row["stopped"] else \
                f"after {row['epochs']} epochs"
            progress(f"[{index}/{total}] {row['name']}: accuracy {row['accuracy']:.4f} {how}, "
                     f"{row['params']:,} params, {row['seconds']:.0f} s")

    result = explore(spec, trial, done=done, on_row=on_row)
    write_markdown(result, os.path.join(out, "explore.md"))
    result["plot"] = write_plot(result, os.path.join(out, "explore.png"))
    write_json(os.path.join(out, "explore.json"), result)
    os.remove(partial)  # every row is in explore.json now
    return result
