"""Float32 computed as IEEE float32, also on GPUs that default to TF32.

On Ampere and later NVIDIA GPUs, PyTorch lets cuDNN run float32 convolutions and RNNs in TF32 by
default (a 10-bit mantissa: relative errors near 1e-3; ``torch.backends.cudnn.allow_tf32``). A
plain-PyTorch reference computed that way is far coarser than the float32 tolerances dnr's ops are
held to, so every comparison against such a reference (the test suite, each benchmark's
correctness check) runs inside :func:`ieee_float32`. Training and timing keep the user's settings.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["ieee_float32"]


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """TF32 off for cuDNN and for CUDA matmuls inside the block; both flags restored after it (also on an
    exception). No effect on the CPU, which never computes float32 in TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
