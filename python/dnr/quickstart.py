"""Quickstart: DNR at 20x compression with PGD adversarial training on the embedded Fashion-MNIST subset.

    python -m dnr.quickstart                 # ~ a few minutes on two CPU cores, no download
    python -m dnr.quickstart --help

Builds a small CNN, sparsifies it to 5% density, trains it with the hybrid clean + PGD loss and the
DNR rewiring controller, and prints clean / FGSM / PGD test accuracy and the compression ratio.
It runs the same driver as ``dnr train`` (:func:`dnr.harness.fit`) in a temporary run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from dnr.harness import fit, resolve_config
from dnr.harness.report import format_summary

__all__ = ["build_parser", "run", "format_summary", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dnr.quickstart", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=6, help="training epochs")
    p.add_argument("--density", type=float, default=0.05, help="fraction of weights kept (0.05 = 20x)")
    p.add_argument("--mode", choices=["irregular", "channel"], default="irregular", help="sparsity unit")
    p.add_argument("--method", choices=["dnr", "static"], default="dnr",
                   help="dnr rewires every few steps (budget-aware default); static keeps the random initial mask")
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
    """Train and evaluate as configured by ``args``; returns the summary dict.

    Keys: method, mode, density, compression, epochs, eps, clean, fgsm, pgd, pgd_steps, test_examples,
    flops_dense, flops_effective, train_seconds, seed (and the rest of :func:`dnr.harness.fit`'s summary).

    Raises:
        dnr.harness.ConfigError: a bad value (the message names the option).
    """
    cfg = resolve_config("fashion-mnist-quick", overrides=dict(
        dataset="fashion-mnist", model="small_cnn", method=args.method, mode=args.mode, density=args.density,
        epochs=args.epochs, eps=args.eps, alpha=args.alpha, attack_steps=args.attack_steps,
        eval_steps=args.eval_steps, beta=args.beta, lr=args.lr, batch_size=args.batch_size,
        train_size=args.train_size, data_root=args.data_root or "embedded", seed=args.seed, threads=args.threads,
        eval_every=0, plots=False, checkpoint_every=None))
    with tempfile.TemporaryDirectory(prefix="dnr-quickstart-") as tmp:
        summary = fit(cfg, tmp, quiet=args.quiet, progress=False)
    for key in ("run_dir", "model_path"):  # the temporary run directory is gone
        summary.pop(key, None)
    return summary


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
