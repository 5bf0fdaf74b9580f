"""``dnr export CHECKPOINT --format compact|sparse|onnx --out PATH`` (registered by :mod:`dnr.cli`).

The checkpoint is read with :func:`dnr.harness.run.load_trained_model` (``torch.load(weights_only=True)``;
the model is rebuilt from the checkpoint's config and sparsified the same way before its state is
loaded). Other programs can reuse :func:`run_export` with their own ``load`` callback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

__all__ = ["register", "run_export", "cmd_export", "default_loader"]

_DEFAULT_EXT = {"compact": ".pt2", "sparse": ".safetensors", "onnx": ".onnx"}


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to an argparse ``subparsers`` object."""
    from .api import FORMATS
    p = subparsers.add_parser(
        "export", help="export a checkpoint: compacted model, compressed sparse file or ONNX, with a model card",
        description="Export a trained checkpoint (model.pt, checkpoints/last.pt or a run directory). "
                    "compact: channel-pruned model physically compacted (torch.export .pt2; needs --mode channel "
                    "training); sparse: dnr-sparse safetensors file holding only active weights (any mode); "
                    "onnx: ONNX model checked against onnxruntime. A model card <out>.card.json is written beside.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run directory")
    p.add_argument("--format", required=True, choices=FORMATS, help="export format")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="output file (default: beside the checkpoint, model.{pt2,safetensors,onnx})")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="sparse: dtype of the stored values (float32 round-trips bit-exactly)")
    p.add_argument("--onnx-model", default=None, choices=("compact", "masked"),
                   help="onnx: export the compacted or the masked model (default: compact for channel-pruned "
                        "models, else masked)")
    p.add_argument("--no-check", action="store_true", help="skip the check of the export against the model")
    p.set_defaults(func=cmd_export)
    return p


def default_loader(path: str):
    """(model, input_size, info) of a dnr checkpoint; ``info`` has architecture, config and summary."""
    from ..harness.run import dataset_meta, load_trained_model
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model.pt")):
        path = os.path.join(path, "model.pt")  # the final model (with its evaluation summary)
    model, cfg, state = load_trained_model(path)
    _, in_channels, size, *_ = dataset_meta(cfg.dataset)
    summary = state.get("summary")
    if summary is None and state.get("metrics"):  # a training checkpoint: its last evaluated epoch
        rows = [r for r in state["metrics"] if r.get("test_clean_acc") is not None]
        if rows:
            summary = {"clean": rows[-1]["test_clean_acc"], "pgd": rows[-1].get("test_pgd_acc"),
                       "epoch": rows[-1].get("epoch")}
    info = {"architecture": cfg.model, "config": state.get("config"), "summary": summary,
            "path": state.get("path", path)}
    return model, (in_channels, size, size), info


def run_export(checkpoint: str, fmt: str, out: str | None = None, *, dtype: str | None = None,
               onnx_model: str | None = None, check: bool = True,
               load: Callable[[str], tuple] | None = None) -> dict:
    """Export a checkpoint; return the model card.

    Args:
        load: ``load(checkpoint) -> (masked model, input_size, info)`` where ``info`` is a dict with
            optional "architecture", "config", "summary" (accuracies) and "path"; default
            :func:`default_loader` (dnr checkpoints).
    """
    from .api import export_model
    model, input_size, info = (load or default_loader)(checkpoint)
    if out is None:
        src = info.get("path", checkpoint)
        folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
        out = os.path.join(folder, "model" + _DEFAULT_EXT[fmt])
    return export_model(model.cpu().eval(), out, fmt, input_size, dtype=dtype, onnx_model=onnx_model,
                        architecture=info.get("architecture"), config=info.get("config"),
                        summary=info.get("summary"), check=check)


def cmd_export(args) -> int:
    from ..harness.checkpoint import CheckpointError
    from .compact import CompactionError
    from .sparse_format import SparseFormatError
    try:
        card = run_export(args.checkpoint, args.format, args.out, dtype=args.dtype, onnx_model=args.onnx_model,
                          check=not args.no_check)
    except (CompactionError, SparseFormatError, CheckpointError, ImportError, FileNotFoundError,
            AssertionError) as err:
        if getattr(args, "traceback", False):
            raise
        print(f"dnr: error: export: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    e = card["export"]
    print(json.dumps({"format": e["format"], "file": e["file"], "file_bytes": e["file_bytes"],
                      "dense_file_bytes": e["dense_file_bytes"], "ratio_vs_dense": round(e["ratio_vs_dense"], 3),
                      "density": card["density"], "parameters": card["parameters"],
                      "check": card.get("check")}, indent=2))
    return 0
