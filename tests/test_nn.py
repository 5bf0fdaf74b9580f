"""Masked layers, sparsify() and density_report() against independent oracles."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnr
from dnr.nn import MaskedConv2d, MaskedLinear, masked_layers, sparsify

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]


def _random_mask(shape, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


CONV_CASES = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=4, out_channels=8, kernel_size=(3, 1), groups=2, dilation=2, padding=(2, 0)),
    dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding="same"),
    dict(in_channels=3, out_channels=5, kernel_size=4, padding="same"),  # asymmetric 'same'
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", CONV_CASES)
def test_masked_conv_matches_conv_with_masked_weight(device, dtype, kwargs):
    torch.manual_seed(0)
    dense = nn.Conv2d(**kwargs).to(device, dtype)
    layer = MaskedConv2d.from_dense(dense)
    mask = _random_mask(layer.weight.shape).to(device)
    layer.set_mask(mask)
    x = torch.randn(2, kwargs["in_channels"], 9, 8, device=device, dtype=dtype)
    # oracle: nn.Conv2d itself with the weight multiplied by the mask
    with torch.no_grad():
        dense.weight.mul_(mask)
    torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=0)
    assert layer.weight.dtype == dtype and layer.mask.dtype == torch.bool


@pytest.mark.parametrize("device", DEVICES)
def test_weight_grad_is_dense_by_default_and_masked_on_request(device):
    torch.manual_seed(0)
    layer = MaskedConv2d(3, 4, 3, padding=1).to(device)
    mask = _random_mask(layer.weight.shape).to(device)
    layer.set_mask(mask)
    x = torch.randn(2, 3, 6, 6, device=device)
    # oracle: gradient of conv2d with respect to the effective weight w*mask, computed directly
    w_eff = (layer.weight.detach() * mask).requires_grad_(True)
    F.conv2d(x, w_eff, layer.bias.detach(), padding=1).square().sum().backward()
    layer(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, w_eff.grad)
    assert layer.weight.grad[~mask].abs().sum() > 0  # dense: pruned positions have gradient
    layer.weight.grad = None
    layer.dense_weight_grad = False
    layer(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, w_eff.grad * mask)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_linear_matches_linear(device):
    torch.manual_seed(0)
    dense = nn.Linear(7, 5).to(device)
    layer = MaskedLinear.from_dense(dense)
    mask = _random_mask(layer.weight.shape).to(device)
    layer.set_mask(mask)
    x = torch.randn(3, 2, 7, device=device)
    torch.testing.assert_close(layer(x), F.linear(x, dense.weight * mask, dense.bias))


def test_mask_is_in_state_dict_and_round_trips():
    layer = MaskedLinear(6, 4)
    layer.set_mask(_random_mask((4, 6)))
    state = layer.state_dict()
    assert state["mask"].dtype == torch.bool
    fresh = MaskedLinear(6, 4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.mask, layer.mask) and torch.equal(fresh.weight, layer.weight)
    bad = dict(state, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="mask has shape"):
        fresh.load_state_dict(bad)


def test_set_mask_rejects_wrong_shape_and_values_without_changes():
    layer = MaskedConv2d(2, 3, 3)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=r"mask has shape \(3, 2, 3\), expected the weight's shape \(3, 2, 3, 3\)"):
        layer.set_mask(torch.ones(3, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        layer.set_mask(torch.full((3, 2, 3, 3), 0.5))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        layer.set_mask([[1]])
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


def test_forward_refuses_mask_on_another_device():
    layer = MaskedLinear(4, 3)
    layer.mask = torch.ones(3, 4, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="mask is on meta but weight is on cpu"):
        layer(torch.randn(2, 4))


class UserNet(nn.Module):
    """A user model the package does not know: convs, BN, a grouped conv, a linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize("mode", ["irregular", "channel"])
@pytest.mark.parametrize("init", ["uniform", "erk"])
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_sparsify_exact_budget_and_keeps_weights(mode, init, density):
    torch.manual_seed(0)
    model = UserNet().double()
    reference = copy.deepcopy(model)
    dnr.sparsify(model, density=density, mode=mode, init=init, generator=torch.Generator().manual_seed(1))
    layers = dnr.masked_layers(model)
    expected_layers = 3 if mode == "irregular" else 2  # channel mode keeps the classifier dense
    assert len(layers) == expected_layers
    prunable = sum(l.weight.numel() for _, l in layers)
    active = sum(int(l.mask.sum()) for _, l in layers)
    if mode == "irregular":
        assert active == round(density * prunable)  # exact global budget
    else:
        assert abs(active - round(density * prunable)) <= max(l.weight[0].numel() for _, l in layers)
        for _, l in layers:  # whole channels only
            rows = l.mask.reshape(l.mask.shape[0], -1)
            assert torch.equal(rows.all(1), rows.any(1))
    for name, layer in layers:
        assert layer.weight.dtype == torch.float64
        assert int(layer.mask.sum()) >= 1
        old = reference.get_submodule(name).weight
        torch.testing.assert_close(layer.weight, old * layer.mask, rtol=0, atol=0)


def test_sparsify_uniform_is_uniform_and_erk_favours_small_layers():
    model = dnr.sparsify(UserNet(), density=0.2, init="uniform")
    dens = [l.density for _, l in dnr.masked_layers(model)]
    assert max(dens) - min(dens) < 0.01
    model = dnr.sparsify(UserNet(), density=0.2, init="erk")
    dens = {n: l.density for n, l in dnr.masked_layers(model)}
    # ERK: density scales with (sum of dims)/(product of dims): the 3-channel stem is denser than conv 2
    assert dens["features.0"] > dens["features.3"]


def test_sparsify_exclude_and_first_last_options():
    model = dnr.sparsify(UserNet(), density=0.1, exclude="head")
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, MaskedLinear)
    model = dnr.sparsify(UserNet(), density=0.1, exclude=[nn.Linear])
    assert not isinstance(model.head, MaskedLinear)
    model = dnr.sparsify(UserNet(), density=0.1, exclude=lambda name, m: name.startswith("features.0"))
    assert not isinstance(model.features[0], MaskedConv2d)
    model = dnr.sparsify(UserNet(), density=0.1, prune_first=False, prune_last=False)
    assert [n for n, _ in dnr.masked_layers(model)] == ["features.3"]


@pytest.mark.parametrize("bad,match", [
    (dict(density=0.0), r"density must be a number in \(0, 1\], got 0.0"),
    (dict(density=1.5), r"density must be a number in \(0, 1\], got 1.5"),
    (dict(density=-0.1), r"density must be a number in \(0, 1\], got -0.1"),
    (dict(mode="block"), r"mode must be one of \('irregular', 'channel'\), got 'block'"),
    (dict(init="normal"), r"init must be 'uniform' or 'erk', got 'normal'"),
    (dict(exclude=[3]), r"exclude entries must be layer names"),
    (dict(exclude="*"), r"every prunable layer of UserNet is excluded"),
    (dict(density=1e-6), r"fewer than the 3 layers"),
])
def test_sparsify_bad_input_leaves_model_untouched(bad, match):
    model = UserNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        dnr.sparsify(model, **bad)
    assert not any(isinstance(m, dnr.nn.MaskedLayer) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_sparsify_model_without_prunable_layer():
    with pytest.raises(ValueError, match="has no prunable layer"):
        dnr.sparsify(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


@pytest.mark.parametrize("device", DEVICES)
def test_sparsify_keeps_device_and_requires_grad(device):
    model = UserNet().to(device)
    model.head.bias.requires_grad_(False)
    dnr.sparsify(model, density=0.1)
    for _, layer in dnr.masked_layers(model):
        assert layer.weight.device.type == device and layer.mask.device.type == device
    assert model.head.bias.requires_grad is False


def test_channel_mode_pairs_norm_layers_and_zeroes_dead_channels():
    torch.manual_seed(0)
    model = dnr.sparsify(UserNet(), density=0.25, mode="channel")
    assert model.features[0].norm_name == "features.1"
    assert model.features[3].norm_name == "features.4"
    for idx, bn_idx in ((0, 1), (3, 4)):
        conv, bn = model.features[idx], model.features[bn_idx]
        dead = ~conv.channel_mask
        assert dead.any()
        assert torch.all(bn.weight[dead] == 0) and torch.all(bn.bias[dead] == 0)
        if conv.bias is not None:
            assert torch.all(conv.bias[dead] == 0)


def test_density_report_counts_against_manual_oracle():
    torch.manual_seed(0)
    model = dnr.sparsify(UserNet(), density=0.1, generator=torch.Generator().manual_seed(0))
    rep = dnr.density_report(model, input_size=(3, 8, 8))
    layers = dnr.masked_layers(model)
    n = sum(l.weight.numel() for _, l in layers)
    k = sum(int(l.mask.sum()) for _, l in layers)
    total = sum(p.numel() for p in model.parameters())
    assert (rep.prunable, rep.active) == (n, k)
    assert rep.compression == pytest.approx(n / k)
    assert rep.total_params == total and rep.nonzero_params == total - (n - k)
    # dense MACs by hand: conv1 8*8*16*3*9, conv2 8*8*32*4*9, head 128*10
    macs = 64 * 16 * 27 + 64 * 32 * 36 + 1280
    assert rep.flops_dense == 2 * macs
    masked = 64 * int(model.features[0].mask.sum()) + 64 * int(model.features[3].mask.sum()) + int(model.head.mask.sum())
    assert rep.flops_masked == 2 * masked
    assert rep.flops_effective <= rep.flops_masked
    text = str(rep)
    assert "compression" in text and "features.3" in text
    assert rep.to_dict()["density"] == pytest.approx(k / n)


def test_density_report_effective_drops_inputs_of_dead_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    dnr.sparsify(model, density=0.5, mode="channel")
    rep = dnr.density_report(model, input_size=(3, 4, 4))
    conv1, conv2 = model[0], model[3]
    live_in = conv1.channel_mask
    expected_conv2 = int((conv2.mask & live_in[None, :, None, None]).sum())
    row = next(r for r in rep.layers if r.name == "3")
    assert row.effective_active == expected_conv2 < row.active
    assert rep.effective_density < rep.density
    # the dense classifier's inputs from dead channels are dead too
    head = next(r for r in rep.layers if r.name == "7")
    assert not head.masked and head.macs_effective == 10 * 16 * int(model[3].channel_mask.sum())


def test_sparsify_refuses_an_already_sparsified_model_unless_asked():
    """Issue 12: a second sparsify used to draw new random masks silently, losing the trained structure."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sparsify(model, density=0.3, generator=torch.Generator().manual_seed(0))
    masks = [layer.mask.clone() for _, layer in masked_layers(model)]
    x = torch.randn(5, 8)
    before = model(x)
    with pytest.raises(ValueError, match=r"already sparsified \(2 masked layers: 0, 2\).*resparsify=True"):
        sparsify(model, density=0.3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(m, layer.mask) for m, (_, layer) in zip(masks, masked_layers(model)))
    assert torch.equal(model(x), before)
    sparsify(model, density=0.3, resparsify=True, generator=torch.Generator().manual_seed(1))
    assert any(not torch.equal(m, layer.mask) for m, (_, layer) in zip(masks, masked_layers(model)))
    assert sum(int(layer.mask.sum()) for _, layer in masked_layers(model)) == round(0.3 * (8 * 16 + 16 * 4))


@pytest.mark.parametrize("exclude", [42, 1.5, object()])
def test_sparsify_exclude_of_the_wrong_type_is_a_clear_error(exclude):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(TypeError, match=r"exclude must be a layer name or glob pattern, .*; got .* \((int|float|object)\)"):
        sparsify(model, density=0.3, exclude=exclude)
    assert not masked_layers(model)
