"""DNR's dense-to-sparse start (``dnr.DNR(..., sparsify_until=f)``): training starts dense and every layer is
pruned by magnitude to its initial unit count on a cubic schedule that reaches the exact budget at step
S = f * T; rewiring runs from there. Oracles: the cubic formula written out here, masks and weights read back
from the model, magnitudes compared directly."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dnr

MODES = ["irregular", "channel"]


def _model(mode, seed=0, density=0.3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 3))
    return dnr.sparsify(model, density=density, mode=mode, generator=torch.Generator().manual_seed(seed))


def _units(layer, mode):
    return int(layer.mask.sum()) if mode == "irregular" else int(layer.mask.flatten(1).any(1).sum())


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _controller(model, seed=0, total_steps=40, sparsify_until=0.5, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    kw = {"rewire_every": 2, "prune_rate": 0.3, **kw}
    ctl = dnr.DNR(model, opt, total_steps=total_steps, sparsify_until=sparsify_until,
                  generator=torch.Generator().manual_seed(seed), **kw)
    return opt, ctl


@pytest.mark.parametrize("mode", MODES)
def test_the_start_opens_every_mask_and_redraws_only_the_pruned_weights(mode):
    model = _model(mode)
    layers = dnr.masked_layers(model)
    before = {name: (layer.weight.detach().clone(), layer.mask.clone()) for name, layer in layers}
    _controller(model)
    for name, layer in layers:
        weight, mask = before[name]
        assert bool(layer.mask.all())
        assert torch.equal(layer.weight[mask], weight[mask])  # the initial mask's weights are kept
        bound = 1.0 / math.sqrt(layer.weight[0].numel())
        fresh = layer.weight[~mask]
        assert bool((fresh != 0).all()) and float(fresh.detach().abs().max()) <= bound  # nn's default init range


def test_the_default_start_is_the_first_third_of_the_rewiring_window():
    model = _model("irregular")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=120)  # the library's default: sparsify_until="auto"
    assert ctl.sparsify_until == pytest.approx(0.25) and ctl.sparsify_steps == 30
    assert all(bool(layer.mask.all()) for _, layer in dnr.masked_layers(model))
    for until in (0.3, 1.0):
        model = _model("irregular")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ctl = dnr.DNR(model, opt, total_steps=120, rewire_until=until, sparsify_until="auto")
        assert ctl.sparsify_until == pytest.approx(until / 3) and ctl.sparsify_steps == round(120 * until / 3)
    for mode, settings in (("irregular", dnr.rewiring.REWIRE_SETTINGS["paper"]), ("channel", {})):
        # the paper's schedule, and channel mode by default, start at the budget from the random masks
        model = _model(mode)
        masks = [layer.mask.clone() for _, layer in dnr.masked_layers(model)]
        ctl = dnr.DNR(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), total_steps=120,
                      **settings)
        assert ctl.sparsify_until == 0.0 and ctl.sparsify_steps == 0
        assert all(torch.equal(layer.mask, m) for (_, layer), m in zip(dnr.masked_layers(model), masks))
    assert dnr.rewiring.auto_sparsify_until(0.75, "channel") == 0.0
    with pytest.raises(ValueError, match="mode must be 'irregular' or 'channel', got 'rows'"):
        dnr.rewiring.auto_sparsify_until(0.75, "rows")


def test_channel_start_gives_the_reopened_channels_their_norm_back():
    """dnr.sparsify zeroed a closed channel's norm scale and shift; behind a ReLU such a channel gets no gradient,
    so the dense start must reset them, or the channels it opens would stay dead (and still count)."""
    model = _model("channel")
    norms = [model[1], model[4]]
    closed = [~layer.mask.flatten(1).any(1) for _, layer in dnr.masked_layers(model)][:2]
    assert all(bool(c.any()) for c in closed)
    for norm, c in zip(norms, closed):  # dnr.sparsify zeroed them: a closed channel outputs exactly zero
        assert bool((norm.weight[c] == 0).all()) and bool((norm.bias[c] == 0).all())
        with torch.no_grad():  # statistics as after some training, to see them reset
            norm.running_mean.fill_(0.5)
            norm.running_var.fill_(2.0)
    _controller(model)
    for norm, c in zip(norms, closed):
        assert bool((norm.weight[c] == 1).all()) and bool((norm.bias[c] == 0).all())
        assert bool((norm.running_mean[c] == 0).all()) and bool((norm.running_var[c] == 1).all())
        assert bool((norm.running_mean[~c] == 0.5).all()) and bool((norm.running_var[~c] == 2.0).all())


@pytest.mark.parametrize("mode", MODES)
def test_units_follow_the_cubic_schedule_and_reach_the_exact_budget(mode):
    model = _model(mode)
    layers = dnr.masked_layers(model)
    n = [_units(layer, mode) for _, layer in layers]  # the initial masks: the budget per layer
    budget = sum(int(layer.mask.sum()) for _, layer in layers)
    N = [layer.weight.shape[0] if mode == "channel" else layer.weight.numel() for _, layer in layers]
    opt, ctl = _controller(model, total_steps=40, sparsify_until=0.5, rewire_every=3)
    S, every = 20, 3
    assert ctl.sparsify_steps == S and ctl.sparsify_targets(0) == N
    last = list(N)
    for t in range(1, 41):
        _step(model, opt, t)
        units = [_units(layer, mode) for _, layer in layers]
        if t < S:
            pruned_at = t - t % every
            expected = [a + round((b - a) * (1 - pruned_at / S) ** 3) for a, b in zip(n, N)]
            assert units == expected, t
            assert all(u <= v for u, v in zip(units, last))  # units only ever leave in this phase
        else:  # from S on: the exact budget, and every rewiring keeps it
            assert sum(int(layer.mask.sum()) for _, layer in layers) == budget, t
            assert all(u >= f for u, f in zip(units, ctl.floors))
        if t == S:
            assert units == n  # each layer ends at its initial count
        last = units
        for _, layer in layers:
            assert int(((layer.weight != 0) & ~layer.mask).sum()) == 0  # pruned weights are exactly zero
    events = [r.get("event", "rewire") for r in ctl.history]
    assert events[:S // every + 1] == ["sparsify"] * (S // every + 1) and "rewire" in events
    assert all(r["step"] > S for r in ctl.history if r.get("event") is None)


def test_each_pruning_step_keeps_the_largest_magnitudes():
    model = _model("irregular")
    opt, ctl = _controller(model, total_steps=40, sparsify_until=0.5, rewire_every=4)
    layers = dnr.masked_layers(model)
    for t in range(1, 4):
        _step(model, opt, t)
    # step 4 prunes; with lr 0 its update leaves the weights as they are now, so the ranking is known
    weights = {name: layer.weight.detach().clone() for name, layer in layers}
    masks = {name: layer.mask.clone() for name, layer in layers}
    opt.param_groups[0]["lr"] = 0.0
    _step(model, opt, 4)
    for name, layer in layers:
        kept = weights[name][layer.mask].abs()
        dropped = weights[name][masks[name] & ~layer.mask].abs()
        assert dropped.numel() > 0 and torch.equal(layer.weight[layer.mask], weights[name][layer.mask])
        assert float(kept.min()) >= float(dropped.max())


def test_rewiring_waits_for_the_budget_and_bad_values_are_clear_errors():
    model = _model("irregular")
    opt, ctl = _controller(model, total_steps=40, sparsify_until=0.5)
    _step(model, opt, 1)
    with pytest.raises(RuntimeError, match=r"reaches the budget at step 20 \(sparsify_until=0.5\)"):
        ctl.rewire()
    assert ctl.end_epoch() is None  # no epoch-end rewiring inside the phase either
    for bad in (-0.1, 0.75, 0.9, True, "half"):
        with pytest.raises(ValueError, match=r"sparsify_until must be 'auto' or a number in \[0, rewire_until=0.75\), got"):
            dnr.DNR(_model("irregular"), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                    total_steps=10, sparsify_until=bad)


@pytest.mark.parametrize("mode", MODES)
def test_state_round_trip_inside_the_phase_is_bit_identical(mode):
    model = _model(mode)
    opt, ctl = _controller(model, total_steps=24, sparsify_until=0.5, rewire_every=3, regrowth="random")
    for t in range(1, 25):
        _step(model, opt, t)

    model2 = _model(mode)
    opt2, ctl2 = _controller(model2, total_steps=24, sparsify_until=0.5, rewire_every=3, regrowth="random")
    for t in range(1, 8):  # step 7: inside the phase (S = 12), between two pruning steps
        _step(model2, opt2, t)
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "dnr": ctl2.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    model3 = _model(mode, seed=5)  # another init: everything must come from the state
    opt3, ctl3 = _controller(model3, seed=5, total_steps=24, sparsify_until=0.5, rewire_every=3, regrowth="random")
    model3.load_state_dict(state["model"])
    opt3.load_state_dict(state["opt"])
    ctl3.load_state_dict(state["dnr"])
    for t in range(8, 25):
        _step(model3, opt3, t)
    assert ctl3.history == ctl.history and ctl3.steps == ctl.steps
    for (k, a), (_, b) in zip(model.state_dict().items(), model3.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_state_whose_masks_do_not_match_the_schedule_is_refused():
    model = _model("irregular")
    opt, ctl = _controller(model, total_steps=40, sparsify_until=0.5, rewire_every=3)
    for t in range(1, 7):
        _step(model, opt, t)
    state = ctl.state_dict()
    state["steps"] = 3  # the masks hold step 6's targets
    with pytest.raises(ValueError, match=r"expects \d+ active weights at optimizer step 3"):
        ctl.load_state_dict(state)


def test_a_refused_state_leaves_the_controller_as_it_was():
    model = _model("irregular")
    opt, ctl = _controller(model, total_steps=40, sparsify_until=0.5, rewire_every=3)
    for t in range(1, 7):
        _step(model, opt, t)
    before = (ctl.sparsify_until, ctl.sparsify_every, list(ctl.targets), ctl.total_steps, ctl.budget)
    state = ctl.state_dict()
    state["steps"], state["config"] = 3, {**state["config"], "total_steps": 80}
    with pytest.raises(ValueError, match="expects"):
        ctl.load_state_dict(state)
    assert (ctl.sparsify_until, ctl.sparsify_every, ctl.targets, ctl.total_steps, ctl.budget) == before
