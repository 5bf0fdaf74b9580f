"""Loading of the compiled extension ``dnr._C`` and what it provides.

Importing ``dnr._C`` runs its static registrations: the schemas of the ``dnr::*``
operators (``csrc/dnr.cpp``) and the CPU/CUDA kernels it was built with. The
extension is optional: without it (pure-Python install, ``DNR_DISABLE_EXT=1``, or
an import error such as a torch ABI mismatch) every op runs its PyTorch reference.

The CUDA kernels run only on GPUs that the binary has machine code (or PTX) for:
:func:`cuda_kernels_run_on` checks a GPU against the architecture list recorded at
build time, the first time a CUDA tensor reaches an op (not at import, which would
initialise CUDA in every process that imports dnr), and logs one warning when the
reference has to run instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys

import torch

__all__ = ["loaded", "reason", "has_kernel", "DISABLE_ENV", "cuda_arch_list", "has_kernel_image", "cuda_kernels_run_on"]

log = logging.getLogger("dnr.ops")

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


def cuda_arch_list() -> str | None:
    """The TORCH_CUDA_ARCH_LIST the loaded binary's CUDA kernels were compiled for
    ("" for a CPU-only build), or None when unknown (not loaded, or built before the
    list was recorded)."""
    if not loaded():
        return None
    return getattr(sys.modules["dnr._C"], "cuda_arch_list", None)


_ARCH = re.compile(r"(\d+)\.(\d+)([af]?)(\+PTX)?", re.IGNORECASE)


def has_kernel_image(capability: tuple[int, int], arch_list: str) -> bool:
    """Whether a binary built for ``arch_list`` (TORCH_CUDA_ARCH_LIST syntax, e.g.
    "8.0;9.0;10.0+PTX") can launch its kernels on a GPU of compute ``capability``
    (major, minor). Machine code for X.Y runs on X.Z with Z >= Y ("X.Ya" only on X.Y,
    "X.Yf" on the X family from Y); "+PTX" adds PTX that the driver compiles for any
    GPU of capability >= X.Y. An entry in another form (a named architecture such as
    "Hopper") cannot be judged: the answer is then True, as before this check existed.
    """
    major, minor = capability
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        match = _ARCH.fullmatch(entry)
        if match is None:
            return True
        arch = (int(match.group(1)), int(match.group(2)))
        suffix, ptx = match.group(3).lower(), match.group(4) is not None
        if suffix == "a":  # architecture-specific: exactly this GPU, machine code or PTX
            if (major, minor) == arch:
                return True
            continue
        if major == arch[0] and minor >= arch[1]:  # machine code of this generation
            return True
        if ptx and not suffix and (major, minor) >= arch:  # PTX of an older GPU, JIT-compiled
            return True
    return False


_RUNS_ON: dict[int, bool] = {}
_WARNED = False


@torch.compiler.assume_constant_result  # traced code asks once, at trace time
def cuda_kernels_run_on(index: int) -> bool:
    """Whether the CUDA kernels can run on GPU ``index``: False (and one logged
    warning per process) when the binary has no image for its architecture, so that
    the ops run their PyTorch reference there instead of failing with "no kernel
    image is available". Asked once per GPU (CUDA is initialised: a tensor lives there)."""
    if index not in _RUNS_ON:
        arch_list = cuda_arch_list()
        capability = torch.cuda.get_device_capability(index)
        _RUNS_ON[index] = arch_list is None or has_kernel_image(capability, arch_list)
        if not _RUNS_ON[index]:
            warn_no_kernel_image(torch.cuda.get_device_name(index), capability, arch_list)
    return _RUNS_ON[index]


def warn_no_kernel_image(gpu: str, capability: tuple[int, int], arch_list: str) -> None:
    """Log, once per process, that the CUDA kernels cannot run on ``gpu``."""
    global _WARNED
    if _WARNED:
        return
    _WARNED = True
    major, minor = capability
    log.warning(
        "dnr: the CUDA kernels were built for TORCH_CUDA_ARCH_LIST=%r, which has no kernel image for %s "
        "(compute capability %d.%d); dnr.ops runs the PyTorch reference on it. Rebuild with "
        "TORCH_CUDA_ARCH_LIST=\"%d.%d\" (or add it to the list) to use the kernels.",
        arch_list, gpu, major, minor, major, minor,
    )
