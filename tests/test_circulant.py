"""Block-circulant layers (dnr.nn.block_circulant): both product forms (FFT and dense) against the dense matrices
they stand for.

Oracles are independent of the FFT code: a dense matrix written out element by element from the documented
convention ``C[r, c] = w[(r - c) mod k]`` with Python loops, ``F.linear`` / ``F.conv2d`` on it, and autograd of
those for the gradients.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnr
from dnr.nn.block_circulant import (BlockCirculantConv2d, BlockCirculantLinear, block_circulant_conv2d,
                                    block_circulant_dense, block_circulant_matmul, circulant, circulant_layers,
                                    circulant_report, densify_circulant, fft_form_pays, project_to_vectors,
                                    set_circulant_impl)

DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]
IMPLS = ["fft", "dense"]  # the two product forms ("auto" picks one of them per layer)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}

# (out, in, k): divisible, non-divisible on either side, k = 1, k = the whole layer, odd k
LINEAR_SIZES = [(8, 8, 4), (10, 7, 4), (12, 30, 8), (5, 3, 5), (6, 9, 1), (16, 16, 16), (9, 14, 3)]


def loop_dense(vectors: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """The convention written out entry by entry: W[i*k + r, j*k + c] = vectors[i, j, (r - c) mod k]."""
    p, q, k = vectors.shape[:3]
    w = torch.zeros((out_size, in_size, *vectors.shape[3:]), dtype=vectors.dtype)
    for row in range(out_size):
        for col in range(in_size):
            i, r = divmod(row, k)
            j, c = divmod(col, k)
            w[row, col] = vectors[i, j, (r - c) % k].cpu()
    return w


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m, n, k", LINEAR_SIZES)
def test_linear_forward_and_backward_equal_the_dense_matrix(device, dtype, bias, m, n, k, impl):
    layer = BlockCirculantLinear(n, m, k, bias=bias, impl=impl, device=device, dtype=dtype)
    assert layer.product_form() == impl
    x = torch.randn(3, 2, n, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 2, m) and y.dtype == dtype
    dense = loop_dense(layer.vectors.detach(), m, n).to(device)
    assert torch.equal(layer.dense_weight().detach(), dense)  # indexing builds exactly the written-out matrix
    # the reference: F.linear on a dense weight built by indexing, autograd through the indexing
    vec = layer.vectors.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    ref = F.linear(xr, block_circulant_dense(vec, m, n), layer.bias)
    torch.testing.assert_close(y, ref, atol=TOL[dtype], rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(layer.vectors.grad, vec.grad, atol=TOL[dtype] * 10, rtol=0)


CONV_CASES = [  # (c_in, c_out, kernel, k, stride, padding, dilation)
    (8, 8, 3, 4, 1, 1, 1),
    (10, 7, 3, 4, 2, 0, 1),     # non-divisible channels, stride 2, no padding
    (3, 17, 3, 8, 1, "same", 1),  # more outputs than inputs, "same" padding
    (6, 12, (3, 1), 3, (2, 1), (1, 0), 1),  # odd block, rectangular kernel and stride
    (4, 4, 3, 4, 1, 2, 2),      # dilation
    (5, 9, 1, 2, 1, 0, 1),      # 1x1 conv
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c_in, c_out, kernel, k, stride, padding, dilation", CONV_CASES)
def test_conv_forward_and_backward_equal_the_dense_kernel(device, dtype, c_in, c_out, kernel, k, stride, padding,
                                                          dilation, impl):
    layer = BlockCirculantConv2d(c_in, c_out, kernel, k, stride=stride, padding=padding, dilation=dilation,
                                 impl=impl, device=device, dtype=dtype)
    assert layer.product_form() == impl
    x = torch.randn(2, c_in, 9, 8, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    dense = loop_dense(layer.vectors.detach(), c_out, c_in).to(device)
    assert torch.equal(layer.dense_weight().detach(), dense)
    vec = layer.vectors.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    ref = F.conv2d(xr, block_circulant_dense(vec, c_out, c_in), layer.bias.detach(), stride=layer.stride,
                   padding=layer.padding, dilation=layer.dilation)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=TOL[dtype], rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(layer.vectors.grad, vec.grad, atol=TOL[dtype] * 10, rtol=0)
    torch.testing.assert_close(layer.bias.grad, g.sum((0, 2, 3)), atol=TOL[dtype], rtol=0)


def is_block_circulant(w: torch.Tensor, k: int) -> bool:
    """Every k x k block (cropped at the edges) is constant along its wrapped diagonals."""
    m, n = w.shape[:2]
    for row in range(m):
        for col in range(n):
            i, r = divmod(row, k)
            j, c = divmod(col, k)
            r2, c2 = (r + 1) % k, (c + 1) % k  # one step down the wrapped diagonal inside the same block
            if i * k + r2 < m and j * k + c2 < n and not torch.equal(w[row, col], w[i * k + r2, j * k + c2]):
                return False
    return True


@pytest.mark.parametrize("m, n, k", [(8, 12, 4), (10, 7, 4), (9, 9, 3)])
def test_dense_weight_is_block_circulant(m, n, k):
    layer = BlockCirculantLinear(n, m, k, dtype=torch.float64)
    w = layer.dense_weight().detach()
    assert is_block_circulant(w, k)
    assert is_block_circulant(BlockCirculantConv2d(n, m, 3, k).dense_weight().detach(), k)
    # the first column of block (i, j) is its vector
    v = layer.vectors.detach()
    for row in range(m):
        i, r = divmod(row, k)
        for j in range(math.ceil(n / k)):
            assert w[row, j * k] == v[i, j, r]
    assert not is_block_circulant(torch.randn(m, n, dtype=torch.float64), k)  # the check can fail


@pytest.mark.parametrize("m, n, k", LINEAR_SIZES)
def test_parameter_count_is_ceil_m_k_times_ceil_n_k_times_k(m, n, k):
    layer = BlockCirculantLinear(n, m, k)
    assert layer.vectors.numel() == math.ceil(m / k) * math.ceil(n / k) * k
    assert sum(p.numel() for p in layer.parameters()) == math.ceil(m / k) * math.ceil(n / k) * k + m
    assert sum(p.numel() for p in BlockCirculantLinear(n, m, k, bias=False).parameters()) == layer.vectors.numel()
    conv = BlockCirculantConv2d(n, m, 3, k)
    assert sum(p.numel() for p in conv.parameters()) == math.ceil(m / k) * math.ceil(n / k) * k * 9 + m
    assert conv.num_dense == m * n * 9 and layer.num_dense == m * n


def test_gradcheck_linear_and_conv():
    lin = BlockCirculantLinear(7, 6, 4, dtype=torch.float64)
    x = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    v = lin.vectors.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: block_circulant_matmul(a, b, 6), (x, v))
    xc = torch.randn(1, 5, 5, 4, dtype=torch.float64, requires_grad=True)
    vc = torch.randn(2, 2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: block_circulant_conv2d(a, b, 6, stride=2, padding=1), (xc, vc))
    assert torch.autograd.gradgradcheck(lambda a, b: block_circulant_matmul(a, b, 6), (x, v))


def test_block_circulant_matmul_shapes_and_errors():
    v = torch.randn(3, 2, 4)
    assert block_circulant_matmul(torch.randn(5, 8), v).shape == (5, 12)
    assert block_circulant_matmul(torch.randn(2, 3, 6), v, 10).shape == (2, 3, 10)
    with pytest.raises(ValueError, match=r"x has 9 features, more than the q \* k = 2 \* 4 = 8"):
        block_circulant_matmul(torch.randn(5, 9), v)
    with pytest.raises(ValueError, match=r"out_features must be in \[1, p \* k = 12\], got 13"):
        block_circulant_matmul(torch.randn(5, 8), v, 13)
    with pytest.raises(ValueError, match=r"vectors must have shape \[p, q, k\]"):
        block_circulant_matmul(torch.randn(5, 8), torch.randn(3, 8))


@pytest.mark.parametrize("block_size, error, match", [
    (0, ValueError, "block_size must be an int >= 1, got 0"),
    (-4, ValueError, "block_size must be an int >= 1, got -4"),
    (2.0, TypeError, r"block_size must be an int >= 1, got 2.0 \(float\)"),
    (True, TypeError, "block_size must be an int >= 1, got True"),
    (17, ValueError, r"block_size=17 is larger than the layer \(16 outputs x 8 inputs\): expected at most"),
])
def test_bad_block_sizes_are_clear_errors(block_size, error, match):
    with pytest.raises(error, match=match):
        BlockCirculantLinear(8, 16, block_size)
    with pytest.raises(error, match=match):
        BlockCirculantConv2d(8, 16, 3, block_size)


def test_groups_and_padding_modes_are_clear_errors():
    with pytest.raises(ValueError, match="groups must be 1, got 2 .*exclude="):
        BlockCirculantConv2d(8, 8, 3, 4, groups=2)
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.LazyLinear(4))
    before = [type(m) for m in model]
    with pytest.raises(ValueError, match=r"cannot make layer '1' .* groups must be 1, got 8.*exclude=\['1'\]"):
        circulant(model, 4)
    assert [type(m) for m in model] == before  # all or nothing: the first conv was not converted either
    with pytest.raises(ValueError, match="padding_mode must be 'zeros', got 'reflect'"):
        BlockCirculantConv2d.from_dense(nn.Conv2d(4, 4, 3, padding_mode="reflect"), 2)


def test_circulant_converts_in_place_keeps_exclusions_and_refuses_twice():
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    assert circulant(model, 4, exclude="4") is model
    assert [type(m).__name__ for m in model] == ["BlockCirculantLinear", "ReLU", "BlockCirculantLinear", "ReLU",
                                                 "Linear"]
    with pytest.raises(ValueError, match="already has 2 block-circulant layers"):
        circulant(model, 4)
    m2 = nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 4))
    circulant(m2, 4, convert_first=False)
    assert [type(m).__name__ for m in m2] == ["Linear", "BlockCirculantLinear"]
    with pytest.raises(ValueError, match="every layer of Sequential is excluded"):
        circulant(nn.Sequential(nn.Linear(4, 4)), 2, exclude=nn.Linear)
    with pytest.raises(ValueError, match=r"cannot make layer '2' .*block_size=8 is larger than the layer \(4 outputs x 4 inputs\)"):
        circulant(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4), nn.Linear(4, 4)), 8)
    with pytest.raises(ValueError, match="has masked layers"):
        circulant(dnr.sparsify(nn.Sequential(nn.Linear(8, 8)), density=0.5), 2)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        circulant("model", 2)


def test_conversion_starts_from_the_projection_and_keeps_circulant_weights_exactly():
    """A dense layer whose weight already is block-circulant converts to the same function."""
    torch.manual_seed(1)
    vec = torch.randn(2, 3, 4, 3, 3, dtype=torch.float64)
    conv = nn.Conv2d(10, 8, 3, padding=1, bias=True).double()
    with torch.no_grad():
        conv.weight.copy_(block_circulant_dense(vec, 8, 10))
    x = torch.randn(2, 10, 6, 6, dtype=torch.float64)
    ref = conv(x)
    new = BlockCirculantConv2d.from_dense(conv, 4)
    torch.testing.assert_close(new(x), ref, atol=1e-10, rtol=0)
    # a generic weight: the projection is the nearest block-circulant one (closer than any other vectors)
    w = torch.randn(8, 12, dtype=torch.float64)
    best = project_to_vectors(w, 4)
    dist = (block_circulant_dense(best, 8, 12) - w).norm()
    for _ in range(5):
        other = best + 0.01 * torch.randn_like(best)
        assert (block_circulant_dense(other, 8, 12) - w).norm() > dist


@pytest.mark.parametrize("name, size", [("vgg16", 32), ("resnet18", 32)])
def test_vgg16_and_resnet18_convert_with_unchanged_output_shapes(name, size):
    model = dnr.models.build_model(name, 10, 3, size, None, None).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        shape = model(x).shape
    convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    circulant(model, 8)
    layers = circulant_layers(model)
    assert len(layers) == convs and not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    with torch.no_grad():
        assert model(x).shape == shape
    rep = circulant_report(model)
    # the first conv (3 -> 64) pads its 3 input channels to 8, the classifier's 10 outputs pad to 16
    assert 7.5 < rep["compression"] < 8.0
    fresh = dnr.models.build_model(name, 10, 3, size, None, None)
    with pytest.raises(ValueError, match=r"block_size=128 is larger than the layer \(64 outputs x 3 inputs\)"):
        circulant(fresh, 128)
    assert not circulant_layers(fresh)


def test_densify_and_report_agree_with_the_layers():
    model = dnr.models.small_cnn()
    circulant(model, 4)
    dense = densify_circulant(model).eval()
    model.eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), atol=1e-5, rtol=1e-4)
    rep = circulant_report(model, (1, 28, 28))
    assert rep["dense"] == sum(m.weight.numel() for m in dense.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert rep["stored"] == sum(m.vectors.numel() for _, m in circulant_layers(model))
    assert rep["flops_dense"] == dnr.density_report(dense, input_size=(1, 28, 28)).flops_dense
    assert [r["compression"] for r in rep["layers"]] == [1.0, 4.0, 4.0, 4.0, 1280 / 384]


class _Recurrent(nn.Module):
    """One block-circulant layer applied three times per example, as a recurrent cell's hidden projection."""

    def __init__(self):
        super().__init__()
        self.cell = BlockCirculantLinear(8, 8, 4)

    def forward(self, x):
        for _ in range(3):
            x = torch.tanh(self.cell(x))
        return x


def test_report_counts_every_call_of_a_layer():
    model = _Recurrent()
    rep = circulant_report(model, (8,))
    once = circulant_report(nn.Sequential(BlockCirculantLinear(8, 8, 4)), (8,))
    assert once["flops_dense"] == 2 * 64  # one [8] x [8, 8] product
    assert rep["flops_dense"] == 3 * once["flops_dense"] and rep["flops_fft"] == 3 * once["flops_fft"]


def test_low_precision_inputs_compute_in_float32():
    layer = BlockCirculantLinear(8, 8, 4)
    x = torch.randn(2, 8)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x.bfloat16().float()), atol=1e-2, rtol=1e-2)


def test_bf16_autocast_runs_the_fft_form_in_float32():
    """--precision bf16 trains under autocast: the frequency-domain conv must not be cast to bfloat16 (torch.complex
    has no bfloat16), and both layers give their float32 result."""
    conv, lin = BlockCirculantConv2d(8, 8, 3, 4, padding=1, impl="fft"), BlockCirculantLinear(8, 8, 4, impl="fft")
    x, v = torch.randn(2, 8, 5, 5), torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yc, yl = conv(x), lin(v)
        yc.float().sum().backward()
    torch.testing.assert_close(yc, conv(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(yl, lin(v), atol=1e-5, rtol=1e-5)
    assert conv.vectors.grad is not None


def test_bf16_autocast_runs_the_dense_form_like_the_plain_layers():
    """The dense form is F.conv2d / F.linear on the dense kernel: under autocast it computes in bfloat16 as
    nn.Conv2d / nn.Linear holding that kernel do (to bfloat16 rounding: the bias is added after the product), and
    the gradient reaches the vectors."""
    conv, lin = BlockCirculantConv2d(8, 8, 3, 4, padding=1, impl="dense"), BlockCirculantLinear(8, 8, 4, impl="dense")
    x, v = torch.randn(2, 8, 5, 5), torch.randn(2, 8)
    plain_conv, plain_lin = densify_circulant(nn.Sequential(conv, lin))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yc, yl = conv(x), lin(v)
        yc.float().sum().backward()
        assert yc.dtype == yl.dtype == torch.bfloat16
        torch.testing.assert_close(yc, plain_conv(x), atol=2e-2, rtol=0)
        torch.testing.assert_close(yl, plain_lin(v), atol=2e-2, rtol=0)
    assert conv.vectors.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_eval_mode_weight_cache_follows_the_vectors(kind, impl):
    """Eval mode without a gradient to the vectors reuses the prepared weight (spectrum or dense matrix); an
    optimizer step, load_state_dict and a mode switch renew it, so the output always equals the dense layer of the
    current vectors."""
    if kind == "linear":
        layer, x = BlockCirculantLinear(12, 8, 4, impl=impl, dtype=torch.float64), \
            torch.randn(3, 12, dtype=torch.float64)
    else:
        layer, x = BlockCirculantConv2d(6, 8, 3, 4, padding=1, impl=impl, dtype=torch.float64), \
            torch.randn(2, 6, 5, 5, dtype=torch.float64)

    def fresh():
        dense = layer.dense_weight().detach()
        return F.linear(x, dense, layer.bias) if kind == "linear" else F.conv2d(x, dense, layer.bias, padding=1)

    layer.eval()
    layer.vectors.requires_grad_(False)  # a frozen model, as during an attack
    first = layer(x)
    assert "_weight_cache" in layer.__dict__
    cached = layer.__dict__["_weight_cache"][1]
    torch.testing.assert_close(layer(x), first, atol=0, rtol=0)
    assert layer.__dict__["_weight_cache"][1] is cached  # reused, not recomputed
    layer.vectors.requires_grad_(True)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    layer(x).square().sum().backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fresh(), atol=1e-10, rtol=0)
        layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
        torch.testing.assert_close(layer(x), fresh(), atol=1e-10, rtol=0)
        layer.vectors.data.mul_(2)  # not seen by the version counter: a mode switch drops the cache
        layer.eval()
        torch.testing.assert_close(layer(x), fresh(), atol=1e-10, rtol=0)
    # training mode never caches (the prepared weight is part of the autograd graph)
    layer.train()
    layer(x)
    assert "_weight_cache" not in layer.__dict__


@pytest.mark.parametrize("kind, out_size, in_size, k, fft", [
    ("conv", 128, 128, 8, True), ("conv", 512, 256, 16, True), ("conv", 128, 128, 4, False),
    ("conv", 64, 128, 16, False), ("conv", 32, 64, 16, False),
    ("linear", 1024, 1024, 8, True), ("linear", 4096, 4096, 64, True), ("linear", 4096, 4096, 4, True),
    ("linear", 1024, 1024, 4, False), ("linear", 4096, 4096, 2, False), ("linear", 576, 128, 16, False),
    ("linear", 512, 128, 16, False),
])
def test_auto_takes_the_fft_form_only_in_wide_layers_from_k_8(kind, out_size, in_size, k, fft):
    """The documented rule: FFT form from k = 8 in convs with >= 128 and linear layers with >= 1,024 input and
    output channels / features (linear >= 4,096 from k = 4); every layer built with impl="auto" resolves by it."""
    assert fft_form_pays(kind, out_size, in_size, k) is fft
    layer = (BlockCirculantConv2d(in_size, out_size, 1, k) if kind == "conv"
             else BlockCirculantLinear(in_size, out_size, k))
    assert layer.impl == "auto" and layer.product_form() == ("fft" if fft else "dense")


@pytest.mark.parametrize("kind, out_size, in_size, k, fft", [
    ("conv", 128, 128, 8, False), ("conv", 512, 512, 16, False), ("conv", 512, 256, 64, False),
    ("linear", 1024, 1024, 8, False), ("linear", 1024, 1024, 64, False), ("linear", 4096, 2048, 16, False),
    ("linear", 4096, 4096, 2, True), ("linear", 4096, 4096, 16, True), ("linear", 8192, 4096, 64, True),
    ("linear", 4096, 4096, 1, False),
])
def test_auto_on_cuda_takes_the_fft_form_only_in_linear_layers_4096_wide(kind, out_size, in_size, k, fft, device):
    """The GPU rule (measured on an H200): dense form in every convolution, FFT form in linear layers at least
    4,096 wide from k = 2. A layer resolves "auto" by the rule of the device its vectors are on."""
    assert fft_form_pays(kind, out_size, in_size, k, "cuda") is fft
    assert fft_form_pays(kind, out_size, in_size, k, "cpu") is fft_form_pays(kind, out_size, in_size, k)
    layer = (BlockCirculantConv2d(in_size, out_size, 1, k, device=device) if kind == "conv"
             else BlockCirculantLinear(in_size, out_size, k, device=device))
    expected = fft if device == "cuda" else fft_form_pays(kind, out_size, in_size, k)
    assert layer.product_form() == ("fft" if expected else "dense")


def test_impl_is_set_per_model_and_bad_values_are_clear_errors():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8, 6))
    circulant(model, 2, impl="fft")
    assert [layer.product_form() for _, layer in circulant_layers(model)] == ["fft", "fft"]
    x = torch.randn(2, 4, 3, 3)
    model.eval()
    before = model(x)
    previous = set_circulant_impl(model, "dense")
    assert previous == {"0": "fft", "2": "fft"}
    assert [layer.product_form() for _, layer in circulant_layers(model)] == ["dense", "dense"]
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)  # the same function, another product
    assert "impl='dense' (dense)" in repr(model[0])
    for call in (lambda: BlockCirculantLinear(4, 4, 2, impl="fast"),
                 lambda: BlockCirculantConv2d(4, 4, 3, 2, impl=None),
                 lambda: circulant(nn.Sequential(nn.Linear(4, 4)), 2, impl="FFT"),
                 lambda: set_circulant_impl(model, "gemm")):
        with pytest.raises(ValueError, match=r"impl must be one of 'auto', 'fft', 'dense', got"):
            call()
    with pytest.raises(ValueError, match="kind must be 'conv' or 'linear'"):
        fft_form_pays("lstm", 8, 8, 8)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_prepared_weight_serves_several_calls(impl):
    """layer(x, prepared=layer.prepare(x)) equals layer(x), and one prepared weight serves several calls (a
    recurrent hidden projection) with the gradient reaching the vectors once per use."""
    layer = BlockCirculantLinear(12, 8, 4, impl=impl, dtype=torch.float64)
    x1, x2 = torch.randn(3, 12, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    prepared = layer.prepare(x1)
    assert prepared[0] == impl
    (layer(x1, prepared=prepared) + 2 * layer(x2, prepared=prepared)).sum().backward()
    got = layer.vectors.grad.clone()
    layer.vectors.grad = None
    (layer(x1) + 2 * layer(x2)).sum().backward()
    torch.testing.assert_close(got, layer.vectors.grad, atol=1e-10, rtol=0)
