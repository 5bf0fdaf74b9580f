"""Exact channel compaction (dnr.export.compact_model): same outputs, exact parameter counts, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnr
from dnr.export import CompactionError, ExpandChannels, compact_model
from dnr.nn import apply_masks, density_report, masked_layers, sparsify


# ---------------------------------------------------------------------------------------- test models
class TinyVGG(nn.Module):
    """conv-BN-ReLU(-pool) stack, flatten of a 2x2 map, two linear layers."""

    def __init__(self, widths=(8, 16, 16), hidden=24, classes=5):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin * 4, hidden), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(hidden, classes))

    def forward(self, x):  # [B, 3, 8, 8]
        return self.classifier(self.features(x))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)  # in-place residual sum, as in many CIFAR ResNets
        return F.relu(out)


class TinyResNet(nn.Module):
    """Stem, identity blocks and a projection block, avg-pool, view(B, -1), linear head ``fc``."""

    def __init__(self, width=8, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(Block(width, width, 1), Block(width, width, 1))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width, 1))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):  # [B, 3, 8, 8]
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.avg_pool2d(out, 4)
        return self.fc(out.view(out.size(0), -1))


class Mixed(nn.Module):
    """Conv with bias + GroupNorm, two branches joined by cat, global mean, linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.b1 = nn.Conv2d(8, 6, 1)
        self.b2 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        h = F.silu(self.gn(self.a(x)))
        h = torch.cat([torch.relu(self.b1(h)), self.b2(h)], dim=1)
        return self.head(h.mean(dim=(2, 3)))


def _randomize_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial norm statistics and affine parameters, so that eval mode is not the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _pruned(factory, density, seed=0, randomize=True, **kw):
    gen = torch.Generator().manual_seed(seed)
    model = factory()
    if randomize:
        _randomize_norms(model, gen)
    sparsify(model, density, mode="channel", generator=gen, **kw)
    return model.eval()


def _assert_close(model, compact, x):
    with torch.no_grad():
        ref, got = model(x), compact(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _weights(model, types=(nn.Conv2d, nn.Linear)):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, types))


SMALL = {
    "small_cnn": (lambda: dnr.models.small_cnn(widths=(8, 16, 16), hidden=32), (1, 28, 28)),
    "tiny_vgg": (TinyVGG, (3, 8, 8)),
    "tiny_resnet": (TinyResNet, (3, 8, 8)),
}


# ---------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("name", list(SMALL))
def test_compacted_equals_masked_on_random_inputs(name, density):
    factory, size = SMALL[name]
    model = _pruned(factory, density, seed=int(density * 100))
    compact = compact_model(model, size)
    assert not any(isinstance(m, dnr.MaskedConv2d) for m in compact.modules())
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())
    _assert_close(model, compact, torch.randn(6, *size))
    _assert_close(model, compact, torch.rand(1, *size))  # batch 1 as well


def test_compacted_equals_masked_on_real_images():
    x, _ = dnr.data.fashion_mnist("test", subset=64)[:64]
    for density in (0.1, 0.3):
        model = _pruned(dnr.models.small_cnn, density, seed=3)
        _assert_close(model, compact_model(model, (1, 28, 28)), x)


def test_compaction_does_not_modify_the_model():
    model = _pruned(TinyResNet, 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compact_model(model, (3, 8, 8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(m, dnr.MaskedConv2d) for n, m in model.named_modules() if n.endswith("conv1"))


def test_groupnorm_cat_mean_and_biases():
    torch.manual_seed(1)
    model = _pruned(Mixed, 0.4, seed=5)
    compact = compact_model(model, (3, 6, 6))
    _assert_close(model, compact, torch.randn(4, 3, 6, 6))
    gn = compact.get_submodule("gn")
    assert gn.num_channels % gn.num_groups == 0 and gn.num_channels // gn.num_groups == 2  # whole groups kept


# ---------------------------------------------------------------------------------------- residuals
def _set_channels(layer, alive):
    alive = torch.as_tensor(alive, dtype=torch.bool)
    layer.set_mask(alive.reshape(-1, *([1] * (layer.weight.dim() - 1))).expand(layer.weight.shape).clone())


@pytest.mark.parametrize("agree", [True, False])
def test_residual_block_dead_sets(agree):
    """Projection block: conv2 and shortcut prune the same channels (removed from the sum) or different ones
    (the sum keeps the union; each branch still computes only its own channels)."""
    model = _pruned(TinyResNet, 1.0, seed=2)  # every channel alive; masks set by hand below
    block = model.layer2[0]
    c2 = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    sc = c2.clone() if agree else torch.tensor([1, 1, 0, 1, 0, 1, 0, 0, 1, 1, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    _set_channels(block.conv2, c2)
    _set_channels(block.shortcut[0], sc)
    apply_masks(model)
    compact = compact_model(model, (3, 8, 8))
    _assert_close(model, compact, torch.randn(5, 3, 8, 8))
    plan = compact.dnr_compaction
    union = int((c2 | sc).sum())
    assert plan["layer2.0.conv2"]["out"] == int(c2.sum())
    assert plan["layer2.0.shortcut.0"]["out"] == int(sc.sum())
    assert plan["layer2.1.conv1"]["in"] == union  # the next block reads the union of the two branches
    # the identity shortcut of layer2.1 carries the union on to the head
    assert plan["fc"]["in"] == int(((c2 | sc) | model.layer2[1].conv2.channel_mask).sum())
    expands = [m for m in compact.modules() if isinstance(m, ExpandChannels)]
    if agree:
        assert plan["layer2.1.conv1"]["in"] == int(c2.sum())
    assert len(expands) >= (0 if agree else 2)


def test_head_rows_are_never_dropped():
    model = _pruned(TinyVGG, 0.3, prune_last=True)
    head = model.classifier[-1]
    _set_channels(head, torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool))
    apply_masks(model)
    compact = compact_model(model, (3, 8, 8))
    x = torch.randn(3, 3, 8, 8)
    _assert_close(model, compact, x)
    assert compact(x).shape == (3, 5)


# ---------------------------------------------------------------------------------------- parameter count
def _chain_oracle(model, size):
    """Parameters of the compacted model, by hand from the masks, for conv/BN chains ending in a flatten
    (spatial side ``hw``) and linear layers: each layer keeps its active rows times the active rows of
    the layer before it; BN keeps its conv's rows; biases follow their rows."""
    total, prev, layers = 0, size[0], [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for i, m in enumerate(layers):
        rows = int(m.channel_mask.sum()) if hasattr(m, "channel_mask") else m.weight.shape[0]
        if isinstance(m, nn.Linear) and isinstance(layers[i - 1], nn.Conv2d):
            prev *= m.in_features // layers[i - 1].out_channels  # features per channel after flatten
        total += rows * prev * (m.weight[0, 0].numel()) + (rows if m.bias is not None else 0)
        total += 2 * rows if isinstance(m, nn.Conv2d) else 0  # its BatchNorm
        prev = rows
    return total


@pytest.mark.parametrize("name", ["small_cnn", "tiny_vgg"])
@pytest.mark.parametrize("density", [0.1, 0.3])
def test_parameter_count_of_chains_matches_the_masks(name, density):
    factory, size = SMALL[name]
    model = _pruned(factory, density, seed=9)
    assert sum(p.numel() for p in compact_model(model, size).parameters()) == _chain_oracle(model, size)


@pytest.mark.parametrize("name", list(SMALL))
def test_parameter_count_matches_density_report(name):
    """Per layer, the compacted conv/linear holds exactly the report's effective weights; in total the
    model holds those plus biases and norm parameters of the kept channels."""
    factory, size = SMALL[name]
    model = _pruned(factory, 0.3, seed=7)
    report = density_report(model, size)
    compact = compact_model(model, size)
    modules = dict(compact.named_modules())
    expected_total = 0
    for row in report.layers:
        positions = row.macs_dense // math.prod(row.shape)
        effective = row.macs_effective // positions  # == row.effective_active for masked layers
        layer = modules[row.name]
        expected_total += layer.weight.numel() + (layer.weight.shape[0] if layer.bias is not None else 0)
        if row.masked:
            assert effective == row.effective_active
        assert layer.weight.numel() == effective, row.name
        assert layer.weight.shape[0] == (row.active_channels if row.masked else row.channels), row.name
    norms = [m for m in compact.modules() if isinstance(m, nn.BatchNorm2d)]
    expected_total += sum(2 * m.num_features for m in norms)
    assert sum(p.numel() for p in compact.parameters()) == expected_total
    if name == "tiny_resnet":
        assert _weights(compact) == report.effective_active + sum(
            r.macs_effective // (r.macs_dense // math.prod(r.shape)) for r in report.layers if not r.masked)


# ---------------------------------------------------------------------------------------- errors
def test_irregular_model_is_refused_with_the_layer_name():
    model = TinyVGG()
    sparsify(model, 0.3, mode="irregular", generator=torch.Generator().manual_seed(0))
    with pytest.raises(CompactionError, match=r"features\.0.*irregular"):
        compact_model(model, (3, 8, 8))


class _Sliced(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.bn(self.conv(x))[:, :4]  # a channel slice: not modelled
        return self.fc(h.mean((2, 3)))


def test_unsupported_op_names_the_node_and_strict_false_keeps_channels():
    model = _pruned(_Sliced, 0.5, seed=1)
    with pytest.raises(CompactionError, match=r"getitem.*pruned channel"):
        compact_model(model, (3, 4, 4))
    compact = compact_model(model, (3, 4, 4), strict=False)
    _assert_close(model, compact, torch.randn(2, 3, 4, 4))
    assert "getitem" in " ".join(compact.dnr_compaction_notes)


def test_missing_input_size_and_untraceable_model():
    model = _pruned(TinyVGG, 0.5)
    with pytest.raises(ValueError, match="input_size"):
        compact_model(model)

    class Branchy(TinyVGG):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return super().forward(x)
            return super().forward(-x)

    with pytest.raises(CompactionError, match="trace"):
        compact_model(_pruned(Branchy, 0.5), (3, 8, 8))


# ---------------------------------------------------------------------------------------- package models
def _real_rgb(n, size):
    """Fashion-MNIST test images as 3-channel inputs of side ``size`` (zero-padded): real image statistics."""
    x, _ = dnr.data.fashion_mnist("test", subset=n)[:n]
    pad = size - 28
    return F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)).repeat(1, 3, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("name", ["vgg16", "resnet18"])
def test_package_models_compact_exactly(name, density):
    if not hasattr(dnr.models, name):
        pytest.skip(f"dnr.models.{name} not available")
    gen = torch.Generator().manual_seed(11)
    model = getattr(dnr.models, name)(num_classes=10)
    _randomize_norms(model, gen)
    sparsify(model, density, mode="channel", generator=gen)
    model.eval()
    compact = compact_model(model, (3, 32, 32))
    _assert_close(model, compact, torch.rand(2, 3, 32, 32, generator=gen))
    _assert_close(model, compact, _real_rgb(4, 32))
    kept = sum(m.weight.numel() for n, m in compact.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and n in dict(masked_layers(model)))
    prunable = sum(m.weight.numel() for _, m in masked_layers(model))
    assert kept < density * prunable * 1.01  # dead inputs are removed too: at most the masked density


# ---------------------------------------------------------------------------------------- devices, dtypes, pieces
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_compaction_on_device_and_dtype(device, dtype, tol):
    model = _pruned(TinyResNet, 0.3, seed=4).to(device=device, dtype=dtype)
    compact = compact_model(model, (3, 8, 8))
    assert all(p.device.type == device and p.dtype == dtype for p in compact.parameters())
    x = torch.randn(3, 3, 8, 8, device=device, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=tol, atol=tol)


def test_expand_channels_scatters_into_zeros():
    x = torch.randn(2, 3, 4, 4)
    index = torch.tensor([3, 0, 3, 2, 1])  # 3 = the zero slot
    out = ExpandChannels(index)(x)
    expected = torch.zeros(2, 5, 4, 4)
    expected[:, 1], expected[:, 3], expected[:, 4] = x[:, 0], x[:, 2], x[:, 1]
    assert torch.equal(out, expected)


class _Views(nn.Module):
    """A no-op view that names the channel count, and flatten through reshape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).reshape(x.shape[0], -1)
        h = torch.relu(self.fc1(h)).view(-1, 6)  # a no-op view that spells out 6 features
        return self.fc2(h)


def test_views_that_name_channel_counts():
    model = _pruned(_Views, 0.4, seed=3)
    assert model.fc1.channel_mask.sum() < 6  # the hidden layer is pruned, so view(-1, 6) must go
    compact = compact_model(model, (3, 4, 4))
    _assert_close(model, compact, torch.randn(4, 3, 4, 4))


class _LateNorm(nn.Module):
    """conv -> ReLU -> BN: the BN is not paired with the conv, so a pruned channel leaves the BN as the
    constant shift, which the next conv reads: the channel must be kept (as a zero channel) up to the BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.bn(torch.relu(self.conv(x)))
        return self.fc(torch.relu(self.conv2(h)).mean((2, 3)))


def test_norm_that_revives_a_pruned_channel():
    model = _pruned(_LateNorm, 0.5, seed=6)
    assert model.conv.norm_name is None and not bool(model.conv.channel_mask.all())
    compact = compact_model(model, (3, 4, 4))
    _assert_close(model, compact, torch.randn(3, 3, 4, 4))
    assert compact.dnr_compaction["conv"]["out"] == 8  # zero channels kept: the BN turns them into constants
