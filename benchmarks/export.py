"""Inference latency/throughput of dense vs masked vs channel-compacted models, and file sizes.

    python benchmarks/export.py                                   # CPU: small_cnn, vgg16, resnet18 at 0.25 and 0.1
    python benchmarks/export.py --device cuda --batches 1 64 1024  # on the GPU machine
    python benchmarks/export.py --models vgg16 --densities 0.25 --batches 1 64 --out benchmarks/results/x.json

For each model and channel density: the dense model, the masked model (``sparsify(mode="channel")``,
masks applied in every forward) and the compacted model (:func:`dnr.export.compact_model`); the
compacted model is first checked against the masked one (eval mode, float32). Timings are eval-mode
forward passes under ``torch.inference_mode``, the three models timed round-robin (median of the
repeats after warm-up). File sizes:
dense safetensors, ``dnr-sparse`` safetensors (float32 and float16) and the compacted ``.pt2``.
Writes JSON to ``benchmarks/results/export-<device>.json`` by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import dnr
from dnr.export import compact_model, save_compact, save_dense, save_sparse
from dnr.nn import density_report, sparsify

SIZES = {"small_cnn": (1, 28, 28), "vgg16": (3, 32, 32), "resnet18": (3, 32, 32)}


def build(name: str) -> torch.nn.Module:
    return getattr(dnr.models, name)(num_classes=10)


def time_forwards(nets: dict, x, device, min_time: float, max_iters: int) -> dict:
    """Median seconds per forward pass of each model on ``x``.

    The models are timed round-robin (one pass of each per round), so that a change in machine load
    affects all of them alike.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in nets}
    with torch.inference_mode():
        for m in nets.values():
            for _ in range(2):
                m(x)
        sync()
        start = time.perf_counter()
        while len(times[next(iter(nets))]) < max_iters and (time.perf_counter() - start < min_time
                                                             or len(times[next(iter(nets))]) < 3):
            for k, m in nets.items():
                t = time.perf_counter()
                m(x)
                sync()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def file_sizes(masked, compact, size) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = {"dense_safetensors": save_dense(masked, os.path.join(tmp, "d.safetensors"))}
        for dtype in ("float32", "float16"):
            p = os.path.join(tmp, f"s-{dtype}.safetensors")
            layout = save_sparse(masked, p, dtype=dtype)
            out[f"sparse_{dtype}"] = os.path.getsize(p)
            out[f"sparse_{dtype}_predicted_payload"] = layout.payload_bytes
        p = os.path.join(tmp, "c.pt2")
        save_compact(compact, p, size)
        out["compact_pt2"] = os.path.getsize(p)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--densities", nargs="+", type=float, default=[0.25, 0.1])
    ap.add_argument("--batches", nargs="+", type=int, default=None,
                    help="batch sizes (default: 1 64 on CPU, 1 64 1024 on CUDA)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per measurement (at least)")
    ap.add_argument("--max-iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--no-sizes", action="store_true", help="skip the file sizes")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/export-<device>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/export.py: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batches or ([1, 64, 1024] if device.type == "cuda" else [1, 64])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results = []
    for name in args.models:
        size = SIZES[name]
        dense = build(name).eval()
        for density in args.densities:
            gen = torch.Generator().manual_seed(0)
            masked = sparsify(build(name), density, mode="channel", generator=gen).eval()
            compact = compact_model(masked, size)
            x = torch.rand((8, *size), generator=gen)
            with torch.no_grad():
                diff = float((masked(x) - compact(x)).abs().max())
            report = density_report(masked, size)
            row = {"model": name, "density": density, "device": str(device), "max_abs_diff": diff,
                   "effective_density": report.effective_density,
                   "params": {"dense": sum(p.numel() for p in dense.parameters()),
                              "compact": sum(p.numel() for p in compact.parameters())},
                   "flops": {"dense": report.flops_dense, "effective": report.flops_effective},
                   "timings": []}
            if not args.no_sizes:
                row["file_bytes"] = file_sizes(masked, compact, size)
            nets = {"dense": dense.to(device), "masked": masked.to(device), "compact": compact.to(device)}
            for batch in batches:
                xb = torch.rand((batch, *size), device=device)
                t = time_forwards(nets, xb, device, args.min_time, args.max_iters)
                entry = {"batch": batch}
                for k, sec in t.items():
                    entry[f"{k}_ms"] = sec * 1e3
                    entry[f"{k}_img_per_s"] = batch / sec
                entry["speedup_compact_vs_dense"] = t["dense"] / t["compact"]
                entry["speedup_compact_vs_masked"] = t["masked"] / t["compact"]
                row["timings"].append(entry)
                print(f"{name:<9} d={density:<5} {device.type} B={batch:<5} dense {t['dense']*1e3:8.2f} ms  "
                      f"masked {t['masked']*1e3:8.2f} ms  compact {t['compact']*1e3:8.2f} ms  "
                      f"speedup vs dense {entry['speedup_compact_vs_dense']:.2f}x", flush=True)
            dense.cpu()
            results.append(row)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "device_name": torch.cuda.get_device_name() if device.type == "cuda"
            else platform.processor() or "cpu", "command": " ".join(["python", "benchmarks/export.py", *(argv or sys.argv[1:])])}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"export-{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
