"""dnr.nn.BatchNorm2d: nn.BatchNorm2d's values, gradients and state on every path; the eval-mode kernel only
where it applies (frozen parameters, an input that needs its gradient, eager CPU float tensors); the models
use it, trace with a BatchNorm module node and export; an attack and a PGD training step are bit for bit
those of nn.BatchNorm2d. The op's own oracles: tests/test_ops_batch_norm.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnr.ops
from dnr.models import build_model
from dnr.nn import BatchNorm2d
from dnr.nn import batchnorm

from conftest import DEVICES


class _Spy:
    """Counts the module's calls of dnr.ops.batch_norm_eval (the kernel path)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        monkeypatch.setattr(batchnorm.ops, "batch_norm_eval", self)

    def __call__(self, *args):
        self.calls += 1
        return _REAL(*args)


_REAL = dnr.ops.batch_norm_eval


def _pair(c=4, affine=True, seed=0):
    """A dnr BatchNorm2d and an nn.BatchNorm2d with the same trained-looking state, both in eval mode."""
    torch.manual_seed(seed)
    ours, theirs = BatchNorm2d(c, affine=affine), nn.BatchNorm2d(c, affine=affine)
    state = {"running_mean": torch.randn(c), "running_var": torch.rand(c) * 3 + 0.1,
             "num_batches_tracked": torch.tensor(7)}
    if affine:
        state |= {"weight": torch.randn(c), "bias": torch.randn(c)}
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    return ours.eval(), theirs.eval()


def _freeze(*modules):
    for m in modules:
        m.requires_grad_(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_frozen_eval_mode_takes_the_kernel_and_equals_nn_batchnorm(dtype, affine, layout, monkeypatch):
    spy = _Spy(monkeypatch)
    ours, theirs = _pair(affine=affine)
    _freeze(ours, theirs)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = torch.randn(3, 4, 6, 5, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = ours(a), theirs(b)
    g = torch.randn_like(out_a)
    out_a.backward(g)
    out_b.backward(g)
    assert spy.calls == 1
    assert torch.equal(out_a, out_b) and torch.equal(a.grad, b.grad)


def test_other_cases_are_nn_batchnorm(monkeypatch):
    """Training mode, trainable affine parameters, no input gradient, no running statistics, unbatched or
    bfloat16 input: torch's op, with identical results and state."""
    spy = _Spy(monkeypatch)
    # training mode: batch statistics, running statistics updated alike
    ours, theirs = _pair()
    ours.train(), theirs.train()
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    assert torch.equal(ours(x), theirs(x))
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    # eval mode with trainable parameters: ATen's backward computes their gradients with the input's
    ours, theirs = _pair()
    a, b = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ours(a).square().sum().backward()
    theirs(b).square().sum().backward()
    assert torch.equal(a.grad, b.grad) and torch.equal(ours.weight.grad, theirs.weight.grad)
    # no input gradient (evaluation under no_grad)
    _freeze(ours, theirs)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    # no running statistics: batch statistics in eval mode too
    ours, theirs = BatchNorm2d(4, track_running_stats=False).eval(), nn.BatchNorm2d(4, track_running_stats=False).eval()
    _freeze(ours, theirs)
    assert torch.equal(ours(x), theirs(x))
    # bfloat16: torch's kernel
    ours, theirs = _pair()
    _freeze(ours, theirs)
    xb = x.detach().bfloat16().requires_grad_()
    assert torch.equal(ours.bfloat16()(xb), theirs.bfloat16()(xb))
    assert spy.calls == 0
    with pytest.raises(ValueError, match="expected 4D input"):
        ours(torch.randn(4, 5, 5, requires_grad=True))


@pytest.mark.parametrize("device", DEVICES)
def test_on_cuda_it_is_nn_batchnorm(device, monkeypatch):
    if device == "cpu":
        pytest.skip("the CUDA case")
    spy = _Spy(monkeypatch)
    ours, theirs = (m.to(device) for m in _pair())
    _freeze(ours, theirs)
    x = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    assert torch.equal(ours(x), theirs(x)) and spy.calls == 0


def test_torch_func_transforms_see_torch_batch_norm(monkeypatch):
    spy = _Spy(monkeypatch)
    ours, theirs = _pair()
    _freeze(ours, theirs)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    grad = torch.func.grad(lambda t: ours(t).square().sum())(x)
    assert spy.calls == 0
    assert torch.equal(grad, torch.func.grad(lambda t: theirs(t).square().sum())(x))


@pytest.mark.parametrize("name", ["small_cnn", "wide_cnn", "vgg_cnn", "resnet18"])
def test_models_use_it_trace_with_batchnorm_modules_and_export(name, monkeypatch):
    kwargs = dict(num_classes=10, in_channels=1, input_size=28) if name != "resnet18" else \
        dict(num_classes=10, in_channels=3, input_size=32)
    model = build_model(name, **kwargs).eval()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is BatchNorm2d for m in norms)
    x = torch.rand(2, kwargs["in_channels"], kwargs["input_size"], kwargs["input_size"])
    traced = torch.fx.symbolic_trace(model)  # a call_module node per BatchNorm, as nn.BatchNorm2d gives
    modules = dict(traced.named_modules())
    assert sum(n.op == "call_module" and isinstance(modules[n.target], nn.BatchNorm2d)
               for n in traced.graph.nodes) == len(norms)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(traced(x), out)
    spy = _Spy(monkeypatch)
    exported = torch.export.export(model, (x,))  # export (dynamo) records torch's op
    assert spy.calls == 0
    with torch.no_grad():
        assert torch.equal(exported.module()(x), out)
    traced.train(), model.train()  # the node follows the module's mode (it shares the model's modules)
    with torch.no_grad():
        assert not torch.equal(traced(x), out)


def _swap_norms(model, cls):
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            new = cls(child.num_features)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            _swap_norms(child, cls)
    return model


def test_an_attack_and_a_training_step_equal_nn_batchnorm_bit_for_bit(monkeypatch):
    """The kernel's values and input gradients are torch's exactly, so PGD finds the same adversarial
    examples and a PGD-trained CNN takes the same steps (the attack runs the kernel path)."""
    from dnr.attacks import pgd
    spy = _Spy(monkeypatch)
    states = []
    for cls in (BatchNorm2d, nn.BatchNorm2d):
        torch.manual_seed(0)
        model = _swap_norms(build_model("small_cnn", num_classes=10, in_channels=1, input_size=28), cls)
        x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            x_adv = pgd(model, x, y, 0.1, 0.025, 3, generator=torch.Generator().manual_seed(1))
            model.train()
            loss = F.cross_entropy(model(x), y) + F.cross_entropy(model(x_adv), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        states.append((x_adv, model.state_dict()))
    assert spy.calls == 2 * 3 * 3  # two steps x three PGD steps x three BatchNorm layers
    assert torch.equal(states[0][0], states[1][0])
    for key in states[0][1]:
        assert torch.equal(states[0][1][key], states[1][1][key]), key


@pytest.mark.parametrize("name", ["small_cnn", "vgg_cnn", "resnet18"])
def test_torch_layers_gives_torch_classes_with_the_same_outputs_for_exact_type_tools(name):
    """torch.ao.quantization.fuse_modules matches exact types: it needs torch's classes, which
    dnr.nn.torch_layers gives back (same state, dtype, mode and requires_grad; a copy)."""
    from dnr.nn import MaxPool2d, torch_layers
    kwargs = dict(num_classes=10, in_channels=1, input_size=28) if name != "resnet18" else \
        dict(num_classes=10, in_channels=3, input_size=32)
    model = build_model(name, **kwargs).double().eval()
    model.requires_grad_(False)
    plain = torch_layers(model)
    assert any(type(m) is BatchNorm2d for m in model.modules())  # the original is untouched
    assert not any(isinstance(m, (BatchNorm2d, MaxPool2d)) for m in plain.modules())
    assert [type(m).__name__ for m in plain.modules()] == [type(m).__name__ for m in model.modules()]
    assert not plain.training and not any(p.requires_grad for p in plain.parameters())
    x = torch.rand(2, kwargs["in_channels"], kwargs["input_size"], kwargs["input_size"], dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    if name == "small_cnn":
        with pytest.raises(AssertionError, match="did not find fuser method"):
            torch.ao.quantization.fuse_modules(model, [["features.0", "features.1", "features.2"]])
        fused = torch.ao.quantization.fuse_modules(plain, [["features.0", "features.1", "features.2"]])
        with torch.no_grad():
            torch.testing.assert_close(fused(x), model(x))
    # in place: the same object, its layers replaced
    assert torch_layers(model, inplace=True) is model and not any(isinstance(m, BatchNorm2d) for m in model.modules())
    # one kind only
    fresh = build_model(name, **kwargs)
    norms_only = torch_layers(fresh, kinds=[BatchNorm2d])
    assert not any(isinstance(m, BatchNorm2d) for m in norms_only.modules())
    assert [type(m) for m in norms_only.modules() if isinstance(m, nn.MaxPool2d)] == \
        [type(m) for m in fresh.modules() if isinstance(m, nn.MaxPool2d)]
    with pytest.raises(ValueError, match=r"torch_layers: kinds must be among dnr.nn.BatchNorm2d, dnr.nn.MaxPool2d"):
        torch_layers(fresh, kinds=[nn.ReLU])
    # a single layer
    bn = BatchNorm2d(3, affine=False)
    assert type(torch_layers(bn)) is nn.BatchNorm2d and type(bn) is BatchNorm2d
    with pytest.raises(TypeError, match="torch_layers: model must be an nn.Module, got list"):
        torch_layers([bn])
