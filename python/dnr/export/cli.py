"""``dnr export CHECKPOINT --format compact|sparse|onnx --out PATH`` (registered by :mod:`dnr.cli`).

The checkpoint is read with :func:`dnr.harness.load_trained_model` (``torch.load(weights_only=True)``;
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
                   help="output file (default: model.{pt2,safetensors,onnx} in the run directory, else beside the checkpoint)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="sparse: dtype of the stored values (float32 round-trips bit-exactly)")
    p.add_argument("--onnx-model", default=None, choices=("compact", "masked"),
                   help="onnx: export the compacted or the masked model (default: compact for channel-pruned "
                        "models, else masked)")
    p.add_argument("--no-check", action="store_true", help="skip the check of the export against the model")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output file (never the checkpoint, a run file or another checkpoint)")
    p.set_defaults(func=cmd_export)
    return p


def default_loader(path: str):
    """(model, input_size, info) of a dnr checkpoint; ``info`` has architecture, config, summary and the
    export formats its compression method declares."""
    from ..harness.builders import dataset_meta
    from ..harness.run import load_trained_model
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
            "path": state.get("path", path), "export_formats": cfg.method_class.export_formats}
    return model, (in_channels, size, size), info


def default_export_path(checkpoint: str, fmt: str) -> str:
    """``model.<ext>`` in the run directory of ``checkpoint`` (a run directory, its model.pt or a file in
    its checkpoints/ folder), else beside the checkpoint file."""
    checkpoint = os.path.abspath(checkpoint)
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
    if os.path.basename(folder) == "checkpoints" and os.path.isfile(os.path.join(folder, "..", "config.json")):
        folder = os.path.dirname(folder)  # never beside the checkpoints: that folder is the run's
    return os.path.join(folder, "model" + _DEFAULT_EXT[fmt])


def run_export(checkpoint: str, fmt: str, out: str | None = None, *, dtype: str | None = None,
               onnx_model: str | None = None, check: bool = True, force: bool = False,
               load: Callable[[str], tuple] | None = None) -> dict:
    """Export a checkpoint; return the model card.

    The output file and its card are checked before anything is loaded: never the checkpoint itself,
    another checkpoint or a run file, and an existing file only with ``force``.

    Args:
        force: replace an existing output file (or card) that is none of the protected files.
        load: ``load(checkpoint) -> (masked model, input_size, info)`` where ``info`` is a dict with
            optional "architecture", "config", "summary" (accuracies), "path" and "export_formats" (those
            the model's compression method declares; default all); default
            :func:`default_loader` (dnr checkpoints).

    Raises:
        OutputRefused: the output or its card may not be written.
    """
    from .._files import check_output_file
    from .api import export_model
    from .model_card import card_path
    if fmt not in _DEFAULT_EXT:
        raise ValueError(f"fmt must be one of {tuple(_DEFAULT_EXT)}, got {fmt!r}")
    argument = "option --out" if out is not None else "export file (default path)"
    if out is None:
        out = default_export_path(checkpoint, fmt)
    inputs = [checkpoint]
    if os.path.isdir(checkpoint):  # the files a run directory's export may read
        inputs += [os.path.join(checkpoint, "model.pt"), os.path.join(checkpoint, "checkpoints", "last.pt")]
    check_output_file(out, argument=argument, inputs=inputs, force=force)
    check_output_file(card_path(out), argument=f"{argument} (its model card)", inputs=inputs, force=force)
    model, input_size, info = (load or default_loader)(checkpoint)
    formats = info.get("export_formats")
    if formats is not None and fmt not in formats:
        from .._files import OutputRefused
        raise OutputRefused(f"option --format: got {fmt!r}, but the checkpoint's compression method exports only "
                            f"{list(formats)}")
    return export_model(model.cpu().eval(), out, fmt, input_size, dtype=dtype, onnx_model=onnx_model,
                        architecture=info.get("architecture"), config=info.get("config"),
                        summary=info.get("summary"), check=check)


def cmd_export(args) -> int:
    from .._files import FileWriteError, OutputRefused
    from ..harness.checkpoint import CheckpointError
    from .compact import CompactionError
    from .sparse_format import SparseFormatError
    try:
        card = run_export(args.checkpoint, args.format, args.out, dtype=args.dtype, onnx_model=args.onnx_model,
                          check=not args.no_check, force=args.force)
    except (CompactionError, SparseFormatError, CheckpointError, ImportError, FileNotFoundError,
            AssertionError, OutputRefused, FileWriteError) as err:
        if getattr(args, "traceback", False):
            raise
        print(f"dnr: error: export: {' '.join(str(err).split())}", file=sys.stderr)
        return 2 if isinstance(err, OutputRefused) else 1
    e = card["export"]
    print(json.dumps({"format": e["format"], "file": e["file"], "file_bytes": e["file_bytes"],
                      "dense_file_bytes": e["dense_file_bytes"], "ratio_vs_dense": round(e["ratio_vs_dense"], 3),
                      "density": card["density"], "parameters": card["parameters"],
                      "check": card.get("check")}, indent=2))
    return 0
