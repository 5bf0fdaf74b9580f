"""Shared helpers of the per-op benchmarks: argument parsing, timing, environment, JSON output.

Every benchmark script checks its op against plain PyTorch first, then times both in
the same run and writes ``<op>-<device>.json`` into ``benchmarks/results/`` (or
``--out`` / ``$OUT``), plus a printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# Weight shapes of ResNet-18 for 32x32 inputs (CIFAR stem: 3x3 conv1, no max-pool), fc included.
RESNET18_SHAPES = (
    [(64, 3, 3, 3)] + [(64, 64, 3, 3)] * 4
    + [(128, 64, 3, 3), (128, 128, 3, 3), (128, 64, 1, 1), (128, 128, 3, 3), (128, 128, 3, 3)]
    + [(256, 128, 3, 3), (256, 256, 3, 3), (256, 128, 1, 1), (256, 256, 3, 3), (256, 256, 3, 3)]
    + [(512, 256, 3, 3), (512, 512, 3, 3), (512, 256, 1, 1), (512, 512, 3, 3), (512, 512, 3, 3)]
    + [(10, 512)]
)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: 50 on cuda, 10 on cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(RESULTS),
                   help="folder for the JSON file (default: $OUT if set, else benchmarks/results)")
    return p


def setup(args) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 50 if device.type == "cuda" else 10
    import dnr.ops

    print(f"device {device_name(device)}; dnr backend: {json.dumps(dnr.ops.backend())}")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, repeats: int, warmup: int = 3, inner: int = 1) -> float:
    """Milliseconds per call of fn() over `repeats` timed runs (each `inner` calls): the
    median on CUDA, the minimum on CPU (shared CPUs are noisy; the minimum is the run
    least disturbed by other processes)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times) if device.type == "cuda" else min(times)


def time_alternated(fns: dict, device: torch.device, repeats: int, warmup: int = 3) -> dict:
    """Milliseconds per call of each ``fns[name]()``, their timed runs alternated (a, b, c, a, b, c, ...) so
    that a slow spell of a shared machine hits all alike; the statistic is time_fn's. Returns name -> ms."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_fn(fn, device, 1, warmup=0))
    pick = statistics.median if device.type == "cuda" else min
    return {name: pick(t) for name, t in times.items()}


def time_pair(baseline, candidate, device: torch.device, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Milliseconds per call of baseline() and of candidate(), alternated (time_alternated)."""
    t = time_alternated({"baseline": baseline, "candidate": candidate}, device, repeats, warmup)
    return t["baseline"], t["candidate"]


def copy_bandwidth(device: torch.device, numel: int = 1 << 26) -> float:
    """Achievable bytes/s of this device: a large clone (read + write)."""
    numel = numel if device.type == "cuda" else numel // 16
    x = torch.empty(numel, dtype=torch.float32, device=device).fill_(1)
    y = torch.empty_like(x)
    ms = time_fn(lambda: y.copy_(x), device, repeats=10)
    return 2 * 4 * numel / (ms / 1e3)


def environment(device: torch.device) -> dict:
    import dnr
    import dnr.ops

    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "dnr": dnr.__version__,
        "dnr_backend": dnr.ops.backend(),
        "threads": torch.get_num_threads(),
        # the float32 precision the timings ran at (cuDNN's TF32 is on by default, matmul's off)
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write(op: str, device: torch.device, rows: list[dict], args, extra: dict | None = None) -> Path:
    """Print the rows as a table and write the JSON file; return its path."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{op}-{device.type}.json"
    payload = {"op": op, "environment": environment(device), "repeats": args.repeats, "results": rows, **(extra or {})}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def _fmt(v) -> str:
    if v is None:  # a column this row does not have
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def pgd7_attack(model, x, y):
    """dnr.attacks.pgd at eps 0.1, step 0.025, 7 steps, a fixed random start: [B, ...] -> [B, ...]."""
    from dnr.attacks import pgd

    return pgd(model, x, y, 0.1, 0.025, 7, generator=torch.Generator(device=x.device).manual_seed(0))


def pgd7_training_step(model, x, y):
    """One PGD-7 adversarial training step of ``model`` on (x, y) (the attack, then a train-mode forward +
    backward of the cross-entropy on the adversarial batch and an SGD step), as a closure."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        x_adv = pgd7_attack(model, x, y)
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x_adv), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def dnr_optimizer(model, device: torch.device, cfg=None):
    """(optimizer, controller) as ``dnr train --method dnr`` builds them for a sparse ``model`` (the fused
    MaskedSGD where compiled) with the DNR controller's mask hook, started at the budget
    (``sparsify_until=0``): a benchmark times steps of the sparse network, not the dense start. ``cfg``: the
    run config whose lr / momentum / Nesterov / weight decay to use (default lr 0.1, momentum 0.9, no
    Nesterov, weight decay 5e-4)."""
    from dnr.harness.builders import make_optimizer
    from dnr.harness.config import TrainConfig
    from dnr.rewiring import DNR

    cfg = cfg or TrainConfig(method="dnr", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False)
    opt = make_optimizer(cfg, model, device)
    return opt, DNR(model, opt, total_steps=10_000, sparsify_until=0)
