"""The report of ``dnr compare``: compare.json, compare.md and the plots, rebuilt from compare_spec.json and
the per-cell files only (so every number in it is one that a run directory holds).

compare.md has one table per (model, mode) with the mean ± std over the seeds each cell has (sample std,
ddof=1; 0 for a single seed) and the seed count, the failed sanity checks, and the computed "where DNR wins
and where it does not" section per model; compare.json carries every cell (with its model and evaluation
settings), the aggregates and the comparisons; plots/ one pair of figures per model.
"""

from __future__ import annotations

import json
import math
import os
import textwrap

import numpy as np

from ..._files import atomic_open, read_json, sha256_file, write_json
from .. import config as hconfig
from ..report import plots_or_note
from .spec import evaluation_settings

__all__ = ["write_compare_report", "draw_plots", "ACC_METRICS"]

ACC_METRICS = ("clean", "fgsm", "autoattack", "autoattack_pgd")


def _density_tag(d: float) -> str:
    return f"{d:g}"


def _unique(values) -> list:
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------- data
def _cell_record(c: dict, spec: dict) -> dict:
    """Everything compare.json says about one cell, read from its run directory (None where missing).

    ``c`` is the cell as compare_spec.json planned it; a folder written before cells carried their model
    and evaluation settings takes them from its config and the spec's one eval block."""
    run_dir = c["run_dir"]
    ev_settings = c.get("eval") or spec["eval"]
    rec = dict(c, eval=ev_settings, model_name=c.get("model_name") or c["config"].get("model"), status="missing",
               summary=None, robust_eval=None, eval_settings=None, model=None, train_seconds=None,
               train_wall_seconds=None, eval_seconds=None, density=None, compression=None)
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
        current = evaluation_settings(ev_settings, c["seed"], sha256_file(os.path.join(run_dir, "model.pt")))
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
    m = rec["model"]  # the model's size: weights, parameters, FLOPs
    if m is not None:
        for k in ("active_weights", "prunable_weights", "total_params", "nonzero_params", "flops_dense",
                  "flops_effective"):
            out[k] = m.get(k)
    return out


def _group_key(rec: dict) -> tuple:
    return rec["model_name"], rec["method"], rec["mode"], rec["target_density"]


def _aggregate(records: list[dict]) -> list[dict]:
    """Mean, sample std (ddof=1) and count over the evaluated seeds of each (model, method, mode, density)."""
    groups: dict = {}
    for rec in records:
        groups.setdefault(_group_key(rec), []).append(rec)
    out = []
    for (model, method, mode, d), recs in groups.items():
        per = [_values(r) for r in recs if r["status"] == "evaluated"]
        metrics = {}
        for name in sorted({k for p in per for k in p}):
            vals = [p[name] for p in per if p.get(name) is not None]
            if vals:
                arr = np.asarray(vals, dtype=float)
                metrics[name] = {"mean": float(np.mean(arr)),
                                 "std": float(np.std(arr, ddof=1)) if len(arr) > 1 else 0.0, "n": len(vals),
                                 "values": vals}
        out.append({"model_name": model, "method": method, "mode": mode, "target_density": d,
                    "seeds": [r["seed"] for r in recs], "n_evaluated": len(per), "metrics": metrics})
    return out


def _layout(spec: dict, records: list[dict]) -> dict:
    """The order of models, methods, modes and densities in the tables (the config's order)."""
    grids = spec.get("grids") or [spec]
    return {"models": _unique(r["model_name"] for r in records),
            "methods": _unique(m for g in grids for m in g["methods"]),
            "modes": _unique(m for g in grids for m in g["modes"]),
            "densities": _unique(d for g in grids for d in g["densities"])}


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
        # compare.json names the run directory relative to the folder, as compare_spec.json does
        records.append(dict(_cell_record(c, spec), run_dir=os.path.join("runs", c["key"])))
    data = {"title": spec["title"], "command": meta.get("command"), "machine": meta.get("machine"), "config": spec,
            "layout": _layout(spec, records), "std": "sample std over seeds (numpy ddof=1)", "cells": records,
            "aggregate": _aggregate(records)}
    data["wins"] = _wins(data)
    plots_dir = os.path.join(out_dir, "plots")
    plots, note = plots_or_note(lambda: draw_plots(data, plots_dir))
    data["plots"] = [os.path.relpath(p, out_dir) for p in plots]
    data["plots_note"] = note
    json_path = os.path.join(out_dir, "compare.json")
    write_json(json_path, data)
    md_path = os.path.join(out_dir, "compare.md")
    with atomic_open(md_path, "w") as f:
        f.write(_markdown(data))
    return dict(data, report=md_path, json=json_path, plots=plots, plots_dir=plots_dir, note=note)


def _groups_for(data: dict, model: str, mode: str) -> list[dict]:
    """The aggregate rows of the (model, mode) table: the density-independent references first."""
    mine = [g for g in data["aggregate"] if g["model_name"] == model]
    refs = [g for g in mine if g["mode"] is None]
    rows = [g for g in mine if g["mode"] == mode]
    order = {m: i for i, m in enumerate(data["layout"]["methods"])}
    rows.sort(key=lambda g: (-g["target_density"], order.get(g["method"], 99)))
    return refs + rows


def _cells_of(data: dict, g: dict) -> list[dict]:
    return [r for r in data["cells"] if _group_key(r) == (g["model_name"], g["method"], g["mode"], g["target_density"])
            and r["status"] == "evaluated"]


def _pgd_steps_of(cells: list[dict]) -> list[int]:
    return sorted({s for c in cells for s in c["eval"]["pgd_steps"]})


# ---------------------------------------------------------------------------------------- markdown
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


def _eval_text(ev: dict) -> str:
    return (f"L-inf eps {ev['eps']:.4g}, PGD steps {ev['pgd_steps']} with {ev['restarts']} restart(s), FGSM "
            f"{'on' if ev['fgsm'] else 'off'}, AutoAttack {_aa_text(ev)}, test examples {ev['test_size'] or 'all'}; "
            f"eps sweep {ev['sweep_eps']} (PGD-{ev['sweep_steps']}, first {ev['sweep_examples'] or 'all'} examples)")


def _grid_text(g: dict) -> str:
    return (f"methods {', '.join(g['methods'])}; modes {', '.join(g['modes'])}; target densities "
            f"{', '.join(_density_tag(d) for d in g['densities'])}; seeds {', '.join(map(str, g['seeds']))}")


def _settings_lines(data: dict) -> list[str]:
    spec, lay = data["config"], data["layout"]
    lines = ["## Settings", ""]
    if data["cells"]:
        cfg_keys = ("dataset", "data_root", "model", "train_size", "epochs", "batch_size", "lr", "lr_schedule", "eps",
                    "alpha", "attack_steps", "beta", "init", "prune_rate", "prune_rate_min", "deterministic")
        cfg = data["cells"][0].get("config")
        lines += [f"Preset `{spec.get('preset') or 'fashion-mnist-quick'}`; shared training overrides: "
                  f"`{json.dumps(spec['train'])}`.", ""]
        if cfg:
            shown = dict(cfg, model=", ".join(lay["models"]))
            lines += ["| training option | value |", "|---|---|"] + [f"| {k} | {shown.get(k)} |" for k in cfg_keys]
            lines += [""]
    published = hconfig.PUBLISHED.get(spec.get("preset") or "")
    if published:
        nums = ", ".join(f"{k} {v}%" for k, v in published.items() if k in ("clean", "pgd", "autoattack") and v)
        lines += [f"Published numbers for preset `{spec['preset']}` (not computed here): {nums}. Source: "
                  f"{published['source']}.", ""]
    ref = ("Density-independent methods are trained once per seed at density 1.0 and shown in every mode's table "
           "as the 1x reference.")
    note = "Accuracies in %, mean ± std over seeds (sample std, ddof=1)."
    if not spec.get("grids"):
        lines += [f"Grid: {_grid_text(spec)}. {ref}", ""]
        lines += [f"Evaluation (dnr.evaluation.robust_evaluation): {_eval_text(spec['eval'])}. {note}", ""]
    else:
        lines += [f"Models: {', '.join(lay['models'])}. The cells are the union of these grids (x models). {ref}", ""]
        for i, g in enumerate(spec["grids"]):
            train = {k: v for k, v in g["train"].items() if spec["train"].get(k) != v}
            lines.append(f"- grids[{i}]: {_grid_text(g)}; evaluation: {_eval_text(g['eval'])}"
                         + (f"; training overrides `{json.dumps(train)}`" if train else ""))
        lines += ["", f"Evaluation: dnr.evaluation.robust_evaluation with each grid's settings. {note}", ""]
    return lines


def _table_lines(data: dict, model: str, mode: str, multi: bool) -> list[str]:
    groups = _groups_for(data, model, mode)
    pgd_steps = [str(s) for s in _pgd_steps_of([r for r in data["cells"] if r["model_name"] == model])]
    lines = [f"## {model}: {mode} sparsity" if multi else f"## {mode.capitalize()} sparsity", ""]
    head = (["method", "target density", "density", "compression", "params (active / total)", "FLOPs"]
            + ["clean", "FGSM"] + [f"PGD-{s}" for s in pgd_steps] + ["AutoAttack (n)", "train time (s)"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
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
    return lines + [""]


def _markdown(data: dict) -> str:
    lay = data["layout"]
    multi = len(lay["models"]) > 1
    lines = [f"# {data['title']}", ""]
    if data.get("command"):
        lines += ["Regenerate (reuses every finished cell):", "", "```", data["command"], "```", ""]
    mach = data.get("machine") or {}
    if mach:
        lines += ["## Machine", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {mach.get(k)} |" for k in ("platform", "python", "processor", "cpu_count", "torch",
                                                       "device", "dnr")] + [""]
    lines += _settings_lines(data)
    for model in lay["models"]:
        modes = [mode for mode in lay["modes"] if any(r["model_name"] == model and r["mode"] == mode
                                                      for r in data["cells"])] or lay["modes"][:1]
        for mode in modes:
            lines += _table_lines(data, model, mode, multi)
    lines += ["FLOPs: effective multiply-adds x 2 per example (structurally zero channels removed); params: active "
              "prunable weights / all parameters.", ""]
    lines += _sanity_lines(data)
    lines += ["## Where DNR wins and where it does not", ""] + _wins_lines(data) + [""]
    if data.get("plots"):
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({p})" for p in data["plots"]] + [""]
    if data.get("plots_note"):
        lines += [data["plots_note"], ""]
    lines += ["Per-cell numbers (and every run's settings, sweep and sanity details): `compare.json`; run "
              "directories: `runs/`.", ""]
    return "\n".join(lines)


def _sanity_lines(data: dict) -> list[str]:
    lines = ["## Sanity checks", ""]
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
    return lines


# ---------------------------------------------------------------------------------------- DNR vs the others
def _shared_pgd(a: dict, b: dict, fallback: int) -> int:
    """The largest PGD step count both groups were evaluated with (``fallback`` if none)."""
    steps = lambda g: {int(k[4:]) for k in g["metrics"] if k.startswith("pgd_")}  # noqa: E731
    common = steps(a) & steps(b)
    return max(common) if common else fallback


def _wins(data: dict) -> list[dict]:
    """Per model, DNR's mean against every other method at each (mode, density) on clean, PGD (the most steps
    both were evaluated with) and AutoAttack (when any of the model's cells runs it)."""
    lay = data["layout"]
    out = []
    if "dnr" not in lay["methods"]:
        return out
    by = {(g["model_name"], g["method"], g["mode"], g["target_density"]): g for g in data["aggregate"]}
    for model in lay["models"]:
        cells = [r for r in data["cells"] if r["model_name"] == model]
        pgd_max = max(_pgd_steps_of(cells) or [0])
        with_aa = any(r["eval"]["autoattack"] for r in cells)
        for mode in lay["modes"]:
            for d in lay["densities"]:
                mine = by.get((model, "dnr", mode, d))
                if mine is None:
                    continue
                for other in lay["methods"]:
                    if other == "dnr":
                        continue
                    theirs = by.get((model, other, mode, d)) or by.get((model, other, None, 1.0))
                    if theirs is None:
                        continue
                    pgd = _shared_pgd(mine, theirs, pgd_max)
                    metrics = [("clean", "clean"), (f"pgd_{pgd}", f"PGD-{pgd}")]
                    if with_aa:
                        metrics.append(("autoattack", "AutoAttack"))
                    for key, label in metrics:
                        out.append(_comparison(mine, theirs, key, label, model_name=model, mode=mode, density=d,
                                               other=other))
    return out


def _comparison(mine: dict, theirs: dict, key: str, label: str, **where) -> dict:
    a, b = mine["metrics"].get(key), theirs["metrics"].get(key)
    item = dict(where, other_density=theirs["target_density"], metric=label, dnr=a and a["mean"],
                other_mean=b and b["mean"])
    if a is None or b is None:
        item.update(result="n/a")
        return item
    margin = a["mean"] - b["mean"]
    noise = math.sqrt(a["std"] ** 2 + b["std"] ** 2)
    item.update(margin=margin, combined_std=noise, seeds=min(a["n"], b["n"]))
    item["result"] = "win" if margin > 0 else ("loss" if margin < 0 else "tie")
    if min(a["n"], b["n"]) < 2:
        item["noise"] = "unknown (one seed)"
    else:
        item["noise"] = "exceeds seed std" if abs(margin) > noise else "within seed noise"
    return item


def _wins_lines(data: dict) -> list[str]:
    lay = data["layout"]
    if "dnr" not in lay["methods"]:
        return ["Method dnr is not in this grid: no comparison."]
    wins = data["wins"]
    if not wins:
        return ["No evaluated dnr cells and comparison partners yet."]
    multi = len(lay["models"]) > 1
    lines = ["Computed from the table means: margin = dnr − other in percentage points; combined std = "
             "sqrt(std_dnr² + std_other²) over seeds. A margin within the combined std is within seed noise."]
    for model in lay["models"]:
        mine = [w for w in wins if w["model_name"] == model]
        if not mine:
            continue
        if multi:
            lines += ["", f"### {model}"]
        cur = None
        for w in mine:
            head = (w["mode"], w["density"])
            if head != cur:
                cur = head
                lines += ["", f"**{w['mode']}, target density {_density_tag(w['density'])}**", ""]
            other = w["other"] + (" (dense, 1x)" if w["other_density"] == 1.0 and w["density"] != 1.0 else "")
            if w["result"] == "n/a":
                lines.append(f"- vs {other}, {w['metric']}: n/a (not evaluated)")
                continue
            verb = {"win": "DNR wins by", "loss": "DNR loses by", "tie": "tie,"}[w["result"]]
            lines.append(f"- vs {other}, {w['metric']}: {verb} {100 * abs(w['margin']):.2f} pp "
                         f"({100 * w['dnr']:.2f} vs {100 * w['other_mean']:.2f}; combined std "
                         f"{100 * w['combined_std']:.2f} pp: {w['noise']})")
        lines += ["", (f"Overall ({model}): " if multi else "Overall: ") + _tally(mine)]
    return lines


def _tally(wins: list[dict]) -> str:
    real = [w for w in wins if w["result"] != "n/a"]
    sig = [w for w in real if w.get("noise") == "exceeds seed std"]
    n_win, n_loss = sum(w["result"] == "win" for w in real), sum(w["result"] == "loss" for w in real)
    return (f"{n_win} wins, {n_loss} losses of {len(real)} comparisons; beyond seed noise: "
            f"{sum(w['result'] == 'win' for w in sig)} wins, {sum(w['result'] == 'loss' for w in sig)} losses.")


# ---------------------------------------------------------------------------------------- plots
def draw_plots(data: dict, plots_dir: str) -> list[str]:
    """clean_vs_compression.png and robust_vs_compression.png per model (``-<model>`` in the file names when
    the grid has several models); one column per mode, mean ± std over seeds. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lay = data["layout"]
    modes = lay["modes"]
    multi = len(lay["models"]) > 1
    colors = {m: f"C{i}" for i, m in enumerate(lay["methods"])}
    os.makedirs(plots_dir, exist_ok=True)
    out = []
    for model in lay["models"]:
        aggregate = [g for g in data["aggregate"] if g["model_name"] == model]
        pgd_max = max(_pgd_steps_of([r for r in data["cells"] if r["model_name"] == model]) or [0])
        has_aa = any(g["metrics"].get("autoattack") for g in aggregate)
        suffix = f"-{model}" if multi else ""
        figures = [(f"clean_vs_compression{suffix}.png", [("clean", "clean accuracy (%)")]),
                   (f"robust_vs_compression{suffix}.png", [(f"pgd_{pgd_max}", f"PGD-{pgd_max} accuracy (%)")]
                    + ([("autoattack", "AutoAttack accuracy (%)")] if has_aa else []))]
        for fname, rows in figures:
            # constrained layout keeps the (wrapped) title inside the figure, above the panels
            width = 5.5 * len(modes)  # inches
            fig, axes = plt.subplots(len(rows), len(modes), figsize=(width, 4 * len(rows)), squeeze=False,
                                     layout="constrained")
            for r, (key, ylabel) in enumerate(rows):
                for c, mode in enumerate(modes):
                    _plot_panel(axes[r][c], aggregate, lay["methods"], colors, key, mode)
                    axes[r][c].set_ylabel(ylabel)
            title = f"{data['title']}{f' ({model})' if multi else ''}: mean ± std over seeds"
            fig.suptitle(textwrap.fill(title, width=int(11 * width)))  # ~11 characters per inch
            out.append(os.path.join(plots_dir, fname))
            fig.savefig(out[-1], dpi=100)
            plt.close(fig)
    return out


def _plot_panel(ax, aggregate: list[dict], methods: list[str], colors: dict, key: str, mode: str) -> None:
    for method in methods:
        groups = [g for g in aggregate if g["method"] == method and g["mode"] in (mode, None)
                  and g["metrics"].get(key) and g["metrics"].get("compression")]
        if not groups:
            continue
        groups.sort(key=lambda g: g["metrics"]["compression"]["mean"])
        xs = [g["metrics"]["compression"]["mean"] for g in groups]
        ys = [100 * g["metrics"][key]["mean"] for g in groups]
        es = [100 * g["metrics"][key]["std"] for g in groups]
        if groups[0]["mode"] is None:  # dense reference: a line across and its point at 1x
            ax.axhline(ys[0], color=colors[method], ls="--", lw=1, alpha=0.7)
            ax.errorbar(xs, ys, yerr=es, fmt="s", color=colors[method], capsize=3, label=f"{method} (dense, 1x)")
        else:
            ax.errorbar(xs, ys, yerr=es, fmt="-o", color=colors[method], capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("compression (x, log scale)")
    ax.set_title(f"{mode}")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
