"""The block-circulant vectors' "mean" gradient rule (dnr.nn.block_circulant.average_circulant_gradients, the
option of the circulant methods and the default of dnr explore): an SGD step on the vectors with the averaged gradient is a step of projected
SGD on the layer's dense-equivalent weight.

The oracle is independent of the code under test: the dense weight written out entry by entry from the
convention ``W[i*k + r, j*k + c] = v[i, j, (r - c) mod k]`` (tests/test_circulant.py's ``loop_dense``), the
gradient of the same loss taken by autograd w.r.t. that dense matrix, the SGD step taken on it, and the
projection onto block-circulant matrices written as a Python loop that averages each wrapped diagonal over the
positions inside the layer."""

import pytest
import torch
import torch.nn.functional as F

from dnr.harness import ConfigError, TrainConfig
from dnr.methods import registry
from dnr.nn.block_circulant import (BlockCirculantConv2d, BlockCirculantLinear, average_circulant_gradients,
                                    entries_per_vector)
from test_circulant import DTYPES, loop_dense

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def loop_projection(w: torch.Tensor, k: int) -> torch.Tensor:
    """The Frobenius projection of w [m, n, *taps] onto block-circulant matrices, written out: every position
    (row, col) inside the layer takes the mean of the entries on its block's wrapped diagonal."""
    m, n = w.shape[:2]
    sums, counts = {}, {}
    for row in range(m):
        for col in range(n):
            key = (row // k, col // k, (row % k - col % k) % k)
            sums[key] = sums.get(key, 0) + w[row, col]
            counts[key] = counts.get(key, 0) + 1
    out = torch.empty_like(w)
    for row in range(m):
        for col in range(n):
            key = (row // k, col // k, (row % k - col % k) % k)
            out[row, col] = sums[key] / counts[key]
    return out


def dense_of(layer) -> torch.Tensor:
    m, n = layer.dense_weight_shape[:2]
    return loop_dense(layer.vectors.detach().cpu(), m, n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, m, n, k", [("linear", 12, 8, 4), ("linear", 10, 7, 4), ("linear", 9, 14, 3),
                                           ("conv", 8, 12, 4), ("conv", 6, 5, 4)])
@pytest.mark.parametrize("momentum, wd", [(0.0, 0.0), (0.9, 5e-2)], ids=["sgd", "momentum+wd"])
def test_an_averaged_step_is_projected_sgd_on_the_dense_weight(device, dtype, kind, m, n, k, momentum, wd):
    torch.manual_seed(0)
    if kind == "linear":
        layer = BlockCirculantLinear(n, m, k, bias=False, device=device, dtype=dtype)
        x = torch.randn(5, n, device=device, dtype=dtype)

        def loss_of(weight):
            return F.linear(x, weight).tanh().pow(2).sum()
    else:
        layer = BlockCirculantConv2d(n, m, 3, k, padding=1, bias=False, device=device, dtype=dtype)
        x = torch.randn(2, n, 5, 5, device=device, dtype=dtype)

        def loss_of(weight):
            return F.conv2d(x, weight, padding=1).tanh().pow(2).sum()
    lr = 0.1
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    w = dense_of(layer).to(device)
    buf = torch.zeros_like(w)
    for _ in range(2):  # two steps: the second one uses the momentum buffer
        # the oracle: projected SGD (momentum, L2 decay) on the dense matrix
        wd_ = w.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(wd_), wd_)
        direction = loop_projection((grad + wd * w).cpu(), k).to(device)
        buf = momentum * buf + direction
        w = w - lr * buf
        # the layer: autograd's gradient of the vectors, averaged, then torch's SGD on them
        opt.zero_grad()
        layer(x).tanh().pow(2).sum().backward()
        assert average_circulant_gradients(layer) == 1
        opt.step()
        torch.testing.assert_close(dense_of(layer).to(device), w, atol=TOL[dtype], rtol=0)


def test_the_plain_sum_is_not_projected_sgd():
    """The check above can fail: without the averaging (autograd's sum) the step moves the dense weight k
    times as far where blocks are whole."""
    torch.manual_seed(0)
    layer = BlockCirculantLinear(8, 8, 4, bias=False, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    w0 = dense_of(layer)
    wd_ = w0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.linear(x, wd_).pow(2).sum(), wd_)
    layer(x).pow(2).sum().backward()
    with torch.no_grad():
        layer.vectors -= 0.01 * layer.vectors.grad
    step = dense_of(layer) - w0
    torch.testing.assert_close(step, -0.01 * 4 * loop_projection(grad, 4), atol=1e-12, rtol=0)


@pytest.mark.parametrize("m, n, k", [(8, 8, 4), (10, 7, 4), (5, 3, 5), (9, 14, 3)])
def test_entries_per_vector_counts_the_positions_inside_the_layer(m, n, k):
    p, q = -(-m // k), -(-n // k)
    expected = torch.zeros(p, q, k)
    for row in range(m):
        for col in range(n):
            expected[row // k, col // k, (row % k - col % k) % k] += 1
    assert torch.equal(entries_per_vector(m, n, k), expected)


def test_layers_without_a_gradient_are_skipped():
    layer = BlockCirculantLinear(8, 8, 4)
    assert average_circulant_gradients(layer) == 0
    assert average_circulant_gradients(torch.nn.Linear(3, 3)) == 0


def _method_step(rule):
    """One step of the circulant method's optimizer (its step pre-hook) on a tiny linear model: the vectors'
    change. ``rule`` None: the method's default."""
    options = [] if rule is None else [f"gradient={rule}"]
    cfg = TrainConfig(method="circulant", block_size=4, method_options=options).validate()
    method = registry.get("circulant")(cfg)
    torch.manual_seed(0)
    model = method.prepare_model(torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False)), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method.attach(model, opt, total_steps=1, steps_per_epoch=1)
    before = model[0].vectors.detach().clone()
    model(torch.randn(3, 8)).pow(2).sum().backward()
    grad = model[0].vectors.grad.clone()
    opt.step()
    return model[0].vectors.detach() - before, grad


def test_the_circulant_methods_sum_by_default_and_average_on_request():
    sum_step, grad = _method_step(None)
    mean_step, grad_mean = _method_step("mean")
    assert torch.equal(grad, grad_mean)  # the same autograd gradient in both runs
    torch.testing.assert_close(sum_step, -0.1 * grad, atol=1e-7, rtol=0)
    torch.testing.assert_close(mean_step, -0.1 * grad / 4, atol=1e-7, rtol=0)
    assert registry.get("admm-circulant").options == {"gradient": "sum"}


def test_a_bad_gradient_rule_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"--method-options gradient: got 'median', expected one of mean, sum"):
        TrainConfig(method="circulant", block_size=4, method_options=["gradient=median"]).validate()
