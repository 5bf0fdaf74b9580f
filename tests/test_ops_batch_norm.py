"""dnr.ops.batch_norm_eval / dnr::batch_norm_eval(_backward): torch's eval-mode F.batch_norm (the oracle, and an
explicit per-channel formula in numpy below) in values and input gradients, bit for bit, on both paths of the
CPU kernel (NCHW planes, channels_last rows), with and without weight, float32 and float64, 2-D to 5-D input;
weight and bias gradients, double backward, one-line errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dnr.ops
from dnr import _ext

from conftest import DEVICES

DTYPES = [torch.float32, torch.float64]
SHAPES = [(4, 3, 5, 7), (2, 16, 28, 28), (8, 5), (3, 4, 6), (2, 3, 2, 3, 4), (1, 1, 1, 1)]


def _params(c, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(c, generator=g)
    var = torch.rand(c, generator=g) * 4 + 1e-3
    var[0] = 0.0  # a dead channel's running variance: invstd = 1 / sqrt(eps)
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (mean, var, weight, bias)]


def _run(fn, x, grad_out, *args, **kwargs):
    a = x.detach().clone().requires_grad_()
    out = fn(a, *args, **kwargs)
    (grad,) = torch.autograd.grad(out, a, grad_out)
    return out.detach(), grad


def _torch(x, mean, var, weight, bias, eps):
    return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
def test_values_and_input_gradients_are_torch_bit_for_bit(device, dtype, shape, layout, affine):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
    grad_out = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_out))
    mean, var, weight, bias = _params(shape[1], dtype, device)
    if not affine:
        weight = bias = None
    for eps in (1e-5, 1e-3):
        out, grad = _run(dnr.ops.batch_norm_eval, x, grad_out, mean, var, weight, bias, eps)
        want, want_grad = _run(_torch, x, grad_out, mean, var, weight, bias, eps)
        assert torch.equal(out, want) and out.stride() == want.stride()
        assert torch.equal(grad, want_grad) and grad.stride() == want_grad.stride()


def test_input_gradient_is_the_per_channel_formula():
    """An oracle outside torch: grad_input = (grad_output * invstd) * weight, invstd = 1 / sqrt(var + eps) in
    float64 rounded to float32, each product rounded to float32 (numpy float32 arithmetic)."""
    x = torch.randn(3, 4, 5, 6)
    grad_out = torch.randn(3, 4, 5, 6)
    mean, var, weight, bias = _params(4, torch.float32, "cpu")
    _, grad = _run(dnr.ops.batch_norm_eval, x, grad_out, mean, var, weight, bias, 1e-5)
    invstd = (1.0 / np.sqrt(var.numpy().astype(np.float64) + 1e-5)).astype(np.float32)
    want = (grad_out.numpy() * invstd[None, :, None, None]) * weight.numpy()[None, :, None, None]
    assert want.dtype == np.float32
    np.testing.assert_array_equal(grad.numpy(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_double_backward(device):
    """Every gradient the op gives (input, weight, bias) and their second order, against finite differences,
    and a Hessian-vector product through it equal (to rounding) to one through torch's op."""
    mean, var, weight, bias = _params(3, torch.float64, device)
    var[0] = 0.5
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    fn = lambda x, w, b: dnr.ops.batch_norm_eval(x, mean, var, w, b, 1e-5)  # noqa: E731
    torch.autograd.gradcheck(fn, (x, w, b))
    torch.autograd.gradgradcheck(fn, (x, w, b))
    v = torch.randn_like(x)
    hv = []
    for op in (fn, lambda x, w, b: _torch(x, mean, var, w, b, 1e-5)):
        (g,) = torch.autograd.grad((op(x, w, b).tanh() ** 2).sum(), x, create_graph=True)
        hv.append(torch.autograd.grad((g * v).sum(), (x, w)))
    for mine, theirs in zip(*hv):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


def test_weight_and_bias_gradients_match_torch():
    mean, var, weight, bias = _params(5, torch.float32, "cpu")
    x = torch.randn(6, 5, 7, 7)
    grads = []
    for op in (dnr.ops.batch_norm_eval, lambda x, *a: _torch(x, *a)):
        w, b, a = weight.clone().requires_grad_(), bias.clone().requires_grad_(), x.clone().requires_grad_()
        op(a, mean, var, w, b, 1e-5).pow(2).sum().backward()
        grads.append((a.grad, w.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0])  # the input gradient: the kernel, bit for bit
    for mine, theirs in zip(grads[0][1:], grads[1][1:]):  # torch ops: another summation order
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-4)


def test_two_threads_equal_one():
    x = torch.randn(8, 16, 28, 28)
    grad_out = torch.randn(8, 16, 28, 28)
    mean, var, weight, bias = _params(16, torch.float32, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(dnr.ops.batch_norm_eval, x, grad_out, mean, var, weight, bias, 1e-5)
        torch.set_num_threads(2)
        two = _run(dnr.ops.batch_norm_eval, x, grad_out, mean, var, weight, bias, 1e-5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_other_dtypes_and_strides_run_torch():
    mean, var, weight, bias = _params(3, torch.float32, "cpu")
    x = torch.randn(2, 3, 8, 6).transpose(2, 3)  # strided: torch's op
    out, grad = _run(dnr.ops.batch_norm_eval, x, torch.ones(2, 3, 6, 8), mean, var, weight, bias)
    want, want_grad = _run(_torch, x, torch.ones(2, 3, 6, 8), mean, var, weight, bias, 1e-5)
    assert torch.equal(out, want) and torch.equal(grad, want_grad)
    xb = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    assert torch.equal(dnr.ops.batch_norm_eval(xb, mean, var, weight, bias), _torch(xb, mean, var, weight, bias, 1e-5))


def test_the_op_itself_takes_any_strides():
    if not _ext.has_kernel("batch_norm_eval", "cpu"):
        pytest.skip(f"no CPU kernel of dnr::batch_norm_eval ({_ext.reason() or 'not built'})")
    mean, var, weight, bias = _params(5, torch.float32, "cpu")
    g = torch.randn(2, 6, 5, 4).transpose(1, 2)  # [2, 5, 6, 4], neither layout
    want = g * (1 / (var.double() + 1e-5).sqrt()).float().view(1, 5, 1, 1) * weight.view(1, 5, 1, 1)
    got = torch.ops.dnr.batch_norm_eval_backward(g, weight, var, 1e-5)
    assert got.is_contiguous() and torch.equal(got, want)


def test_torch_func_transforms_run_torch_batch_norm():
    mean, var, weight, bias = _params(3, torch.float32, "cpu")
    x = torch.randn(4, 3, 5, 5)
    f = lambda t: dnr.ops.batch_norm_eval(t, mean, var, weight, bias)  # noqa: E731
    # (vmap's batching rule for torch's batch norm rounds differently from the unbatched op: close, not equal)
    torch.testing.assert_close(torch.vmap(f)(x.unsqueeze(1)).squeeze(1), _torch(x, mean, var, weight, bias, 1e-5),
                               rtol=1e-5, atol=1e-5)
    grad = torch.func.grad(lambda t: f(t).square().sum())(x)
    assert torch.equal(grad, torch.func.grad(lambda t: _torch(t, mean, var, weight, bias, 1e-5).square().sum())(x))


def test_uses_the_kernel_where_built():
    table = dnr.ops.backend()["batch_norm_eval"]
    assert table["cpu"] == ("extension" if _ext.has_kernel("batch_norm_eval", "cpu") else "reference")
    assert table["cuda"] == "reference"  # torch's (cuDNN) batch norm on the GPU


_C3 = torch.zeros(3)


@pytest.mark.parametrize("args, error, match", [
    ((torch.zeros(3), _C3, _C3), ValueError, r"batch_norm_eval: input must be \[N, C, \*\], got shape \(3,\)"),
    ((torch.zeros(2, 3, dtype=torch.int64), _C3, _C3), TypeError, r"input must be a floating-point tensor, got dtype torch.int64"),
    ((torch.zeros(2, 4, 5), _C3, torch.ones(4)), ValueError,
     r"batch_norm_eval: running_mean must have shape \(4,\) \(the input's channels\), got \(3,\)"),
    ((torch.zeros(2, 3, 5), _C3, _C3, torch.ones(2)), ValueError, r"batch_norm_eval: weight must have shape \(3,\)"),
    ((torch.zeros(2, 3, 5), _C3, [1.0, 1.0, 1.0]), TypeError, r"running_var must be a torch.Tensor, got list"),
    ((torch.zeros(2, 3, 5), _C3, torch.ones(3, requires_grad=True)), ValueError,
     r"batch_norm_eval: running_var must not require grad"),
])
def test_bad_input_is_a_one_line_error(args, error, match):
    with pytest.raises(error, match=match):
        dnr.ops.batch_norm_eval(*args)


def test_the_kernel_rejects_bad_arguments_itself():
    if not _ext.has_kernel("batch_norm_eval", "cpu"):
        pytest.skip(f"no CPU kernel of dnr::batch_norm_eval ({_ext.reason() or 'not built'})")
    with pytest.raises(RuntimeError, match=r"dnr::batch_norm_eval_backward: running_var must have shape \[4\]"):
        torch.ops.dnr.batch_norm_eval_backward(torch.zeros(2, 4, 3), None, torch.ones(3), 1e-5)
    with pytest.raises(RuntimeError, match=r"dnr::batch_norm_eval: weight must have the input's dtype"):
        torch.ops.dnr.batch_norm_eval(torch.zeros(2, 3, 3), torch.ones(3, dtype=torch.float64), None,
                                      torch.zeros(3), torch.ones(3), 1e-5)
    with pytest.raises(RuntimeError, match=r"dnr::batch_norm_eval_backward: grad_output must be float32 or float64"):
        torch.ops.dnr.batch_norm_eval_backward(torch.zeros(2, 3, dtype=torch.bfloat16), None,
                                               torch.ones(3, dtype=torch.bfloat16), 1e-5)


def test_empty_batch():
    mean, var, weight, bias = _params(3, torch.float32, "cpu")
    x = torch.zeros(0, 3, 4, 4, requires_grad=True)
    out = dnr.ops.batch_norm_eval(x, mean, var, weight, bias)
    out.sum().backward()
    assert out.shape == (0, 3, 4, 4) and x.grad.shape == (0, 3, 4, 4)
