"""The ``dnr`` command (also ``python -m dnr``): train, eval, report, compare, info.

    dnr train                       # preset fashion-mnist-quick: DNR at 20x on the embedded Fashion-MNIST subset
    dnr train --preset cifar10-resnet18-irregular --data-root ~/data/cifar10 --out runs/r18
    dnr train --config run.yaml --epochs 50       # flags override the file, the file overrides the preset
    dnr train --resume runs/r18                   # continue exactly where the run stopped
    dnr eval runs/r18/model.pt --steps 50 --restarts 5 [--autoattack]
    dnr report runs/r18
    dnr info runs/r18/model.pt
    dnr analyze hessian runs/r18                  # top Hessian eigenvalue of the clean and adversarial loss
    dnr compare --config configs/compare-fashion-mnist.yaml --out runs/compare [--jobs 2] [--models M ...]
    dnr compare --report-only runs/compare        # rebuild compare.md / compare.json / plots from the run files

Errors (bad option or value, missing data, damaged checkpoint, NaN loss) print one line
``dnr: error: ...`` on stderr and exit with status 2 (usage/config) or 1 (everything else).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings


from . import distributed
from ._files import DamagedFileError, FileWriteError, OutputRefused, atomic_open, check_output_dir, check_output_file
from . import methods
from .harness import builders as hbuild
from .harness import checkpoint as ckpt
from .harness import config as hconfig
from .harness import errors as herrors
from .harness import report as hreport
from .harness import run as hrun
from .harness import evaluate as hevaluate
from .nn import density_report

__all__ = ["build_parser", "main"]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _add_train(sub) -> None:
    presets = "\n".join(f"  {name:<32} {_preset_line(name)}" for name in hconfig.PRESETS)
    p = sub.add_parser(
        "train", formatter_class=_Formatter, help="train a model with a compression method (dnr, static, oneshot, admm, rsr, dense-at, dense, plugins)",
        description="Train a model and evaluate it; writes a run directory (config, metrics, rewiring log, "
                    "checkpoints, final model, report and plots).\n\nOption values come from the preset "
                    f"(default {hconfig.DEFAULT_PRESET}), then the --config file, then the flags.",
        epilog="presets:\n" + presets)
    g = p.add_argument_group("run")
    g.add_argument("--preset", default=None, metavar="NAME",
                   help=f"named settings to start from (default {hconfig.DEFAULT_PRESET}; list below)")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="YAML (.yaml/.yml, needs pyyaml) or JSON file of option: value (may name a 'preset')")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="run directory to create (default runs/<preset>-<method>-<date>-<time>)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR exactly where it stopped (its saved config is used)")
    g.add_argument("--quiet", action="store_true", help="print only the final summary table (and errors)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars (shown on a terminal's stderr when tqdm is installed)")
    g.add_argument("--dry-run", action="store_true",
                   help="resolve and validate the config, check the data, print the config and exit")
    g.add_argument("--json", default=None, metavar="FILE", help="also write the final summary to this JSON file")
    g.add_argument("--force", action="store_true",
                   help="let --json replace an existing file (never a checkpoint, a run file or an input)")
    hconfig.add_config_arguments(p)
    p.set_defaults(func=cmd_train)


def _preset_line(name: str) -> str:
    c = hconfig.resolve_config(name)
    line = f"{c.model} on {c.dataset}, {c.method} {c.mode} density {c.density}, {c.epochs} epochs"
    pub = hconfig.PUBLISHED.get(name)
    if pub:
        nums = ", ".join(f"{k} {v}" for k, v in pub.items() if k in ("clean", "pgd", "autoattack") and v is not None)
        line += f" (published: {nums})"
    return line


def _add_threads(p) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")


def _set_threads(args) -> None:
    """Apply --threads (checked first: a bad value is a one-line error before any work)."""
    if args.threads is not None:
        hconfig.check_number("option --threads", args.threads, int, lo=1)
        import torch
        torch.set_num_threads(args.threads)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", formatter_class=_Formatter,
                       help="clean / FGSM / PGD (/ AutoAttack) accuracy of a checkpoint",
                       description="Evaluate a checkpoint (model.pt, checkpoints/last.pt or a run directory) on "
                                   "its dataset's test split; prints JSON. Attack defaults come from the run's config.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run directory")
    p.add_argument("--data-root", default=None, metavar="DIR", help="dataset folder (default: the run's)")
    p.add_argument("--test-size", type=int, default=None, metavar="N",
                   help="evaluate the first N test examples (default: the run's test size, else all)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="evaluation batch size")
    p.add_argument("--eps", type=float, default=None, metavar="X", help="L-inf radius (default: the run's eval eps)")
    p.add_argument("--alpha", type=float, default=None, metavar="X", help="PGD step size (default: 2.5 eps / steps)")
    p.add_argument("--steps", type=int, default=None, metavar="K", help="PGD steps (default: the run's eval steps)")
    p.add_argument("--restarts", type=int, default=None, metavar="R",
                   help="PGD random restarts (default: the run's eval restarts)")
    p.add_argument("--no-fgsm", action="store_true", help="skip FGSM")
    p.add_argument("--no-pgd", action="store_true", help="skip PGD")
    p.add_argument("--autoattack", action="store_true",
                   help="also run AutoAttack (standard, L-inf) through the torchattacks package")
    p.add_argument("--apgd", action="store_true",
                   help="also run APGD-CE then APGD-T (AutoAttack's two gradient attacks, 50 steps each, "
                        "torchattacks): most of AutoAttack's strength at a fraction of its cost")
    p.add_argument("--sanity", action="store_true",
                   help="also run the gradient-masking sanity checks (dnr.evaluation.robust_evaluation): PGD with "
                        "the given steps and 50 steps, an eps sweep [0, eps/2, eps, 2 eps, 0.3, 0.5] (PGD-20) and, "
                        "with --autoattack, AutoAttack vs PGD on the same examples; prints the checks to stderr and "
                        "adds the full result under \"robust\" (costs about 9 more PGD runs over the test set)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the PGD random starts and AutoAttack (default: the run's seed, which reproduces "
                        "the final evaluation of dnr train)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON result to FILE")
    p.add_argument("--resume-dir", default=None, metavar="DIR",
                   help="save the progress of --autoattack, --apgd and --sanity in DIR (created if missing) after "
                        "every batch, one file each (eval-*.partial.pt, removed when that evaluation ends): the "
                        "same command again continues an interrupted evaluation and prints the uninterrupted result")
    p.add_argument("--force", action="store_true",
                   help="let --out replace an existing file (never a checkpoint, a run file or an input)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_threads(p)
    p.set_defaults(func=cmd_eval)


def _add_report(sub) -> None:
    p = sub.add_parser("report", formatter_class=_Formatter, help="markdown summary and PNG plots of a run",
                       description="Write RUN_DIR/report.md and RUN_DIR/plots/*.png (accuracy per epoch, "
                                   "per-layer density over training, final density per layer; plots need matplotlib).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by dnr train")
    p.set_defaults(func=cmd_report)


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", formatter_class=_Formatter,
        help="train and evaluate grids of models x methods x modes x densities x seeds, one report",
        description="Train every cell of one or several grids (models x methods x modes x densities x seeds) "
                    "from one compare config, "
                    "evaluate each with dnr.evaluation.robust_evaluation and write OUT/compare.md, "
                    "OUT/compare.json and OUT/plots/. Rerunning reuses finished cells and resumes interrupted "
                    "ones.\n\nConfig keys (YAML or JSON): preset, train (TrainConfig options shared by all cells), "
                    "models (default: train's model), methods, modes, densities, seeds, eval (test_size, pgd_steps, "
                    "restarts, fgsm, autoattack, autoattack_examples, sweep_eps, sweep_steps, sweep_examples, eps, "
                    "alpha), grids (a list of {methods, modes, densities, seeds, eval, train}: the cells are their "
                    "union; a grid's missing keys come from the top level, its eval / train override the top "
                    "level's for its cells), model_prefix (cell names start with their model: default when models "
                    "lists several), title. An OUT that records other cells is refused unless this run plans a "
                    "superset of them (the record is replaced) or a subset with their settings (it is kept).",
        epilog="example: dnr compare --config configs/compare-fashion-mnist.yaml --out runs/compare --jobs 2")
    p.add_argument("report_dir", nargs="?", default=None, metavar="OUT",
                   help="with --report-only: the output folder (same as --out)")
    p.add_argument("--config", default=None, metavar="FILE", help="compare config (YAML needs pyyaml, or JSON)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (reused on a rerun)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="cells trained in parallel processes (default 1)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads per cell (default: torch's default with --jobs 1, else 1)")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="override the config's models (on a config listing several, the cells keep their "
                        "<model>- prefix, so a subset of its folder's cells runs under their recorded names)")
    p.add_argument("--methods", nargs="+", default=None, metavar="M",
                   help="override the config's methods (the top-level list and every grid's)")
    p.add_argument("--modes", nargs="+", default=None, metavar="MODE", help="override the config's modes (likewise)")
    p.add_argument("--densities", nargs="+", type=float, default=None, metavar="D",
                   help="override the config's densities (likewise)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="S",
                   help="override the config's seeds (likewise)")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild the report of OUT from its per-cell files (no training or evaluation)")
    p.set_defaults(func=cmd_compare)


def _add_info(sub) -> None:
    p = sub.add_parser("info", formatter_class=_Formatter, help="density report of a checkpoint",
                       description="Per-layer density, compression and FLOPs of a checkpoint (model.pt, "
                                   "checkpoints/last.pt or a run directory).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_info)


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", formatter_class=_Formatter, help="loss-landscape analysis of a checkpoint",
                       description="Analyses of a trained model.")
    what = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    h = what.add_parser("hessian", formatter_class=_Formatter,
                        help="top Hessian eigenvalue of the clean and the adversarial loss",
                        description="Top eigenvalue (power iteration on Hessian-vector products) of the Hessian, "
                                    "w.r.t. the parameters, of the clean and the adversarial cross-entropy of a "
                                    "checkpoint's model (eval mode) on the first N examples of its data; the "
                                    "adversarial examples are the run's training PGD attack.")
    h.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run directory")
    h.add_argument("--examples", type=int, default=256, metavar="N", help="examples in the batch (default 256)")
    h.add_argument("--iters", type=int, default=20, metavar="K", help="power-iteration steps (default 20)")
    h.add_argument("--eps", type=float, default=None, metavar="X",
                   help="L-inf radius of the attack (default: the run's training eps)")
    h.add_argument("--split", default="test", help="data split: test (default) or train")
    h.add_argument("--data-root", default=None, metavar="DIR", help="dataset folder (default: the run's)")
    h.add_argument("--seed", type=int, default=None, help="seed of the attack and the start vector (default: the run's)")
    h.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    h.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_threads(h)
    h.set_defaults(func=cmd_analyze_hessian)


def _add_explore(sub) -> None:  # E-RNN's design exploration (issue 17)
    p = sub.add_parser(
        "explore", formatter_class=_Formatter,
        help="design exploration of recurrent models: cell x hidden size x block size, early stopping, Pareto table",
        description="Train every configuration (cell type x hidden size x block size; k = 1 dense) of a recurrent "
                    "classifier under a short budget, stopping early those that cannot reach the accuracy "
                    "requirement (rule: from epoch ceil(check_fraction * budget), at least 2, stop when acc_e + the "
                    "larger of the last two per-epoch gains x the epochs left < requirement), and write OUT/explore.json, "
                    "explore.md and explore.png: the Pareto fronts of accuracy against parameters and FLOPs, the "
                    "smallest model that meets the requirement and the epochs saved. One progress line per "
                    "configuration; the rows so far are saved in OUT/explore_partial.json, so an interrupted "
                    "exploration resumes (finished configurations reused) when run again with the same config and "
                    "--out.\n\nConfig keys (YAML or JSON): requirement (required), cells, hidden_sizes, "
                    "block_sizes, budget_epochs, check_fraction, "
                    "dataset, data_root, reading (rows / pixels), train_size, test_size, batch_size, lr and max_grad_norm "
                    "(default: dnr train's for the recurrent models, lr 0.5 and clipping to norm 1; 0 = no "
                    "clipping), circulant_gradient (the block-circulant vectors' gradient rule: mean, the default, "
                    "or sum), seed, title.",
        epilog="example: dnr explore --config docs/e-rnn/explore.yaml --out runs/explore-ernn")
    p.add_argument("--config", required=True, metavar="FILE", help="explore config (YAML needs pyyaml, or JSON)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (must not hold a finished exploration; an interrupted one of the same config "
                        "is resumed)")
    _add_threads(p)
    p.set_defaults(func=cmd_explore)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    intro, usage = __doc__.split("\n\n")[:2]
    parser = argparse.ArgumentParser(prog="dnr", formatter_class=_Formatter, description=intro + "\n\n" + usage)
    parser.add_argument("--version", action="version", version=f"dnr {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_report(sub)
    _add_compare(sub)
    _add_info(sub)
    _add_analyze(sub)
    _add_explore(sub)
    try:  # the export commands, when that module is installed
        from .export import cli as export_cli
    except ImportError:
        export_cli = None
    if export_cli is not None and hasattr(export_cli, "register"):
        export_cli.register(sub)
    return parser


# ---------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    overrides = hconfig.config_overrides_from_args(args)
    launched = distributed.launch_info()  # (rank, world size) set by torchrun, before any group exists
    if launched[0] != 0:  # only rank 0 talks
        args.quiet = True
    if args.resume:
        if args.preset or args.config or args.out:
            raise hconfig.ConfigError("--resume continues a run with its saved config: do not combine it with "
                                      "--preset, --config or --out")
        _check_json_output(args, run_dir=args.resume)
        summary = _interruptible(args.resume, lambda: hrun.fit(
            None, None, resume=args.resume, quiet=args.quiet, progress=not args.no_progress,
            overrides_on_resume=overrides))
    else:
        file_values = hconfig.load_config_file(args.config) if args.config else {}
        cfg = hconfig.resolve_config(args.preset, file_values, overrides)
        preset = args.preset or file_values.get("preset") or hconfig.DEFAULT_PRESET
        if launched[1] > 1 and not args.out and not args.dry_run:
            raise hconfig.ConfigError(f"option --out: required with {launched[1]} processes (torchrun), so that "
                                      "all of them write to one run directory")
        if (not args.quiet or args.dry_run) and launched[0] == 0:
            print("resolved config (preset " + preset + "):")
            print("\n".join(f"  {k}: {v}" for k, v in cfg.to_dict().items()), flush=True)
        out = args.out or os.path.join("runs", f"{preset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        check_output_dir(out, argument="option --out")
        _check_json_output(args, run_dir=out)
        if args.dry_run:
            hbuild.check_data(cfg)
            return 0
        summary = _interruptible(out, lambda: hrun.fit(cfg, out, quiet=args.quiet, progress=not args.no_progress))
    if summary is None:
        return 130
    if launched[0] != 0:
        return 0
    print(hreport.format_summary(summary))
    print(f"run directory: {summary['run_dir']}")
    if summary.get("plots"):
        print(f"plots: {summary['plots_dir']} ({', '.join(os.path.basename(p) for p in summary['plots'])})")
    elif summary.get("plots_note"):
        print(summary["plots_note"])
    if summary.get("report"):
        print(f"report: {summary['report']}")
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def _check_json_output(args, run_dir: str) -> None:
    """``train --json``: writable, and none of the run's files or inputs (checked before training)."""
    if args.json:
        check_output_file(args.json, argument="option --json", inputs=[args.config], force=args.force,
                          run_dirs=[run_dir])


def _interruptible(run_dir: str, train):
    """Run ``train()``; on Ctrl-C say how to continue and return None."""
    try:
        return train()
    except KeyboardInterrupt:
        if os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt")):
            print(f"dnr: interrupted; continue with: dnr train --resume {run_dir}", file=sys.stderr)
        else:
            print("dnr: interrupted before the first checkpoint", file=sys.stderr)
        return None


def cmd_eval(args) -> int:
    numbers = {name: getattr(args, name) for name in hevaluate.EVAL_OPTION_FIELDS}
    hevaluate.check_evaluation_options(**numbers)  # before anything is loaded
    _set_threads(args)
    device = hevaluate.resolve_device(args.device)
    if args.out:
        check_output_file(args.out, argument="option --out", force=args.force,
                          inputs=[args.checkpoint, ckpt.resolve_checkpoint_path(args.checkpoint)])
    if args.resume_dir is not None:
        check_output_dir(args.resume_dir, argument="option --resume-dir")
        os.makedirs(args.resume_dir, exist_ok=True)
    model, cfg, state = hrun.load_trained_model(args.checkpoint, device)
    res = hevaluate.evaluate_trained(model, cfg, device=device, data_root=args.data_root, fgsm=not args.no_fgsm,
                                     pgd=not args.no_pgd, autoattack=args.autoattack, apgd=args.apgd,
                                     sanity=args.sanity, quiet=args.quiet, resume_dir=args.resume_dir,
                                     **numbers)
    if "robust" in res:
        from .evaluation import format_sanity
        print(format_sanity(res["robust"]), file=sys.stderr, flush=True)
    text = json.dumps({"checkpoint": state["path"], **res}, indent=2)
    print(text)
    if args.out:
        with atomic_open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def cmd_report(args) -> int:
    # report.md and plots/ are this command's own products; anything else there is refused
    check_output_file(os.path.join(args.run_dir, "report.md"), argument="report file", own_output=True)
    check_output_dir(os.path.join(args.run_dir, "plots"), argument="plots folder")
    out = hreport.write_report(args.run_dir)
    print(f"report: {out['report']}")
    if out["plots"]:
        print(f"plots: {out['plots_dir']} ({', '.join(os.path.basename(p) for p in out['plots'])})")
    else:
        print(out["note"] or "no plots (the run has no metrics yet)")
    return 0


def cmd_compare(args) -> int:
    from .harness import compare as hcompare
    if args.report_only:
        out = args.report_dir or args.out
        if out is None:
            raise hconfig.ConfigError("dnr compare --report-only needs the output folder: "
                                      "dnr compare --report-only OUT")
        for name in hcompare.OUTPUT_FILES:
            check_output_file(os.path.join(out, name), argument="compare report", own_output=True)
        res = hcompare.write_compare_report(out)
    else:
        if args.report_dir is not None:
            raise hconfig.ConfigError(f"dnr compare: unexpected argument {args.report_dir!r} (give the output folder "
                                      "with --out, or add --report-only)")
        if args.config is None or args.out is None:
            raise hconfig.ConfigError("dnr compare needs --config FILE and --out DIR")
        check_output_dir(args.out, argument="option --out")
        for name in hcompare.OUTPUT_FILES:
            check_output_file(os.path.join(args.out, name), argument="option --out", inputs=[args.config],
                              own_output=True)
        spec = hcompare.override_lists(hcompare.load_compare_config(args.config), methods=args.methods,
                                       modes=args.modes, densities=args.densities, seeds=args.seeds,
                                       models=args.models)
        argv = getattr(args, "_argv", None)
        argv = sys.argv[1:] if argv is None else argv
        import shlex
        command = "dnr " + shlex.join(str(a) for a in argv)
        res = _interruptible_compare(lambda: hcompare.run_compare(spec, args.out, jobs=args.jobs,
                                                                  threads=args.threads, command=command))
        if res is None:
            return 130
        return 0
    print(f"report: {res['report']}")
    print(f"json: {res['json']}")
    if res["plots"]:
        print(f"plots: {res['plots_dir']} ({', '.join(os.path.basename(p) for p in res['plots'])})")
    elif res["note"]:
        print(res["note"])
    return 0


def _interruptible_compare(work):
    try:
        return work()
    except KeyboardInterrupt:
        print("dnr: interrupted; rerun the same command to continue (finished cells are reused, interrupted "
              "ones resumed)", file=sys.stderr)
        return None


def cmd_explore(args) -> int:
    from .explore import load_explore_spec, run_explore
    spec = load_explore_spec(args.config)
    _set_threads(args)
    res = run_explore(spec, args.out, progress=lambda line: print(line, flush=True))
    print(f"explore: {len(res['rows'])} configurations, {res['stopped']} stopped early, {res['epochs_saved']} of "
          f"{res['epochs_total']} epochs saved; smallest meeting {spec.requirement}: {res['smallest'] or 'none'}")
    print(f"report: {os.path.join(args.out, 'explore.md')}")
    return 0


def cmd_info(args) -> int:
    model, cfg, state = hrun.load_trained_model(args.checkpoint)
    _, c, s, _, _, _ = hbuild.dataset_meta(cfg.dataset)
    report = density_report(model, input_size=(c, s, s))
    if args.json:
        print(json.dumps({"checkpoint": state["path"], "kind": state["kind"], "config": cfg.to_dict(),
                          **report.to_dict()}, indent=2, default=list))
        return 0
    where = ""
    if state["kind"] == "train":  # the words of the training log: epochs counted from 1, batch b/steps
        if state["batch"]:
            where = (f", epoch {state['epoch'] + 1}, batch {state['batch']}/{state.get('steps_per_epoch', '?')}, "
                     f"step {state['step']}")
        else:
            where = f", end of epoch {state['epoch']}/{cfg.epochs}, step {state['step']}"
    print(f"checkpoint: {state['path']} ({state['kind']}{where})")
    mode = f" ({cfg.mode})" if cfg.method_class.sparse else ""  # masked methods only have a sparsity mode
    print(f"model: {cfg.model} on {cfg.dataset}, method {cfg.method}{mode}, target density {cfg.density}")
    print(report)
    return 0


def cmd_analyze_hessian(args) -> int:
    from .harness.analyze import hessian_of_checkpoint
    _set_threads(args)
    res = hessian_of_checkpoint(args.checkpoint, examples=args.examples, iters=args.iters, eps=args.eps,
                                split=args.split, data_root=args.data_root, seed=args.seed, device=args.device)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"checkpoint: {res['checkpoint']}")
    print(f"top Hessian eigenvalue, {res['examples']} {res['split']} examples, {res['iters']} power iterations:")
    print(f"  clean loss        {res['clean']:.6g}")
    print(f"  adversarial loss  {res['adversarial']:.6g}  (PGD-{res['attack_steps']}, eps {res['eps']:g})")
    return 0


# ---------------------------------------------------------------------------------------- entry point
_EXPECTED = (hconfig.ConfigError, ckpt.CheckpointError, herrors.RunError, herrors.TrainingDiverged, FileNotFoundError,
             OutputRefused, FileWriteError, DamagedFileError)
_USAGE_ERRORS = (hconfig.ConfigError, OutputRefused)  # exit status 2


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """dnr's own warnings (a checkpoint fallback) as one ``dnr: warning:`` line; others as Python shows them."""
    if issubclass(category, ckpt.CheckpointFallbackWarning):
        print(f"dnr: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOWWARNING = warnings.showwarning


def _plugins_in(argv: list[str]) -> list[str]:
    """The modules named by ``--plugin`` on a command line (before it is parsed: the methods they register
    are valid --method values and are listed by --help)."""
    found, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--plugin="):
            found.append(arg.split("=", 1)[1])
        elif arg == "--plugin":
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                found.append(argv[i])
                i += 1
            continue
        i += 1
    return found


def main(argv=None) -> int:
    try:  # a plugin that fails to import is reported by the config's validation, as a one-line error
        methods.import_plugins(_plugins_in(sys.argv[1:] if argv is None else list(argv)))
    except methods.PluginError:
        pass
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = None if argv is None else list(argv)  # the command line, for reports that show it
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", ckpt.CheckpointFallbackWarning)
        return _run(args)


def _run(args) -> int:
    try:
        return args.func(args)
    except _EXPECTED as err:
        if args.traceback:
            raise
        msg = " ".join(str(err).split())
        if isinstance(err, FileNotFoundError) and err.filename and err.filename not in msg:
            msg = f"{msg}: {err.filename}"
        rank, world = distributed.launch_info()
        # under torchrun a diverged loss and a bad option are the same on every process: rank 0 says it
        if rank == 0 or not isinstance(err, (hconfig.ConfigError, herrors.TrainingDiverged)):
            print(f"dnr: error: {msg}" if world == 1 else f"dnr: error (rank {rank}): {msg}", file=sys.stderr)
        return 2 if isinstance(err, _USAGE_ERRORS) else 1
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
