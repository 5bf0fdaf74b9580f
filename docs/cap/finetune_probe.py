"""The first fine-tuning steps after a cascaded projection, BatchNorms folded away or kept (docs/cap/README.md).

The ``cap`` method projects its dense model and fine-tunes the projected network with the run's optimizer
(SGD, its momentum, Nesterov and weight decay) at the restarted schedule's peak learning rate. Defaults
revision 0 fine-tuned the projected network with its BatchNorms folded into the weights; revision 1 keeps a
BatchNorm on each projected producer's channels, calibrated to the identity (``cascaded_projection``'s
``keep_norms``). This script takes a trained dense model (a run's ``model.pt``), projects it the way a
``cap`` / ``cap-robust`` run would (``CascadedProjection.project``: the run's calibration data, projection
steps and loss), once in each form, and fine-tunes each for ``--steps`` steps of the harness's adversarial
training step (``dnr.engine.train_epoch``) on the same batches (the harness's first fine-tuning epoch's
order), from the same random state, next to the dense model itself fine-tuned the same way (the reference:
what restarting the learning rate does to a network that was not projected). It prints and writes
(``--out``, JSON) each step's learning rate, loss and gradient norm. ``--warmup N`` ramps the learning rate
linearly to its peak over the first N steps in all three forms, as ``--warmup-epochs`` ramps a run's first steps
(the harness restarts a phased method's schedule at its peak, without a warm-up: a probe of whether one would
help).

    python docs/cap/finetune_probe.py docs/cap/grid/runs/vgg_cnn-dense-at-s0/model.pt \\
        --method cap-robust --density 0.25 --steps 60 --out docs/cap/finetune_probe-cap-robust.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import os
import platform
import sys

import torch

from dnr import distributed, methods
from dnr.data.loader import BatchLoader
from dnr.engine import train_epoch
from dnr.harness import load_trained_model
from dnr.harness.builders import EpochBatchSampler, build_dataset, make_optimizer, warmup_factor


def fine_tune(model, cfg, train_set, steps: int, seed: int, warmup: int = 0) -> list[dict]:
    """``steps`` harness training steps of ``model`` at ``cfg.lr`` (constant: the first steps of the restarted
    schedule are at its peak), reached after a linear ramp over the first ``warmup`` steps; per step: the
    learning rate, the loss and the gradient norm."""
    optimizer = make_optimizer(cfg, model, torch.device("cpu"))

    def set_lr(step):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * warmup_factor(step, warmup)  # the harness's warm-up ramp

    sampler = EpochBatchSampler(len(train_set), cfg.batch_size, cfg.seed, 0, 1)
    loader = BatchLoader(train_set, sampler, torch.device("cpu"))
    rows: list[dict] = []

    def batches():
        """The fine-tuning epochs' batches in the harness's order, from the first fine-tuning epoch on."""
        for epoch in itertools.count(cfg.pre_epochs):
            sampler.set_epoch(epoch, 0)
            yield from loader

    class FirstSteps:
        def __iter__(self):
            return itertools.islice(batches(), steps)

        def __len__(self):
            return steps

    def record(i, out):
        norm = math.sqrt(sum(float(p.grad.detach().pow(2).sum()) for p in model.parameters() if p.grad is not None))
        rows.append({"step": i + 1, "lr": optimizer.param_groups[0]["lr"], "loss": float(out["loss"]),
                     "grad_norm": norm})
        set_lr(i + 1)  # for the next step

    set_lr(0)
    torch.manual_seed(seed)
    train_epoch(model.train(), FirstSteps(), optimizer, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps,
                beta=cfg.beta, attack_bn_mode=cfg.attack_bn_mode, progress=record)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a trained dense model (a run's model.pt)")
    ap.add_argument("--method", choices=["cap", "cap-robust"], default="cap-robust")
    ap.add_argument("--density", type=float, default=0.25, help="the FLOP fraction kept (default 0.25)")
    ap.add_argument("--steps", type=int, default=60, help="fine-tuning steps per form (default 60)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="ramp the learning rate linearly to its peak over this many first steps (default 0: none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the per-step records here (JSON; refused if it exists)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"argument --steps: got {args.steps}, expected an integer >= 1")
    if args.warmup < 0:
        ap.error(f"argument --warmup: got {args.warmup}, expected an integer >= 0")
    if args.out and os.path.exists(args.out):
        ap.error(f"argument --out: {args.out!r} exists; remove it or choose another file")
    torch.set_num_threads(args.threads)
    dense, saved, _ = load_trained_model(args.model)
    cfg = dataclasses.replace(saved, method=args.method, density=args.density, epochs=max(saved.epochs, 2))
    cfg.validate()
    train_set = build_dataset(cfg, "train", torch.Generator().manual_seed(distributed.rank_seed(cfg.seed + 1, 0)))
    method = methods.create(cfg)
    method.use_training_data(train_set, tuple(train_set[0][0].shape))
    result = {"model": args.model, "method": args.method, "density": args.density, "steps": args.steps,
              "warmup": args.warmup,
              "lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov, "weight_decay": cfg.weight_decay,
              "torch": torch.__version__, "machine": platform.platform(), "forms": {}}
    for name, keep in (("dense", None), ("folded", False), ("kept", True)):
        net = copy.deepcopy(dense) if keep is None else method.project(dense, keep_norms=keep)
        rows = fine_tune(net, cfg, train_set, args.steps, cfg.seed, args.warmup)
        result["forms"][name] = rows
        losses = [r["loss"] for r in rows]
        print(f"{name}: loss at step 1 {losses[0]:.3f}, highest {max(losses):.3f} (step "
              f"{losses.index(max(losses)) + 1}), mean of the last 10 steps {sum(losses[-10:]) / len(losses[-10:]):.3f}; "
              f"largest gradient norm {max(r['grad_norm'] for r in rows):.2f}")
    forms = result["forms"]
    print("step | loss: dense, folded, kept | gradient norm: dense, folded, kept")
    for d, f, k in zip(forms["dense"], forms["folded"], forms["kept"]):
        print(f"{d['step']:4d} | {d['loss']:.3f} {f['loss']:.3f} {k['loss']:.3f} | "
              f"{d['grad_norm']:.2f} {f['grad_norm']:.2f} {k['grad_norm']:.2f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
