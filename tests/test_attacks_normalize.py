"""Tests for dnr.nn.normalize.Normalize (the model's first layer, so attacks see raw pixels)."""
import math

import pytest
import torch
from torch import nn

from dnr.nn.normalize import Normalize

# tests/conftest.py skips the `needs_cuda` marker without a GPU; the skipif keeps this file safe alone.
needs_cuda = [pytest.mark.needs_cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_images_per_channel(device, dtype):
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.25, 0.5]
    norm = Normalize(mean, std).to(device=device, dtype=dtype)
    x = torch.rand(4, 3, 5, 6, dtype=dtype, device=device)
    y = norm(x)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    for c in range(3):  # oracle: channel by channel with Python floats
        torch.testing.assert_close(y[:, c], (x[:, c] - mean[c]) / std[c])
    assert norm.mean.shape == (3,) and norm.std.shape == (3,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_features_2d_and_other_ranks(dtype):
    norm = Normalize(torch.tensor([1.0, -2.0]), torch.tensor([2.0, 4.0])).to(dtype)
    x = torch.randn(7, 2, dtype=dtype)
    torch.testing.assert_close(norm(x), torch.stack([(x[:, 0] - 1) / 2, (x[:, 1] + 2) / 4], dim=1))
    x3 = torch.randn(3, 2, 5, dtype=dtype)  # [B, C, L]
    torch.testing.assert_close(norm(x3)[:, 1], (x3[:, 1] + 2) / 4)


def test_scalar_stats_broadcast_to_any_channel_count():
    norm = Normalize(0.5, 0.25)
    assert norm.mean.shape == (1,)
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(norm(x), (x - 0.5) / 0.25)


def test_gradient_flows_to_input_and_buffers_are_not_parameters():
    norm = Normalize([0.5, 0.5], [0.5, 0.25])
    assert list(norm.parameters()) == []
    assert set(norm.state_dict()) == {"mean", "std"}
    x = torch.rand(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(norm.double()(x).sum(), x)
    torch.testing.assert_close(g[:, 0], torch.full_like(g[:, 0], 2.0))
    torch.testing.assert_close(g[:, 1], torch.full_like(g[:, 1], 4.0))


def test_state_dict_roundtrip_and_repr():
    a = Normalize([0.2860], [0.3530])
    b = Normalize([0.0], [1.0])
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 1, 4, 4)
    torch.testing.assert_close(b(x), a(x))
    assert repr(a) == "Normalize(mean=(0.286), std=(0.353))"
    assert "Normalize" in repr(nn.Sequential(a))


def test_half_precision_input_keeps_dtype():
    norm = Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    x = torch.rand(2, 3, 4, 4).to(torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "mean,std,exc,msg",
    [
        ([0.5, 0.5], [0.5], ValueError, r"mean and std must have the same length, got len\(mean\)=2 and len\(std\)=1"),
        ([0.5], [0.0], ValueError, r"every std must be > 0, got std=\[0\.0\]"),
        ([0.5, 0.5], [0.2, -0.1], ValueError, r"every std must be > 0, got std=\[0\.2"),
        ([0.5], [math.nan], ValueError, r"std must be finite, got \[nan\]"),
        ([math.inf], [1.0], ValueError, r"mean must be finite, got \[inf\]"),
        ([], [], ValueError, r"mean must be a scalar or a non-empty 1-D sequence .*got shape \(0,\)"),
        ([[0.5]], [[0.5]], ValueError, r"mean must be a scalar or a non-empty 1-D sequence .*got shape \(1, 1\)"),
        ("abc", [1.0], TypeError, r"mean must be a float, a sequence of floats or a tensor, got 'abc'"),
        (True, 1.0, TypeError, r"mean must be a float, a sequence of floats or a tensor, got bool True"),
        (torch.tensor([True]), 1.0, TypeError, r"mean must be a real-valued tensor, got dtype torch\.bool"),
    ],
)
def test_bad_construction_raises(mean, std, exc, msg):
    with pytest.raises(exc, match=f"^Normalize: {msg}"):
        Normalize(mean, std)


def test_bad_input_raises():
    norm = Normalize([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
    with pytest.raises(ValueError, match=r"input has 1 channels \(dim 1 of shape \(2, 1, 4, 4\)\) but mean/std have 3"):
        norm(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"input must have shape \[B, C, \.\.\.\] \(at least 2 dims\), got shape \(3,\)"):
        norm(torch.rand(3))
