"""Measured CPU latency of every trained cell of a `dnr compare` folder (the block-circulant report, issue 16).

    python docs/circulant/latency.py runs/compare-circulant --threads 1 [--repeats 20]

Loads each cell's model.pt (``dnr.harness.load_trained_model``), runs it in eval mode without gradients on
random [B, 1, 28, 28] inputs at batch 1 and 256, and records the minimum over ``--repeats`` timed runs (the
least disturbed one on a shared CPU). Writes ``latency.json`` into the compare folder and prints a table.
Masked (DNR) layers compute with the dense weight times its mask, so irregular sparsity is not faster on CPU.
Block-circulant models are timed twice: as shipped (``impl="auto"``: each layer in the product form
``dnr.nn.block_circulant.fft_form_pays`` picks, the dense form in the small CNN's layers), and with every layer in
the FFT form (``fft_batch{B}_ms``); both with the weight (spectrum or dense matrix) cached, as at inference.
"""

import argparse
import json
import os
import sys
import time

import torch

from dnr.harness.run import load_trained_model
from dnr.nn import circulant_layers, set_circulant_impl


def latency_ms(model, batch: int, repeats: int) -> float:
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)  # warm-up (and the block-circulant weight spectra)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("compare_dir")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = os.path.join(args.compare_dir, "runs")
    if not os.path.isdir(runs):
        print(f"latency.py: error: {args.compare_dir!r} has no runs/ folder (not a dnr compare output)", file=sys.stderr)
        return 2
    rows = []
    for cell in sorted(os.listdir(runs)):
        path = os.path.join(runs, cell, "model.pt")
        if not os.path.isfile(path):
            continue
        model, cfg, _ = load_trained_model(path)
        model.eval()
        row = {"cell": cell, "method": cfg.method, "density": cfg.density,
               "block_size": cfg.resolved_block_size if cfg.method == "circulant" else None}
        for b in args.batches:
            row[f"batch{b}_ms"] = latency_ms(model, b, args.repeats)
        if circulant_layers(model):
            set_circulant_impl(model, "fft")
            for b in args.batches:
                row[f"fft_batch{b}_ms"] = latency_ms(model, b, args.repeats)
        rows.append(row)
    out = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__, "cells": rows}
    with open(os.path.join(args.compare_dir, "latency.json"), "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print("| cell | " + " | ".join(f"batch {b} ms" for b in args.batches) + " | "
          + " | ".join(f"FFT form, batch {b} ms" for b in args.batches) + " |")
    print("|---|" + "---|" * (2 * len(args.batches)))
    for r in rows:
        fft = [f"{r[f'fft_batch{b}_ms']:.2f}" if f"fft_batch{b}_ms" in r else "-" for b in args.batches]
        print(f"| {r['cell']} | " + " | ".join(f"{r[f'batch{b}_ms']:.2f}" for b in args.batches) + " | "
              + " | ".join(fft) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
