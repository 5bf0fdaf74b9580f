"""The CaP report's tables (docs/cap/README.md), from a ``dnr compare`` folder and latency.py's JSON only.

Per model: every cell sorted by its measured FLOPs (the compacted network's), and one table per CaP FLOPs target
(the grid's ``cap`` densities: 0.5 = 2x fewer, 0.25 = 4x fewer) that sets ``cap`` and ``cap-robust`` beside the
dense model and each channel method (DNR's channel mode, one-shot channel pruning) read at the CaP cell's FLOPs:

- **nearest**: the method's cell whose FLOPs are nearest (its FLOPs fraction shown, so the difference is visible);
- **at equal FLOPs**: the accuracies linearly interpolated in the FLOPs fraction between the method's two cells
  that bracket the CaP cell's FLOPs; "not reached" when all its cells lie on one side (then only nearest counts).

The comparison lines under each table (CaP minus the channel method, in points) use the interpolated value when
there is one, else the nearest cell's, and say which. Writes OUT (markdown) and OUT with .json (the same numbers).

    python docs/cap/cap_report.py docs/cap/grid --latency docs/cap/latency.json --out docs/cap/cap.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys

CAP_METHODS = ("cap", "cap-robust")
CHANNEL_METHODS = ("dnr", "oneshot")
METRICS = ("clean", "pgd", "autoattack")


def cell_rows(compare: dict, latency: dict | None) -> list[dict]:
    """One row per evaluated cell: model, method, mode, density, FLOPs (fraction of the model's dense-at cell),
    params, accuracies in %, latency in ms (None where missing)."""
    rows = []
    for c in compare["cells"]:
        ev, summary = c.get("robust_eval"), c.get("summary")
        if not ev or not summary:
            continue
        lat = (latency or {}).get(c["key"], {})
        pgd = ev.get("pgd") or {}
        steps = max(pgd, key=int) if pgd else None  # the strongest PGD the cell was evaluated with
        rows.append({
            "key": c["key"], "model": c["model_name"], "method": c["method"], "mode": ("projected" if c["method"] in CAP_METHODS else c["mode"] or "dense"),
            "density": c["target_density"],
            # latency.py's count comes from the compacted network itself; compare's from the mask
            "flops": lat.get("flops", summary["flops_effective"]),
            "params": lat.get("params", (c.get("model") or {}).get("nonzero_params")),
            "clean": _pct(ev.get("clean")), "pgd": _pct(pgd.get(steps)), "pgd_steps": steps and int(steps),
            "autoattack": _pct(ev.get("autoattack")),
            "autoattack_n": ev.get("autoattack_n"), "n": ev.get("n"),
            "ms_batch1": lat.get("ms_batch1"), "ms_batch64": lat.get("ms_batch64")})
    for model in {r["model"] for r in rows}:
        dense = [r for r in rows if r["model"] == model and r["method"] == "dense-at"]
        if len(dense) != 1:
            raise ValueError(f"model {model!r}: expected one dense-at cell, found {len(dense)}")
        for r in rows:
            if r["model"] == model:
                r["flops_fraction"] = r["flops"] / dense[0]["flops"]
    return rows


def _pct(v):
    return None if v is None else 100.0 * v


def read_at(cells: list[dict], fraction: float) -> dict:
    """A channel method's cells read at FLOPs ``fraction``: the nearest cell, and the accuracies interpolated
    linearly in the FLOPs fraction between the two cells that bracket it (None when none do)."""
    cells = sorted(cells, key=lambda r: r["flops_fraction"])
    nearest = min(cells, key=lambda r: (abs(r["flops_fraction"] - fraction), r["flops_fraction"]))
    below = [r for r in cells if r["flops_fraction"] <= fraction]
    above = [r for r in cells if r["flops_fraction"] >= fraction]
    interpolated = None
    if below and above:
        lo, hi = below[-1], above[0]
        t = 0.0 if hi["flops_fraction"] == lo["flops_fraction"] else (
            (fraction - lo["flops_fraction"]) / (hi["flops_fraction"] - lo["flops_fraction"]))
        interpolated = {"between": [lo["key"], hi["key"]], "t": t}
        for m in METRICS:
            a, b = lo[m], hi[m]
            interpolated[m] = None if a is None or b is None else a + t * (b - a)
    return {"nearest": nearest, "interpolated": interpolated,
            "range": [cells[0]["flops_fraction"], cells[-1]["flops_fraction"]]}


def comparisons(rows: list[dict]) -> list[dict]:
    """Per model and CaP target: the CaP cells, the dense cell and each channel method read at the CaP FLOPs."""
    out = []
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        dense = next(r for r in mine if r["method"] == "dense-at")
        for target in sorted({r["density"] for r in mine if r["method"] in CAP_METHODS}, reverse=True):
            caps = [r for r in mine if r["method"] in CAP_METHODS and r["density"] == target]
            fraction = max(r["flops_fraction"] for r in caps)  # cap and cap-robust share their ranks
            channel = {}
            for method in CHANNEL_METHODS:
                cells = [r for r in mine if r["method"] == method and r["mode"] == "channel"]
                if cells:
                    channel[method] = read_at(cells, fraction)
            lines = []
            for cap in caps:
                for method, read in channel.items():
                    ref, how = ((read["interpolated"], "at equal FLOPs") if read["interpolated"]
                                else (read["nearest"], f"nearest cell, {read['nearest']['flops_fraction']:.2f} of the FLOPs"))
                    deltas = {m: (None if cap[m] is None or ref[m] is None else cap[m] - ref[m]) for m in METRICS}
                    lines.append({"cap": cap["method"], "other": method, "how": how, "deltas": deltas})
            out.append({"model": model, "target": target, "fraction": fraction, "dense": dense, "caps": caps,
                        "channel": channel, "lines": lines})
    return out


def _f(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def _acc(r):
    return " | ".join(_f(r[m]) for m in METRICS)


def markdown(rows: list[dict], comps: list[dict], source: str, latency_source: str | None) -> str:
    steps = sorted({r["pgd_steps"] for r in rows if r["pgd_steps"]})
    pgd = f"PGD-{steps[0]}" if len(steps) == 1 else "PGD (the most steps each cell has)"
    lines = [f"# CaP report tables (generated by `docs/cap/cap_report.py` from `{source}`"
             + (f" and `{latency_source}`" if latency_source else "") + ")", "",
             "Accuracies in % on the first test images of the run (AutoAttack on its own count, see compare.md); "
             "FLOPs: multiply-adds x 2 per image of the compacted network, and their fraction of the dense-at "
             "cell's; ms: latency.py's medians at batch 1 / 64.", ""]
    for model in sorted({r["model"] for r in rows}):
        lines += [f"## {model}: every cell by FLOPs", "",
                  f"| method | mode | density | FLOPs | fraction | params | clean | {pgd} | AutoAttack | ms b1 / b64 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["model"] == model), key=lambda r: -r["flops_fraction"]):
            params = "-" if r["params"] is None else f"{r['params']:,}"
            lines.append(f"| {r['method']} | {r['mode']} | {r['density']:g} | {r['flops']:,} | "
                         f"{r['flops_fraction']:.3f} | {params} | {_acc(r)} | "
                         f"{_f(r['ms_batch1'], 3)} / {_f(r['ms_batch64'])} |")
        lines.append("")
        for comp in (c for c in comps if c["model"] == model):
            lines += [f"### {model} at {1 / comp['target']:g}x fewer FLOPs (CaP at {comp['fraction']:.3f} of the "
                      "dense FLOPs)", "",
                      f"| method | read at | FLOPs fraction | clean | {pgd} | AutoAttack |", "|---|---|---|---|---|---|",
                      f"| dense-at | its cell | 1.000 | {_acc(comp['dense'])} |"]
            for cap in comp["caps"]:
                lines.append(f"| {cap['method']} | its cell | {cap['flops_fraction']:.3f} | {_acc(cap)} |")
            for method, read in comp["channel"].items():
                n = read["nearest"]
                lines.append(f"| {method} channel | nearest cell (density {n['density']:g}) | "
                             f"{n['flops_fraction']:.3f} | {_acc(n)} |")
                if read["interpolated"]:
                    lines.append(f"| {method} channel | at equal FLOPs (interpolated) | {comp['fraction']:.3f} | "
                                 f"{_acc(read['interpolated'])} |")
                else:
                    lo, hi = read["range"]
                    lines.append(f"| {method} channel | at equal FLOPs: not reached (its cells span {lo:.3f}-{hi:.3f}) "
                                 "| - | - | - | - |")
            lines.append("")
            for ln in comp["lines"]:
                d = ln["deltas"]
                lines.append(f"- {ln['cap']} minus {ln['other']} channel ({ln['how']}): clean {_signed(d['clean'])}, "
                             f"{pgd} {_signed(d['pgd'])}, AutoAttack {_signed(d['autoattack'])} points")
            lines.append("")
    return "\n".join(lines)


def _signed(v):
    return "-" if v is None else f"{v:+.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compare_dir", help="a dnr compare output folder (with compare.json)")
    parser.add_argument("--latency", help="latency.py's JSON for the same folder (FLOPs, params, ms)")
    parser.add_argument("--out", required=True, help="markdown file to write (its .json beside it)")
    args = parser.parse_args(argv)
    path = os.path.join(args.compare_dir, "compare.json")
    if not os.path.isfile(path):
        parser.error(f"compare_dir {args.compare_dir!r} has no compare.json (run dnr compare first)")
    json_out = os.path.splitext(args.out)[0] + ".json"
    inputs = {os.path.realpath(p) for p in (path, args.latency) if p}
    for out in (args.out, json_out):
        if os.path.realpath(out) in inputs:
            parser.error(f"--out {args.out!r} would overwrite the input {out!r}; choose another name")
    with open(path) as f:
        compare = json.load(f)
    latency = None
    if args.latency:
        with open(args.latency) as f:
            latency = json.load(f)["cells"]
    rows = cell_rows(compare, latency)
    if not any(r["method"] in CAP_METHODS for r in rows):
        parser.error(f"{args.compare_dir!r} has no evaluated cap / cap-robust cell")
    comps = comparisons(rows)
    with open(args.out, "w") as f:
        f.write(markdown(rows, comps, args.compare_dir, args.latency) + "\n")
    with open(json_out, "w") as f:
        json.dump({"cells": rows, "comparisons": comps}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
