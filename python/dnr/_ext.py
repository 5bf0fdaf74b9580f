"""Loading of the compiled extension ``dnr._C`` and what it provides.

Importing ``dnr._C`` runs its static registrations: the schemas of the ``dnr::*``
operators (``csrc/dnr.cpp``) and the CPU/CUDA kernels it was built with. The
extension is optional: without it (pure-Python install, ``DNR_DISABLE_EXT=1``, or
an import error such as a torch ABI mismatch) every op runs its PyTorch reference.
"""

from __future__ import annotations

import importlib
import os

import torch

__all__ = ["loaded", "reason", "has_kernel", "DISABLE_ENV"]

DISABLE_ENV = "DNR_DISABLE_EXT"

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _load() -> str | None:
    """Import dnr._C; return None on success, else why it is not loaded."""
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    try:
        importlib.import_module("dnr._C")
    except ImportError as error:  # not built, or built against another torch
        return f"import of dnr._C failed: {error}"
    except OSError as error:  # a shared library it needs is missing
        return f"loading dnr._C failed: {error}"
    return None


_REASON = _load()


def loaded() -> bool:
    """True when the extension's operators are registered."""
    return _REASON is None


def reason() -> str | None:
    """Why the extension is not loaded, or None when it is."""
    return _REASON


def has_kernel(op_name: str, device_type: str) -> bool:
    """True when the extension registered a kernel of ``dnr::<op_name>`` for
    ``device_type`` ("cpu" or "cuda"); always False when it is not loaded."""
    key = _DISPATCH_KEYS.get(device_type.lower())
    if key is None:
        raise ValueError(f"device_type must be one of {sorted(_DISPATCH_KEYS)}, got {device_type!r}")
    if not loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dnr::{op_name}", key)
