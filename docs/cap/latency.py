"""Measured CPU latency of the compacted networks of a CaP report run (docs/cap/README.md).

For every cell of a ``dnr compare`` output folder (a sub-folder with ``model.pt``), the trained model is rebuilt
(``dnr.harness.load_trained_model``), compacted (``dnr.export.compact_model``: channel-pruned models lose their
dead channels; a CaP model is already a plain smaller network and is traced as it is), checked against the
trained model, and timed with ``torch.utils.benchmark`` (median of blocked runs, one thread by default) at
batch 1 and batch 64. Writes JSON: cell -> parameters, FLOPs per image, milliseconds per batch.

    python docs/cap/latency.py docs/cap/grid --out docs/cap/latency.json [--threads 1] [--min-time 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils import benchmark

from dnr.export import check_compact, compact_model
from dnr.harness import load_trained_model
from dnr.harness.builders import dataset_meta
from dnr.nn import density_report


def measure(model_path: str, min_time: float) -> dict:
    model, cfg, _ = load_trained_model(model_path)
    _, channels, side, _, _, _ = dataset_meta(cfg.dataset)
    size = (channels, side, side)
    compact = compact_model(model, size)
    check_compact(model, compact, torch.rand(8, *size, generator=torch.Generator().manual_seed(0)))
    out = {"method": cfg.method, "mode": cfg.mode, "model": cfg.model, "density": cfg.density,
           "params": sum(p.numel() for p in compact.parameters()),
           "flops": density_report(compact, input_size=size).flops_dense}
    for batch in (1, 64):
        x = torch.rand(batch, *size)
        with torch.inference_mode():
            timer = benchmark.Timer(stmt="m(x)", globals={"m": compact, "x": x}, num_threads=torch.get_num_threads())
            out[f"ms_batch{batch}"] = 1e3 * timer.blocked_autorange(min_run_time=min_time).median
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compare_dir")
    parser.add_argument("--out", required=True, help="JSON file to write (refused if it exists)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per model and batch size")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"--out {args.out!r} exists; remove it or choose another file")
    torch.set_num_threads(args.threads)
    root = os.path.join(args.compare_dir, "runs")  # dnr compare keeps its cells there
    root = root if os.path.isdir(root) else args.compare_dir
    cells = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "model.pt")))
    if not cells:
        parser.error(f"{args.compare_dir!r} holds no cell with a model.pt")
    results = {}
    for cell in cells:
        results[cell] = measure(os.path.join(root, cell, "model.pt"), args.min_time)
        r = results[cell]
        print(f"{cell}: {r['params']:,} params, {r['flops']:,} FLOPs, {r['ms_batch1']:.3f} ms (batch 1), "
              f"{r['ms_batch64']:.2f} ms (batch 64)", flush=True)
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "torch": torch.__version__, "cells": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
