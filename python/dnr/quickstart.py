"""Quickstart: DNR at 20x compression with PGD adversarial training on the embedded Fashion-MNIST subset.

    python -m dnr.quickstart                 # ~ a few minutes on two CPU cores, no download
    python -m dnr.quickstart --help

Builds a small CNN, sparsifies it to 5% density, trains it with the hybrid clean + PGD loss and the
DNR rewiring controller, and prints clean / FGSM / PGD test accuracy and the compression ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.utils.data import DataLoader

import dnr
from dnr.models import small_cnn


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dnr.quickstart", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=6, help="training epochs")
    p.add_argument("--density", type=float, default=0.05, help="fraction of weights kept (0.05 = 20x)")
    p.add_argument("--mode", choices=["irregular", "channel"], default="irregular", help="sparsity unit")
    p.add_argument("--method", choices=["dnr", "static"], default="dnr",
                   help="dnr rewires every epoch; static keeps the random initial mask")
    p.add_argument("--eps", type=float, default=0.1, help="L-inf radius for training and evaluation")
    p.add_argument("--alpha", type=float, default=0.025, help="PGD step size during training")
    p.add_argument("--attack-steps", type=int, default=5, help="PGD steps during training")
    p.add_argument("--eval-steps", type=int, default=20, help="PGD steps for the test evaluation")
    p.add_argument("--beta", type=float, default=0.5, help="weight of the clean loss in the hybrid loss")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (cosine-annealed)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-size", type=int, default=None, help="use only the first N training images")
    p.add_argument("--data-root", default=None,
                   help="folder with the Fashion-MNIST IDX files (default: the subset shipped in the package)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    return p


def run(args: argparse.Namespace) -> dict:
    """Train and evaluate as configured by ``args``; returns the summary dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_set = dnr.data.fashion_mnist("train", root=args.data_root, subset=args.train_size)
    test_set = dnr.data.fashion_mnist("test", root=args.data_root)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test_set, batch_size=500)

    model = small_cnn(num_classes=10)
    dnr.sparsify(model, density=args.density, mode=args.mode, generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total_steps = args.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    controller = dnr.DNR(model, optimizer, total_steps=total_steps) if args.method == "dnr" else None
    if controller is None:  # a static mask still has to be re-applied after every step
        optimizer.register_step_post_hook(lambda *_: dnr.apply_masks(model))

    start = time.perf_counter()
    for epoch in range(args.epochs):
        stats = dnr.train.train_epoch(model, loader, optimizer, controller=controller,
                                      last_epoch=epoch == args.epochs - 1, eps=args.eps, alpha=args.alpha,
                                      steps=args.attack_steps, beta=args.beta, lr_scheduler=scheduler)
        if not args.quiet:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {stats['loss']:.3f}  "
                  f"train clean {stats['train_clean_acc']:.3f}  train PGD {stats['train_adv_acc']:.3f}  "
                  f"{stats['images_per_s']:.0f} img/s", flush=True)
    train_seconds = time.perf_counter() - start
    result = dnr.attacks.evaluate(model, test_loader, eps=args.eps, alpha=2.5 * args.eps / args.eval_steps,
                                  steps=args.eval_steps)
    report = dnr.density_report(model, input_size=(1, 28, 28))
    summary = {
        "method": args.method, "mode": args.mode, "density": report.density, "compression": report.compression,
        "epochs": args.epochs, "eps": args.eps, "clean": result["clean"], "fgsm": result["fgsm"],
        "pgd": result["pgd"], "pgd_steps": args.eval_steps, "test_examples": result["n"],
        "flops_dense": report.flops_dense, "flops_effective": report.flops_effective,
        "train_seconds": train_seconds, "seed": args.seed,
    }
    return summary


def format_summary(s: dict) -> str:
    rows = [
        ("method", f"{s['method']} ({s['mode']})"),
        ("density", f"{s['density']:.4f} ({s['compression']:.1f}x compression)"),
        ("clean accuracy", f"{100 * s['clean']:.2f}%"),
        (f"FGSM accuracy (eps {s['eps']})", f"{100 * s['fgsm']:.2f}%"),
        (f"PGD-{s['pgd_steps']} accuracy (eps {s['eps']})", f"{100 * s['pgd']:.2f}%"),
        ("FLOPs / image (dense -> effective)", f"{s['flops_dense']:,} -> {s['flops_effective']:,}"),
        ("training time", f"{s['train_seconds']:.0f} s for {s['epochs']} epochs"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    summary = run(args)
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
