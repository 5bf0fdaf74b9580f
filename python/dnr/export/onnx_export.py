"""ONNX export of masked or compacted models, checked against onnxruntime.

Masked layers are first replaced by plain ``nn.Conv2d``/``nn.Linear`` holding ``weight * mask``
(:func:`dense_copy`), so the ONNX graph uses standard operators only. Needs ``pip install onnx
onnxruntime``; uses the TorchScript-based exporter (``dynamo=False``), which needs no onnxscript.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Sequence

import torch
from torch import nn

from ..nn.masked import MaskedLayer
from ..nn.plain import plain_layer
from .._files import atomic_path
from ._optional import require

__all__ = ["dense_copy", "export_onnx", "run_onnx", "check_onnx", "OnnxMismatchError"]


class OnnxMismatchError(AssertionError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance."""


@torch.no_grad()
def dense_copy(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` with every masked layer replaced by a plain layer holding ``weight * mask``.

    Same function (bit for bit in float32: pruned weights are exact zeros), no dnr operator inside.
    """
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if not isinstance(m, MaskedLayer):
            continue
        out.set_submodule(name, plain_layer(m, m.weight * m.mask))
    return out


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int], *, opset: int = 17,
                dynamic_batch: bool = True) -> str:
    """Export ``model`` (eval mode, on CPU, float32) to ONNX.

    Args:
        model: a masked, compacted or plain model; masked layers are exported as dense layers.
        path: output ``.onnx`` file.
        input_size: one example's shape without the batch dim, e.g. (3, 32, 32).
        opset: ONNX opset version.
        dynamic_batch: make the batch dimension symbolic.

    Returns:
        the path written. Input name "input" [B, *input_size], output name "output".
    """
    require("onnx", "export_onnx")
    net = dense_copy(model).cpu().float().eval()
    example = torch.zeros((1, *[int(s) for s in input_size]))
    path = os.fspath(path)
    onnx = require("onnx", "export_onnx")
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(net, (example,), tmp, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None)
        onnx.checker.check_model(onnx.load(tmp))
    return path


def run_onnx(path: str | os.PathLike, x: torch.Tensor) -> torch.Tensor:
    """Run an exported model with onnxruntime on the CPU: x [B, *input_size] -> output tensor."""
    ort = require("onnxruntime", "run_onnx")
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().float().numpy()})
    return torch.from_numpy(out)


@torch.no_grad()
def check_onnx(model: nn.Module, path: str | os.PathLike, x: torch.Tensor, *, rtol: float = 1e-4,
               atol: float = 1e-5) -> float:
    """Compare onnxruntime's output on ``x`` with ``model``'s (eval, CPU, float32); return the max abs diff.

    Raises:
        OnnxMismatchError: when the outputs differ beyond ``atol + rtol * |expected|``.
    """
    expected = dense_copy(model).cpu().float().eval()(x.cpu().float())
    got = run_onnx(path, x)
    if got.shape != expected.shape:
        raise OnnxMismatchError(f"onnxruntime output shape {tuple(got.shape)} != PyTorch {tuple(expected.shape)}")
    diff = (got - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bool(bad.any()):
        raise OnnxMismatchError(f"onnxruntime differs from PyTorch at {int(bad.sum())} of {bad.numel()} outputs "
                                f"(max abs diff {float(diff.max()):.3g}, atol={atol}, rtol={rtol})")
    return float(diff.max()) if diff.numel() else 0.0
