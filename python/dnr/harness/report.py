"""Run reports: ``report.md`` and PNG plots (matplotlib, optional) from a run directory's files.

Plots (``RUN_DIR/plots/``):
    accuracy.png          clean and PGD test accuracy (and training accuracy) per epoch
    layer_density.png     per-layer density at the end of every epoch
    final_density.png     final density per layer (bar chart)
    curriculum.png        SAT curriculum runs (or runs that measure the Hessian): lambda_t, the attack radius
                          and the effective eps per epoch; the top Hessian eigenvalue per measurement
"""

from __future__ import annotations

import os

from .._files import atomic_open, read_json, read_jsonl

__all__ = ["write_report", "format_summary", "read_run", "plots_or_note"]


def read_run(run_dir: str) -> dict:
    """config.json, metrics.jsonl, rewiring.jsonl and summary.json (when present) of a run directory.

    Raises:
        FileNotFoundError: not a run directory.
        DamagedFileError: a damaged or empty file, named with its line.
    """
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{run_dir!r} is not a run directory (no config.json)")

    def jsonl(name):
        path = os.path.join(run_dir, name)
        return read_jsonl(path) if os.path.isfile(path) else []

    def optional_json(name):
        path = os.path.join(run_dir, name)
        return read_json(path) if os.path.isfile(path) else None

    config = read_json(cfg_path)
    summary = optional_json("summary.json")
    initial = optional_json("initial_density.json")
    return {"config": config, "metrics": jsonl("metrics.jsonl"), "rewiring": jsonl("rewiring.jsonl"),
            "summary": summary, "initial_density": initial, "curriculum": jsonl("curriculum.jsonl")}


def _has_curriculum(run: dict) -> bool:
    """The run used a SAT curriculum or measured the Hessian (older runs have neither)."""
    return run["config"].get("curriculum", "none") != "none" or bool(run.get("curriculum"))


def format_summary(s: dict) -> str:
    """The final summary table (clean / FGSM / PGD accuracy, density, compression, FLOPs, time)."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    # the sparsity mode names masked methods only ("circulant (irregular)" would be wrong); summaries from
    # before the "sparse" key: every method but dense / dense-at was a masked one
    sparse = s.get("sparse", s["method"] not in ("dense", "dense-at"))
    method = f"{s['method']} ({s['mode']})" if sparse else s["method"]
    rows = [
        ("method", method),
        ("density", f"{s['density']:.4f} ({s['compression']:.1f}x compression)"),
        ("clean accuracy", pct(s["clean"])),
        (f"FGSM accuracy (eps {s['eps']:.4g})", pct(s["fgsm"])),
        (f"PGD-{s['pgd_steps']} accuracy (eps {s['eps']:.4g})", pct(s["pgd"])),
    ]
    if s.get("flops_dense") is not None:
        rows.append(("FLOPs / image (dense -> effective)",
                     f"{s['flops_dense']:,} -> {s['flops_effective']:,} "
                     f"({s['flops_dense'] / max(1, s['flops_effective']):.1f}x fewer)"))
    rows.append(("training time", f"{s['train_seconds']:.0f} s for {s['epochs']} epochs"))
    if s.get("test_examples") is not None:
        rows.append(("test examples", str(s["test_examples"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _plots(run: dict, plots_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plots_dir, exist_ok=True)
    rows = run["metrics"]
    out = []
    epochs = [r["epoch"] for r in rows]

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("test_clean_acc", "test clean", "-o"), ("test_pgd_acc", "test PGD", "-s"),
                              ("train_clean_acc", "train clean", "--"), ("train_adv_acc", "train PGD", ":")):
        pts = [(e, r[key]) for e, r in zip(epochs, rows) if r.get(key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, label=label)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.append(os.path.join(plots_dir, "accuracy.png"))
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)

    names = list(rows[-1]["layers"]) if rows and rows[-1].get("layers") else []
    if names:
        initial = run.get("initial_density") or {}
        xs = ([0] if initial else []) + epochs
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in names:
            ys = ([initial.get(name)] if initial else []) + [r["layers"].get(name) for r in rows]
            ax.plot(xs, ys, "-o", markersize=3, label=name)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch (0: initial mask)")
        ax.set_ylabel("density")
        ax.set_yscale("log")
        ax.set_title("per-layer density over training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(os.path.join(plots_dir, "layer_density.png"))
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)

        final = rows[-1]["layers"]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(range(len(names)), [final[n] for n in names])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("density")
        ax.set_title("final density per layer")
        fig.tight_layout()
        out.append(os.path.join(plots_dir, "final_density.png"))
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    if _has_curriculum(run):
        out.append(_curriculum_plot(plt, run, os.path.join(plots_dir, "curriculum.png")))
    return out


def _curriculum_plot(plt, run: dict, path: str) -> str:
    """Left: lambda_t, the attack radius and the effective eps (mean L-inf perturbation) per epoch; right:
    the top Hessian eigenvalue of the adversarial loss at every measurement (curriculum.jsonl)."""
    rows = [r for r in run["metrics"] if r.get("curriculum_lambda") is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if rows:
        epochs = [r["epoch"] for r in rows]
        left.plot(epochs, [r["curriculum_lambda"] for r in rows], "-o", label="lambda_t (epoch end)")
        eps_max = run["config"].get("eps") or 1.0
        left.plot(epochs, [r["curriculum_eps"] / eps_max for r in rows], "--s", label="attack eps / eps_max")
        left.plot(epochs, [r["effective_eps"] / eps_max for r in rows], ":^", label="effective eps / eps_max")
        left.xaxis.get_major_locator().set_params(integer=True)
    left.set_xlabel("epoch")
    left.set_ylim(-0.05, 1.1)
    left.set_title(f"curriculum {run['config'].get('curriculum', 'none')}: difficulty per epoch")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    meas = run.get("curriculum") or []
    if meas:
        right.plot([m["step"] for m in meas], [m["lambda_max"] for m in meas], "-o", markersize=3)
        adv = [m for m in meas if m.get("advanced")]
        right.plot([m["step"] for m in adv], [m["lambda_max"] for m in adv], "o", fillstyle="none",
                   label="lambda advanced")
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no Hessian measurements\n(--curriculum-every 0)", ha="center", va="center",
                   transform=right.transAxes)
    right.set_xlabel("optimizer step")
    right.set_ylabel("top Hessian eigenvalue")
    right.set_title("lambda_max of the adversarial loss")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _markdown(run: dict, plots: list[str], run_dir: str, note: str | None) -> str:
    cfg, rows, s = run["config"], run["metrics"], run["summary"]
    lines = [f"# dnr run: {cfg['method']} {cfg['model']} on {cfg['dataset']}", ""]
    keys = ("method", "mode", "density", "model", "dataset", "epochs", "batch_size", "lr", "lr_schedule",
            "eps", "alpha", "attack_steps", "beta", "eval_steps", "seed", "deterministic")
    lines += ["| option | value |", "|---|---|"] + [f"| {k} | {cfg[k]} |" for k in keys] + [""]
    if s is not None:
        lines += ["## Final evaluation", "", "```", format_summary(s), "```", ""]
    if rows:
        lines += ["## Per epoch", "", "| epoch | loss | train clean | train PGD | test clean | test PGD | density | "
                  "lr | s | img/s |", "|---|---|---|---|---|---|---|---|---|---|"]

        def f(v, fmt=".4f"):
            return "-" if v is None else format(v, fmt)

        for r in rows:
            lines.append(f"| {r['epoch']} | {f(r['loss'])} | {f(r['train_clean_acc'])} | {f(r['train_adv_acc'])} | "
                         f"{f(r['test_clean_acc'])} | {f(r['test_pgd_acc'])} | {f(r['density'])} | "
                         f"{f(r['lr'], '.4g')} | "
                         f"{f(r['seconds'], '.1f')} | {f(r['images_per_s'], '.0f')} |")
        lines.append("")
    if s is not None and s.get("layers"):
        lines += ["## Final density per layer", "", "| layer | active / prunable | density |", "|---|---|---|"]
        for l in s["layers"]:
            if l["masked"]:
                lines.append(f"| {l['name']} | {l['active']} / {l['prunable']} | {l['density']:.4f} |")
        lines.append("")
    if run["rewiring"]:
        lines += [f"Rewiring rounds: {len(run['rewiring'])} (details in `rewiring.jsonl`).", ""]
    if _has_curriculum(run):
        lines += _curriculum_markdown(run)
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, run_dir)})" for p in plots] + [""]
    if note:
        lines += [note, ""]
    return "\n".join(lines)


def _curriculum_markdown(run: dict) -> list[str]:
    cfg = run["config"]
    lines = [f"## Curriculum: {cfg.get('curriculum', 'none')}", "",
             "| epoch | lambda_t | attack eps | effective eps | top Hessian eigenvalue |", "|---|---|---|---|---|"]

    def f(v, fmt=".4g"):
        return "-" if v is None else format(v, fmt)

    for r in run["metrics"]:
        if "curriculum_lambda" in r:
            lines.append(f"| {r['epoch']} | {f(r['curriculum_lambda'])} | {f(r['curriculum_eps'])} | "
                         f"{f(r['effective_eps'])} | {f(r['hessian_lambda_max'])} |")
    if run.get("curriculum"):
        lines.append(f"\n{len(run['curriculum'])} Hessian measurements (details in `curriculum.jsonl`).")
    return lines + [""]


def plots_or_note(make_plots) -> tuple[list, str | None]:
    """``(make_plots(), None)``, or ``([], why)`` when matplotlib is not installed."""
    try:
        return make_plots(), None
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib, or pip install 'dnr[plots]')"


def write_report(run_dir: str) -> dict:
    """Write ``report.md`` and the plots of ``run_dir``.

    Returns:
        {"report": path of report.md, "plots": [png paths], "plots_dir": folder, "note": why plots are
        missing (matplotlib not installed) or None}.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run directory.
    """
    run = read_run(run_dir)
    plots_dir = os.path.join(run_dir, "plots")
    plots, note = plots_or_note(lambda: _plots(run, plots_dir))
    report = os.path.join(run_dir, "report.md")
    with atomic_open(report, "w") as f:
        f.write(_markdown(run, plots, run_dir, note))
    return {"report": report, "plots": plots, "plots_dir": plots_dir, "note": note}
