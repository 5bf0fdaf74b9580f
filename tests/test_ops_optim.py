"""dnr.ops.momentum_stats against per-tensor float64 sums, and dnr.ops.masked_sgd_step_
against torch.optim.SGD followed by a mask multiply."""

import numpy as np
import pytest
import torch

import dnr.ops
from dnr import reference

IMPLS = {"ops": dnr.ops, "reference": reference}


def _layers(device, dtype, shapes=((8, 3, 3, 3), (40000,), (5, 7), (0, 4), (6,))):
    momenta = [torch.randn(s, dtype=dtype).to(device) for s in shapes]
    masks = [torch.rand(s).to(device) < 0.3 for s in shapes]
    masks[-1][:] = False  # a layer with nothing active
    if len(shapes) > 2:  # a non-contiguous layer
        momenta[2], masks[2] = momenta[2].t(), masks[2].t()
    return momenta, masks


def sgd_then_mask(sgd, params, grads, masks):
    """The oracle step: torch.optim.SGD with ``grads`` set on ``params``, then the mask multiply."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    sgd.step()
    with torch.no_grad():
        for p, k in zip(params, masks):
            p.mul_(k)


def stats_oracle(momenta, masks):
    rows = []
    for m, k in zip(momenta, masks):
        values = np.abs(m.double().cpu().numpy())[k.cpu().numpy()]
        rows.append((float(np.sum(values, dtype=np.float64)), float(values.size)))
    return np.array(rows, dtype=np.float64).reshape(-1, 2)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_momentum_stats_matches_sums(dtype, impl, device):
    momenta, masks = _layers(device, dtype)
    out = IMPLS[impl].momentum_stats(momenta, masks)
    assert out.dtype == torch.float64 and out.shape == (len(momenta), 2)
    assert out.device.type == device
    np.testing.assert_allclose(out.cpu().numpy(), stats_oracle(momenta, masks), rtol=1e-12, atol=0)


def test_momentum_stats_deterministic(device):
    momenta, masks = _layers(device, torch.float32, shapes=((300, 1000), (64, 64, 3, 3)))
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            runs.append(dnr.ops.momentum_stats(momenta, masks))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert torch.equal(runs[0], other), "momentum_stats must give bit-identical results"


def test_momentum_stats_empty_list():
    out = dnr.ops.momentum_stats([], [])
    assert out.shape == (0, 2) and out.dtype == torch.float64


MOMENTUM_ERRORS = [
    (lambda m, k: (m, k[:1]), ValueError, r"momenta and masks must have the same length, got 2 and 1"),
    (lambda m, k: (m, [k[0], k[1].float()]), TypeError, r"masks\[1\] must be a torch\.bool tensor, got dtype torch\.float32"),
    (lambda m, k: (m, [k[0], k[1][:2]]), ValueError, r"masks\[1\] must have the shape of momenta\[1\] \(3, 4\), got \(2, 4\)"),
    (lambda m, k: ([m[0], m[1].long()], k), TypeError, r"momenta\[1\] must be a floating-point tensor, got dtype torch\.int64"),
    (lambda m, k: (m[0], k), TypeError, r"momenta must be a list or tuple of tensors, got Tensor"),
]


@pytest.mark.parametrize("change, error, message", MOMENTUM_ERRORS)
def test_momentum_stats_errors(change, error, message):
    momenta, masks = [torch.randn(5), torch.randn(3, 4)], [torch.ones(5, dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool)]
    with pytest.raises(error, match=message):
        dnr.ops.momentum_stats(*change(momenta, masks))


# (momentum, dampening, weight_decay, nesterov)
SGD_CASES = [(0.9, 0.0, 5e-4, False), (0.9, 0.0, 5e-4, True), (0.8, 0.1, 0.0, False), (0.0, 0.0, 1e-2, False)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum, dampening, weight_decay, nesterov", SGD_CASES)
def test_masked_sgd_step_matches_sgd(momentum, dampening, weight_decay, nesterov, dtype, impl, device):
    shapes = [(6, 3, 3, 3), (10, 4), (4,)]
    masks = [torch.rand(s, device=device) < 0.4 for s in shapes]
    params = [(torch.randn(s, dtype=dtype, device=device) * k).requires_grad_() for s, k in zip(shapes, masks)]
    oracle_params = [p.detach().clone().requires_grad_() for p in params]
    sgd = torch.optim.SGD(oracle_params, lr=0.1, momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay, nesterov=nesterov, foreach=False)
    buffers = [torch.zeros_like(p) for p in params]
    for step in range(4):
        grads = [torch.randn_like(p) for p in params]
        sgd_then_mask(sgd, oracle_params, grads, masks)
        IMPLS[impl].masked_sgd_step_(params, grads, buffers, masks, 0.1, momentum, dampening, weight_decay,
                                     nesterov, step == 0)
        for p, want in zip(params, oracle_params):
            torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)
        if momentum:
            for buf, p in zip(buffers, oracle_params):
                torch.testing.assert_close(buf, sgd.state[p]["momentum_buffer"], rtol=1e-6, atol=1e-7)
    for p, buf, k in zip(params, buffers, masks):
        assert torch.all(p[~k] == 0), "pruned weights must be exactly zero"
        if momentum:
            assert buf[~k].abs().sum() > 0, "momentum buffers must stay dense"


def _sgd_args():
    params = [torch.randn(3, 4), torch.randn(5)]
    return dict(params=params, grads=[torch.randn_like(p) for p in params],
                momentum_buffers=[torch.zeros_like(p) for p in params],
                masks=[torch.rand(p.shape) < 0.5 for p in params],
                lr=0.1, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False, first_step=True)


SGD_ERRORS = [
    (dict(masks=lambda a: a["masks"][:1]), ValueError,
     r"params, grads, momentum_buffers and masks must have the same length, got 2, 2, 2 and 1"),
    (dict(grads=lambda a: [a["grads"][0].double(), a["grads"][1]]), TypeError,
     r"grads\[0\] must have params\[0\]'s dtype torch\.float32, got torch\.float64"),
    (dict(momentum_buffers=lambda a: [a["momentum_buffers"][0], torch.zeros(4)]), ValueError,
     r"momentum_buffers\[1\] must have the shape of params\[1\] \(5,\), got \(4,\)"),
    (dict(masks=lambda a: [a["masks"][0], a["masks"][1].int()]), TypeError,
     r"masks\[1\] must be a torch\.bool tensor, got dtype torch\.int32"),
    (dict(lr=lambda a: -1.0), ValueError, r"lr must be >= 0\.0, got -1\.0"),
    (dict(nesterov=lambda a: True, dampening=lambda a: 0.1), ValueError,
     r"nesterov needs momentum > 0 and dampening == 0, got momentum=0\.9, dampening=0\.1"),
    (dict(first_step=lambda a: "yes"), TypeError, r"first_step must be a bool, got 'yes'"),
]


@pytest.mark.parametrize("changes, error, message", SGD_ERRORS)
def test_masked_sgd_step_errors_leave_inputs_unchanged(changes, error, message):
    args = _sgd_args()
    mutable = args["params"] + args["momentum_buffers"]
    before = [t.clone() for t in mutable]
    for key, change in changes.items():
        args[key] = change(args)
    with pytest.raises(error, match=message):
        dnr.ops.masked_sgd_step_(**args)
    assert all(torch.equal(t, b) for t, b in zip(mutable, before)), "nothing may be modified on error"


def _sgd_oracle_float64(params, grads, bufs, masks, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """The SGD formula in float64 (independent of ATen's op sequence)."""
    out_p, out_b = [], []
    for p, g, b, k in zip(params, grads, bufs, masks):
        p, g, b = p.double(), g.double(), b.double()
        g = g + weight_decay * p
        b = g if first_step else momentum * b + (1 - dampening) * g
        d = g + momentum * b if nesterov else b
        out_p.append((p - lr * d) * k)
        out_b.append(b)
    return out_p, out_b


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2), (torch.float32, 2e-6)])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_masked_sgd_step_reduced_precision(dtype, tol, impl, device):
    shapes = [(33, 7), (40001,), (1,)]
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    bufs = [torch.randn(s, device=device).to(dtype) for s in shapes]
    masks = [torch.rand(s, device=device) < 0.5 for s in shapes]
    args = (0.1, 0.9, 0.0, 1e-2, True, False)
    want_p, want_b = _sgd_oracle_float64(params, grads, bufs, masks, *args)
    IMPLS[impl].masked_sgd_step_(params, grads, bufs, masks, *args)
    for got, want in zip(params + bufs, want_p + want_b):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_masked_sgd_step_exact_with_non_contiguous_grads(device):
    """float32: bit for bit against SGD + mask, gradients and masks given as transposed views."""
    p = torch.randn(40, 37, device=device)
    grad = torch.randn(37, 40, device=device).t()
    mask = (torch.rand(37, 40, device=device) < 0.5).t()
    ref = torch.nn.Parameter(p.clone())
    sgd = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=False)
    buf = torch.zeros_like(p)
    for step in range(3):
        sgd_then_mask(sgd, [ref], [grad], [mask])
        dnr.ops.masked_sgd_step_([p], [grad], [buf], [mask], 0.1, 0.9, 0.0, 1e-3, False, step == 0)
    assert torch.equal(p, ref.detach())
    assert torch.equal(buf, sgd.state[ref]["momentum_buffer"])


@pytest.mark.parametrize("impl", list(IMPLS))
def test_masked_sgd_step_without_momentum_leaves_buffers(impl, device):
    p, g = torch.randn(5, device=device), torch.randn(5, device=device)
    mask = torch.tensor([True, False, True, True, False], device=device)
    buf = torch.full((5,), 7.0, device=device)
    want = (p - 0.1 * g) * mask
    IMPLS[impl].masked_sgd_step_([p], [g], [buf], [mask], 0.1, 0.0, 0.0, 0.0, False, False)
    torch.testing.assert_close(p, want)
    assert torch.all(buf == 7.0), "with momentum 0 the buffers are neither read nor written"


def test_masked_sgd_step_kernel_errors():
    """The compiled op's own checks (direct torch.ops calls skip the Python wrapper)."""
    from dnr import _ext

    if not _ext.has_kernel("masked_sgd_step_", "cpu"):
        pytest.skip("no CPU kernel")
    p = [torch.randn(3, 4)]
    op = torch.ops.dnr.masked_sgd_step_
    with pytest.raises(RuntimeError, match=r"must have one length, got 1, 1, 1 and 0"):
        op(p, [torch.randn(3, 4)], [torch.zeros(3, 4)], [], 0.1, 0.9, 0.0, 0.0, False, True)
    with pytest.raises(RuntimeError, match=r"params\[0\] must be dense, e\.g\. contiguous or channels_last \(it is "
                                           r"written in place\), got sizes \[3, 4\] and strides \[8, 2\]"):
        op([torch.randn(3, 8)[:, ::2]], [torch.randn(3, 4)], [torch.zeros(3, 4)], [torch.ones(3, 4, dtype=torch.bool)],
           0.1, 0.9, 0.0, 0.0, False, True)
    cl = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] must have the memory layout of params\[0\] "
                                           r"\(strides \[60, 1, 15, 3\]; it is written in place\), got strides "
                                           r"\[60, 20, 5, 1\]"):
        op([cl], [torch.randn(2, 3, 4, 5)], [torch.zeros(2, 3, 4, 5)], [torch.ones(2, 3, 4, 5, dtype=torch.bool)],
           0.1, 0.9, 0.0, 0.0, False, True)
    with pytest.raises(RuntimeError, match=r"masks\[0\] has dtype Float but must have Bool"):
        op(p, [torch.randn(3, 4)], [torch.zeros(3, 4)], [torch.ones(3, 4)], 0.1, 0.9, 0.0, 0.0, False, True)
    with pytest.raises(RuntimeError, match=r"nesterov needs momentum > 0 and dampening == 0, got momentum=0"):
        op(p, [torch.randn(3, 4)], [torch.zeros(3, 4)], [torch.ones(3, 4, dtype=torch.bool)], 0.1, 0.0, 0.0, 0.0, True, True)


@pytest.mark.parametrize("impl", ["ops", "kernel"])
def test_masked_sgd_step_exact_for_channels_last_params(impl, device, monkeypatch):
    """float32, bit for bit against SGD + mask for channels_last weights (what --channels-last trains), with
    contiguous gradients and masks; through the wrapper the compiled kernel runs (no reference fallback)."""
    from dnr import _ext

    if impl == "kernel" and not _ext.has_kernel("masked_sgd_step_", torch.device(device).type):
        pytest.skip("no compiled masked_sgd_step_")
    if impl == "ops" and _ext.has_kernel("masked_sgd_step_", torch.device(device).type):
        monkeypatch.setattr(reference, "masked_sgd_step_", lambda *a, **k: pytest.fail("fell back to the reference"))
    layout = torch.channels_last
    shapes = [(8, 3, 3, 3), (16, 8, 1, 1), (5, 7)]
    params = [torch.randn(s, device=device) for s in shapes]
    params = [p.contiguous(memory_format=layout) if p.dim() == 4 else p for p in params]
    masks = [torch.rand(s, device=device) < 0.4 for s in shapes]
    refs = [torch.nn.Parameter(p.clone()) for p in params]
    sgd = torch.optim.SGD(refs, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True, foreach=False)
    bufs = [torch.zeros_like(p) for p in params]  # p's memory order
    assert bufs[0].is_contiguous(memory_format=layout) and not bufs[0].is_contiguous()
    op = dnr.ops.masked_sgd_step_ if impl == "ops" else torch.ops.dnr.masked_sgd_step_
    for step in range(3):
        grads = [torch.randn(s, device=device) for s in shapes]  # contiguous: the op reorders them
        sgd_then_mask(sgd, refs, grads, masks)
        op(params, grads, bufs, masks, 0.1, 0.9, 0.0, 1e-3, True, step == 0)
    for p, r, b in zip(params, refs, bufs):
        assert torch.equal(p, r.detach()) and torch.equal(b, sgd.state[r]["momentum_buffer"])
    assert params[0].is_contiguous(memory_format=layout)


def test_masked_sgd_step_falls_back_for_non_contiguous_params(device):
    base = torch.randn(6, 5, device=device)
    p = base.t()  # a view: the kernel needs contiguous params, the wrapper uses the reference
    grad, buf = torch.randn(5, 6, device=device), torch.zeros(5, 6, device=device)
    mask = torch.rand(5, 6, device=device) < 0.5
    want = (p - 0.1 * grad) * mask
    dnr.ops.masked_sgd_step_([p], [grad], [buf], [mask], 0.1, 0.9, 0.0, 0.0, False, True)
    torch.testing.assert_close(p, want)
    assert torch.equal(base.t(), p)


@pytest.mark.parametrize("impl", ["ops", "reference"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_masked_sgd_step_bumps_version_counters(momentum, impl, device):
    """params (and the buffers when momentum is used) are written in place: their version counters move
    as torch.optim.SGD's do, so autograd raises for a graph that saved a parameter's old value."""
    params = [torch.randn(3, 4, device=device, requires_grad=True), torch.randn(5, device=device, requires_grad=True)]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    masks = [torch.rand(p.shape, device=device) < 0.5 for p in params]
    saved = sum((p * p).sum() for p in params)  # mul saves each parameter
    before = [t._version for t in params + bufs]
    args = (params, grads, bufs, masks, 0.1, momentum, 0.0, 1e-4, False, True)
    with torch.no_grad():
        if impl == "ops":
            dnr.ops.masked_sgd_step_(*args)
        else:
            reference.masked_sgd_step_(*args)
    after = [t._version for t in params + bufs]
    assert all(a > b for a, b in zip(after[:2], before[:2]))
    assert all((a > b) is (momentum != 0) for a, b in zip(after[2:], before[2:]))  # untouched without momentum
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
