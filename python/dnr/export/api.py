"""``export_model``: one call that writes an export (compact, sparse or onnx) and its model card."""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import torch
from torch import nn

from .._files import atomic_path
from ..nn.block_circulant import circulant_layers, densify_circulant, set_circulant_impl
from .compact import compact_model
from .model_card import model_card, write_model_card
from .onnx_export import check_onnx, export_onnx
from .sparse_format import file_payload_bytes, save_dense, save_sparse

__all__ = ["FORMATS", "export_model", "save_compact", "load_compact", "check_compact"]

FORMATS = ("compact", "sparse", "onnx")


def save_compact(compacted: nn.Module, path: str | os.PathLike, input_size: Sequence[int]) -> str:
    """Save a compacted model as a ``torch.export`` program (``.pt2``, batch dimension dynamic).

    Load it with :func:`load_compact` (no pickled Python code, no dnr needed to run it).
    """
    example = torch.zeros((2, *[int(s) for s in input_size]), device=next(compacted.parameters()).device)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(compacted.eval(), (example,), dynamic_shapes=({0: batch},))
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp)
    return os.fspath(path)


def load_compact(path: str | os.PathLike) -> nn.Module:
    """Load a model written by :func:`save_compact`: [B, *input_size] -> logits, eval mode."""
    return torch.export.load(os.fspath(path)).module()


@torch.no_grad()
def check_compact(model: nn.Module, compacted: nn.Module, x: torch.Tensor, *, rtol: float = 1e-4,
                  atol: float = 1e-5) -> float:
    """Max abs difference of the eval-mode outputs on ``x``; AssertionError beyond ``atol + rtol*|ref|``."""
    was = model.training
    model.eval()
    try:
        ref, got = model(x), compacted(x)
    finally:
        model.train(was)
    diff = (ref - got).abs()
    if bool((diff > atol + rtol * ref.abs()).any()):
        raise AssertionError(f"compacted model differs from the masked model: max abs diff {float(diff.max()):.3g}")
    return float(diff.max()) if diff.numel() else 0.0


def export_model(model: nn.Module, out: str | os.PathLike, fmt: str, input_size: Sequence[int], *,
                 dtype: str | None = None, onnx_model: str | None = None, architecture: str | None = None,
                 config: dict | None = None, summary: dict | None = None, check: bool = True,
                 generator: torch.Generator | None = None) -> dict:
    """Export ``model`` to ``out`` in format ``fmt`` and write the model card beside it.

    Args:
        model: a masked model (as trained by dnr), on the CPU.
        out: output file (compact: ``.pt2``; sparse: ``.safetensors``; onnx: ``.onnx``).
        fmt: "compact" (channel-compacted dense model, torch.export program), "sparse" (dnr-sparse
            safetensors file) or "onnx".
        input_size: one example's shape without the batch dim, e.g. (3, 32, 32).
        dtype: sparse only: value dtype ("float32" default, "float16", "bfloat16").
        onnx_model: onnx only: "compact" or "masked" (default: compact when the model prunes whole
            channels, else masked).
        architecture, config, summary: recorded in the card (summary's accuracies are copied).
        check: verify the export against the masked model on random inputs (compact: PyTorch outputs,
            onnx: onnxruntime, sparse: exact round trip).
        generator: for the random check inputs.

    Returns:
        the model card (also written to ``<out>.card.json``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    was_training = model.training
    model.eval()
    try:
        return _export(model, out, fmt, input_size, dtype=dtype, onnx_model=onnx_model, architecture=architecture,
                       config=config, summary=summary, check=check, generator=generator)
    finally:
        model.train(was_training)


def _export(model, out, fmt, input_size, *, dtype, onnx_model, architecture, config, summary, check, generator):
    input_size = tuple(int(s) for s in input_size)
    out = os.fspath(out)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    x = torch.rand((4, *input_size), generator=gen)
    extra: dict = {}
    exported = None
    circulant = bool(circulant_layers(model))
    if circulant:
        _export_circulant(model, out, fmt, input_size, x, extra, check=check)
    elif fmt == "compact":
        exported = compact_model(model, input_size)
        if check:
            extra["check"] = {"max_abs_diff_vs_masked": check_compact(model, exported, x)}
        save_compact(exported, out, input_size)
    elif fmt == "sparse":
        layout = save_sparse(model, out, dtype=dtype, metadata={"architecture_name": architecture or ""})
        extra["sparse"] = {"value_dtype": layout.value_dtype, "payload_bytes": file_payload_bytes(out),
                           "predicted_payload_bytes": layout.payload_bytes,
                           "predicted_ratio": layout.ratio,
                           "encodings": {t.key: t.encoding for t in layout.tensors if t.encoding != "dense"}}
        if check and layout.value_dtype == "float32":
            from .sparse_format import read_sparse
            state, _ = read_sparse(out)
            own = model.state_dict()
            bad = [k for k in own if not torch.equal(state[k], _masked(own, k))]
            if bad:
                raise AssertionError(f"sparse round trip is not exact for {bad[:3]}")
            extra["check"] = {"round_trip": "bit-exact"}
    else:
        if onnx_model is None:
            from .compact import check_channel_structure, CompactionError
            try:
                check_channel_structure(model)
                onnx_model = "compact"
            except CompactionError:
                onnx_model = "masked"
        if onnx_model not in ("compact", "masked"):
            raise ValueError(f"onnx_model must be 'compact' or 'masked', got {onnx_model!r}")
        net = compact_model(model, input_size) if onnx_model == "compact" else model
        if onnx_model == "compact":
            exported = net
        export_onnx(net, out, input_size)
        extra["onnx"] = {"model": onnx_model}
        if check:
            extra["check"] = {"max_abs_diff_onnxruntime_vs_torch": check_onnx(net, out, x)}
            if onnx_model == "compact":
                extra["check"]["max_abs_diff_vs_masked"] = check_compact(model, net, x)
    # the dense reference size for the card, measured after the export: a model the format cannot take
    # (compact on an irregular model) is refused for that reason, not for an optional package
    with tempfile.TemporaryDirectory(prefix="dnr-export-") as tmp:
        dense_path = os.path.join(tmp, "dense.safetensors")
        dense_bytes = save_dense(densify_circulant(model) if circulant else model, dense_path)
        if circulant:  # the weights alone (a small model's .pt2 is mostly its graph): vectors against dense matrices
            stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            extra["circulant_storage"] = {"weight_bytes": stored, "dense_weight_bytes": file_payload_bytes(dense_path),
                                          "weight_ratio_vs_dense": file_payload_bytes(dense_path) / max(1, stored)}
    card = model_card(model, input_size, export_format=fmt, export_path=out, exported_model=exported,
                      architecture=architecture, config=config, summary=summary, extra=extra)
    card["export"]["dense_file_bytes"] = dense_bytes
    card["export"]["ratio_vs_dense"] = dense_bytes / max(1, card["export"]["file_bytes"])
    write_model_card(card, out)
    return card


def _export_circulant(model, out, fmt, input_size, x, extra: dict, *, check: bool) -> None:
    """Export a block-circulant model (``dnr.circulant``): compact = the model itself as a torch.export program,
    whose weights are only the defining vectors; onnx = the FFT form when the exporter and onnxruntime take it,
    else the dense-matrix form (``densify_circulant``); the card says which and why."""
    if fmt == "compact":
        save_compact(model, out, input_size)
        if check:
            with torch.no_grad():
                ref, got = model(x), load_compact(out)(x)
            extra["check"] = {"round_trip": "bit-exact" if torch.equal(ref, got) else "not bit-exact",
                              "max_abs_diff_vs_model": float((ref - got).abs().max())}
            if not torch.equal(ref, got):
                raise AssertionError(f"compact export of the block-circulant model is not bit-exact: max abs diff "
                                     f"{extra['check']['max_abs_diff_vs_model']:.3g}")
        return
    if fmt == "sparse":
        raise ValueError("format 'sparse' stores masked weights; a block-circulant model has none (use 'compact', "
                         "which stores only its defining vectors, or 'onnx')")
    # the FFT form in every layer (whatever product form each computes with here: impl="auto" takes the dense
    # form in small layers): needs FFT operators in the ONNX exporter (ONNX DFT, opset 17+) and in onnxruntime
    previous = set_circulant_impl(model, "fft")
    try:
        export_onnx(model, out, input_size)
        error = check_onnx(model, out, x) if check else None
        extra["onnx"] = {"model": "circulant-fft"}
        if check:
            extra["check"] = {"max_abs_diff_onnxruntime_vs_torch": error}
        return
    except Exception as err:  # noqa: BLE001 - any exporter or runtime failure selects the dense form
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    finally:
        for name, impl in previous.items():
            model.get_submodule(name).impl = impl
    dense = densify_circulant(model)
    export_onnx(dense, out, input_size)
    extra["onnx"] = {"model": "circulant-dense", "fft_form_refused": reason}
    if check:
        extra["check"] = {"max_abs_diff_onnxruntime_vs_torch": check_onnx(model, out, x)}


def _masked(state: dict, key: str) -> torch.Tensor:
    """The state entry as the masked model computes with it (pruned weights as exact zeros)."""
    t = state[key].cpu()
    mask_key = key[: -len("weight")] + "mask" if key.endswith("weight") else None
    if mask_key is not None and mask_key in state:
        return torch.where(state[mask_key].cpu(), t, torch.zeros_like(t))
    return t
