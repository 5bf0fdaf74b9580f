"""dnr.ops.masked_conv2d / masked_linear against F.conv2d / F.linear with weight * mask."""

import pytest
import torch
import torch.nn.functional as F

import dnr.ops
from dnr import _ext, reference

# (batch, in_ch, H, W, out_ch, kernel, stride, padding, dilation, groups, bias)
CONV_CASES = [
    (2, 3, 8, 8, 4, 3, 1, 1, 1, 1, True),
    (2, 4, 9, 7, 6, (3, 1), (2, 1), (1, 0), 1, 2, False),
    (1, 4, 10, 10, 4, 3, 1, 2, 2, 4, True),  # depthwise, dilated
    (3, 2, 5, 6, 3, 1, 2, 0, 1, 1, True),  # 1x1, strided
    (0, 3, 6, 6, 2, 3, 1, 1, 1, 1, True),  # empty batch
]
# "kernel": the compiled op called directly (dnr.ops may prefer the reference for some inputs on CPU)
IMPLS = ["ops", "reference", "kernel"]


def _conv_inputs(case, device, dtype, requires_grad=False):
    b, c, h, w, o, k, stride, padding, dilation, groups, has_bias = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(b, c, h, w, device=device, dtype=dtype, requires_grad=requires_grad)
    weight = torch.randn(o, c // groups, kh, kw, device=device, dtype=dtype, requires_grad=requires_grad)
    mask = torch.rand(weight.shape, device=device) < 0.5
    bias = torch.randn(o, device=device, dtype=dtype, requires_grad=requires_grad) if has_bias else None
    return x, weight, mask, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _masked_conv2d(impl, x, weight, mask, bias, stride=1, padding=0, dilation=1, groups=1, dense_weight_grad=True):
    if impl == "ops":
        return dnr.ops.masked_conv2d(x, weight, mask, bias, stride, padding, dilation, groups, dense_weight_grad)
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    if impl == "kernel":
        if not _ext.has_kernel("masked_conv2d", x.device.type):
            pytest.skip(f"no compiled masked_conv2d ({_ext.reason() or 'not built'})")
        return torch.ops.dnr.masked_conv2d(x, weight, mask, bias, pair(stride), pair(padding), pair(dilation), groups,
                                           dense_weight_grad)
    return reference.masked_conv2d(x, weight, mask, bias, pair(stride), pair(padding), pair(dilation), groups, dense_weight_grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CONV_CASES)
def test_masked_conv2d_value(case, dtype, impl, device):
    x, weight, mask, bias, kw = _conv_inputs(case, device, dtype)
    out = _masked_conv2d(impl, x, weight, mask, bias, **kw)
    torch.testing.assert_close(out, F.conv2d(x, weight * mask, bias, **kw))


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_masked_conv2d_non_contiguous(layout, device):
    x, weight, mask, bias, kw = _conv_inputs(CONV_CASES[0], device, torch.float32)
    if layout == "channels_last":
        x, weight = x.to(memory_format=torch.channels_last), weight.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(2, 6, 8, 16, device=device)[:, ::2, :, ::2]
    else:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        mask = mask.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (x.is_contiguous() and mask.is_contiguous())
    out = dnr.ops.masked_conv2d(x, weight, mask, bias, **kw)
    torch.testing.assert_close(out, F.conv2d(x.contiguous(), weight * mask, bias, **kw))


def test_masked_conv2d_unbatched_and_same_padding(device):
    x = torch.randn(3, 7, 7, device=device)
    weight = torch.randn(5, 3, 3, 3, device=device)
    mask = torch.rand(weight.shape, device=device) < 0.5
    out = dnr.ops.masked_conv2d(x, weight, mask, padding="same", dilation=2)
    torch.testing.assert_close(out, F.conv2d(x, weight * mask, padding="same", dilation=2))
    assert out.shape == (5, 7, 7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dense", [True, False])
def test_masked_conv2d_grads(dense, impl, device):
    x, weight, mask, bias, kw = _conv_inputs(CONV_CASES[1], device, torch.float64, requires_grad=True)
    grad_out = torch.randn_like(F.conv2d(x, weight, bias, **kw))
    _masked_conv2d(impl, x, weight, mask, bias, dense_weight_grad=dense, **kw).backward(grad_out)

    # Oracle: the gradient wrt an independent leaf holding weight * mask.
    x_ref = x.detach().clone().requires_grad_()
    w_eff = (weight * mask).detach().requires_grad_()
    F.conv2d(x_ref, w_eff, bias.detach() if bias is not None else None, **kw).backward(grad_out)
    expected = w_eff.grad if dense else w_eff.grad * mask
    torch.testing.assert_close(weight.grad, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    pruned = weight.grad[~mask]
    if dense:
        assert pruned.abs().sum() > 0, "dense weight gradient must reach pruned positions"
    else:
        assert torch.all(pruned == 0)


@pytest.mark.parametrize("dense", [True, False])
def test_masked_conv2d_gradcheck(dense, device):
    x, weight, mask, bias, kw = _conv_inputs((2, 4, 5, 5, 4, 3, 1, 1, 1, 2, True), device, torch.float64, requires_grad=True)
    if dense:
        # The dense weight gradient is by design not d(value)/d(weight) at pruned
        # positions: check weight with a full mask, and x and bias with a sparse one.
        full = torch.ones_like(mask)
        assert torch.autograd.gradcheck(lambda x, w, b: dnr.ops.masked_conv2d(x, w, full, b, **kw), (x, weight, bias), fast_mode=True)
        w = weight.detach()
        assert torch.autograd.gradcheck(lambda x, b: dnr.ops.masked_conv2d(x, w, mask, b, dense_weight_grad=True, **kw), (x, bias), fast_mode=True)
    else:
        assert torch.autograd.gradcheck(
            lambda x, w, b: dnr.ops.masked_conv2d(x, w, mask, b, dense_weight_grad=False, **kw), (x, weight, bias), fast_mode=True
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 6), (0, 6), (6,)])
def test_masked_linear_value(shape, dtype, device):
    x = torch.randn(shape, device=device, dtype=dtype)
    weight = torch.randn(4, 6, device=device, dtype=dtype)
    mask = torch.rand(weight.shape, device=device) < 0.5
    bias = torch.randn(4, device=device, dtype=dtype)
    torch.testing.assert_close(dnr.ops.masked_linear(x, weight, mask, bias), F.linear(x, weight * mask, bias))


@pytest.mark.parametrize("dense", [True, False])
def test_masked_linear_grads(dense, device):
    x = torch.randn(5, 6, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 6, device=device, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(weight.shape, device=device) < 0.5
    grad_out = torch.randn(5, 4, device=device, dtype=torch.float64)
    dnr.ops.masked_linear(x, weight, mask, dense_weight_grad=dense).backward(grad_out)
    dense_grad = grad_out.t() @ x.detach()  # d(sum(grad_out * x W^T)) / dW
    torch.testing.assert_close(weight.grad, dense_grad if dense else dense_grad * mask)
    torch.testing.assert_close(x.grad, grad_out @ (weight * mask).detach())
    w = weight.detach()
    assert torch.autograd.gradcheck(lambda x: dnr.ops.masked_linear(x, w, mask, dense_weight_grad=dense), (x,))


CONV_ERRORS = [
    (dict(mask="float"), TypeError, r"mask must be a torch\.bool tensor, got dtype torch\.float32"),
    (dict(mask="short"), ValueError, r"mask must have the shape of weight \(4, 3, 3, 3\), got \(4, 3, 3, 2\)"),
    (dict(input="2d"), ValueError, r"input must be \[B, C, H, W\] or \[C, H, W\], got shape \(3, 8\)"),
    (dict(input="channels"), ValueError, r"input has 5 channels but weight \(4, 3, 3, 3\) with groups=1 expects 3"),
    (dict(input="double"), TypeError, r"input must have weight's dtype torch\.float32, got torch\.float64"),
    (dict(bias="short"), ValueError, r"bias must have shape \(4,\), got \(3,\)"),
    (dict(stride=0), ValueError, r"stride must be >= 1, got 0"),
    (dict(padding=(1, 2, 3)), TypeError, r"padding must be an int or a pair of ints, got \(1, 2, 3\)"),
    (dict(padding="full"), ValueError, r"padding must be 'valid', 'same', an int or a pair of ints, got 'full'"),
    (dict(groups=2), ValueError, r"input has 3 channels but weight \(4, 3, 3, 3\) with groups=2 expects 6"),
    (dict(dense_weight_grad=1), TypeError, r"dense_weight_grad must be a bool, got 1"),
]


@pytest.mark.parametrize("change, error, message", CONV_ERRORS)
def test_masked_conv2d_errors(change, error, message):
    x, weight, bias = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)
    mask = torch.ones(4, 3, 3, 3, dtype=torch.bool)
    inputs = {"2d": torch.randn(3, 8), "channels": torch.randn(2, 5, 8, 8), "double": x.double()}
    kwargs = dict(change)
    x = inputs.get(kwargs.pop("input", None), x)
    mask = {"float": mask.float(), "short": mask[..., :2]}.get(kwargs.pop("mask", None), mask)
    bias = {"short": bias[:3]}.get(kwargs.pop("bias", None), bias)
    with pytest.raises(error, match=message):
        dnr.ops.masked_conv2d(x, weight, mask, bias, **kwargs)


def test_masked_linear_errors():
    weight, mask = torch.randn(4, 6), torch.ones(4, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"input must be \[\*, 6\] to match weight \(4, 6\), got shape \(2, 5\)"):
        dnr.ops.masked_linear(torch.randn(2, 5), weight, mask)
    with pytest.raises(TypeError, match=r"mask must be a torch\.bool tensor, got dtype torch\.int64"):
        dnr.ops.masked_linear(torch.randn(2, 6), weight, mask.long())
    with pytest.raises(TypeError, match=r"weight must be a torch\.Tensor, got list"):
        dnr.ops.masked_linear(torch.randn(2, 6), [[1.0]], mask)


# ----------------------------------------------------------------- channel masks (gather path)


def _channel_mask(weight, alive):
    mask = torch.rand(weight.shape, device=weight.device) < 0.6
    mask[~alive] = False  # whole output channels pruned
    mask[alive, 0, 0, 0] = True
    return mask


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_masked_conv2d_dead_channels(layout, has_bias, dense, device):
    """Whole pruned output channels (the kernel convolves the live filters only): values and
    gradients against F.conv2d(x, weight * mask) and an independent leaf for weight * mask."""
    x = torch.randn(3, 4, 7, 6, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, device=device, dtype=torch.float64, requires_grad=True) if has_bias else None
    alive = torch.tensor([True, False, True, False, False, True], device=device)
    mask = _channel_mask(weight, alive)
    xin = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x
    out = dnr.ops.masked_conv2d(xin, weight, mask, bias, stride=(2, 1), padding=1, dense_weight_grad=dense)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    x_ref = x.detach().clone().requires_grad_()
    w_eff = (weight * mask).detach().requires_grad_()
    b_ref = bias.detach().clone().requires_grad_() if has_bias else None
    want = F.conv2d(x_ref, w_eff, b_ref, stride=(2, 1), padding=1)
    want.backward(grad_out)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(weight.grad, w_eff.grad if dense else w_eff.grad * mask)
    if has_bias:
        torch.testing.assert_close(bias.grad, b_ref.grad)
    if dense:
        assert weight.grad[~alive].abs().sum() > 0, "dense weight gradient must reach pruned channels"


def test_masked_conv2d_gradcheck_dead_channels(device):
    x = torch.randn(2, 2, 4, 4, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
    mask = _channel_mask(weight, torch.tensor([False, True, True], device=device))
    assert torch.autograd.gradcheck(
        lambda x, w, b: dnr.ops.masked_conv2d(x, w, mask, b, padding=1, dense_weight_grad=False), (x, weight, bias),
        fast_mode=True,
    )


def test_masked_conv2d_all_channels_dead_and_empty_batch(device):
    weight = torch.randn(3, 2, 3, 3, device=device)
    bias = torch.randn(3, device=device)
    dead = torch.zeros_like(weight, dtype=torch.bool)
    x = torch.randn(2, 2, 5, 5, device=device)
    torch.testing.assert_close(dnr.ops.masked_conv2d(x, weight, dead, bias), F.conv2d(x, weight * dead, bias))
    some = _channel_mask(weight, torch.tensor([True, False, True], device=device))
    empty = torch.randn(0, 2, 5, 5, device=device)
    assert dnr.ops.masked_conv2d(empty, weight, some, bias).shape == (0, 3, 3, 3)


@pytest.mark.parametrize("write", ["copy_", "data", "data_copy_"])
def test_masked_conv2d_sees_new_mask(write, device):
    """A mask changed in place between forwards is seen, however it was written: copy_ bumps its
    version counter, a write through .data (as dist.broadcast(t.data) does) does not. (The CUDA kernel
    used to cache the live channels per version and kept the old ones after a .data write.)"""
    layer_w = torch.randn(4, 2, 3, 3, device=device, requires_grad=True)
    mask = torch.ones_like(layer_w, dtype=torch.bool)
    x = torch.randn(1, 2, 5, 5, device=device)
    for alive in ([True, False, True, False], [False, False, True, True], [True, True, False, True]):
        new = torch.tensor(alive, device=device).view(-1, 1, 1, 1).expand_as(mask)
        before = mask._version
        if write == "copy_":
            mask.copy_(new)
        elif write == "data":
            mask.data[:] = new
        else:
            mask.data.copy_(new)
        assert (mask._version == before) is (write != "copy_")  # the case the old cache missed
        out = dnr.ops.masked_conv2d(x, layer_w, mask, padding=1)
        torch.testing.assert_close(out, F.conv2d(x, layer_w * mask, padding=1))
        g = torch.autograd.grad(out.square().sum(), layer_w)[0]
        w_eff = (layer_w * mask).detach().requires_grad_()
        torch.testing.assert_close(g, torch.autograd.grad(F.conv2d(x, w_eff, padding=1).square().sum(), w_eff)[0])


# ----------------------------------------------------------------- second-order gradients


def _second_order_inputs(device, channel_mask):
    x = torch.randn(2, 3, 5, 5, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(weight.shape, device=device) < 0.5
    if channel_mask:
        mask[1] = False
        mask[3] = False
    return x, weight, mask, bias


def _kernel_conv(dense):
    return lambda x, w, mask, b: torch.ops.dnr.masked_conv2d(x, w, mask, b, [1, 1], [1, 1], [1, 1], 1, dense)


@pytest.mark.parametrize("channel_mask", [False, True], ids=["irregular", "channel"])
def test_masked_conv2d_gradgradcheck(channel_mask, device):
    """Double backward through the compiled op (gradgradcheck, float64): the backward op has its own
    autograd, so create_graph=True users (gradient penalties, Hessian-vector products) get exact
    second derivatives. With dense_weight_grad=False the op's gradients are the true derivatives."""
    if not _ext.has_kernel("masked_conv2d", device):
        pytest.skip(f"no compiled masked_conv2d ({_ext.reason() or 'not built'})")
    x, weight, mask, bias = _second_order_inputs(device, channel_mask)
    conv = _kernel_conv(False)
    assert torch.autograd.gradgradcheck(lambda x, w, b: conv(x, w, mask, b), (x, weight, bias))


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("channel_mask", [False, True], ids=["irregular", "channel"])
def test_masked_conv2d_double_backward_matches_reference(channel_mask, dense, device):
    """A gradient-penalty loss differentiated twice: the kernel path equals the reference's autograd
    (whose dense weight gradient defines the convention at pruned weights) in every input."""
    if not _ext.has_kernel("masked_conv2d", device):
        pytest.skip(f"no compiled masked_conv2d ({_ext.reason() or 'not built'})")
    x, weight, mask, bias = _second_order_inputs(device, channel_mask)

    def penalty_grads(conv):
        out = conv(x, weight, mask, bias)
        gx, gw = torch.autograd.grad(out.square().sum(), (x, weight), create_graph=True)
        penalty = gx.square().sum() + (gw * torch.linspace(-1, 1, gw.numel(), device=device, dtype=gw.dtype).view_as(gw)).sum()
        return torch.autograd.grad(penalty, (x, weight, bias))

    want = penalty_grads(lambda x, w, m, b: reference.masked_conv2d(x, w, m, b, [1, 1], [1, 1], [1, 1], 1, dense))
    got = penalty_grads(_kernel_conv(dense))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert got[1].abs().sum() > 0


def test_compiled_kernel_is_used_when_loaded():
    from dnr import _ext

    if not _ext.loaded():
        pytest.skip(_ext.reason())
    assert dnr.ops.backend()["masked_conv2d"]["cpu"] == "extension"
    x, weight, mask, bias, kw = _conv_inputs(CONV_CASES[0], "cpu", torch.float32, requires_grad=True)
    out = torch.ops.dnr.masked_conv2d(x, weight, mask, bias, [1, 1], [1, 1], [1, 1], 1, True)
    assert out.grad_fn is not None, "registered autograd must attach a backward"
    torch.testing.assert_close(out, F.conv2d(x, weight * mask, bias, padding=1))


CPP_CONV_ERRORS = [
    (lambda x, w, k: (x[0], w, k), r"dnr::masked_conv2d: input must be \[B, C, H, W\], got shape \[3, 8, 8\]"),
    (lambda x, w, k: (x, w, k.float()), r"dnr::masked_conv2d: mask must be torch\.bool, got Float"),
    (lambda x, w, k: (x, w, k[:2]), r"dnr::masked_conv2d: mask has shape \[2, 3, 3, 3\] but weight has shape \[4, 3, 3, 3\]"),
]


@pytest.mark.parametrize("change, message", CPP_CONV_ERRORS)
def test_masked_conv2d_kernel_errors(change, message):
    """The compiled op's own checks (direct torch.ops calls skip the Python wrapper)."""
    from dnr import _ext

    if not _ext.loaded():
        pytest.skip(_ext.reason())
    x, w, k = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.ones(4, 3, 3, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dnr.masked_conv2d(*change(x, w, k), None, [1, 1], [0, 0], [1, 1], 1, True)


def _autocast_dtype(device):
    return torch.bfloat16 if device == "cpu" else torch.float16


@pytest.mark.parametrize("input_dtype", ["float32", "autocast"], ids=["fp32-input", "lowp-input"])
@pytest.mark.parametrize("pattern", ["irregular", "channel"])
def test_masked_conv2d_under_autocast_casts_like_conv2d(pattern, input_dtype, device):
    """Under autocast the op (kernel or reference) computes in the autocast dtype like F.conv2d does, takes
    a low-precision input (the previous layer's output) and returns the weight gradient in float32."""
    low = _autocast_dtype(device)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9, device=device)
    x = x.to(low) if input_dtype == "autocast" else x
    weight = torch.randn(6, 4, 3, 3, device=device, requires_grad=True)
    bias = torch.randn(6, device=device, requires_grad=True)
    mask = torch.rand(weight.shape, device=device) < 0.5
    if pattern == "channel":  # on CPU the compiled kernel runs only when whole output channels are pruned
        mask = mask.clone()
        mask[::2] = False
    # the oracle's leaf is the effective weight: its gradient is the dense one the op returns
    ref_w = (weight.detach() * mask).requires_grad_(True)
    ref_b = bias.detach().clone().requires_grad_(True)
    with torch.autocast(device, dtype=low):
        out = dnr.ops.masked_conv2d(x, weight, mask, bias, padding=1)
        ref = F.conv2d(x, ref_w, ref_b, padding=1)
    assert out.dtype == ref.dtype == low
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    g = torch.randn(out.shape, device=device)
    out.float().backward(g)
    ref.float().backward(g)
    assert weight.grad.dtype == bias.grad.dtype == torch.float32
    torch.testing.assert_close(weight.grad, ref_w.grad, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(bias.grad, ref_b.grad, atol=5e-2, rtol=2e-2)
    assert weight.grad[~mask].abs().sum() > 0  # still the dense gradient DNR's momentum needs


# ----------------------------------------------------------------- torch.compile, channels_last


@pytest.mark.slow
def test_compiled_channel_masked_model_in_channels_last_matches_eager():
    """A channel-masked model in channels_last through inductor: the fake kernels must report the
    kernels' strides (inductor asserts them), and values and gradients must equal eager's."""
    import dnr

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 12, 3, padding=1, bias=False),
        torch.nn.ReLU(), torch.nn.Conv2d(12, 8, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    )
    dnr.sparsify(model, density=0.5, mode="channel", generator=torch.Generator().manual_seed(1))
    model = model.to(memory_format=torch.channels_last)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(not bool(m.mask.reshape(m.mask.shape[0], -1).any(1).all()) for m in convs), "no pruned channel"
    x = torch.randn(4, 3, 10, 10).to(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (4,))

    def step(run):
        model.zero_grad()
        loss = F.cross_entropy(run(x), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    want_loss, want_grads = step(model)
    got_loss, got_grads = step(torch.compile(model))
    torch.testing.assert_close(got_loss, want_loss)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("write", ["copy_", "data"])
def test_reduce_overhead_sees_a_rewired_mask(write):
    """torch.compile(mode="reduce-overhead") graphs the model, the masked convolution included (its
    CUDA path reads the mask on the device only): after a mask changes in place, the compiled model
    still equals eager."""
    import dnr

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1)).cuda()
    dnr.sparsify(model, density=0.5, mode="channel", generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(2, 3, 8, 8, device="cuda")
    for step in range(3):
        torch.testing.assert_close(compiled(x.clone()), model(x))
        conv = model[0]  # channel mode leaves the last layer dense (prune_last=False)
        new = torch.roll(conv.mask, shifts=step + 1, dims=0)  # other live channels, same address
        if write == "copy_":
            conv.mask.copy_(new)
        else:
            conv.mask.data[:] = new
