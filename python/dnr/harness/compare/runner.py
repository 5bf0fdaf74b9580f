"""The runner of ``dnr compare``: plan the cells, train each (or reuse / resume it), evaluate it with its
own evaluation settings, then write the report.

Reuse: a run directory with summary.json whose config.json equals the cell's config is not retrained; one
with a checkpoint but no summary is resumed; robust_eval.json is reused only when its evaluation settings
(including the SHA-256 of model.pt) equal the cell's current ones, and an interrupted evaluation continues
after its last finished batch (``robust_eval.partial.pt``, ``robust_evaluation``'s ``resume_file``). A run
directory whose config differs from the cell's is an error (nothing is overwritten), and so is a finished run
trained under an older revision of its method's defaults (``CompressionMethod.defaults_revision``): same
config, other behaviour.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import shutil
import threading
import time
from typing import Callable

from ... import evaluation
from ...methods import registry
from ..._files import read_json, sha256_file, write_json
from ..config import SAVED_BEFORE_OPTION, ConfigError, TrainConfig, check_number, require
from ..errors import RunError
from ..run import CHECKPOINT, RESUME_MUTABLE
from .report import write_compare_report
from .spec import CompareSpec, evaluation_settings

# robust_evaluation's progress in a cell's run directory while it is evaluated (removed when it finishes)
EVAL_PROGRESS_FILE = "robust_eval.partial.pt"

# what compare_spec.json records about each cell (the report reads it back)
CELL_FIELDS = ("key", "model_name", "method", "mode", "target_density", "seed", "grids", "eval", "run_dir", "config")

# the fields that make two records the same cell (run_dir is derived from the key; grids are labels)
SAME_CELL_FIELDS = ("model_name", "method", "mode", "target_density", "seed", "eval")

__all__ = ["CELL_FIELDS", "EVAL_PROGRESS_FILE", "run_compare", "run_cell", "cell_state", "machine_info",
           "folder_relation"]


def _config_defaults() -> dict:
    """The value a saved config without an option ran with: SAVED_BEFORE_OPTION's, else TrainConfig's default."""
    out = dict(SAVED_BEFORE_OPTION)
    for f in dataclasses.fields(TrainConfig):
        if f.name in out:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _configs_equal(a: dict, b: dict) -> bool:
    """Equal settings, the resume-mutable ones aside. An option missing from one side counts as its default:
    a run saved by an older dnr, before that option existed, ran with what its default now selects (a new
    option's default keeps the old behaviour), so upgrading dnr does not orphan a grid's finished cells."""
    defaults = _config_defaults()
    strip = lambda c: {k: v for k, v in {**defaults, **c}.items() if k not in RESUME_MUTABLE}  # noqa: E731
    return json.loads(json.dumps(strip(a))) == json.loads(json.dumps(strip(b)))


def cell_state(run_dir: str, config: dict) -> str:
    """'done' (summary.json, same config), 'resume' (checkpoint, same config), 'fresh' (nothing there),
    'restart' (same config, killed before its first checkpoint); raises RunError when the directory holds
    a run with a different config."""
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        if os.path.exists(os.path.join(run_dir, CHECKPOINT)):
            return "resume"
        return "fresh"
    saved = read_json(cfg_path)
    if not _configs_equal(saved, config):
        defaults = _config_defaults()
        diff = sorted(k for k in set(saved) | set(config)
                      if k not in RESUME_MUTABLE and saved.get(k, defaults.get(k)) != config.get(k, defaults.get(k)))
        raise RunError(f"run directory {run_dir!r} holds a run with a different config ({', '.join(diff)}); "
                       "delete it or choose another --out")
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary_path):
        registry.import_plugins(config.get("plugin") or [])  # a worker process may not have imported it yet
        method = registry.get(config["method"])
        trained_under = read_json(summary_path).get("defaults_revision", 0)
        if trained_under != method.defaults_revision:
            raise RunError(f"run directory {run_dir!r} was trained under revision {trained_under} of method "
                           f"{method.name!r}'s defaults, this dnr has revision {method.defaults_revision} (the "
                           "defaults changed, so its results are not the cell's); delete it or choose another --out")
        return "done"
    if os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
        return "resume"
    return "restart"


def _same_cell(recorded: dict, planned: dict) -> list[str]:
    """The fields in which a cell recorded in compare_spec.json differs from a planned one ([] = same cell)."""
    as_json = lambda v: json.loads(json.dumps(v))  # noqa: E731  (tuples and lists compare equal, as saved)
    # a folder written before cells carried model_name names the model in the config only
    recorded = dict(recorded, model_name=recorded.get("model_name") or (recorded.get("config") or {}).get("model"))
    diff = [f for f in SAME_CELL_FIELDS if as_json(recorded.get(f)) != as_json(planned[f])]
    return diff + ([] if _configs_equal(recorded.get("config") or {}, planned["config"]) else ["config"])


def folder_relation(out_dir: str, cells: list[dict]) -> str:
    """How the planned ``cells`` relate to the cells an existing compare folder records, checked before
    anything is written, so that no command silently drops a folder's record of its cells or retrains
    finished cells under new names.

    Returns:
        'new' (no compare_spec.json yet), 'grid' (the plan holds every recorded cell, maybe more: the
        folder's record is replaced by this plan) or 'subset' (the plan is some of the recorded cells, with
        their recorded settings: they run and the folder keeps its record, so its report lists the cells not
        yet finished as missing).

    Raises:
        ConfigError: the folder's compare_spec.json is unreadable; a planned cell is recorded under another
            name (e.g. without the model prefix that the folder's several-model config gives it); or the plan
            leaves out recorded cells and is not a subset of them with their settings.
    """
    path = os.path.join(out_dir, "compare_spec.json")
    if not os.path.exists(path):
        return "new"
    try:
        recorded = {c["key"]: c for c in read_json(path)["cells"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"option --out: {out_dir!r} has a compare_spec.json that cannot be read ({err}); "
                          "choose another --out") from None
    planned = {c["key"]: c for c in cells}
    dropped = [k for k in recorded if k not in planned]
    if not dropped:
        return "grid"
    extra = [k for k in planned if k not in recorded]
    for key in extra:  # a renamed cell is a planned name the folder lacks for a recorded cell the plan lacks
        for old_key in dropped:
            if not _same_cell(recorded[old_key], planned[key]):
                raise ConfigError(f"option --out: {out_dir!r} records cell {old_key!r}, which this command names "
                                  f"{key!r} (same settings, another name: cell names start with their model when "
                                  "the config lists several models, or sets model_prefix); run the folder's own "
                                  "config, or choose another --out")
    differing = {k: _same_cell(recorded[k], planned[k]) for k in planned if k in recorded}
    differing = {k: v for k, v in differing.items() if v}
    if not extra and not differing:
        return "subset"
    some = lambda keys: ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")  # noqa: E731
    why = (f"plans {len(extra)} cell(s) it does not record ({some(extra)})" if extra else
           "plans " + ", ".join(f"{k!r} with other {'/'.join(v)}" for k, v in list(differing.items())[:2]))
    raise ConfigError(f"option --out: {out_dir!r} holds another comparison: this command leaves out {len(dropped)} "
                      f"of its {len(recorded)} recorded cells ({some(dropped)}) and {why}; run a subset of its "
                      "cells with its settings, a superset, or choose another --out")


# ---------------------------------------------------------------------------------------- one cell
def _model_stats(model, cfg: TrainConfig) -> dict:
    import torch
    from ...nn import density_report
    from ..builders import dataset_meta
    _, c, s, _, _, _ = dataset_meta(cfg.dataset)
    rep = density_report(model, input_size=(c, s, s))
    if rep.prunable:
        active, prunable = rep.active, rep.prunable
    else:  # a dense model: every conv / linear weight is active
        prunable = sum(m.weight.numel() for m in model.modules()
                       if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
        active = prunable
    stats = {"active_weights": int(active), "prunable_weights": int(prunable), "total_params": int(rep.total_params),
             "nonzero_params": int(rep.nonzero_params), "flops_dense": rep.flops_dense,
             "flops_masked": rep.flops_masked, "flops_effective": rep.flops_effective}
    from ...nn.block_circulant import circulant_layers, circulant_report
    if circulant_layers(model):  # block-circulant layers: stored vectors of dense weights, FFT-form FLOPs (estimate)
        circ = circulant_report(model, (c, s, s))
        stats["active_weights"] = active + circ["stored"]  # + the layers that stayed nn.Conv2d / nn.Linear
        stats["prunable_weights"] = prunable + circ["dense"]
        for key in ("flops_dense", "flops_masked"):
            stats[key] = rep.flops_dense + circ["flops_dense"]
        stats["flops_effective"] = rep.flops_dense + circ["flops_fft"]
    return stats


def exit_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """End this process once the process ``parent_pid`` is gone (the initializer of `dnr compare --jobs N`'s
    workers). Killing the parent (SIGTERM from ``timeout`` or a job scheduler, SIGKILL) does not stop a process
    pool's workers: each would go on training its cell for up to hours, unseen. A daemon thread polls the
    parent's pid; the interrupted cell resumes from its last checkpoint (written atomically) on the next run."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="dnr-compare-exit-with-parent").start()


def run_cell(task: dict) -> dict:
    """Train (or reuse / resume) and evaluate one cell; the worker of ``run_compare`` (picklable in, out).

    task: {key, run_dir, config, eval, seed, threads, worker (bool: set torch threads to threads or 1)}.
    Returns {key, status, train_wall_seconds, eval_wall_seconds, eval_reused}."""
    import torch
    from ..builders import make_test_loader
    from ..run import fit, load_trained_model
    saved_threads = torch.get_num_threads()
    if task.get("worker"):
        torch.set_num_threads(task.get("threads") or 1)
    elif task.get("threads"):
        torch.set_num_threads(task["threads"])
    try:
        run_dir, config = task["run_dir"], task["config"]
        state = cell_state(run_dir, config)
        t0 = time.perf_counter()
        if state == "restart":  # killed before its first checkpoint: nothing worth keeping
            shutil.rmtree(run_dir)
            state = "fresh"
        if state == "fresh":
            cfg = TrainConfig(**config).validate()
            os.makedirs(os.path.dirname(run_dir), exist_ok=True)
            fit(cfg, run_dir, quiet=True, progress=False)
            status = "trained"
        elif state == "resume":
            fit(None, None, resume=run_dir, quiet=True, progress=False)
            status = "resumed"
        else:
            status = "reused"
        train_wall = time.perf_counter() - t0
        if status != "reused":
            write_json(os.path.join(run_dir, "compare_train.json"),
                        {"status": status, "train_wall_seconds": train_wall})

        model_path = os.path.join(run_dir, "model.pt")
        settings = evaluation_settings(task["eval"], task["seed"], sha256_file(model_path))
        eval_path = os.path.join(run_dir, "robust_eval.json")
        if os.path.isfile(eval_path):
            old = read_json(eval_path)
            if old.get("settings") == json.loads(json.dumps(settings)):
                return {"key": task["key"], "run_dir": run_dir, "status": status, "train_wall_seconds": train_wall,
                        "eval_wall_seconds": 0.0, "eval_reused": True}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t1 = time.perf_counter()
        model, cfg, _ = load_trained_model(model_path, device)
        ev = task["eval"]
        eval_cfg = dataclasses.replace(cfg, test_size=ev["test_size"])
        loader = make_test_loader(eval_cfg)
        try:
            result = evaluation.robust_evaluation(
                model, loader, eps=ev["eps"], alpha=ev["alpha"], pgd_steps=tuple(ev["pgd_steps"]),
                restarts=ev["restarts"], fgsm=ev["fgsm"], autoattack=ev["autoattack"],
                autoattack_examples=ev["autoattack_examples"], sweep_eps=list(ev["sweep_eps"]) or None,
                sweep_steps=ev["sweep_steps"], sweep_examples=ev["sweep_examples"], seed=task["seed"],
                device=device, resume_file=os.path.join(run_dir, EVAL_PROGRESS_FILE))
        except ImportError as err:
            if not ev["autoattack"]:
                raise
            raise ConfigError(f"compare config key 'eval.autoattack' is true but AutoAttack is unavailable ({err}): "
                              f"{evaluation.AUTOATTACK_INSTALL_HINT}, or set eval.autoattack: false") from None
        stats = _model_stats(model.cpu(), cfg)
        eval_wall = time.perf_counter() - t1
        write_json(eval_path, {"settings": settings, "device": device, "result": result, "model": stats,
                                "eval_wall_seconds": eval_wall})
        return {"key": task["key"], "run_dir": run_dir, "status": status, "train_wall_seconds": train_wall,
                "eval_wall_seconds": eval_wall, "eval_reused": False}
    finally:
        torch.set_num_threads(saved_threads)


# ---------------------------------------------------------------------------------------- the grid
def machine_info() -> dict:
    import torch
    from ... import __version__
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "device": device, "processor": platform.processor() or platform.machine(),
            "dnr": __version__}


def run_compare(spec: dict, out_dir: str, *, jobs: int = 1, threads: int | None = None, command: str | None = None,
                log: Callable[[str], None] | None = print) -> dict:
    """Train and evaluate every cell of ``spec`` into ``out_dir``, then write the report.

    Args:
        spec: a compare config (see :mod:`dnr.harness.compare.spec`; validated here) or a CompareSpec.
        out_dir: output folder (created; rerunning into it reuses finished cells).
        jobs: cells run in parallel (spawned processes); 1 = in this process, one after the other.
        threads: torch CPU threads per cell (default: unchanged for jobs=1, 1 per worker otherwise).
        command: the command line that regenerates the report (shown in compare.md).
        log: progress lines (one per cell started / finished); None for silence.

    Returns:
        what :func:`write_compare_report` returns (compare.json's content plus the written paths).
    """
    require("option --jobs", jobs, isinstance(jobs, int) and not isinstance(jobs, bool) and jobs >= 1,
            "an integer >= 1")
    check_number("option --threads", threads, int, lo=1, optional=True)
    if not isinstance(spec, CompareSpec):
        spec = CompareSpec.from_mapping(spec, threads=threads)
    cells = spec.plan(threads=threads)
    if any(c["eval"]["autoattack"] for c in cells):
        try:
            importlib.import_module("torchattacks")
        except ImportError:
            raise ConfigError("compare config key 'eval.autoattack' is true but the torchattacks package is not "
                              f"installed: {evaluation.AUTOATTACK_INSTALL_HINT}, or set eval.autoattack: false") from None
    say = log or (lambda _msg: None)
    out_dir = os.path.abspath(out_dir)
    runs = os.path.join(out_dir, "runs")
    relation = folder_relation(out_dir, cells)
    for c in cells:
        c["run_dir"] = os.path.join(runs, c["key"])
        cell_state(c["run_dir"], c["config"])  # a conflicting run directory fails before any training
    os.makedirs(runs, exist_ok=True)
    if relation == "subset":  # the folder's record names more cells than this command runs: keep it whole
        say(f"compare: {out_dir} records more cells than this command plans; running {len(cells)} of them and "
            "keeping its compare_spec.json")
    else:
        write_json(os.path.join(out_dir, "compare_spec.json"),
                   {"spec": spec.to_dict(), "command": command, "machine": machine_info(), "jobs": jobs,
                    "threads": threads,
                    # run_dir relative to the folder: the folder can move (or be committed); the reader rebuilds it
                    "cells": [dict({k: c[k] for k in CELL_FIELDS}, run_dir=os.path.join("runs", c["key"]))
                              for c in cells]})
    tasks = [{"key": c["key"], "run_dir": c["run_dir"], "config": c["config"], "eval": c["eval"],
              "seed": c["seed"], "threads": threads, "worker": jobs > 1} for c in cells]
    total = len(tasks)
    say(f"compare: {total} cells ({_shape(spec)}; density-independent methods once per "
        f"{'(model, seed)' if spec.models and len(spec.models) > 1 else 'seed'}), {jobs} job(s), output {out_dir}")
    t_start = time.perf_counter()
    done = [0]

    def started(task):
        say(f"[start] {task['key']}")

    def finished(res, t):
        done[0] += 1
        say(_finished_line(res, t, done[0], total))

    if jobs == 1:
        for task in tasks:
            started(task)
            t = time.perf_counter()
            finished(run_cell(task), time.perf_counter() - t)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp
        pending = list(tasks)
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                    initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
            running: dict = {}
            try:
                while pending or running:
                    while pending and len(running) < jobs:
                        task = pending.pop(0)
                        started(task)
                        running[pool.submit(run_cell, task)] = (task, time.perf_counter())
                    ready, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
                    for fut in ready:
                        task, t = running.pop(fut)
                        finished(fut.result(), time.perf_counter() - t)
            except BaseException:
                for fut in running:
                    fut.cancel()
                raise
    say(f"compare: all {total} cells done in {time.perf_counter() - t_start:.0f} s")
    out = write_compare_report(out_dir)
    say(f"report: {out['report']}")
    say(f"plots: {out['plots_dir']} ({', '.join(os.path.basename(p) for p in out['plots'])})" if out["plots"]
        else (out["note"] or "no plots"))
    return out


def _shape(spec: CompareSpec) -> str:
    """The grid's shape in words, for the first progress line."""
    grids = ["{} methods x {} modes x {} densities x {} seeds".format(
        len(g.methods), len(g.modes), len(g.densities), len(g.seeds)) for g in spec.grids]
    models = f"{len(spec.models)} models x " if spec.models and len(spec.models) > 1 else ""
    return models + (grids[0] if len(grids) == 1 else "the union of " + " + ".join(f"({g})" for g in grids))


def _finished_line(res: dict, seconds: float, i: int, total: int) -> str:
    line = f"[done {i}/{total}] {res['key']}: {res['status']}"
    try:
        with open(os.path.join(res["run_dir"], "robust_eval.json")) as f:
            ev = json.load(f)
        r = ev["result"]
        pgd_max = max(r["pgd"], key=int) if r.get("pgd") else None
        parts = [f"clean {_pc(r.get('clean'))}"]
        if pgd_max is not None:
            parts.append(f"PGD-{pgd_max} {_pc(r['pgd'][pgd_max])}")
        if r.get("autoattack") is not None:
            parts.append(f"AA {_pc(r['autoattack'])}")
        line += "  " + "  ".join(parts)
    except (OSError, KeyError, ValueError, TypeError):
        pass
    return (line + f"  train {res['train_wall_seconds']:.0f} s  eval {res['eval_wall_seconds']:.0f} s"
            f"{' (reused)' if res.get('eval_reused') else ''}  {seconds:.0f} s")


def _pc(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"
