"""``dnr compare``: a grid of methods x modes x densities x seeds from one config, one report.

Every cell of the grid is trained with :func:`dnr.harness.fit` into its own run directory and then
evaluated with :func:`dnr.evaluation.robust_evaluation` (clean, FGSM, PGD at several step counts with
restarts, AutoAttack, an eps sweep and sanity checks). The grid's report is rebuilt from the per-cell files
only, so every number in it is one that a run directory holds.

Output folder ``OUT``::

    compare_spec.json    the validated grid, the command that made it, the machine, the planned cells
    runs/<cell>/         one run directory per cell (``fit``'s files + robust_eval.json)
    compare.json         the grid, every cell's numbers and the mean / std over seeds
    compare.md           the markdown report (tables per mode, failed sanity checks, where DNR wins)
    plots/               clean_vs_compression.png, robust_vs_compression.png (need matplotlib)

Cells: a sparse method (``TrainConfig.sparse``) gets one cell per (mode, density, seed), named
``<method>-<mode>-d<density>-s<seed>``; a density-independent method (dense, dense-at) one cell per seed,
``<method>-s<seed>``, trained at density 1.0 and shown in every mode's table as the 1x reference.

Reuse: a run directory with summary.json whose config.json equals the cell's config is not retrained; one
with a checkpoint but no summary is resumed; robust_eval.json is reused only when its evaluation settings
(including the SHA-256 of model.pt) equal the current ones. A run directory whose config differs from the
cell's is an error (nothing is overwritten).

Std over seeds is the sample standard deviation (ddof=1; 0 for a single seed).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import platform
import shutil
import time
from typing import Any, Callable

import numpy as np

from .. import evaluation
from .._files import atomic_open, read_json, sha256_file
from . import config as hconfig
from .config import ConfigError, TrainConfig, load_config_file, resolve_config
from .report import plots_or_note
from .. import methods as method_registry
from .errors import RunError
from .run import CHECKPOINT, RESUME_MUTABLE

__all__ = ["OUTPUT_FILES", "run_compare", "write_compare_report", "load_compare_config", "validate_compare_spec", "plan_cells",
           "EVAL_DEFAULTS"]

SPEC_KEYS = ("preset", "train", "methods", "modes", "densities", "seeds", "eval", "title")
EVAL_DEFAULTS = {"test_size": None, "pgd_steps": [20, 50], "restarts": 2, "fgsm": True, "autoattack": True,
                 "autoattack_examples": 500, "sweep_eps": None, "sweep_steps": 20, "sweep_examples": 500,
                 "eps": None, "alpha": None}
OUTPUT_FILES = ("compare_spec.json", "compare.json", "compare.md")  # written into the output folder
GRID_TRAIN_KEYS = ("method", "mode", "density", "seed")  # set per cell: not allowed in `train`
MODES = ("irregular", "channel")


# ---------------------------------------------------------------------------------------- config
def load_compare_config(path: str) -> dict:
    """Read a compare config (YAML or JSON mapping). Keys are not validated here (see validate_compare_spec)."""
    return load_config_file(path)


def _err(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"compare config key {key!r}: got {value!r}, expected {expected}")


def _list(spec: dict, key: str) -> list:
    value = spec.get(key)
    if value is None:
        raise ConfigError(f"compare config key {key!r} is missing: give a non-empty list")
    if not isinstance(value, (list, tuple)):
        value = [value]
    if not value:
        raise _err(key, list(value), "a non-empty list")
    if len(set(map(repr, value))) != len(value):
        raise _err(key, list(value), "a list without duplicates")
    return list(value)


def _number(key, v, *, integer=False, lo=None, lo_open=False, hi=None, none_ok=False):
    if v is None and none_ok:
        return None
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or (not integer and not math.isfinite(v)):
        raise _err(key, v, ("an integer" if integer else "a number") + (" (or null)" if none_ok else ""))
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise _err(key, v, f"{'an integer' if integer else 'a number'} {'>' if lo_open else '>='} {lo}")
    if hi is not None and v > hi:
        raise _err(key, v, f"a number <= {hi}")
    return int(v) if integer else float(v)


def validate_compare_spec(spec: dict) -> dict:
    """Check every key of a compare config and return it normalised (lists, eval defaults filled in).

    Raises:
        ConfigError: naming the key, the value and what was expected; also any cell whose TrainConfig is
        invalid (so a bad grid fails before any training).
    """
    if not isinstance(spec, dict):
        raise ConfigError(f"compare config must be a mapping of key: value, got {type(spec).__name__}")
    spec = {str(k).replace("-", "_"): v for k, v in spec.items()}
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"compare config: unknown key(s) {', '.join(map(repr, unknown))}; expected keys: "
                          f"{', '.join(SPEC_KEYS)}")
    out: dict = {}
    preset = spec.get("preset")
    if preset is not None and (not isinstance(preset, str) or preset not in hconfig.PRESETS):
        raise _err("preset", preset, f"one of {list(hconfig.PRESETS)}")
    out["preset"] = preset
    train = spec.get("train") or {}
    if not isinstance(train, dict):
        raise _err("train", train, "a mapping of TrainConfig option: value")
    train = {str(k).replace("-", "_"): v for k, v in train.items()}
    grid_keys = sorted(set(train) & set(GRID_TRAIN_KEYS))
    if grid_keys:
        raise ConfigError(f"compare config key 'train': {', '.join(grid_keys)} is set per cell by the grid; use "
                          "the keys methods, modes, densities and seeds instead")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(train) - fields)
    if bad:
        raise ConfigError(f"compare config key 'train': unknown TrainConfig option(s) {', '.join(map(repr, bad))}; "
                          "see dnr train --help")
    out["train"] = train

    methods = _list(spec, "methods")
    try:  # the train section's plugins register methods the grid may name
        method_registry.import_plugins(hconfig.validate_options({"plugin": train.get("plugin", [])})["plugin"])
    except method_registry.PluginError as err:
        raise ConfigError(f"compare config key 'train': option plugin: {err}") from None
    for m in methods:
        if m not in method_registry.available():
            raise _err("methods", m, f"one of {list(method_registry.available())} (the dnr.methods registry)")
    out["methods"] = methods
    modes = _list(spec, "modes")
    for m in modes:
        if m not in MODES:
            raise _err("modes", m, f"one of {list(MODES)}")
    out["modes"] = modes
    out["densities"] = [_number("densities", d, lo=0.0, lo_open=True, hi=1.0) for d in _list(spec, "densities")]
    for d in out["densities"]:
        if d > 1.0:
            raise _err("densities", d, "numbers in (0, 1]")
    out["seeds"] = [_number("seeds", s, integer=True, lo=0) for s in _list(spec, "seeds")]
    title = spec.get("title")
    if title is not None and not isinstance(title, str):
        raise _err("title", title, "a string")
    out["title"] = title or "dnr compare"

    ev = spec.get("eval") or {}
    if not isinstance(ev, dict):
        raise _err("eval", ev, "a mapping of evaluation setting: value")
    ev = {str(k).replace("-", "_"): v for k, v in ev.items()}
    bad = sorted(set(ev) - set(EVAL_DEFAULTS))
    if bad:
        raise ConfigError(f"compare config key 'eval': unknown setting(s) {', '.join(map(repr, bad))}; expected "
                          f"{', '.join(EVAL_DEFAULTS)}")
    e = dict(EVAL_DEFAULTS, **ev)
    e["test_size"] = _number("eval.test_size", e["test_size"], integer=True, lo=1, none_ok=True)
    steps = e["pgd_steps"]
    if not isinstance(steps, (list, tuple)):
        steps = [steps]
    if not steps:
        raise _err("eval.pgd_steps", list(steps), "a non-empty list of integers >= 1")
    e["pgd_steps"] = sorted({_number("eval.pgd_steps", s, integer=True, lo=1) for s in steps})
    e["restarts"] = _number("eval.restarts", e["restarts"], integer=True, lo=1)
    for key in ("fgsm", "autoattack"):
        if not isinstance(e[key], bool):
            raise _err(f"eval.{key}", e[key], "true or false")
    e["autoattack_examples"] = _number("eval.autoattack_examples", e["autoattack_examples"], integer=True, lo=1,
                                       none_ok=True)
    e["sweep_examples"] = _number("eval.sweep_examples", e["sweep_examples"], integer=True, lo=1, none_ok=True)
    e["sweep_steps"] = _number("eval.sweep_steps", e["sweep_steps"], integer=True, lo=1)
    e["eps"] = _number("eval.eps", e["eps"], lo=0.0, none_ok=True)
    e["alpha"] = _number("eval.alpha", e["alpha"], lo=0.0, lo_open=True, none_ok=True)
    if e["sweep_eps"] is not None:
        sw = e["sweep_eps"] if isinstance(e["sweep_eps"], (list, tuple)) else [e["sweep_eps"]]
        e["sweep_eps"] = sorted({_number("eval.sweep_eps", x, lo=0.0) for x in sw})
    out["eval"] = e

    # every cell's TrainConfig, up front
    cells = plan_cells(out)
    base = TrainConfig(**cells[0]["config"])
    if e["eps"] is None:
        e["eps"] = base.resolved_eval_eps
    if e["sweep_eps"] is None:
        x = e["eps"]
        e["sweep_eps"] = sorted({round(v, 10) for v in (0.0, x / 2, x, 2 * x, 0.3, 0.5)})
    return out


def _density_tag(d: float) -> str:
    return f"{d:g}"


def cell_key(method: str, mode: str | None, density: float | None, seed: int) -> str:
    if mode is None:
        return f"{method}-s{seed}"
    return f"{method}-{mode}-d{_density_tag(density)}-s{seed}"


def plan_cells(spec: dict, *, threads: int | None = None) -> list[dict]:
    """The cells of a validated spec: [{key, method, mode (None: density-independent), target_density, seed,
    config (resolved TrainConfig dict)}]. Raises ConfigError naming the cell whose config is invalid."""
    cells = []
    for method in spec["methods"]:
        probe = _resolve(spec, method, spec["modes"][0], min(spec["densities"]), spec["seeds"][0], threads)
        if probe.sparse:
            for mode in spec["modes"]:
                for d in spec["densities"]:
                    for seed in spec["seeds"]:
                        cfg = _resolve(spec, method, mode, d, seed, threads)
                        cells.append({"key": cell_key(method, mode, d, seed), "method": method, "mode": mode,
                                      "target_density": d, "seed": seed, "config": cfg.to_dict()})
        else:
            for seed in spec["seeds"]:
                cfg = _resolve(spec, method, "irregular", 1.0, seed, threads, reference=True)
                cells.append({"key": cell_key(method, None, None, seed), "method": method, "mode": None,
                              "target_density": 1.0, "seed": seed, "config": cfg.to_dict()})
    return cells


def _resolve(spec, method, mode, density, seed, threads, reference=False) -> TrainConfig:
    overrides = dict(spec["train"], method=method, mode=mode, density=density, seed=seed)
    if threads is not None:
        overrides["threads"] = threads
    try:
        return resolve_config(spec.get("preset"), None, overrides)
    except ConfigError as err:
        where = f"method {method}" + ("" if reference else f", mode {mode}, density {density}") + f", seed {seed}"
        raise ConfigError(f"compare config: the cell ({where}) has an invalid training config: {err}") from None


def _configs_equal(a: dict, b: dict) -> bool:
    strip = lambda c: {k: v for k, v in c.items() if k not in RESUME_MUTABLE}  # noqa: E731
    return json.loads(json.dumps(strip(a))) == json.loads(json.dumps(strip(b)))


def _write_json(path: str, obj) -> None:
    with atomic_open(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")


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
        diff = sorted(k for k in set(saved) | set(config) if k not in RESUME_MUTABLE and saved.get(k) != config.get(k))
        raise RunError(f"run directory {run_dir!r} holds a run with a different config ({', '.join(diff)}); "
                       "delete it or choose another --out")
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        return "done"
    if os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
        return "resume"
    return "restart"


# ---------------------------------------------------------------------------------------- one cell
def _eval_settings(ev: dict, seed: int, model_sha: str) -> dict:
    return {"eps": ev["eps"], "alpha": ev["alpha"], "pgd_steps": list(ev["pgd_steps"]), "restarts": ev["restarts"],
            "fgsm": ev["fgsm"], "autoattack": ev["autoattack"], "autoattack_examples": ev["autoattack_examples"],
            "sweep_eps": list(ev["sweep_eps"]), "sweep_steps": ev["sweep_steps"],
            "sweep_examples": ev["sweep_examples"], "test_size": ev["test_size"], "seed": seed,
            "model_sha256": model_sha}


def _model_stats(model, cfg: TrainConfig) -> dict:
    import torch
    from ..nn import density_report
    from .builders import dataset_meta
    _, c, s, _, _, _ = dataset_meta(cfg.dataset)
    rep = density_report(model, input_size=(c, s, s))
    if rep.prunable:
        active, prunable = rep.active, rep.prunable
    else:  # a dense model: every conv / linear weight is active
        prunable = sum(m.weight.numel() for m in model.modules()
                       if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
        active = prunable
    return {"active_weights": int(active), "prunable_weights": int(prunable), "total_params": int(rep.total_params),
            "nonzero_params": int(rep.nonzero_params), "flops_dense": rep.flops_dense,
            "flops_masked": rep.flops_masked, "flops_effective": rep.flops_effective}


def run_cell(task: dict) -> dict:
    """Train (or reuse / resume) and evaluate one cell; the worker of ``run_compare`` (picklable in, out).

    task: {key, run_dir, config, eval, seed, threads, worker (bool: set torch threads to threads or 1)}.
    Returns {key, status, train_wall_seconds, eval_wall_seconds, eval_reused}."""
    import torch
    from .builders import make_test_loader
    from .run import fit, load_trained_model
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
            _write_json(os.path.join(run_dir, "compare_train.json"),
                        {"status": status, "train_wall_seconds": train_wall})

        model_path = os.path.join(run_dir, "model.pt")
        settings = _eval_settings(task["eval"], task["seed"], sha256_file(model_path))
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
                device=device)
        except ImportError as err:
            if not ev["autoattack"]:
                raise
            raise ConfigError(f"compare config key 'eval.autoattack' is true but AutoAttack is unavailable ({err}): "
                              f"{evaluation.AUTOATTACK_INSTALL_HINT}, or set eval.autoattack: false") from None
        stats = _model_stats(model.cpu(), cfg)
        eval_wall = time.perf_counter() - t1
        _write_json(eval_path, {"settings": settings, "device": device, "result": result, "model": stats,
                                "eval_wall_seconds": eval_wall})
        return {"key": task["key"], "run_dir": run_dir, "status": status, "train_wall_seconds": train_wall,
                "eval_wall_seconds": eval_wall, "eval_reused": False}
    finally:
        torch.set_num_threads(saved_threads)


# ---------------------------------------------------------------------------------------- the grid
def machine_info() -> dict:
    import torch
    from .. import __version__
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
        spec: a compare config (see the module docstring; validated here).
        out_dir: output folder (created; rerunning into it reuses finished cells).
        jobs: cells run in parallel (spawned processes); 1 = in this process, one after the other.
        threads: torch CPU threads per cell (default: unchanged for jobs=1, 1 per worker otherwise).
        command: the command line that regenerates the report (shown in compare.md).
        log: progress lines (one per cell started / finished); None for silence.

    Returns:
        what :func:`write_compare_report` returns (compare.json's content plus the written paths).
    """
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"option --jobs: got {jobs!r}, expected an integer >= 1")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"option --threads: got {threads!r}, expected an integer >= 1")
    spec = validate_compare_spec(spec)
    cells = plan_cells(spec, threads=threads)
    if spec["eval"]["autoattack"]:
        try:
            importlib.import_module("torchattacks")
        except ImportError:
            raise ConfigError("compare config key 'eval.autoattack' is true but the torchattacks package is not "
                              f"installed: {evaluation.AUTOATTACK_INSTALL_HINT}, or set eval.autoattack: false") from None
    say = log or (lambda _msg: None)
    out_dir = os.path.abspath(out_dir)
    runs = os.path.join(out_dir, "runs")
    for c in cells:
        c["run_dir"] = os.path.join(runs, c["key"])
        cell_state(c["run_dir"], c["config"])  # a conflicting run directory fails before any training
    os.makedirs(runs, exist_ok=True)
    _write_json(os.path.join(out_dir, "compare_spec.json"),
                {"spec": spec, "command": command, "machine": machine_info(), "jobs": jobs, "threads": threads,
                 "cells": [{k: c[k] for k in ("key", "method", "mode", "target_density", "seed", "run_dir", "config")}
                           for c in cells]})
    tasks = [{"key": c["key"], "run_dir": c["run_dir"], "config": c["config"], "eval": spec["eval"],
              "seed": c["seed"], "threads": threads, "worker": jobs > 1} for c in cells]
    total = len(tasks)
    say(f"compare: {total} cells ({len(spec['methods'])} methods x {len(spec['modes'])} modes x "
        f"{len(spec['densities'])} densities x {len(spec['seeds'])} seeds; density-independent methods once per "
        f"seed), {jobs} job(s), output {out_dir}")
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
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
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


# ---------------------------------------------------------------------------------------- report
ACC_METRICS = ("clean", "fgsm", "autoattack", "autoattack_pgd")


def _cell_record(c: dict, spec: dict) -> dict:
    """Everything compare.json says about one cell, read from its run directory (None where missing)."""
    run_dir = c["run_dir"]
    rec = dict(c, status="missing", summary=None, robust_eval=None, eval_settings=None, model=None,
               train_seconds=None, train_wall_seconds=None, eval_seconds=None, density=None, compression=None)
    cpath = os.path.join(run_dir, "config.json")
    if os.path.isfile(cpath):
        rec["config"] = read_json(cpath)  # what the run was trained with (the planned config until it exists)
    spath = os.path.join(run_dir, "summary.json")
    if os.path.isfile(spath):
        s = read_json(spath)
        rec["summary"] = {k: s.get(k) for k in ("method", "mode", "density", "effective_density", "compression",
                                                "clean", "fgsm", "pgd", "pgd_steps", "pgd_restarts", "eps",
                                                "test_examples", "flops_dense", "flops_effective",
                                                "train_seconds", "epochs")}
        rec.update(status="trained", train_seconds=s.get("train_seconds"), density=s.get("density"),
                   compression=s.get("compression"))
    tpath = os.path.join(run_dir, "compare_train.json")
    if os.path.isfile(tpath):
        rec["train_wall_seconds"] = read_json(tpath).get("train_wall_seconds")
    epath = os.path.join(run_dir, "robust_eval.json")
    if rec["summary"] is not None and os.path.isfile(epath):
        ev = read_json(epath)
        current = _eval_settings(spec["eval"], c["seed"], sha256_file(os.path.join(run_dir, "model.pt")))
        if ev.get("settings") == json.loads(json.dumps(current)):
            rec.update(status="evaluated", robust_eval=ev["result"], eval_settings=ev["settings"],
                       model=ev.get("model"), eval_seconds=ev.get("eval_wall_seconds"))
        else:
            rec["status"] = "stale evaluation"
    return rec


def _values(rec: dict) -> dict:
    """The per-cell numbers that are aggregated over seeds."""
    out: dict = {"density": rec["density"], "compression": rec["compression"], "train_seconds": rec["train_seconds"],
                 "eval_seconds": rec["eval_seconds"]}
    r = rec["robust_eval"]
    if r is not None:
        for k in ACC_METRICS:
            out[k] = r.get(k)
        for steps, acc in (r.get("pgd") or {}).items():
            out[f"pgd_{steps}"] = acc
    m = rec["model"]
    if m is not None:
        for k in ("active_weights", "prunable_weights", "total_params", "nonzero_params", "flops_dense",
                  "flops_effective"):
            out[k] = m.get(k)
    return out


def _aggregate(records: list[dict]) -> list[dict]:
    groups: dict = {}
    for rec in records:
        groups.setdefault((rec["method"], rec["mode"], rec["target_density"]), []).append(rec)
    out = []
    for (method, mode, d), recs in groups.items():
        per = [_values(r) for r in recs if r["status"] == "evaluated"]
        metrics = {}
        for name in sorted({k for p in per for k in p}):
            vals = [p[name] for p in per if p.get(name) is not None]
            if vals:
                arr = np.asarray(vals, dtype=float)
                metrics[name] = {"mean": float(np.mean(arr)), "std": float(np.std(arr, ddof=1)) if len(arr) > 1 else 0.0, "n": len(vals),
                                 "values": vals}
        out.append({"method": method, "mode": mode, "target_density": d, "seeds": [r["seed"] for r in recs],
                    "n_evaluated": len(per), "metrics": metrics})
    return out


def write_compare_report(out_dir: str) -> dict:
    """Rebuild compare.json, compare.md and the plots of ``out_dir`` from compare_spec.json and the per-cell
    files (cells without results are listed as missing, never filled in).

    Returns compare.json's content plus "report" (md path), "json", "plots", "plots_dir" and "note".

    Raises:
        FileNotFoundError: ``out_dir`` has no compare_spec.json.
    """
    out_dir = os.path.abspath(out_dir)
    spec_path = os.path.join(out_dir, "compare_spec.json")
    if not os.path.isfile(spec_path):
        raise FileNotFoundError(f"{out_dir!r} is not a compare output folder (no compare_spec.json)")
    meta = read_json(spec_path)
    spec = meta["spec"]
    records = []
    for c in meta["cells"]:
        c = dict(c, run_dir=os.path.join(out_dir, "runs", c["key"]))  # the folder may have moved
        records.append(_cell_record(c, spec))
    data = {"title": spec["title"], "command": meta.get("command"), "machine": meta.get("machine"), "config": spec,
            "std": "sample std over seeds (numpy ddof=1)", "cells": records, "aggregate": _aggregate(records)}
    data["wins"] = _wins(data)
    plots_dir = os.path.join(out_dir, "plots")
    plots, note = plots_or_note(lambda: _plots(data, plots_dir))
    data["plots"] = [os.path.relpath(p, out_dir) for p in plots]
    data["plots_note"] = note
    json_path = os.path.join(out_dir, "compare.json")
    _write_json(json_path, data)
    md_path = os.path.join(out_dir, "compare.md")
    with atomic_open(md_path, "w") as f:
        f.write(_markdown(data, out_dir))
    return dict(data, report=md_path, json=json_path, plots=plots, plots_dir=plots_dir, note=note)


def _groups_for_mode(data: dict, mode: str) -> list[dict]:
    """The aggregate rows shown in mode ``mode``'s table: the density-independent references first."""
    refs = [g for g in data["aggregate"] if g["mode"] is None]
    rows = [g for g in data["aggregate"] if g["mode"] == mode]
    order = {m: i for i, m in enumerate(data["config"]["methods"])}
    rows.sort(key=lambda g: (-g["target_density"], order.get(g["method"], 99)))
    return refs + rows


def _pgd_max(data: dict) -> str:
    return str(max(data["config"]["eval"]["pgd_steps"]))


def _fmt_acc(m: dict | None) -> str:
    if not m:
        return "-"
    return f"{100 * m['mean']:.2f} ± {100 * m['std']:.2f} ({m['n']} seed{'s' if m['n'] != 1 else ''})"


def _fmt_num(m: dict | None, fmt: str) -> str:
    if not m:
        return "-"
    return format(m["mean"], fmt) + (f" ± {format(m['std'], fmt)}" if m["n"] > 1 and m["std"] else "")


def _aa_text(ev: dict) -> str:
    if not ev["autoattack"]:
        return "off"
    return f"on (first {ev['autoattack_examples'] or 'all'} examples)"


def _markdown(data: dict, out_dir: str) -> str:
    spec, ev = data["config"], data["config"]["eval"]
    lines = [f"# {data['title']}", ""]
    if data.get("command"):
        lines += ["Regenerate (reuses every finished cell):", "", "```", data["command"], "```", ""]
    mach = data.get("machine") or {}
    if mach:
        lines += ["## Machine", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {mach.get(k)} |" for k in ("platform", "python", "processor", "cpu_count", "torch",
                                                       "device", "dnr")] + [""]
    lines += ["## Settings", ""]
    if data["cells"]:
        base = data["cells"][0]
        cfg_keys = ("dataset", "data_root", "model", "train_size", "epochs", "batch_size", "lr", "lr_schedule", "eps",
                    "alpha", "attack_steps", "beta", "init", "prune_rate", "prune_rate_min", "deterministic")
        cfg = base.get("config")
        lines += [f"Preset `{spec.get('preset') or 'fashion-mnist-quick'}`; shared training overrides: "
                  f"`{json.dumps(spec['train'])}`.", ""]
        if cfg:
            lines += ["| training option | value |", "|---|---|"] + [f"| {k} | {cfg.get(k)} |" for k in cfg_keys] + [""]
    published = hconfig.PUBLISHED.get(spec.get("preset") or "")
    if published:
        nums = ", ".join(f"{k} {v}%" for k, v in published.items() if k in ("clean", "pgd", "autoattack") and v)
        lines += [f"Published numbers for preset `{spec['preset']}` (not computed here): {nums}. Source: "
                  f"{published['source']}.", ""]
    lines += [f"Grid: methods {', '.join(spec['methods'])}; modes {', '.join(spec['modes'])}; target densities "
              f"{', '.join(_density_tag(d) for d in spec['densities'])}; seeds {', '.join(map(str, spec['seeds']))}. "
              "Density-independent methods are trained once per seed at density 1.0 and shown in every mode's table "
              "as the 1x reference.", ""]
    lines += [f"Evaluation (dnr.evaluation.robust_evaluation): L-inf eps {ev['eps']:.4g}, "
              f"PGD steps {ev['pgd_steps']} with {ev['restarts']} restart(s), FGSM {'on' if ev['fgsm'] else 'off'}, "
              f"AutoAttack {_aa_text(ev)}, "
              f"test examples {ev['test_size'] or 'all'}; eps sweep {ev['sweep_eps']} (PGD-{ev['sweep_steps']}, "
              f"first {ev['sweep_examples'] or 'all'} examples). Accuracies in %, mean ± std over seeds "
              "(sample std, ddof=1).", ""]

    pgd_steps = [str(s) for s in ev["pgd_steps"]]
    for mode in spec["modes"]:
        lines += [f"## {mode.capitalize()} sparsity", ""]
        head = (["method", "target density", "density", "compression", "params (active / total)", "FLOPs"]
                + ["clean", "FGSM"] + [f"PGD-{s}" for s in pgd_steps] + ["AutoAttack (n)", "train time (s)"])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for g in _groups_for_mode(data, mode):
            m = g["metrics"]
            aa = _fmt_acc(m.get("autoattack"))
            if m.get("autoattack"):
                ns = {(r["robust_eval"] or {}).get("autoattack_n") for r in _cells_of(data, g)}
                ns.discard(None)
                aa += f" (n={'/'.join(map(str, sorted(ns)))})" if ns else ""
            params = "-"
            if m.get("active_weights"):
                params = f"{_fmt_num(m['active_weights'], ',.0f')} / {_fmt_num(m.get('total_params'), ',.0f')}"
            name = g["method"] + (" (dense)" if g["mode"] is None else "")
            row = [name, _density_tag(g["target_density"]), _fmt_num(m.get("density"), ".4f"),
                   _fmt_num(m.get("compression"), ".1f") + "x" if m.get("compression") else "-", params,
                   _fmt_num(m.get("flops_effective"), ",.0f"), _fmt_acc(m.get("clean")), _fmt_acc(m.get("fgsm"))]
            row += [_fmt_acc(m.get(f"pgd_{s}")) for s in pgd_steps]
            row += [aa, _fmt_num(m.get("train_seconds"), ".0f")]
            if g["n_evaluated"] < len(g["seeds"]):
                row[0] += f" ({len(g['seeds']) - g['n_evaluated']} of {len(g['seeds'])} seeds missing)"
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["FLOPs: effective multiply-adds x 2 per example (structurally zero channels removed); params: active "
              "prunable weights / all parameters.", ""]

    # sanity checks
    lines += ["## Sanity checks", ""]
    passed = failed = unknown = 0
    fails = []
    for rec in data["cells"]:
        for chk in (rec["robust_eval"] or {}).get("sanity") or []:
            if chk.get("passed") is True:
                passed += 1
            elif chk.get("passed") is False:
                failed += 1
                fails.append(f"- **{rec['key']}**: `{chk.get('check')}` FAILED: {chk.get('detail')}")
            else:
                unknown += 1
    lines.append(f"{passed} checks passed, {failed} failed, {unknown} not applicable, over "
                 f"{sum(1 for r in data['cells'] if r['status'] == 'evaluated')} evaluated cells.")
    lines += [""] + (fails or ["No failed checks."]) + [""]
    missing = [r for r in data["cells"] if r["status"] != "evaluated"]
    if missing:
        lines += ["Cells without results (not included above): " +
                  ", ".join(f"{r['key']} ({r['status']})" for r in missing), ""]

    lines += ["## Where DNR wins and where it does not", ""] + _wins_lines(data) + [""]
    if data.get("plots"):
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({p})" for p in data["plots"]] + [""]
    if data.get("plots_note"):
        lines += [data["plots_note"], ""]
    lines += ["Per-cell numbers (and every run's settings, sweep and sanity details): `compare.json`; run "
              "directories: `runs/`.", ""]
    return "\n".join(lines)


def _cells_of(data: dict, g: dict) -> list[dict]:
    return [r for r in data["cells"] if (r["method"], r["mode"], r["target_density"]) ==
            (g["method"], g["mode"], g["target_density"]) and r["status"] == "evaluated"]


def _wins(data: dict) -> list[dict]:
    """DNR's mean against every other method at each (mode, density) on clean, PGD-max and AutoAttack."""
    spec = data["config"]
    metrics = [("clean", "clean"), (f"pgd_{_pgd_max(data)}", f"PGD-{_pgd_max(data)}")]
    if spec["eval"]["autoattack"]:
        metrics.append(("autoattack", "AutoAttack"))
    out = []
    by = {(g["method"], g["mode"], g["target_density"]): g for g in data["aggregate"]}
    if "dnr" not in spec["methods"]:
        return out
    for mode in spec["modes"]:
        for d in spec["densities"]:
            mine = by.get(("dnr", mode, d))
            if mine is None:
                continue
            for other in spec["methods"]:
                if other == "dnr":
                    continue
                theirs = by.get((other, mode, d)) or by.get((other, None, 1.0))
                if theirs is None:
                    continue
                for key, label in metrics:
                    a, b = mine["metrics"].get(key), theirs["metrics"].get(key)
                    item = {"mode": mode, "density": d, "other": other, "other_density": theirs["target_density"],
                            "metric": label, "dnr": a and a["mean"], "other_mean": b and b["mean"]}
                    if a is None or b is None:
                        item.update(result="n/a")
                    else:
                        margin = a["mean"] - b["mean"]
                        noise = math.sqrt(a["std"] ** 2 + b["std"] ** 2)
                        item.update(margin=margin, combined_std=noise, seeds=min(a["n"], b["n"]))
                        item["result"] = "win" if margin > 0 else ("loss" if margin < 0 else "tie")
                        if min(a["n"], b["n"]) < 2:
                            item["noise"] = "unknown (one seed)"
                        else:
                            item["noise"] = "exceeds seed std" if abs(margin) > noise else "within seed noise"
                    out.append(item)
    return out


def _wins_lines(data: dict) -> list[str]:
    spec = data["config"]
    if "dnr" not in spec["methods"]:
        return ["Method dnr is not in this grid: no comparison."]
    wins = data["wins"]
    if not wins:
        return ["No evaluated dnr cells and comparison partners yet."]
    lines = ["Computed from the table means: margin = dnr − other in percentage points; combined std = "
             "sqrt(std_dnr² + std_other²) over seeds. A margin within the combined std is within seed noise.", ""]
    cur = None
    for w in wins:
        head = (w["mode"], w["density"])
        if head != cur:
            cur = head
            lines += ([""] if lines[-1] else []) + [f"**{w['mode']}, target density {_density_tag(w['density'])}**", ""]
        other = w["other"] + (" (dense, 1x)" if w["other_density"] == 1.0 and w["density"] != 1.0 else "")
        if w["result"] == "n/a":
            lines.append(f"- vs {other}, {w['metric']}: n/a (not evaluated)")
            continue
        verb = {"win": "DNR wins by", "loss": "DNR loses by", "tie": "tie,"}[w["result"]]
        lines.append(f"- vs {other}, {w['metric']}: {verb} {100 * abs(w['margin']):.2f} pp "
                     f"({100 * w['dnr']:.2f} vs {100 * w['other_mean']:.2f}; combined std "
                     f"{100 * w['combined_std']:.2f} pp: {w['noise']})")
    real = [w for w in wins if w["result"] != "n/a"]
    sig = [w for w in real if w.get("noise") == "exceeds seed std"]
    n_win, n_loss = sum(w["result"] == "win" for w in real), sum(w["result"] == "loss" for w in real)
    lines += ["", f"Overall: {n_win} wins, {n_loss} "
              f"losses of {len(real)} comparisons; beyond seed noise: {sum(w['result'] == 'win' for w in sig)} wins, "
              f"{sum(w['result'] == 'loss' for w in sig)} losses."]
    return lines


def _plots(data: dict, plots_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = data["config"]
    modes = spec["modes"]
    pgd_key = f"pgd_{_pgd_max(data)}"
    has_aa = any(g["metrics"].get("autoattack") for g in data["aggregate"])
    os.makedirs(plots_dir, exist_ok=True)
    out = []
    figures = [("clean_vs_compression.png", [("clean", "clean accuracy (%)")]),
               ("robust_vs_compression.png", [(pgd_key, f"PGD-{_pgd_max(data)} accuracy (%)")]
                + ([("autoattack", "AutoAttack accuracy (%)")] if has_aa else []))]
    colors = {m: f"C{i}" for i, m in enumerate(spec["methods"])}
    for fname, rows in figures:
        fig, axes = plt.subplots(len(rows), len(modes), figsize=(5.5 * len(modes), 4 * len(rows)), squeeze=False)
        for r, (key, ylabel) in enumerate(rows):
            for c, mode in enumerate(modes):
                ax = axes[r][c]
                for method in spec["methods"]:
                    groups = [g for g in data["aggregate"] if g["method"] == method and g["mode"] in (mode, None)
                              and g["metrics"].get(key) and g["metrics"].get("compression")]
                    if not groups:
                        continue
                    groups.sort(key=lambda g: g["metrics"]["compression"]["mean"])
                    xs = [g["metrics"]["compression"]["mean"] for g in groups]
                    ys = [100 * g["metrics"][key]["mean"] for g in groups]
                    es = [100 * g["metrics"][key]["std"] for g in groups]
                    if groups[0]["mode"] is None:  # dense reference: a line across and its point at 1x
                        ax.axhline(ys[0], color=colors[method], ls="--", lw=1, alpha=0.7)
                        ax.errorbar(xs, ys, yerr=es, fmt="s", color=colors[method], capsize=3,
                                    label=f"{method} (dense, 1x)")
                    else:
                        ax.errorbar(xs, ys, yerr=es, fmt="-o", color=colors[method], capsize=3, label=method)
                ax.set_xscale("log")
                ax.set_xlabel("compression (x, log scale)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{mode}")
                ax.grid(alpha=0.3, which="both")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
        fig.suptitle(f"{data['title']}: mean ± std over seeds")
        fig.tight_layout()
        out.append(os.path.join(plots_dir, fname))
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    return out
