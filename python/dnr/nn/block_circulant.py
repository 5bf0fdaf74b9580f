"""Block-circulant layers (CirCNN, Ding et al., MICRO 2017) with FFT products.

A weight matrix W [m, n] is split into ``p x q`` blocks of size ``k x k`` (``p = ceil(m / k)``,
``q = ceil(n / k)``; sizes that are not multiples of ``k`` are zero-padded). Each block is circulant and
is stored as ONE vector of length ``k``, so a layer holds ``p * q * k`` numbers instead of ``m * n``.

Circulant convention (the one every function here uses, and ``dense_weight()`` builds)::

    block (i, j) of W:   C_ij[r, c] = vectors[i, j, (r - c) mod k]      r, c in [0, k)

i.e. the first COLUMN of each block is its defining vector, and each block is constant along its wrapped
diagonals. Then ``C_ij @ x_j`` is the circular convolution ``w_ij (*) x_j``, so

    y_i = sum_j irfft(rfft(w_ij) * rfft(x_j)) = irfft(sum_j rfft(w_ij) * rfft(x_j))

and the frequency-domain product is summed over the input blocks ``j`` before ONE inverse FFT per output
block (:func:`block_circulant_matmul`). Its backward is a custom autograd function (FFT-domain products too)
that saves only the input and the vectors instead of their spectra: beyond the parameters it keeps the input
(1.0x its bytes) where autograd of the plain ops kept 3.25x (4096 wide, k = 16, batch 256;
``benchmarks/bench_circulant.py`` records ``saved_bytes_fft``). The conv's backward is autograd's.

Convolutions (:class:`BlockCirculantConv2d`): at every kernel tap ``(u, v)`` the ``C_out x C_in`` matrix
``W[:, :, u, v]`` is block-circulant over channel blocks, with vectors ``[p, q, k, kh, kw]``. The FFT form
is an rfft over each channel block of the input, one complex convolution per frequency (a grouped conv
with ``k // 2 + 1`` groups, computed as a real conv of the stacked real and imaginary parts), and an irfft
over the output channel blocks.

Two exact product forms (``impl``): the FFT form above, and the dense form, which builds the dense matrix (or
kernel) from the vectors by indexing and calls ``F.linear`` / ``F.conv2d`` (gradients reach the vectors through
the indexing). Both compute the same function (equal to float rounding) from the same stored vectors; only the
speed differs. ``impl="auto"`` (the default) takes the FFT form only where it was measured faster: convolutions
with at least 128 input and output channels and linear layers with at least 1,024 input and output features, at
k >= 8 (linear layers 4,096 wide from k = 4; :func:`fft_form_pays`); small layers, where the FFTs, transposes and per-frequency products cost more than
the dense product they replace, take the dense form (1.1-15x faster there, forward+backward on a CPU). On CUDA
the rule is the GPU's: the FFT form only in linear layers at least 4,096 wide (every convolution measured on an
H200 was faster in the dense form).

In eval mode, while no gradient flows to the vectors (inference, attacks on a frozen model), a layer keeps
its prepared weight (spectrum or dense matrix) between forward passes (``BlockCirculantLayer.prepare``).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .masked import MaskedLayer
from .plain import plain_layer
from .sparsify import ExcludeSpec, exclusion_predicate

__all__ = ["BlockCirculantLinear", "BlockCirculantConv2d", "BlockCirculantLayer", "block_circulant_matmul",
           "block_circulant_conv2d", "block_circulant_dense", "circulant", "circulant_layers", "circulant_report",
           "check_block_size", "blocks", "fft_flops", "project_to_vectors", "entries_per_vector",
           "average_circulant_gradients", "CIRCULANT_GRADIENTS", "densify_circulant", "linear_spectrum",
           "conv_spectrum", "IMPLS", "check_impl", "fft_form_pays", "set_circulant_impl"]

IMPLS = ("auto", "fft", "dense")

# ---------------------------------------------------------------------------------------- checks and shapes
def check_block_size(block_size, *, in_size: int | None = None, out_size: int | None = None,
                     subject: str = "block_size") -> int:
    """``block_size`` as an int >= 1, or a ValueError/TypeError naming ``subject``, the value and the rule.

    With ``in_size`` / ``out_size`` (a layer's input / output features or channels) the block may not be
    larger than the layer: ``block_size <= max(in_size, out_size)`` (a larger block would only pad zeros).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{subject} must be an int >= 1, got {block_size!r} ({type(block_size).__name__})")
    if block_size < 1:
        raise ValueError(f"{subject} must be an int >= 1, got {block_size}")
    if in_size is not None and out_size is not None and block_size > max(in_size, out_size):
        raise ValueError(f"{subject}={block_size} is larger than the layer ({out_size} outputs x {in_size} inputs): "
                         f"expected at most max(out, in) = {max(in_size, out_size)}")
    return block_size


def check_impl(impl, *, subject: str = "impl") -> str:
    """``impl`` if it is one of :data:`IMPLS` ("auto", "fft", "dense"), else a ValueError naming it."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"{subject} must be one of 'auto', 'fft', 'dense', got {impl!r}")
    return impl


def fft_form_pays(kind: str, out_size: int, in_size: int, block_size: int, device_type: str = "cpu") -> bool:
    """``impl="auto"``'s rule: True where the FFT form is the faster product, False where the dense form is.

    Measured forward+backward with ``benchmarks/bench_circulant_forms.py`` (the tables in
    ``benchmarks/README.md``). On a CPU (one thread, batch 16-128): the FFT form wins from k = 8 in
    convolutions with at least 128 input and output channels (VGG16's 128-512-channel layers: 1.1-3.8x faster
    at k = 8-16) and in linear layers with at least 1,024 input and output features (2-6.5x at k = 8-16), and
    from k = 4 in linear layers with at least 4,096 (1.4x); elsewhere the dense form is faster (the small CNN's
    and the LSTM preset's layers 1.1-15x: the FFTs, the complex transposes and the per-frequency products cost
    more than the small dense product they replace). On CUDA (an H200, batch 128): the dense form wins in every
    convolution measured (VGG16's at k = 8-16 by 1.8-2.2x; cuDNN's convolution is fast and the FFT form's
    many small kernels are not) and in 1,024-wide linear layers; the FFT form only in linear layers at least
    4,096 wide (2-3x at k = 2-16). ``kind`` is "conv" or "linear"; ``device_type`` that of the layer's
    tensors ("cuda" takes the GPU rule, anything else the CPU's).
    """
    if kind not in ("conv", "linear"):
        raise ValueError(f"kind must be 'conv' or 'linear', got {kind!r}")
    narrow = min(out_size, in_size)
    if device_type == "cuda":
        return kind == "linear" and block_size >= 2 and narrow >= 4096
    if kind == "conv":
        return block_size >= 8 and narrow >= 128
    return (block_size >= 8 and narrow >= 1024) or (block_size >= 4 and narrow >= 4096)


def blocks(size: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` covering ``size`` (the last one zero-padded): ceil(size / k)."""
    return -(-size // block_size)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # torch.fft has no bfloat16/float16 kernels on every device: low precision (autocast) is computed in float32
    dtype = torch.result_type(*tensors) if len(tensors) > 1 else tensors[0].dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ---------------------------------------------------------------------------------------- the products
def linear_spectrum(vectors: torch.Tensor) -> torch.Tensor:
    """The weight's spectrum in the layout of :func:`block_circulant_matmul`'s product.

    Shapes: vectors [p, q, k] (real) -> [k // 2 + 1, q, p] (complex, contiguous).
    """
    return torch.fft.rfft(vectors, dim=-1).permute(2, 1, 0).contiguous()


def block_circulant_matmul(x: torch.Tensor, vectors: torch.Tensor, out_features: int | None = None, *,
                           spectrum: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` for the block-circulant ``W`` defined by ``vectors``, through rfft / irfft.

    Shapes:
        x: [*, n] with ``n <= q * k`` (zero-padded to ``q * k``);
        vectors: [p, q, k], block (i, j) is ``C[r, c] = vectors[i, j, (r - c) mod k]`` (module docstring);
        spectrum: optional ``linear_spectrum(vectors)`` [k // 2 + 1, q, p], computed once and reused while the
            vectors do not change (e.g. over the steps of an attack); must be in the computation's dtype;
        returns: [*, out_features] (default ``p * k``), ``out_features <= p * k``.

    Float32 / float64 are computed in their own precision; other dtypes in float32 (result cast back).
    Differentiable in ``x`` and ``vectors`` (E-RNN's block-circulant LSTM/GRU gates reuse it).
    """
    if vectors.dim() != 3:
        raise ValueError(f"vectors must have shape [p, q, k], got {tuple(vectors.shape)}")
    p, q, k = vectors.shape
    n = x.shape[-1]
    out_features = p * k if out_features is None else out_features
    if n > q * k:
        raise ValueError(f"x has {n} features, more than the q * k = {q} * {k} = {q * k} columns of the vectors")
    if not 0 < out_features <= p * k:
        raise ValueError(f"out_features must be in [1, p * k = {p * k}], got {out_features}")
    dtype = _compute_dtype(x, vectors)
    lead = x.shape[:-1]
    xs = x.to(dtype).reshape(-1, n)
    if n < q * k:
        xs = F.pad(xs, (0, q * k - n))
    y = _CirculantMatmul.apply(xs, vectors.to(dtype), spectrum)                        # [N, p * k]
    y = y[:, :out_features]
    return y.reshape(*lead, out_features).to(x.dtype if x.is_floating_point() else dtype)


def _frequency_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per frequency f: [N, q, f] x [f, q, p] -> [N, p, f] (complex), the sum over the q input blocks."""
    return torch.bmm(a.permute(2, 0, 1), b).permute(1, 2, 0)


class _CirculantMatmul(torch.autograd.Function):
    """``xs [N, q*k] -> [N, p*k]`` for vectors [p, q, k]. Saves only ``xs`` and the vectors for backward (which
    the caller holds anyway) instead of their spectra, and recomputes the two rffts in backward: autograd of the
    plain ops kept 3.25x the input's bytes beyond the parameters (``benchmarks/bench_circulant.py``,
    ``saved_bytes_fft``).
    The backward uses differentiable ops, so double backward works.

    Backward, with ``X = rfft(x)``, ``W = rfft(w)``, ``G = rfft(grad_y)`` (real signals):
    ``grad_x = irfft(conj(W) G)`` (the transpose of a circulant block is circulant with the reversed vector) and
    ``grad_w = irfft(sum_n G conj(X))`` (a circular cross-correlation).
    """

    @staticmethod
    def forward(ctx, xs, vectors, spectrum):
        p, q, k = vectors.shape
        weight = linear_spectrum(vectors) if spectrum is None else spectrum            # [f, q, p]
        x_spectrum = torch.fft.rfft(xs.reshape(-1, q, k), dim=-1)                     # [N, q, f]
        y = torch.fft.irfft(_frequency_product(x_spectrum, weight), n=k, dim=-1)      # [N, p, k]
        ctx.save_for_backward(xs, vectors)
        return y.reshape(-1, p * k)

    @staticmethod
    def backward(ctx, grad_y):
        xs, vectors = ctx.saved_tensors
        p, q, k = vectors.shape
        g = torch.fft.rfft(grad_y.reshape(-1, p, k), dim=-1)                           # [N, p, f]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            weight = torch.fft.rfft(vectors, dim=-1).conj().permute(2, 0, 1)          # [f, p, q]
            grad_x = torch.fft.irfft(_frequency_product(g, weight), n=k, dim=-1).reshape(-1, q * k)
        if ctx.needs_input_grad[1]:
            x_spectrum = torch.fft.rfft(xs.reshape(-1, q, k), dim=-1)                 # [N, q, f]
            # sum over the batch per frequency: [f, p, N] @ [f, N, q] -> [f, p, q]
            corr = torch.bmm(g.permute(2, 1, 0), x_spectrum.conj().permute(2, 0, 1))
            grad_w = torch.fft.irfft(corr.permute(1, 2, 0), n=k, dim=-1)             # [p, q, k]
        return grad_x, grad_w, None


def conv_spectrum(vectors: torch.Tensor) -> torch.Tensor:
    """The weight's spectrum as the real grouped-conv kernel of :func:`block_circulant_conv2d`.

    Shapes: vectors [p, q, k, kh, kw] -> [(k // 2 + 1) * 2p, 2q, kh, kw] (real): per frequency the block
    ``[[Re W, -Im W], [Im W, Re W]]`` that maps ``[Re X; Im X]`` to ``[Re WX; Im WX]`` (a real convolution of
    the stacked parts is 4-6x faster on CPU than torch's complex convolution, measured).
    """
    p, q, k, kh, kw = vectors.shape
    w = torch.fft.rfft(vectors, dim=2).permute(2, 0, 1, 3, 4)                          # [f, p, q, kh, kw]
    real, imag = w.real, w.imag
    block = torch.cat([torch.cat([real, -imag], dim=2), torch.cat([imag, real], dim=2)], dim=1)  # [f, 2p, 2q, ...]
    return block.reshape(-1, 2 * q, kh, kw)


def block_circulant_conv2d(x: torch.Tensor, vectors: torch.Tensor, out_channels: int | None = None, *, stride=1,
                           padding=0, dilation=1, spectrum: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, W)`` for the kernel ``W`` that is block-circulant over channels at every tap.

    Shapes:
        x: [B, C_in, H, W] with ``C_in <= q * k`` (zero-padded channels);
        vectors: [p, q, k, kh, kw]; at tap (u, v) block (i, j) is
            ``W[i*k + r, j*k + c, u, v] = vectors[i, j, (r - c) mod k, u, v]``;
        spectrum: optional ``conv_spectrum(vectors)`` (reused while the vectors do not change);
        returns: [B, out_channels, H', W'] (default ``out_channels = p * k``), H', W' as ``F.conv2d``.
    """
    if vectors.dim() != 5:
        raise ValueError(f"vectors must have shape [p, q, k, kh, kw], got {tuple(vectors.shape)}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, C_in, H, W], got {tuple(x.shape)}")
    p, q, k, kh, kw = vectors.shape
    c_in = x.shape[1]
    out_channels = p * k if out_channels is None else out_channels
    if c_in > q * k:
        raise ValueError(f"x has {c_in} channels, more than the q * k = {q} * {k} = {q * k} of the vectors")
    dtype = _compute_dtype(x, vectors)
    xs = x.to(dtype)
    if c_in < q * k:
        xs = F.pad(xs, (0, 0, 0, 0, 0, q * k - c_in))
    b, _, h, w = xs.shape
    f = k // 2 + 1
    weight = conv_spectrum(vectors.to(dtype)) if spectrum is None else spectrum        # [f*2p, 2q, kh, kw]
    x_spectrum = torch.fft.rfft(xs.reshape(b, q, k, h, w), dim=2).transpose(1, 2)     # [B, f, q, H, W]
    stacked = torch.cat([x_spectrum.real, x_spectrum.imag], dim=2).reshape(b, f * 2 * q, h, w)
    with torch.autocast(x.device.type, enabled=False):  # the spectra stay in `dtype` (bf16 autocast would cast)
        out = F.conv2d(stacked, weight, stride=stride, padding=padding, dilation=dilation, groups=f)  # [B, f*2p, ...]
    ho, wo = out.shape[-2:]
    out = out.reshape(b, f, 2, p, ho, wo)
    y = torch.fft.irfft(torch.complex(out[:, :, 0], out[:, :, 1]), n=k, dim=1)       # [B, k, p, H', W']
    y = y.transpose(1, 2).reshape(b, p * k, ho, wo)[:, :out_channels]
    return y.to(x.dtype if x.is_floating_point() else dtype)


def block_circulant_dense(vectors: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """The explicit dense matrix (or kernel) of ``vectors``, built by indexing (no FFT).

    Shapes: vectors [p, q, k, *taps] -> [out_size, in_size, *taps], with
    ``W[i*k + r, j*k + c, ...] = vectors[i, j, (r - c) mod k, ...]`` cropped to the layer's size.
    """
    p, q, k = vectors.shape[:3]
    taps = vectors.shape[3:]
    r = torch.arange(k, device=vectors.device)
    index = (r[:, None] - r[None, :]) % k                                     # [k (r), k (c)]
    full = vectors[:, :, index]                                               # [p, q, k, k, *taps]
    full = full.transpose(1, 2).reshape(p * k, q * k, *taps)                  # [p*k, q*k, *taps]
    return full[:out_size, :in_size]


def fft_flops(out_size: int, in_size: int, block_size: int, positions: int = 1, taps: int = 1) -> int:
    """Estimated real floating-point operations of one FFT-form product per example (a documented model, not a
    measurement): ``2.5 k log2 k`` per real FFT of length ``k`` (q forward, p inverse) at every output
    ``position`` (conv: output pixels; one input FFT per output pixel under-counts stride 1 padding and
    over-counts strided convs), plus 8 flops per complex multiply-add of the ``p * q * (k // 2 + 1) * taps``
    frequency products. The weight's FFT is not counted (fixed at inference)."""
    k = block_size
    p, q = blocks(out_size, k), blocks(in_size, k)
    fft = 2.5 * k * math.log2(k) if k > 1 else 0.0
    return int(round(positions * ((p + q) * fft + 8 * p * q * (k // 2 + 1) * taps)))


# ---------------------------------------------------------------------------------------- the layers
class BlockCirculantLayer:
    """Mixin of the block-circulant layers: the defining ``vectors``, their counts and the product form.

    ``impl`` ("auto", "fft" or "dense"; module docstring) may be changed at any time: it is a choice of
    computation, not state (checkpoints do not hold it)."""

    vectors: nn.Parameter
    block_size: int
    impl: str = "auto"
    kind: str = ""

    def load_dense(self, layer: nn.Module):
        """Set the vectors to the Euclidean projection of ``layer.weight`` (each block averaged along its
        wrapped diagonals) and copy its bias; the vectors require a gradient when the weight did. Returns self."""
        with torch.no_grad():
            self.vectors.copy_(project_to_vectors(layer.weight, self.block_size))
            if layer.bias is not None:
                self.bias.copy_(layer.bias)
        self.vectors.requires_grad_(layer.weight.requires_grad)
        return self

    def entries_per_vector(self, like: torch.Tensor) -> torch.Tensor:
        """[p, q, k]: the dense-weight entries each vector entry stands for (:func:`entries_per_vector`), on
        ``like``'s device and dtype (cached: the sizes never change)."""
        cached = getattr(self, "_entries_per_vector", None)
        if cached is None or cached.device != like.device or cached.dtype != like.dtype:
            shape = self.dense_weight_shape
            cached = entries_per_vector(shape[0], shape[1], self.block_size, device=like.device, dtype=like.dtype)
            self._entries_per_vector = cached
        return cached

    @property
    def num_stored(self) -> int:
        """Stored weight numbers: ``ceil(m / k) * ceil(n / k) * k`` (times the kernel taps of a conv)."""
        return self.vectors.numel()

    @property
    def num_dense(self) -> int:
        """Weights of the equivalent dense layer (``m * n``, times the kernel taps of a conv)."""
        return self.dense_weight_shape[0] * self.dense_weight_shape[1] * math.prod(self.dense_weight_shape[2:])

    @property
    def compression(self) -> float:
        """Dense weights over stored weights (= k when both sizes are multiples of k)."""
        return self.num_dense / self.num_stored

    def product_form(self) -> str:
        """The product this layer computes with: "fft" or "dense" (``impl``, with "auto" resolved by
        :func:`fft_form_pays` from the layer's size, block size and device)."""
        if self.impl != "auto":
            return self.impl
        shape = self.dense_weight_shape
        pays = fft_form_pays(self.kind, shape[0], shape[1], self.block_size, self.vectors.device.type)
        return "fft" if pays else "dense"

    def prepare(self, like: torch.Tensor) -> tuple[str, torch.Tensor]:
        """The weight in the form of this layer's product, for inputs like ``like`` (its dtype decides the
        computation's: float32 / float64 as given, other dtypes float32): ("fft", the spectrum of
        :func:`linear_spectrum` / :func:`conv_spectrum`) or ("dense", the dense matrix / kernel).

        Pass it as ``layer(x, prepared=...)`` to apply the layer several times with one weight transform (a
        recurrent cell's hidden projection over the time steps). Differentiable in the vectors. Cached in eval
        mode while no gradient flows to the vectors (inference, and the steps of an attack on a frozen model:
        one weight transform instead of one per forward pass); computed afresh otherwise (training). The cache
        is keyed by the vectors' version counter, so an optimizer step, ``load_state_dict`` or any in-place op
        renews it; a write through ``vectors.data`` is not seen: call ``train()``/``eval()``, which drop it."""
        form = self.product_form()
        dtype = _compute_dtype(like, self.vectors) if form == "fft" else self._dense_dtype(like)
        v = self.vectors
        exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
        if self.training or (torch.is_grad_enabled() and v.requires_grad) or torch.compiler.is_compiling() \
                or exporting:
            return form, self._make_weight(form, v.to(dtype))
        key = (v._version, v.data_ptr(), v.device, dtype, form)
        cache = self.__dict__.get("_weight_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, self._make_weight(form, v.detach().to(dtype)))
            self.__dict__["_weight_cache"] = cache
        return form, cache[1]

    @staticmethod
    def _dense_dtype(like: torch.Tensor) -> torch.dtype:
        # the dense form computes like nn.Linear / nn.Conv2d: in the input's dtype (autocast then applies)
        return like.dtype if like.is_floating_point() else torch.get_default_dtype()

    def _make_weight(self, form: str, vectors: torch.Tensor) -> torch.Tensor:
        if form == "fft" and self.kind == "linear":
            # forward only: _CirculantMatmul's backward reaches the vectors directly (its own saved input)
            with torch.no_grad():
                return linear_spectrum(vectors)
        if form == "fft":
            return conv_spectrum(vectors)  # differentiable: the conv's backward is autograd's
        shape = self.dense_weight_shape
        return block_circulant_dense(vectors, shape[0], shape[1])

    def train(self, mode: bool = True):
        self.__dict__.pop("_weight_cache", None)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(), .double(), .cuda(): new tensors, drop the cache
        self.__dict__.pop("_weight_cache", None)
        return super()._apply(fn, *args, **kwargs)

    def _init_vectors(self, fan_in: int, shape: tuple, device, dtype) -> None:
        # the default init of nn.Linear / nn.Conv2d (kaiming_uniform with a=sqrt(5): U(-1/sqrt(fan_in), ...)):
        # every dense entry is one of the vector entries, so the dense-equivalent layer has that distribution
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        self.vectors = nn.Parameter(torch.empty(shape, device=device, dtype=dtype).uniform_(-bound, bound))


class BlockCirculantLinear(BlockCirculantLayer, nn.Module):
    """A linear layer whose weight [out_features, in_features] is block-circulant with blocks of ``block_size``.

    Shapes: input [*, in_features] -> output [*, out_features]. Parameters: ``vectors`` [p, q, k]
    (``p = ceil(out_features / k)``, ``q = ceil(in_features / k)``) and ``bias`` [out_features].
    Block (i, j) of the weight is ``C[r, c] = vectors[i, j, (r - c) mod k]`` (see the module docstring);
    ``dense_weight()`` returns that matrix.

    Args:
        in_features, out_features: as ``nn.Linear``.
        block_size: k, an int in [1, max(in_features, out_features)].
        bias: learn an additive bias.
        impl: the product form, "auto" (default: :func:`fft_form_pays`), "fft" or "dense" (module docstring).
    """

    kind = "linear"

    def __init__(self, in_features: int, out_features: int, block_size: int, bias: bool = True, *,
                 impl: str = "auto", device=None, dtype=None):
        super().__init__()
        self.impl = check_impl(impl)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockCirculantLinear: {name} must be an int >= 1, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size = check_block_size(block_size, in_size=in_features, out_size=out_features)
        k = self.block_size
        self._init_vectors(in_features, (blocks(out_features, k), blocks(in_features, k), k), device, dtype)
        self.bias = None
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))

    @property
    def dense_weight_shape(self) -> tuple:
        return (self.out_features, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight [out_features, in_features] (differentiable in ``vectors``)."""
        return block_circulant_dense(self.vectors, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, prepared: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x [*, in_features] -> [*, out_features]; ``prepared``: an optional ``self.prepare(x)``."""
        form, weight = self.prepare(x) if prepared is None else prepared
        if form == "fft":
            y = block_circulant_matmul(x, self.vectors, self.out_features, spectrum=weight)
        else:
            y = F.linear(x.to(weight.dtype), weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @classmethod
    def from_dense(cls, layer: nn.Linear, block_size: int, *, impl: str = "auto") -> "BlockCirculantLinear":
        """A block-circulant layer of ``layer``'s size, device and dtype; its bias is copied and its vectors are
        the Euclidean projection of ``layer.weight`` (each block averaged along its wrapped diagonals)."""
        w = layer.weight
        new = cls(layer.in_features, layer.out_features, block_size, bias=layer.bias is not None, impl=impl,
                  device=w.device, dtype=w.dtype)
        return new.load_dense(layer)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"bias={self.bias is not None}, impl={self.impl!r} ({self.product_form()})")


class BlockCirculantConv2d(BlockCirculantLayer, nn.Module):
    """A 2-d convolution whose kernel is block-circulant over channel blocks at every kernel tap.

    Shapes: input [B, in_channels, H, W] -> output [B, out_channels, H', W'] (H', W' as ``nn.Conv2d``).
    Parameters: ``vectors`` [p, q, k, kh, kw] (``p = ceil(out_channels / k)``, ``q = ceil(in_channels / k)``)
    and ``bias`` [out_channels]. ``dense_weight()`` [out_channels, in_channels, kh, kw] has
    ``W[i*k + r, j*k + c, u, v] = vectors[i, j, (r - c) mod k, u, v]``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as ``nn.Conv2d`` (zero
            padding only; padding may be an int, a pair or "same"/"valid").
        block_size: k, an int in [1, max(in_channels, out_channels)].
        groups: only 1 (grouped block-circulant convolutions are not implemented: a clear error).
        impl: the product form, "auto" (default: :func:`fft_form_pays`), "fft" or "dense" (module docstring).
    """

    kind = "conv"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, block_size: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, *, groups: int = 1, impl: str = "auto", device=None, dtype=None):
        super().__init__()
        self.impl = check_impl(impl)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockCirculantConv2d: {name} must be an int >= 1, got {value!r}")
        if groups != 1:
            raise ValueError(f"BlockCirculantConv2d: groups must be 1, got {groups} (grouped block-circulant "
                             "convolutions are not implemented; leave the layer dense with exclude=)")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = nn.modules.utils._pair(kernel_size)
        self.stride = nn.modules.utils._pair(stride)
        self.dilation = nn.modules.utils._pair(dilation)
        self.padding = padding if isinstance(padding, str) else nn.modules.utils._pair(padding)
        self.groups = 1
        self.block_size = check_block_size(block_size, in_size=in_channels, out_size=out_channels)
        k = self.block_size
        kh, kw = self.kernel_size
        fan_in = in_channels * kh * kw
        self._init_vectors(fan_in, (blocks(out_channels, k), blocks(in_channels, k), k, kh, kw), device, dtype)
        self.bias = None
        if bias:
            bound = 1.0 / math.sqrt(fan_in)
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype).uniform_(-bound, bound))

    @property
    def dense_weight_shape(self) -> tuple:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense kernel [out_channels, in_channels, kh, kw] (differentiable in ``vectors``)."""
        return block_circulant_dense(self.vectors, self.out_channels, self.in_channels)

    def forward(self, x: torch.Tensor, prepared: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, in_channels, H, W] -> [B, out_channels, H', W']; ``prepared``: an optional ``self.prepare(x)``."""
        form, weight = self.prepare(x) if prepared is None else prepared
        if form == "fft":
            y = block_circulant_conv2d(x, self.vectors, self.out_channels, stride=self.stride, padding=self.padding,
                                       dilation=self.dilation, spectrum=weight)
        else:
            y = F.conv2d(x.to(weight.dtype), weight, None, self.stride, self.padding, self.dilation)
        return y if self.bias is None else y + self.bias.to(y.dtype)[:, None, None]

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, block_size: int, *, impl: str = "auto") -> "BlockCirculantConv2d":
        """A block-circulant conv with ``layer``'s geometry, device and dtype (bias copied, vectors projected)."""
        if layer.padding_mode != "zeros":
            raise ValueError(f"BlockCirculantConv2d.from_dense: padding_mode must be 'zeros', got {layer.padding_mode!r}")
        w = layer.weight
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, block_size, stride=layer.stride,
                  padding=layer.padding, dilation=layer.dilation, bias=layer.bias is not None, groups=layer.groups,
                  impl=impl, device=w.device, dtype=w.dtype)
        return new.load_dense(layer)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, block_size={self.block_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"impl={self.impl!r} ({self.product_form()})")


def _wrapped_diagonals(t: torch.Tensor, k: int) -> torch.Tensor:
    """[p*k, q*k, *] -> [p, q, k (diagonal d), k (row r), *]: entry (r, (r - d) mod k) of every k x k block."""
    p, q = t.shape[0] // k, t.shape[1] // k
    full = t.reshape(p, k, q, k, *t.shape[2:]).transpose(1, 2)
    r = torch.arange(k, device=t.device)
    cols = (r[None, :] - r[:, None]) % k  # [d, r]: the column c = (r - d) mod k of diagonal d in row r
    return full[:, :, r[None, :].expand(k, k), cols]


def entries_per_vector(out_size: int, in_size: int, block_size: int, *, device=None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """How many entries of the dense [out_size, in_size] matrix each vector entry stands for, [p, q, k]: k,
    except in a block cropped at the layer's edge (sizes not multiples of k), where a diagonal has fewer
    positions inside the layer (possibly none: 0)."""
    k = block_size
    p, q = blocks(out_size, k), blocks(in_size, k)
    inside = torch.zeros((p * k, q * k), dtype=dtype, device=device)
    inside[:out_size, :in_size] = 1
    return _wrapped_diagonals(inside, k).sum(dim=3)


def project_to_vectors(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """The vectors of the block-circulant matrix nearest to ``weight`` (least squares over its entries).

    Shapes: weight [m, n, *taps] -> vectors [ceil(m/k), ceil(n/k), k, *taps]. Each vector entry is the mean of
    the layer's entries on its wrapped diagonal, ``vectors[i, j, d] = mean W_ij[r, (r - d) mod k]`` over the
    positions inside the layer (a block cropped at the edge has fewer; an entry with none is 0). A weight that
    already is block-circulant is reproduced exactly.
    """
    k = block_size
    m, n = weight.shape[:2]
    p, q = blocks(m, k), blocks(n, k)
    padded = weight.new_zeros((p * k, q * k, *weight.shape[2:]))
    padded[:m, :n] = weight
    total = _wrapped_diagonals(padded, k).sum(dim=3)
    count = entries_per_vector(m, n, k, device=weight.device, dtype=weight.dtype)
    return total / count.reshape(p, q, k, *([1] * (weight.dim() - 2))).clamp_min(1)


# The two rules for the defining vectors' training gradient (``--method-options gradient=...`` of the
# circulant methods, default "sum"; ``circulant_gradient`` of dnr explore, default "mean"): "sum" is autograd's
# (CirCNN / E-RNN train so), "mean" is average_circulant_gradients'.
CIRCULANT_GRADIENTS = ("mean", "sum")


def average_circulant_gradients(model: nn.Module) -> int:
    """Divide the gradient of every block-circulant layer's ``vectors`` in ``model`` by the number of dense-weight
    entries each vector entry stands for (k; fewer in blocks cropped at a layer's edge), in place, before an
    optimizer step. Layers whose vectors have no gradient are skipped; returns the number of layers scaled.

    Why: a vector entry fills k entries of the layer's dense-equivalent weight W, so autograd's gradient of it is
    the SUM of their k gradients, and SGD on the vectors moves W about k times as far per unit of learning rate
    as SGD moves a dense weight: at a learning rate that trains the dense model well, a block-circulant one can
    overshoot (docs/e-rnn/README.md, "The vectors' gradient rule": clean block-circulant GRUs at lr 0.5 end up
    to 37 points below the same runs with this rule).
    With the MEAN, an SGD step on the vectors (momentum, Nesterov and weight decay included: all linear) is
    exactly a step of projected SGD on W: the Frobenius projection onto block-circulant matrices
    (:func:`project_to_vectors`) averages each wrapped diagonal, so ``W - lr * P(G + wd * W)`` has the vectors
    ``v - lr * (G_sum / count + wd * v)``. A block-circulant layer thus trains like its dense twin at the same
    learning rate and weight decay; the gradient itself (``.grad`` after backward) stays autograd's.
    """
    scaled = 0
    for _, layer in circulant_layers(model):
        grad = layer.vectors.grad
        if grad is None:
            continue
        count = layer.entries_per_vector(grad)
        grad.div_(count.reshape(*count.shape, *([1] * (grad.dim() - 3))).clamp_min(1))
        scaled += 1
    return scaled


def circulant_layers(model: nn.Module) -> list[tuple[str, BlockCirculantLayer]]:
    """All block-circulant layers of ``model`` in registration order, as (qualified name, module)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BlockCirculantLayer)]


def circulant(model: nn.Module, block_size: int, exclude: ExcludeSpec = None, *, convert_first: bool = True,
              convert_last: bool = True, impl: str = "auto") -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` by a block-circulant layer, in place.

    All or nothing, like :func:`dnr.sparsify`: every layer is checked and built first; an error (a block size
    larger than a layer, a grouped conv, a conv with non-zero padding mode) raises before the model changes.
    Each new layer keeps the old one's bias, device, dtype and requires_grad, and starts from the projection
    of its weight onto block-circulant matrices (:func:`project_to_vectors`).

    Args:
        model: any ``nn.Module``.
        block_size: k, an int >= 1 and at most ``max(out, in)`` of every converted layer.
        exclude: layers to leave dense: a name or glob pattern, a module type, an iterable of those, or a
            callable ``(name, module) -> bool`` (as ``dnr.sparsify``).
        convert_first / convert_last: convert the first / last eligible layer.
        impl: every new layer's product form: "auto" (default: the faster form per layer, :func:`fft_form_pays`),
            "fft" or "dense" (the module docstring; :func:`set_circulant_impl` changes it later).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: a bad block size, a layer that cannot be converted (named), nothing to convert, or a model
            that is already block-circulant or masked.
        TypeError: ``model``, ``block_size`` or ``exclude`` of the wrong type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_block_size(block_size)
    check_impl(impl)
    excluded = exclusion_predicate(exclude)
    already = circulant_layers(model)
    if already:
        raise ValueError(f"model {type(model).__name__} already has {len(already)} block-circulant layers "
                         f"({already[0][0] or '<model>'}, ...); convert a model once")
    masked = [n for n, m in model.named_modules() if isinstance(m, MaskedLayer)]
    if masked:
        raise ValueError(f"model {type(model).__name__} has masked layers ({masked[0]}, ...): block-circulant "
                         "conversion applies to dense models (one compression family per model)")
    candidates = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d)) and type(m) in (nn.Linear, nn.Conv2d)]
    if not candidates:
        raise ValueError(f"model {type(model).__name__} has no nn.Linear or nn.Conv2d layer to convert")
    chosen = [(n, m) for i, (n, m) in enumerate(candidates)
              if not excluded(n, m) and not (i == 0 and not convert_first)
              and not (i == len(candidates) - 1 and not convert_last and len(candidates) > 1)]
    if not chosen:
        raise ValueError(f"every layer of {type(model).__name__} is excluded (exclude={exclude!r}, "
                         f"convert_first={convert_first}, convert_last={convert_last}); nothing to convert")
    replacements = []
    for name, module in chosen:
        try:
            if isinstance(module, nn.Conv2d):
                new = BlockCirculantConv2d.from_dense(module, block_size, impl=impl)
            else:
                new = BlockCirculantLinear.from_dense(module, block_size, impl=impl)
        except ValueError as err:
            raise ValueError(f"cannot make layer {name!r} ({module}) block-circulant: {err}; leave it dense with "
                             f"exclude=[{name!r}]") from None
        new.train(module.training)
        replacements.append((name, new))
    for name, new in replacements:
        model.set_submodule(name, new)
    return model


def set_circulant_impl(model: nn.Module, impl: str) -> dict[str, str]:
    """Set the product form of every block-circulant layer of ``model`` ("auto", "fft" or "dense"); returns the
    previous ``impl`` of each layer by qualified name, so ``for name, old in previous.items():
    model.get_submodule(name).impl = old`` restores them. The function computed does not change (to float
    rounding), only its speed."""
    check_impl(impl)
    previous = {}
    for name, layer in circulant_layers(model):
        previous[name] = layer.impl
        layer.impl = impl
        layer.__dict__.pop("_weight_cache", None)
    return previous


@torch.no_grad()
def densify_circulant(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every block-circulant layer replaced by the plain ``nn.Linear`` /
    ``nn.Conv2d`` holding its ``dense_weight()`` (same function; used where the FFT form cannot go, e.g. an
    ONNX exporter without FFT operators, and as the dense reference of sizes and timings)."""
    out = copy.deepcopy(model)
    for name, m in circulant_layers(out):
        out.set_submodule(name, plain_layer(m, m.dense_weight()))
    return out


def circulant_report(model: nn.Module, input_size=None) -> dict:
    """Stored and dense-equivalent weights of the block-circulant layers, and FLOPs per example.

    Returns a JSON-ready dict: ``layers`` (name, kind, dense shape, block size, stored, dense, compression, the
    product ``form`` it computes with, and with ``input_size`` [C, H, W] the dense-equivalent and FFT-form ``flops`` of one example),
    ``stored`` / ``dense`` totals and ``compression`` (dense over stored weights of the converted layers).
    """
    rows = []
    positions: dict[str, int] = {}
    if input_size is not None:
        handles = []
        layers = dict(circulant_layers(model))

        def hook(name):
            def record(module, inputs, output):
                # summed over calls: a layer applied several times per example (a recurrent cell's hidden
                # projection, once per time step) costs that many times its one-call FLOPs
                positions[name] = positions.get(name, 0) + (
                    output.shape[-2] * output.shape[-1] if output.dim() == 4 else output[0].numel() // output.shape[-1])
            return record

        for name, layer in layers.items():
            handles.append(layer.register_forward_hook(hook(name)))
        param = next(model.parameters())
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(torch.zeros((1, *input_size), device=param.device, dtype=param.dtype))
        finally:
            model.train(was)
            for h in handles:
                h.remove()
    for name, layer in circulant_layers(model):
        shape = layer.dense_weight_shape
        row = {"name": name, "kind": "conv" if isinstance(layer, BlockCirculantConv2d) else "linear",
               "shape": list(shape), "block_size": layer.block_size, "stored": layer.num_stored,
               "dense": layer.num_dense, "compression": layer.compression, "form": layer.product_form()}
        if name in positions:
            taps = math.prod(shape[2:])
            row["flops_dense"] = 2 * positions[name] * layer.num_dense
            row["flops_fft"] = fft_flops(shape[0], shape[1], layer.block_size, positions[name], taps)
        rows.append(row)
    stored, dense = sum(r["stored"] for r in rows), sum(r["dense"] for r in rows)
    out = {"layers": rows, "stored": stored, "dense": dense, "compression": dense / stored if stored else 1.0}
    if input_size is not None:
        out["flops_dense"] = sum(r.get("flops_dense", 0) for r in rows)
        out["flops_fft"] = sum(r.get("flops_fft", 0) for r in rows)
    return out
