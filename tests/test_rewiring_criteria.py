"""DNR's step-based cadence, its rewiring horizon, the regrowth criteria and the channel-mode signal."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnr
from dnr.models import resnet18, small_cnn
from dnr.rewiring import auto_rewire_interval
from dnr.rewiring.channel_signal import Consumer, OutputGradientMeter, find_channel_consumers

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]


def _batch(n=8, seed=0, size=28):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


# ----------------------------------------------------------------------------- cadence and horizon
@pytest.mark.parametrize("total", [1, 7, 188, 474, 3760, 78200])
@pytest.mark.parametrize("until", [0.5, 0.75, 1.0])
def test_auto_interval_gives_a_sensible_number_of_rewirings(total, until):
    k = auto_rewire_interval(total, until)
    assert 1 <= k <= 100
    rewirings = len(range(k, math.ceil(until * total), k))
    if until * total >= 40:  # long enough for the target count: 20 rewirings or the 100-step cap
        assert rewirings >= min(19, until * total // 100 - 1)


def test_rewiring_stops_at_the_horizon_and_the_prune_rate_reaches_its_floor():
    model = dnr.sparsify(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4)), density=0.3,
                         generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=40, rewire_every=5, rewire_until=0.5, prune_rate=0.3,
                  prune_rate_min=0.0, sparsify_until=0)
    x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
    rates = []
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rates.append(ctl.prune_rate)
    assert [r["step"] for r in ctl.history] == [5, 10, 15]  # none at or after step 20 = 0.5 * 40
    assert rates[19] == pytest.approx(0.0) and rates[-1] == pytest.approx(0.0)
    assert ctl.history[0]["prune_rate"] == pytest.approx(0.3 * (1 + math.cos(math.pi * 5 / 20)) / 2)
    assert ctl.end_epoch() is None  # step-based: epoch ends never rewire


def test_auto_cadence_in_the_controller():
    model = dnr.sparsify(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4)), density=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=400, rewire_every="auto", rewire_until=0.75)
    assert ctl.rewire_every == auto_rewire_interval(400, 0.75) == 15
    with pytest.raises(ValueError, match="rewire_until"):
        dnr.DNR(model, opt, total_steps=400, rewire_until=0.0)
    with pytest.raises(ValueError, match="rewire_every"):
        dnr.DNR(model, opt, total_steps=400, rewire_every="often")


# ----------------------------------------------------------------------------- regrowth criteria
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_regrowth_takes_the_largest_dense_gradients(device):
    torch.manual_seed(0)
    model = dnr.sparsify(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)), density=0.4,
                         generator=torch.Generator().manual_seed(1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=10, regrowth="gradient", redistribution="none", prune_rate=0.25,
                  schedule="constant", sparsify_until=0)
    x, y = torch.randn(32, 12, device=device), torch.randint(0, 5, (32,), device=device)
    _step(model, opt, x, y)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # the gradient the rewiring reads (dense at pruned positions)
    layers = dnr.masked_layers(model)
    before = {n: l.mask.clone() for n, l in layers}
    grads = {n: l.weight.grad.clone() for n, l in layers}
    weights = {n: l.weight.detach().clone() for n, l in layers}
    record = ctl.rewire()
    for row, (name, layer) in zip(record["layers"], layers):
        # oracle: prune the smallest |w| among the active, regrow the largest |g| among the rest
        active = before[name].flatten()
        w = weights[name].flatten().abs().masked_fill(~active, math.inf)
        kept = active.clone()
        kept[torch.argsort(w, stable=True)[:row["pruned"]]] = False
        g = grads[name].flatten().abs().masked_fill(kept, -math.inf)
        expected = kept.clone()
        expected[torch.argsort(g, descending=True, stable=True)[:row["regrown"]]] = True
        assert torch.equal(layer.mask.flatten(), expected), name


def test_gradient_regrowth_needs_a_gradient():
    model = dnr.sparsify(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)), density=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=10, regrowth="gradient", sparsify_until=0)
    _step(model, opt, torch.randn(3, 4), torch.randint(0, 2, (3,)))
    opt.zero_grad()  # set_to_none: no gradient left
    with pytest.raises(RuntimeError, match="dense weight gradient"):
        ctl.rewire()


# ----------------------------------------------------------------------------- channel-mode signal
def test_consumers_of_a_plain_cnn_and_a_residual_network():
    model = dnr.sparsify(small_cnn(), density=0.5, mode="channel")
    producers = {n: l.norm_name for n, l in dnr.masked_layers(model)}
    found = find_channel_consumers(model, producers)
    assert found == {"features.0": [Consumer("features.4", 1)], "features.4": [Consumer("features.8", 1)],
                     "features.8": [Consumer("classifier.1", 9)], "classifier.1": [Consumer("classifier.3", 1)]}
    net = dnr.sparsify(resnet18(num_classes=10, input_size=32), density=0.5, mode="channel")
    producers = {n: l.norm_name for n, l in dnr.masked_layers(net)}
    found = find_channel_consumers(net, producers)
    # a block's second conv feeds the residual sum: the next block's first conv and, through the identity
    # shortcut, the block after the next
    assert {c.name for c in found["layer1.0.conv2"]} == {"layer1.1.conv1", "layer2.0.conv1",
                                                         "layer2.0.shortcut.0"}
    assert {c.name for c in found["layer1.0.conv1"]} == {"layer1.0.conv2"}
    assert {c.name for c in found["layer4.1.conv2"]} == {"linear"}


def test_a_layer_whose_output_is_concatenated_has_no_signal():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Linear(12, 2)

        def forward(self, x):
            a = torch.relu(self.a(x))
            return self.head(torch.cat([self.c(a), self.b(x), a], 1).mean((2, 3)))

    model = dnr.sparsify(Cat(), density=0.5, mode="channel", prune_last=False)
    found = find_channel_consumers(model, {n: None for n, _ in dnr.masked_layers(model)})
    assert "a" not in found and "b" not in found  # a concatenation mixes channel indices


@pytest.mark.parametrize("device", DEVICES)
def test_meter_accumulates_the_consumers_input_gradient(device):
    torch.manual_seed(0)
    model = dnr.sparsify(small_cnn(), density=0.5, mode="channel").to(device)
    producers = {n: l.norm_name for n, l in dnr.masked_layers(model)}
    meter = OutputGradientMeter(model, find_channel_consumers(model, producers))
    seen = {}

    def keep(name):
        def hook(module, args):
            args[0].retain_grad()
            seen[name] = args[0]
        return hook

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(keep(n)) for n in ("features.8", "classifier.1")]
    expected = {"features.4": 0, "features.8": 0}
    for seed in range(2):  # two training backward passes add up
        x, y = _batch(seed=seed)
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        expected["features.4"] = expected["features.4"] + seen["features.8"].grad.double().pow(2).sum((0, 2, 3))
        g = seen["classifier.1"].grad.double().reshape(8, 64, 9)
        expected["features.8"] = expected["features.8"] + g.pow(2).sum((0, 2))
    for h in handles:
        h.remove()
    # attack passes (parameters frozen by dnr.attacks) and eval-mode passes are not counted
    x, y = _batch(seed=5)
    dnr.attacks.pgd(model, x.to(device), y.to(device), eps=0.1, alpha=0.05, steps=2, bn_mode="train")
    model.eval()
    F.cross_entropy(model(x.to(device)), y.to(device)).backward()
    model.train()
    for name in expected:
        torch.testing.assert_close(meter.scores(name), expected[name], rtol=1e-9, atol=0)
    meter.reset()
    assert float(meter.scores("features.4").abs().sum()) == 0.0


def test_channel_regrowth_takes_the_largest_output_gradient():
    torch.manual_seed(0)
    model = dnr.sparsify(small_cnn(), density=0.4, mode="channel", generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=50, prune_rate=0.3, schedule="constant", redistribution="none",
                  sparsify_until=0)
    assert ctl.regrowth == "auto"
    x, y = _batch(16)
    _step(model, opt, x, y)
    layers = dnr.masked_layers(model)
    before = {n: l.channel_mask.clone() for n, l in layers}
    scores = {n: ctl._meter.scores(n).clone() for n, _ in layers}
    norms = {n: l.weight.detach().reshape(l.weight.shape[0], -1).norm(dim=1) for n, l in layers}
    record = ctl.rewire()
    for row, (name, layer) in zip(record["layers"], layers):
        kept = before[name].clone()
        kept[torch.argsort(norms[name].masked_fill(~kept, math.inf), stable=True)[:row["units_pruned"]]] = False
        expected = kept.clone()
        s = scores[name].float().masked_fill(kept, -math.inf)
        expected[torch.argsort(s, descending=True, stable=True)[:row["units_regrown"]]] = True
        assert torch.equal(layer.channel_mask, expected), name
        assert row["units_regrown"] == row["units_pruned"]
    assert all(float(ctl._meter.scores(n).abs().sum()) == 0 for n, _ in layers)  # reset after a rewiring


@pytest.mark.parametrize("mode", ["irregular", "channel"])
def test_fractional_floor_holds_through_rewirings(mode):
    torch.manual_seed(0)
    model = dnr.sparsify(small_cnn(), density=0.3, mode=mode, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    initial = {n: int(dnr.nn.units.active_units(l.mask, mode).sum()) for n, l in dnr.masked_layers(model)}
    ctl = dnr.DNR(model, opt, total_steps=100, prune_rate=0.9, schedule="constant", min_active=0.5,
                  sparsify_until=0)
    budget = ctl.budget
    for seed in range(4):
        x, y = _batch(16, seed=seed)
        _step(model, opt, x, y)
        ctl.rewire()
        assert ctl.active_weights() == budget
        for name, layer in dnr.masked_layers(model):
            assert int(dnr.nn.units.active_units(layer.mask, mode).sum()) >= math.ceil(0.5 * initial[name])


@pytest.mark.parametrize("mode", ["irregular", "channel"])
def test_default_settings_resume_bit_identically_between_rewirings(mode):
    """Save in the middle of a rewiring interval (the channel signal half accumulated), load into a fresh
    model, continue: the same masks, weights and rewiring history as the uninterrupted run."""
    import io

    def make(seed=0):
        torch.manual_seed(seed)
        model = dnr.sparsify(small_cnn(), density=0.3, mode=mode, generator=torch.Generator().manual_seed(seed))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        return model, opt, dnr.DNR(model, opt, total_steps=40, generator=torch.Generator().manual_seed(seed))

    batches = [_batch(8, seed=i) for i in range(40)]

    def train(model, opt, steps):
        for x, y in steps:
            _step(model, opt, x, y)

    model, opt, ctl = make()
    assert ctl.rewire_every == 2  # round(0.75 * 40 / 20): rewirings after steps 2, 4, ..., 28
    train(model, opt, batches)
    model2, opt2, ctl2 = make()
    train(model2, opt2, batches[:7])
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "dnr": ctl2.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model3, opt3, ctl3 = make(seed=5)
    model3.load_state_dict(state["model"])
    opt3.load_state_dict(state["opt"])
    ctl3.load_state_dict(state["dnr"])
    train(model3, opt3, batches[7:])
    assert len(ctl.history) == 14 and ctl3.history == ctl.history
    for (k, a), (_, b) in zip(model.state_dict().items(), model3.state_dict().items()):
        assert torch.equal(a, b), k
