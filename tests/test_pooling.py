"""dnr.nn.MaxPool2d / max_pool2x2: torch's max_pool2d (the oracle) in values and gradients on the kernel path,
torch's own op wherever the path does not apply, and a model built with it traces, exports and trains bit for
bit as with nn.MaxPool2d. The op's own oracles: tests/test_ops_pool.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dnr.models import build_model
from dnr.nn import MaxPool2d, max_pool2x2
from dnr.nn import pooling

from conftest import DEVICES

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _inputs(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).relu()  # post-ReLU: windows of zeros, ties
    ties = torch.randint(0, 3, shape, generator=g).float()  # small integers: ties everywhere
    return [t.to(device=device, dtype=dtype) for t in (x, ties)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 9, 7), (1, 1, 2, 2), (3, 2, 5, 4)])
def test_max_pool2x2_equals_torch_max_pool2d(device, dtype, shape):
    for x in _inputs(shape, dtype, device):
        out = max_pool2x2(x)
        assert out.dtype == dtype and out.is_contiguous()
        assert torch.equal(out, F.max_pool2d(x, 2))


def test_max_pool2x2_propagates_nan_and_infinities_as_torch_does():
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 0, 1] = float("nan")
    x[0, 0, 2, 2] = float("-inf")
    x[0, 1] = float("-inf")
    x[0, 1, 3, 3] = float("inf")
    torch.testing.assert_close(max_pool2x2(x), F.max_pool2d(x, 2), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 1, 8), (3, 8, 8), (2, 3, 8)])
def test_max_pool2x2_bad_shapes_are_a_one_line_error(shape):
    with pytest.raises(ValueError, match=r"max_pool2x2: input must be \[B, C, H, W\] with H, W >= 2, got shape"):
        max_pool2x2(torch.zeros(shape))


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        monkeypatch.setattr(pooling, "max_pool2x2", self)

    def __call__(self, x):
        self.calls += 1
        return max_pool2x2(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_fast_path_runs_with_and_without_autograd_and_matches_nn_maxpool(dtype, monkeypatch):
    spy = _Spy(monkeypatch)
    x = _inputs((4, 3, 10, 10), dtype, "cpu")[0]
    with torch.no_grad():
        assert torch.equal(MaxPool2d(2)(x), nn.MaxPool2d(2)(x))
    assert spy.calls == 1
    assert torch.equal(MaxPool2d((2, 2), stride=(2, 2))(x), nn.MaxPool2d(2)(x))  # no tensor needs a gradient
    assert spy.calls == 2
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert torch.equal(MaxPool2d(2)(a), nn.MaxPool2d(2)(b))  # autograd records it
    assert spy.calls == 3


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_are_torch_max_pool_and_route_ties_to_the_first_maximum(device, monkeypatch):
    spy = _Spy(monkeypatch)
    x = _inputs((2, 3, 6, 6), torch.float64, device)[1]  # ties in most windows
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 3, 3, 3, dtype=torch.float64, device=device)
    MaxPool2d(2)(a).backward(g)
    nn.MaxPool2d(2)(b).backward(g)
    assert spy.calls == (1 if device == "cpu" else 0) and torch.equal(a.grad, b.grad)
    torch.autograd.gradcheck(MaxPool2d(2), (torch.randn(1, 2, 4, 4, dtype=torch.float64, device=device,
                                                       requires_grad=True),))


def test_torch_func_transforms_see_torch_max_pool(monkeypatch):
    """grad and vmap wrap their tensors: the custom op has no vmap rule, so they get torch's op."""
    spy = _Spy(monkeypatch)
    pool = MaxPool2d(2)
    x = torch.randn(3, 2, 4, 4)
    batched = torch.vmap(pool)(x.unsqueeze(1))
    grad = torch.func.grad(lambda t: pool(t).sum())(x)
    assert spy.calls == 0
    assert torch.equal(batched.squeeze(1), F.max_pool2d(x, 2))
    x.requires_grad_()
    F.max_pool2d(x, 2).sum().backward()
    assert torch.equal(grad, x.grad)


def test_a_training_step_equals_nn_maxpool_bit_for_bit():
    """The kernel's values and gradients are torch's exactly, so a PGD-trained CNN takes the same steps."""
    from dnr.attacks import pgd
    states = []
    for pool in (MaxPool2d, nn.MaxPool2d):
        torch.manual_seed(0)
        model = build_model("small_cnn", num_classes=10, in_channels=1, input_size=28)
        for name, m in list(model.features.named_children()):
            if isinstance(m, nn.MaxPool2d):
                model.features[int(name)] = pool(2)
        x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            x_adv = pgd(model, x, y, 0.1, 0.025, 3, generator=torch.Generator().manual_seed(1))
            model.train()
            loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


@pytest.mark.parametrize("module, x", [
    (MaxPool2d(3), torch.rand(2, 3, 9, 9)),
    (MaxPool2d(2, stride=1), torch.rand(2, 3, 8, 8)),
    (MaxPool2d(2, padding=1), torch.rand(2, 3, 8, 8)),
    (MaxPool2d(2, dilation=2), torch.rand(2, 3, 8, 8)),
    (MaxPool2d(2, ceil_mode=True), torch.rand(2, 3, 9, 9)),
    (MaxPool2d(2), torch.rand(3, 8, 8)),  # unbatched
    (MaxPool2d(2), torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)),  # torch's fast layout
    (MaxPool2d(2), torch.rand(2, 3, 16, 8)[:, :, ::2]),  # a strided view
])
def test_other_configurations_and_layouts_run_torch_max_pool(module, x, monkeypatch):
    spy = _Spy(monkeypatch)
    reference = nn.MaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation,
                             ceil_mode=module.ceil_mode)
    with torch.no_grad():
        out = module(x)
    assert spy.calls == 0 and torch.equal(out, reference(x))


def test_return_indices_is_torch_max_pool(monkeypatch):
    spy = _Spy(monkeypatch)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        out, idx = MaxPool2d(2, return_indices=True)(x)
    ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    assert spy.calls == 0 and torch.equal(out, ref) and torch.equal(idx, ref_idx)


@pytest.mark.parametrize("device", DEVICES)
def test_on_cuda_it_is_torch_max_pool(device, monkeypatch):
    if device == "cpu":
        pytest.skip("the CUDA case")
    spy = _Spy(monkeypatch)
    x = torch.rand(2, 3, 8, 8, device=device)
    with torch.no_grad():
        assert torch.equal(MaxPool2d(2)(x), F.max_pool2d(x, 2))
    assert spy.calls == 0


@pytest.mark.parametrize("name", ["small_cnn", "wide_cnn", "vgg_cnn"])
def test_models_use_it_and_trace_with_a_max_pool_node(name, monkeypatch):
    model = build_model(name, num_classes=10, in_channels=1, input_size=28).eval()
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools and all(type(m) is MaxPool2d for m in pools)
    spy = _Spy(monkeypatch)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        assert spy.calls == len(pools)
        traced = torch.fx.symbolic_trace(model)  # fx's Proxy is no plain Tensor: the graph holds torch's op
        targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
        assert targets.count(F.max_pool2d) == len(pools)
        assert torch.equal(traced(x), out)
    exported = torch.export.export(model, (x,))  # export (dynamo) records torch's op, not dnr's
    assert spy.calls == len(pools)
    pool_nodes = [n for n in exported.graph.nodes if n.op == "call_function" and "max_pool2d" in str(n.target)]
    assert len(pool_nodes) == len(pools)
    with torch.no_grad():
        assert torch.equal(exported.module()(x), out)
