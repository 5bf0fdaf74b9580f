"""Lazy imports of the optional export dependencies, with an install hint when missing."""

from __future__ import annotations

import importlib

__all__ = ["require"]

_PIP = {"safetensors": "safetensors", "onnx": "onnx", "onnxruntime": "onnxruntime"}


def require(module: str, what: str):
    """Import ``module`` or raise ImportError saying which feature needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pip_name = _PIP.get(module.split(".")[0], module.split(".")[0])
        raise ImportError(
            f"{what} needs the optional package {pip_name!r}: pip install {pip_name} "
            f"(or pip install 'dnr[export]')"
        ) from err
