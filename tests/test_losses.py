"""Tests for dnr.losses (hybrid clean/adversarial cross-entropy)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dnr.losses import HybridLoss, hybrid_loss

# tests/conftest.py skips the `needs_cuda` marker without a GPU; the skipif keeps this file safe alone.
needs_cuda = [pytest.mark.needs_cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
DTYPES = [torch.float32, torch.float64]


def _data(device, dtype, b=6, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(b, k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    adv = torch.randn(b, k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    target = torch.randint(0, k, (b,), generator=g).to(device)
    return clean, adv, target


def _ce_by_hand(logits, target):
    """Per-example cross-entropy from its definition, float64: logsumexp(z) - z_y."""
    z = logits.double()
    return torch.logsumexp(z, dim=1) - z.gather(1, target[:, None]).squeeze(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_explicit_formula(device, dtype, beta, reduction):
    clean, adv, target = _data(device, dtype)
    got = hybrid_loss(clean, adv, target, beta=beta, reduction=reduction)
    expected = beta * F.cross_entropy(clean, target, reduction=reduction) + (1 - beta) * F.cross_entropy(
        adv, target, reduction=reduction
    )
    assert got.dtype == dtype and got.device.type == device
    assert got.shape == ((6,) if reduction == "none" else ())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    # and against a CE written from its definition (independent of F.cross_entropy)
    per = beta * _ce_by_hand(clean, target) + (1 - beta) * _ce_by_hand(adv, target)
    ref = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    torch.testing.assert_close(got.double(), ref, atol=10 * tol, rtol=10 * tol)


def test_default_beta_is_half_and_mean():
    clean, adv, target = _data("cpu", torch.float64)
    expected = 0.5 * F.cross_entropy(clean, target) + 0.5 * F.cross_entropy(adv, target)
    torch.testing.assert_close(hybrid_loss(clean, adv, target), expected)


def test_beta_one_is_exactly_clean_ce_even_with_nonfinite_adv():
    clean, adv, target = _data("cpu", torch.float32)
    assert torch.equal(hybrid_loss(clean, adv, target, beta=1.0), F.cross_entropy(clean, target))
    bad_adv = torch.full_like(adv, float("nan"))
    assert torch.equal(hybrid_loss(clean, bad_adv, target, beta=1), F.cross_entropy(clean, target))
    assert torch.equal(hybrid_loss(bad_adv, adv, target, beta=0), F.cross_entropy(adv, target))


def test_gradients_split_by_beta():
    clean, adv, target = _data("cpu", torch.float64)
    clean.requires_grad_(True)
    adv.requires_grad_(True)
    hybrid_loss(clean, adv, target, beta=0.3).backward()
    gc = torch.autograd.grad(F.cross_entropy(clean, target), clean)[0]
    ga = torch.autograd.grad(F.cross_entropy(adv, target), adv)[0]
    torch.testing.assert_close(clean.grad, 0.3 * gc)
    torch.testing.assert_close(adv.grad, 0.7 * ga)


def test_module_matches_function_and_repr():
    clean, adv, target = _data("cpu", torch.float32)
    mod = HybridLoss(beta=0.2, reduction="sum")
    torch.testing.assert_close(mod(clean, adv, target), hybrid_loss(clean, adv, target, beta=0.2, reduction="sum"))
    assert "beta=0.2" in repr(mod) and "'sum'" in repr(mod)
    assert HybridLoss().beta == 0.5


@pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan, math.inf])
def test_bad_beta_raises(beta):
    clean, adv, target = _data("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got beta="):
        hybrid_loss(clean, adv, target, beta=beta)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        HybridLoss(beta)


@pytest.mark.parametrize("beta", ["0.5", None, True])
def test_beta_wrong_type_raises(beta):
    clean, adv, target = _data("cpu", torch.float32)
    with pytest.raises(TypeError, match=r"beta must be a real number in \[0, 1\], got"):
        hybrid_loss(clean, adv, target, beta=beta)


def test_bad_inputs_raise():
    clean, adv, target = _data("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"reduction must be one of .* got reduction='avg'"):
        hybrid_loss(clean, adv, target, reduction="avg")
    with pytest.raises(ValueError, match=r"adv_logits must have the shape of clean_logits \(6, 4\), got shape \(5, 4\)"):
        hybrid_loss(clean, adv[:5], target)
    with pytest.raises(ValueError, match=r"target must have shape \[B\] = \[6\], got shape \(5,\)"):
        hybrid_loss(clean, adv, target[:5])
    with pytest.raises(ValueError, match=r"clean_logits must have shape \[B, K\], got shape \(6, 4, 1\)"):
        hybrid_loss(clean[..., None], adv[..., None], target)
    with pytest.raises(TypeError, match=r"target must hold int64 class indices, got dtype torch.float32"):
        hybrid_loss(clean, adv, target.float())
    with pytest.raises(TypeError, match=r"adv_logits must be a Tensor, got list"):
        hybrid_loss(clean, [1.0], target)
