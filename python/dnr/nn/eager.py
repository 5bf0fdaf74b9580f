"""When a layer may take one of dnr's compiled CPU kernels instead of torch's op.

The kernels are custom ops: graphs that ``torch.compile``, ``torch.export``, ``torch.jit`` tracing or
scripting and ``torch.fx`` build should hold torch's own op (exporters and compilers know it; the custom
op has no vmap rule for ``torch.func`` transforms). So a layer's fast path is for plain eager tensors
only, and this is the one place that says what that means.
"""

from __future__ import annotations

import torch

__all__ = ["is_plain_eager_tensor"]


def is_plain_eager_tensor(x) -> bool:
    """True for a ``torch.Tensor`` (not a subclass or an fx Proxy) seen in eager mode: not while scripting,
    tracing or compiling, and not wrapped by a ``torch.func`` transform."""
    if type(x) is not torch.Tensor or torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    return not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(x)
