"""Model card: a JSON file beside every export (architecture, density, parameters, FLOPs, size, accuracy)."""

from __future__ import annotations

import datetime
import json
import os
from typing import Sequence

from torch import nn

from .._files import atomic_open, sha256_file
from ..nn.block_circulant import circulant_layers, circulant_report
from ..nn.report import density_report

__all__ = ["model_card", "write_model_card", "card_path", "ACCURACY_KEYS"]

# summary entries of a dnr checkpoint (dnr.harness.run) that are accuracies or attack settings
ACCURACY_KEYS = ("clean", "fgsm", "pgd", "autoattack", "eps", "alpha", "pgd_steps", "pgd_restarts", "test_examples",
                 "dataset")


def card_path(export_path: str | os.PathLike) -> str:
    """Where the card of ``export_path`` goes: ``<export_path>.card.json``."""
    return os.fspath(export_path) + ".card.json"


def model_card(model: nn.Module, input_size: Sequence[int], *, export_format: str, export_path: str | None = None,
               exported_model: nn.Module | None = None, architecture: str | None = None, config: dict | None = None,
               summary: dict | None = None, extra: dict | None = None) -> dict:
    """Build the model-card dict of an export.

    Args:
        model: the masked model that was exported (densities and FLOPs come from its density report).
        input_size: one example's shape without the batch dim.
        export_format: "compact", "sparse" or "onnx".
        export_path: the exported file (its size and SHA-256 are recorded).
        exported_model: the compacted model, when there is one (its parameter count is recorded).
        architecture: the architecture's name (e.g. the checkpoint config's "model"); default: class name.
        config: the training config (recorded as is).
        summary: the checkpoint's summary; accuracy entries (clean/fgsm/pgd/...) are copied.
        extra: more entries for the card.
    """
    report = density_report(model, input_size=tuple(input_size))
    card = {
        "format": "dnr-model-card",
        "version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "export": {"format": export_format},
        "architecture": {"name": architecture or type(model).__name__, "class": type(model).__name__,
                         "input_size": list(input_size)},
        "density": {"masked": report.density, "effective": report.effective_density,
                    "compression": report.compression},
        "parameters": {"total": report.total_params, "nonzero": report.nonzero_params,
                       "prunable": report.prunable, "active": report.active,
                       "effective_active": report.effective_active},
        "flops": {"dense": report.flops_dense, "masked": report.flops_masked, "effective": report.flops_effective},
        "accuracy": {k: v for k, v in (summary or {}).items() if k in ACCURACY_KEYS},
    }
    if circulant_layers(model):  # block-circulant layers: stored vectors against the dense layers they stand for
        circ = circulant_report(model, tuple(input_size))
        card["circulant"] = {"block_sizes": sorted({r["block_size"] for r in circ["layers"]}),
                             "stored_weights": circ["stored"], "dense_weights": circ["dense"],
                             "compression": circ["compression"], "flops_dense": circ["flops_dense"],
                             "flops_fft": circ["flops_fft"], "layers": circ["layers"]}
    if exported_model is not None:
        card["parameters"]["exported"] = sum(p.numel() for p in exported_model.parameters())
        plan = getattr(exported_model, "dnr_compaction", None)
        if plan:
            # structural effective density: weights the compacted model keeps in the layers that were masked
            masked = {r.name for r in report.layers if r.masked}
            kept = sum(m.weight.numel() for n, m in exported_model.named_modules()
                       if n in masked and isinstance(m, (nn.Conv2d, nn.Linear)))
            card["density"]["compacted"] = kept / report.prunable if report.prunable else 1.0
            card["compaction"] = plan
    if export_path is not None:
        card["export"].update(file=os.path.basename(os.fspath(export_path)),
                              file_bytes=os.path.getsize(export_path), sha256=sha256_file(export_path))
    if config is not None:
        card["config"] = config
    if extra:
        card.update(extra)
    return card


def write_model_card(card: dict, export_path: str | os.PathLike) -> str:
    """Write ``card`` as JSON to :func:`card_path` of ``export_path``; return that path."""
    path = card_path(export_path)
    with atomic_open(path, "w") as f:
        json.dump(card, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    return path
