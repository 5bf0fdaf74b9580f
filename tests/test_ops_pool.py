"""dnr.ops.max_pool2x2 / dnr::max_pool2x2(_backward): torch's max_pool2d (the oracle, and an explicit
per-window loop below) in values and gradients, bit for bit, on every path of the CPU kernel: rows of 1-3
windows (masked loads), 4-7 (two overlapping 4-blocks), 8 and more (8-blocks, the last overlapping), odd
sizes, ties, NaN / inf, -0.0 gradients, every floating dtype, one and two threads."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dnr.ops
from dnr import _ext

from conftest import DEVICES

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns: equal bits, not just equal values (-0.0 != 0.0, NaN == NaN)."""
    return t.contiguous().view(_BITS[t.element_size()])


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    relu = x.relu()  # windows of zeros: ties at 0
    ties = torch.randint(0, 3, shape, generator=g).float()  # ties everywhere
    special = torch.randn(shape, generator=g)
    pick = torch.rand(shape, generator=g)
    special[pick < 0.1] = float("nan")
    special[(pick >= 0.1) & (pick < 0.2)] = float("-inf")
    special[(pick >= 0.2) & (pick < 0.25)] = float("inf")
    special.view(-1)[:4] = float("-inf")  # an all -inf window
    return {name: t.to(device=device, dtype=dtype) for name, t in
            (("randn", x), ("relu", relu), ("ties", ties), ("special", special))}


def _pool_and_grad(fn, x, grad_out):
    a = x.detach().clone().requires_grad_()
    out = fn(a)
    out.backward(grad_out)
    return out.detach(), a.grad


def _grad_out(shape, dtype, device):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    g.view(-1)[::7] = -0.0  # torch's backward turns -0.0 into +0.0 (0 + g)
    return g


# widths 2..21: 1..10 windows a row (masked 1-3, 4-7 in two blocks, 8+ with an overlapping last block),
# plus the CNNs' 28 / 14 / 7
SHAPES = [(2, 3, h, w) for h, w in [(2, 2), (3, 5), (4, 7), (5, 8), (6, 9), (4, 14), (7, 15), (3, 16), (2, 17),
                                   (4, 21), (28, 28), (14, 14), (7, 7)]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_and_gradients_are_torch_max_pool2d_bit_for_bit(device, dtype, shape):
    grad_out = _grad_out((shape[0], shape[1], shape[2] // 2, shape[3] // 2), dtype, device)
    for name, x in _inputs(shape, dtype, device).items():
        out, grad = _pool_and_grad(dnr.ops.max_pool2x2, x, grad_out)
        want, want_grad = _pool_and_grad(lambda t: F.max_pool2d(t, 2), x, grad_out)
        assert out.dtype == dtype and out.shape == want.shape and out.is_contiguous(), name
        assert torch.equal(_bits(out), _bits(want)), name
        assert torch.equal(_bits(grad), _bits(want_grad)), name


def _loop_oracle(x: np.ndarray, grad_out: np.ndarray):
    """An explicit loop over windows: scan row by row, take a value that is greater than the running
    maximum or NaN (torch's CPU rule: the first maximum wins a tie, the last NaN wins)."""
    b, c, h, w = x.shape
    out = np.empty((b, c, h // 2, w // 2), x.dtype)
    grad = np.zeros_like(x)
    for i in range(b):
        for j in range(c):
            for oh in range(h // 2):
                for ow in range(w // 2):
                    best, at = -np.inf, (2 * oh, 2 * ow)
                    for dh in range(2):
                        for dw in range(2):
                            v = x[i, j, 2 * oh + dh, 2 * ow + dw]
                            if v > best or np.isnan(v):
                                best, at = v, (2 * oh + dh, 2 * ow + dw)
                    out[i, j, oh, ow] = best
                    grad[i, j, at[0], at[1]] = grad_out[i, j, oh, ow]
    return out, grad


@pytest.mark.parametrize("shape", [(1, 2, 4, 6), (2, 1, 5, 19), (1, 1, 3, 3)])
def test_matches_an_explicit_window_loop(shape):
    for x in _inputs(shape, torch.float64, "cpu", seed=3).values():
        grad_out = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=torch.float64)
        out, grad = _pool_and_grad(dnr.ops.max_pool2x2, x, grad_out)
        want, want_grad = _loop_oracle(x.numpy(), grad_out.numpy())
        np.testing.assert_array_equal(out.numpy(), want)
        np.testing.assert_array_equal(grad.numpy(), want_grad)


def test_ties_go_to_the_first_maximum_and_nan_to_the_last():
    x = torch.tensor([[[[1.0, 1.0, float("nan"), 0.0],
                        [1.0, 0.0, 5.0, float("nan")]]]])
    x.requires_grad_()
    out = dnr.ops.max_pool2x2(x)
    out.backward(torch.tensor([[[[2.0, 3.0]]]]))
    assert out[0, 0, 0, 0] == 1 and out[0, 0, 0, 1].isnan()
    assert x.grad.tolist() == [[[[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]]]


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_double_backward(device):
    x = torch.randn(2, 3, 6, 9, dtype=torch.float64, device=device, requires_grad=True)
    torch.autograd.gradcheck(dnr.ops.max_pool2x2, (x,))
    torch.autograd.gradgradcheck(dnr.ops.max_pool2x2, (x,))
    # the double backward equals torch's (a Hessian-vector product through a pool)
    v = torch.randn(2, 3, 6, 9, dtype=torch.float64, device=device)
    hv = []
    for fn in (dnr.ops.max_pool2x2, lambda t: F.max_pool2d(t, 2)):
        (g,) = torch.autograd.grad((fn(x) ** 2).sum(), x, create_graph=True)
        hv.append(torch.autograd.grad((g * v).sum(), x)[0])
    assert torch.equal(hv[0], hv[1])


def test_two_threads_equal_one():
    x = _inputs((8, 16, 28, 28), torch.float32, "cpu")["ties"]
    grad_out = _grad_out((8, 16, 14, 14), torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _pool_and_grad(dnr.ops.max_pool2x2, x, grad_out)
        torch.set_num_threads(2)
        two = _pool_and_grad(dnr.ops.max_pool2x2, x, grad_out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_other_layouts_give_torch_results(layout):
    x = _inputs((2, 3, 8, 12), torch.float32, "cpu")["ties"]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:  # H and W swapped in memory
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous()
    grad_out = _grad_out((2, 3, 4, 6), torch.float32, "cpu")
    out, grad = _pool_and_grad(dnr.ops.max_pool2x2, x, grad_out)
    want, want_grad = _pool_and_grad(lambda t: F.max_pool2d(t, 2), x, grad_out)
    assert torch.equal(out, want) and torch.equal(grad, want_grad)


def test_the_op_itself_takes_any_strides():
    """torch.ops.dnr.max_pool2x2 reads a non-contiguous input through a contiguous copy."""
    if not _ext.has_kernel("max_pool2x2", "cpu"):
        pytest.skip(f"no CPU kernel of dnr::max_pool2x2 ({_ext.reason() or 'not built'})")
    x = torch.randn(2, 5, 6, 8).transpose(2, 3)
    assert torch.equal(torch.ops.dnr.max_pool2x2(x), F.max_pool2d(x, 2))


def test_torch_func_transforms_run_torch_max_pool():
    """vmap and grad wrap their tensors; the custom op has no vmap rule, so they get torch's op."""
    x = torch.randn(3, 2, 5, 6)
    assert torch.equal(torch.vmap(dnr.ops.max_pool2x2)(x.unsqueeze(1)).squeeze(1), F.max_pool2d(x, 2))
    grad = torch.func.grad(lambda t: dnr.ops.max_pool2x2(t).sum())(x)
    x.requires_grad_()
    F.max_pool2d(x, 2).sum().backward()
    assert torch.equal(grad, x.grad)


def test_uses_the_kernel_where_built():
    table = dnr.ops.backend()["max_pool2x2"]
    assert table["cpu"] == ("extension" if _ext.has_kernel("max_pool2x2", "cpu") else "reference")
    assert table["cuda"] == "reference"  # torch's (cuDNN) pool on the GPU


@pytest.mark.parametrize("x, error, match", [
    (torch.zeros(3, 8, 8), ValueError, r"max_pool2x2: input must be \[B, C, H, W\] with H, W >= 2, got shape \(3, 8, 8\)"),
    (torch.zeros(2, 3, 1, 8), ValueError, r"max_pool2x2: input must be \[B, C, H, W\] with H, W >= 2, got shape \(2, 3, 1, 8\)"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.int64), TypeError, r"input must be a floating-point tensor, got dtype torch.int64"),
    ([[1.0]], TypeError, r"input must be a torch.Tensor, got list"),
])
def test_bad_input_is_a_one_line_error(x, error, match):
    with pytest.raises(error, match=match):
        dnr.ops.max_pool2x2(x)


def test_the_kernel_rejects_bad_shapes_itself():
    if not _ext.has_kernel("max_pool2x2", "cpu"):
        pytest.skip(f"no CPU kernel of dnr::max_pool2x2 ({_ext.reason() or 'not built'})")
    with pytest.raises(RuntimeError, match=r"dnr::max_pool2x2: input must be \[B, C, H, W\] with H, W >= 2"):
        torch.ops.dnr.max_pool2x2(torch.zeros(2, 3, 8))
    with pytest.raises(RuntimeError, match=r"dnr::max_pool2x2_backward: grad_output must have shape \[2, 3, 4, 4\]"):
        torch.ops.dnr.max_pool2x2_backward(torch.zeros(2, 3, 4, 3), torch.zeros(2, 3, 8, 8))


def test_empty_batch():
    x = torch.zeros(0, 3, 4, 4, requires_grad=True)
    out = dnr.ops.max_pool2x2(x)
    assert out.shape == (0, 3, 2, 2)
    out.sum().backward()
    assert x.grad.shape == x.shape
