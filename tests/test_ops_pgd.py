"""dnr.ops.pgd_step_ against the PGD formula evaluated in float64 with numpy."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dnr.ops
from dnr import reference

# Tolerance of one result vs the float64 formula: float64 and float32 arithmetic are
# exact up to their rounding; half/bfloat16 round x_adv and delta once each.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOLERANCE)


def oracle(delta, x, grad, eps, alpha, lo, hi):
    """The contract's formula in float64; eps/alpha scalars or [B]. Returns (delta, x_adv)."""
    delta, x, grad = (t.double().cpu().numpy() for t in (delta, x, grad))
    view = (-1,) + (1,) * (x.ndim - 1)
    eps = np.asarray(eps, dtype=np.float64).reshape(view if np.ndim(eps) else ())
    alpha = np.asarray(alpha, dtype=np.float64).reshape(view if np.ndim(alpha) else ())
    d = np.clip(delta + alpha * np.sign(grad), -eps, eps)
    x_adv = np.clip(x + d, lo, hi)
    return x_adv - x, x_adv


def make_inputs(shape, device, dtype, eps):
    """x in [0, 1], delta inside the eps-ball, grad with some exact zeros."""
    b = shape[0]
    eps_t = torch.as_tensor(eps, dtype=torch.float32)
    e = eps_t.view((-1,) + (1,) * (len(shape) - 1)) if eps_t.dim() else eps_t
    x = torch.rand(shape)
    delta = (torch.rand(shape) * 2 - 1) * e
    grad = torch.randn(shape) * (torch.rand(shape) > 0.1)
    x[: max(b // 2, 1)] = torch.round(x[: max(b // 2, 1)])  # pixels at 0 / 1 exercise the box clamp
    return [t.to(device=device, dtype=dtype) for t in (delta, (x + delta).clamp(0, 1), x, grad)]


def run(impl, delta, x_adv, x, grad, eps, alpha, lo=0.0, hi=1.0):
    if impl == "ops":
        dnr.ops.pgd_step_(delta, x_adv, x, grad, eps, alpha, lo, hi)
    else:
        as_t = lambda v: torch.as_tensor(v, dtype=torch.float64)  # noqa: E731
        reference.pgd_step_(delta, x_adv, x, grad, as_t(eps), as_t(alpha), lo, hi)


@pytest.mark.parametrize("impl", ["ops", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, eps, alpha",
    [
        ((4, 3, 5, 5), 8 / 255, 2 / 255),
        ((3, 1, 7, 7), [0.1, 0.03, 0.0], [0.02, -0.01, 0.5]),  # per sample, targeted (< 0), eps 0
        ((5, 17), 0.3, -0.1),
        ((1, 70000), 0.05, 0.01),  # several parallel tasks on one sample
    ],
)
def test_pgd_step_matches_formula(shape, eps, alpha, dtype, impl, device):
    delta, x_adv, x, grad = make_inputs(shape, device, dtype, eps)
    want_delta, want_x_adv = oracle(delta, x, grad, eps, alpha, 0.0, 1.0)
    eps_arg = torch.tensor(eps, dtype=torch.float64, device=device) if isinstance(eps, list) else eps
    alpha_arg = torch.tensor(alpha, dtype=torch.float64, device=device) if isinstance(alpha, list) else alpha
    run(impl, delta, x_adv, x, grad, eps_arg, alpha_arg)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(x_adv.double().cpu().numpy(), want_x_adv, rtol=0, atol=tol)
    np.testing.assert_allclose(delta.double().cpu().numpy(), want_delta, rtol=0, atol=tol)
    # Exact invariants in every dtype: x_adv in [lo, hi], and delta is x_adv - x rounded once.
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    torch.testing.assert_close(delta, (x_adv.double() - x.double()).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["channels_last", "strided_inputs"])
def test_pgd_step_layouts(layout, device):
    delta, x_adv, x, grad = make_inputs((3, 4, 6, 5), device, torch.float32, 0.1)
    if layout == "channels_last":
        delta, x_adv, x, grad = (t.to(memory_format=torch.channels_last) for t in (delta, x_adv, x, grad))
    else:  # read-only inputs may have any strides
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        grad = torch.cat([grad, grad], dim=1)[:, ::2]
        assert not x.is_contiguous() and not grad.is_contiguous()
    want_delta, want_x_adv = oracle(delta, x, grad, 0.1, 0.03, 0.0, 1.0)
    dnr.ops.pgd_step_(delta, x_adv, x, grad, torch.tensor(0.1), torch.tensor(0.03), 0.0, 1.0)
    np.testing.assert_allclose(x_adv.double().cpu().numpy(), want_x_adv, rtol=0, atol=1e-6)
    np.testing.assert_allclose(delta.double().cpu().numpy(), want_delta, rtol=0, atol=1e-6)


def test_pgd_step_empty(device):
    for shape in [(0, 3, 4, 4), (2, 0)]:
        delta, x_adv, x, grad = (torch.zeros(shape, device=device) for _ in range(4))
        dnr.ops.pgd_step_(delta, x_adv, x, grad, torch.tensor(0.1), torch.tensor(0.01), 0.0, 1.0)
        assert delta.shape == shape


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    inner=st.integers(1, 40),
    eps=st.lists(st.floats(0.0, 0.5), min_size=4, max_size=4),
    alpha=st.lists(st.floats(-0.3, 0.3), min_size=4, max_size=4),
    bounds=st.tuples(st.floats(-1.0, 0.5), st.floats(0.5, 2.0)),
    seed=st.integers(0, 2**16),
)
def test_pgd_step_property(batch, inner, eps, alpha, bounds, seed):
    lo, hi = bounds
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, inner, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    grad = torch.randn(batch, inner, generator=gen, dtype=torch.float64)
    eps_t, alpha_t = torch.tensor(eps[:batch], dtype=torch.float64), torch.tensor(alpha[:batch], dtype=torch.float64)
    delta = (torch.rand(batch, inner, generator=gen, dtype=torch.float64) * 2 - 1) * eps_t[:, None]
    x_adv = (x + delta).clamp(lo, hi)
    want_delta, want_x_adv = oracle(delta, x, grad, eps[:batch], alpha[:batch], lo, hi)
    dnr.ops.pgd_step_(delta, x_adv, x, grad, eps_t, alpha_t, lo, hi)
    np.testing.assert_allclose(x_adv.numpy(), want_x_adv, rtol=0, atol=1e-12)
    np.testing.assert_allclose(delta.numpy(), want_delta, rtol=0, atol=1e-12)
    assert torch.all(delta.abs() <= eps_t[:, None] + 1e-12)


def _args():
    delta, x_adv, x, grad = make_inputs((2, 3, 4), "cpu", torch.float32, 0.1)
    return dict(delta=delta, x_adv=x_adv, x=x, grad=grad, eps=torch.tensor(0.1), alpha=torch.tensor(0.01), lo=0.0, hi=1.0)


PGD_ERRORS = [
    ("x", lambda a: a["x"][:, :2], ValueError, r"x must have the shape of delta \(2, 3, 4\), got \(2, 2, 4\)"),
    ("grad", lambda a: a["grad"].double(), TypeError, r"grad must have delta's dtype torch\.float32, got torch\.float64"),
    ("eps", lambda a: torch.full((3,), 0.1), ValueError, r"eps must have shape \(\) or \(2,\) \(one value per sample\), got \(3,\)"),
    ("alpha", lambda a: torch.tensor(True), TypeError, r"alpha must be a real tensor, got dtype torch\.bool"),
    ("delta", lambda a: a["delta"].transpose(1, 2), ValueError, r"x_adv must have the shape of delta \(2, 4, 3\), got \(2, 3, 4\)"),
    ("x_adv", lambda a: torch.empty(2, 4, 3).transpose(1, 2), ValueError, r"x_adv must have delta's memory layout \(strides \(12, 4, 1\)\), got strides \(12, 1, 3\)"),
    ("delta", lambda a: torch.zeros(()), ValueError, r"delta must be \[B, \.\.\.\] with a batch dimension, got shape \(\)"),
    ("delta", lambda a: a["delta"].long(), TypeError, r"delta must be a floating-point tensor, got dtype torch\.int64"),
    ("lo", lambda a: 2.0, ValueError, r"lo must be <= hi, got lo=2\.0, hi=1\.0"),
    ("grad", lambda a: a["grad"].numpy(), TypeError, r"grad must be a torch\.Tensor, got ndarray"),
]


@pytest.mark.parametrize("name, bad, error, message", PGD_ERRORS)
def test_pgd_step_errors_leave_inputs_unchanged(name, bad, error, message):
    args = _args()
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    args[name] = bad(args)
    with pytest.raises(error, match=message):
        dnr.ops.pgd_step_(**args)
    for key, value in before.items():
        if key != name:
            assert torch.equal(args[key], value), f"{key} was modified"


def test_pgd_step_rejects_non_dense_delta():
    args = _args()
    base = torch.zeros(2, 3, 8)
    args["delta"], args["x_adv"] = base[:, :, ::2], base.clone()[:, :, ::2]
    with pytest.raises(ValueError, match=r"delta must be contiguous or channels_last \(it is written in place\), got strides \(24, 8, 2\)"):
        dnr.ops.pgd_step_(**args)


@pytest.mark.skipif(not dnr.ops.backend()["pgd_step_"]["cpu"] == "extension", reason="no CPU kernel of dnr::pgd_step_")
def test_pgd_step_kernel_checks():
    """The kernel checks its own arguments too (torch.ops.dnr.* bypasses the wrapper)."""
    a = _args()
    base = torch.zeros(2, 3, 8)
    with pytest.raises(RuntimeError, match=r"dnr::pgd_step_: delta must be contiguous or channels_last"):
        torch.ops.dnr.pgd_step_(base[:, :, ::2], base.clone()[:, :, ::2], a["x"], a["grad"], a["eps"], a["alpha"], 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"dnr::pgd_step_: eps must have shape \[\] or \[2\]"):
        torch.ops.dnr.pgd_step_(a["delta"], a["x_adv"], a["x"], a["grad"], torch.ones(3), a["alpha"], 0.0, 1.0)
    with pytest.raises(RuntimeError, match=r"dnr::pgd_step_: grad has dtype Double but delta has dtype Float"):
        torch.ops.dnr.pgd_step_(a["delta"], a["x_adv"], a["x"], a["grad"].double(), a["eps"], a["alpha"], 0.0, 1.0)


@pytest.mark.parametrize("impl", ["ops", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pgd_step_nan_gradient_does_not_move(impl, dtype, device):
    """sign(NaN) = 0 on every path: an element whose gradient is NaN keeps its delta (here 0.02) and
    x_adv, the others step; +-inf steps like +-1. Nothing becomes NaN."""
    delta = torch.full((2, 4), 0.02, device=device, dtype=dtype)
    x = torch.full((2, 4), 0.5, device=device, dtype=dtype)
    x_adv = x + delta
    grad = torch.tensor([[float("nan"), 1.0, -1.0, 0.0], [float("inf"), float("-inf"), float("nan"), 2.0]],
                        device=device, dtype=dtype)
    run(impl, delta, x_adv, x, grad, 0.1, 0.05)
    want = torch.tensor([[0.02, 0.07, -0.03, 0.02], [0.07, -0.03, 0.02, 0.07]], device=device, dtype=torch.float64)
    assert not torch.isnan(x_adv).any() and not torch.isnan(delta).any()
    torch.testing.assert_close(delta.double(), want, rtol=0, atol=TOLERANCE[dtype])
    torch.testing.assert_close(x_adv.double(), 0.5 + want, rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_pgd_step_bumps_version_counters(impl, device):
    """delta and x_adv are written in place: their version counters move (as any in-place PyTorch op's),
    so a graph that saved them raises at backward instead of using the new values."""
    delta, x_adv, x, grad = make_inputs((2, 3, 4), device, torch.float32, 0.1)
    x_adv.requires_grad_(True)
    saved = (x_adv * x_adv).sum()  # mul saves x_adv for its backward
    before = (delta._version, x_adv._version)
    with torch.no_grad():
        run(impl, delta, x_adv, x, grad, 0.1, 0.01)
    assert delta._version > before[0] and x_adv._version > before[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
