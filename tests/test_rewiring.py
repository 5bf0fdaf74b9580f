"""The DNR controller: exact budget, caps, masking after optimizer steps, channel mode, state round trip."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dnr

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
PAPER = dnr.rewiring.REWIRE_SETTINGS["paper"]  # the paper's schedule: rewiring at epoch ends only


def _momentum_step(model, optimizer, seed):
    """One optimizer step with a random dense gradient, so momentum buffers exist everywhere."""
    g = torch.Generator().manual_seed(seed)
    optimizer.zero_grad()
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p)
    optimizer.step()


def _conv_stack(channels, kernel, with_bn=True):
    layers = []
    for cin, cout in zip(channels[:-1], channels[1:]):
        layers.append(nn.Conv2d(cin, cout, kernel, padding=kernel // 2))
        if with_bn:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], 3))


def _check_rewiring(model, record, budget):
    layers = dict(dnr.masked_layers(model))
    assert sum(int(l.mask.sum()) for l in layers.values()) == budget == record["active"]
    assert record["pruned"] == record["regrown"]
    for row in record["layers"]:
        layer = layers[row["name"]]
        assert int(layer.mask.sum()) == row["active"] >= 1  # no layer dies
        assert row["units_regrown"] <= row["regrow_cap_units"]  # per-layer cap respected
        if not record["cap_relaxed"]:
            assert row["regrow_cap_units"] == math.floor(0.99 * row["units_free"])
        assert int(((layer.weight != 0) & ~layer.mask).sum()) == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(1, 40), min_size=2, max_size=6),
    density=st.floats(0.02, 0.9),
    prune_rate=st.floats(0.01, 0.95),
    seed=st.integers(0, 2**16),
)
def test_irregular_budget_is_exact_after_every_rewiring(widths, density, prune_rate, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])
    n = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    if round(density * n) < len(widths) - 1:
        return  # fewer weights than layers: sparsify refuses (tested elsewhere)
    dnr.sparsify(model, density=density, generator=torch.Generator().manual_seed(seed))
    budget = round(density * n)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=10, prune_rate=prune_rate, schedule="constant", sparsify_until=0)
    assert ctl.budget == budget
    for i in range(3):
        _momentum_step(model, opt, seed + i)
        _check_rewiring(model, ctl.rewire(), budget)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.lists(st.integers(2, 24), min_size=3, max_size=5),
    kernel=st.sampled_from([1, 3]),
    density=st.floats(0.05, 0.8),
    prune_rate=st.floats(0.05, 0.9),
    seed=st.integers(0, 2**16),
)
def test_channel_budget_is_exact_after_every_rewiring(channels, kernel, density, prune_rate, seed):
    torch.manual_seed(seed)
    model = _conv_stack([3] + channels, kernel)
    dnr.sparsify(model, density=density, mode="channel", generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=10, prune_rate=prune_rate, schedule="constant", sparsify_until=0)
    budget = ctl.budget
    for i in range(3):
        _momentum_step(model, opt, seed + i)
        record = ctl.rewire()
        _check_rewiring(model, record, budget)
        for _, layer in dnr.masked_layers(model):
            rows = layer.mask.reshape(layer.mask.shape[0], -1)
            assert torch.equal(rows.all(1), rows.any(1))  # whole channels only


def test_redistribution_follows_normalised_momentum():
    """The layer with the larger mean |momentum| regrows more, by its share mu_l of the freed weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 50, bias=False), nn.Linear(50, 50, bias=False))
    dnr.sparsify(model, density=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=10, **{**PAPER, "schedule": "constant"})
    model[0].weight.grad = torch.full((50, 50), 3.0)
    model[1].weight.grad = torch.full((50, 50), 1.0)
    opt.step()
    rec = ctl.rewire()
    mu = [r["mu"] for r in rec["layers"]]
    assert mu == pytest.approx([0.75, 0.25])
    freed = rec["pruned"]
    assert [r["regrown"] for r in rec["layers"]] == [round(0.75 * freed), round(0.25 * freed)]
    assert rec["layers"][0]["pruned"] == math.ceil(0.5 * 500)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_pruned_weights_stay_zero_and_momentum_stays_dense(nesterov, weight_decay):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    dnr.sparsify(model, density=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    dnr.DNR(model, opt, total_steps=100, sparsify_until=0)
    x, y = torch.rand(16, 3, 6, 6), torch.randint(0, 4, (16,))
    momenta = []
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for _, layer in dnr.masked_layers(model):
            assert torch.all(layer.weight[~layer.mask] == 0)
        momenta.append(opt.state[model[0].weight]["momentum_buffer"].clone())
    pruned = ~model[0].mask
    assert momenta[-1][pruned].abs().sum() > 0  # momentum accumulates at pruned positions
    assert not torch.equal(momenta[-1][pruned], momenta[-2][pruned])


def test_regrown_weights_start_at_zero_and_survivors_keep_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 30), nn.Linear(30, 5))
    dnr.sparsify(model, density=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=100, prune_rate=0.3, schedule="constant", sparsify_until=0)
    _momentum_step(model, opt, 0)
    before = {n: (l.mask.clone(), l.weight.detach().clone()) for n, l in dnr.masked_layers(model)}
    ctl.rewire()
    grown_any = False
    for name, layer in dnr.masked_layers(model):
        old_mask, old_w = before[name]
        grown = layer.mask & ~old_mask
        kept = layer.mask & old_mask
        grown_any |= bool(grown.any())
        assert torch.all(layer.weight[grown] == 0)
        assert torch.equal(layer.weight[kept], old_w[kept])
    assert grown_any


def test_channel_mode_regrown_channels_are_reinitialised_and_learn():
    """A regrown channel starts from the default init, not zero: from zero weights a conv + BN + ReLU
    channel outputs a constant 0 and gets exactly zero gradient forever (a dead channel)."""
    torch.manual_seed(0)
    model = _conv_stack([3, 8, 12, 16], 3)
    dnr.sparsify(model, density=0.3, mode="channel")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=20, prune_rate=0.4, schedule="constant", sparsify_until=0,
                  generator=torch.Generator().manual_seed(1))
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    before = {n: (l.channel_mask.clone(), l.weight.detach().clone()) for n, l in dnr.masked_layers(model)}
    ctl.rewire()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grown_any = False
    for name, layer in dnr.masked_layers(model):
        old_channels, old_w = before[name]
        grown = layer.channel_mask & ~old_channels
        kept = layer.channel_mask & old_channels
        assert torch.equal(layer.weight[kept], old_w[kept])  # survivors keep their values
        if not grown.any():
            continue
        grown_any = True
        w = layer.weight[grown]
        bound = 1 / math.sqrt(layer.weight[0].numel())
        assert w.abs().max() <= bound and (w != 0).all()  # the default init's range, no zeros
        assert layer.weight.grad[grown].abs().sum() > 0   # and it learns
    assert grown_any


def test_channel_mode_pruned_channels_output_exactly_zero():
    torch.manual_seed(0)
    model = _conv_stack([3, 8, 12, 16], 3)
    dnr.sparsify(model, density=0.3, mode="channel")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ctl = dnr.DNR(model, opt, total_steps=20, prune_rate=0.4, sparsify_until=0)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 3, (8,))
    for step in range(6):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step % 2 == 1:
            ctl.rewire()
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o))
             for k, m in enumerate(model) if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    for mode in ("train", "eval"):
        getattr(model, mode)()
        model(x)
        for k, module in enumerate(model):
            if isinstance(module, dnr.MaskedConv2d):
                dead = ~module.channel_mask
                assert dead.any()
                assert torch.all(outputs[k][:, dead] == 0)      # conv output
                assert torch.all(outputs[k + 1][:, dead] == 0)  # its BatchNorm output
    for h in hooks:
        h.remove()


def test_rewire_every_k_steps_and_cosine_schedule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    dnr.sparsify(model, density=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=12, **{**PAPER, "rewire_every": 4})
    assert ctl.prune_rate == pytest.approx(0.5)
    for i in range(12):
        _momentum_step(model, opt, i)
    assert [r["step"] for r in ctl.history] == [4, 8]  # not at the last step
    assert ctl.prune_rate == pytest.approx(0.005)
    t = 4
    assert ctl.history[0]["prune_rate"] == pytest.approx(0.005 + 0.495 * (1 + math.cos(math.pi * t / 12)) / 2)
    assert ctl.end_epoch() is None  # step-based rewiring: epoch ends do not rewire


def test_end_epoch_skips_the_last_epoch():
    model = dnr.sparsify(nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2)), density=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=4, **PAPER)
    _momentum_step(model, opt, 0)
    assert ctl.end_epoch() is not None
    assert ctl.end_epoch(last=True) is None
    assert len(ctl.history) == 1 and ctl.epochs == 2


def test_adam_uses_its_first_moment():
    torch.manual_seed(0)
    model = dnr.sparsify(nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 2)), density=0.3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctl = dnr.DNR(model, opt, total_steps=10, sparsify_until=0)
    _momentum_step(model, opt, 0)
    rec = ctl.rewire()
    assert rec["active"] == ctl.budget
    for _, layer in dnr.masked_layers(model):
        assert torch.all(layer.weight[~layer.mask] == 0)


def test_grad_scaler_skipped_step_does_not_advance_schedule():
    torch.manual_seed(0)
    model = dnr.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), density=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=10, **PAPER)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert ctl.steps == 1
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0] = float("inf")  # overflow: the scaler must skip this step
    scaler.step(opt)
    scaler.update()
    assert ctl.steps == 1 and ctl.prune_rate == pytest.approx(dnr.rewiring.cosine_prune_rate(1, 10))
    for _, layer in dnr.masked_layers(model):
        assert torch.all(layer.weight[~layer.mask] == 0)


def test_lr_scheduler_works_alongside():
    model = dnr.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), density=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    ctl = dnr.DNR(model, opt, total_steps=5)
    for i in range(5):
        _momentum_step(model, opt, i)
        sched.step()
    assert ctl.steps == 5 and opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def _train(model, opt, ctl, data, steps, start=0):
    xs, ys = data
    for i in range(start, steps):
        x, y = xs[i % len(xs)], ys[i % len(ys)]
        noise = torch.rand(x.shape) * 0.01  # consumes the global RNG: it must be restored on resume
        opt.zero_grad()
        F.cross_entropy(model(x + noise), y).backward()
        opt.step()


def _make(seed=0, mode="irregular"):
    torch.manual_seed(seed)
    model = _conv_stack([1, 6, 8], 3)
    dnr.sparsify(model, density=0.3, mode=mode, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    ctl = dnr.DNR(model, opt, total_steps=12, rewire_every=3, prune_rate=0.4,
                  regrowth="random", generator=torch.Generator().manual_seed(seed))
    return model, opt, ctl


@pytest.mark.parametrize("mode", ["irregular", "channel"])
def test_state_round_trip_is_bit_identical(mode):
    g = torch.Generator().manual_seed(123)
    data = (torch.rand(4, 8, 1, 6, 6, generator=g), torch.randint(0, 3, (4, 8), generator=g))
    model, opt, ctl = _make(mode=mode)
    _train(model, opt, ctl, data, 12)

    model2, opt2, ctl2 = _make(mode=mode)
    _train(model2, opt2, ctl2, data, 5)
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "dnr": ctl2.state_dict(),
                "rng": torch.get_rng_state()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    model3, opt3, ctl3 = _make(seed=99, mode=mode)  # different init: everything must come from the state
    model3.load_state_dict(state["model"])
    opt3.load_state_dict(state["opt"])
    ctl3.load_state_dict(state["dnr"])
    torch.set_rng_state(state["rng"])
    _train(model3, opt3, ctl3, data, 12, start=5)
    assert ctl3.history == ctl.history and ctl3.steps == ctl.steps
    for (k, a), (_, b) in zip(model.state_dict().items(), model3.state_dict().items()):
        assert torch.equal(a, b), k


def test_controller_bad_input():
    model = dnr.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), density=0.5)
    with pytest.raises(ValueError, match=r"momentum=0; DNR needs a momentum buffer"):
        dnr.DNR(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)
    with pytest.raises(TypeError, match="RMSprop has no momentum buffer"):
        dnr.DNR(model, torch.optim.RMSprop(model.parameters()), total_steps=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"total_steps must be an int >= 1, got 0"):
        dnr.DNR(model, opt, total_steps=0)
    with pytest.raises(ValueError, match=r"prune_rate must be in \(0, 1\), got 1.5"):
        dnr.DNR(model, opt, total_steps=10, prune_rate=1.5)
    with pytest.raises(ValueError, match="has no masked layer"):
        plain = nn.Linear(3, 3)
        dnr.DNR(plain, torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9), total_steps=10)
    with pytest.raises(ValueError, match="is not in the optimizer's parameters"):
        dnr.DNR(model, torch.optim.SGD(model[1].parameters(), lr=0.1, momentum=0.9), total_steps=10)
    model[0].mask = model[0].mask.to("meta")
    with pytest.raises(ValueError, match="mask is on meta but weight on cpu"):
        dnr.DNR(model, opt, total_steps=10)


def test_rewire_before_first_step_and_mismatched_state():
    model = dnr.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), density=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = dnr.DNR(model, opt, total_steps=10, sparsify_until=0)
    with pytest.raises(RuntimeError, match="needs at least one optimizer step first"):
        ctl.rewire()
    state = ctl.state_dict()
    state["budget"] += 1
    with pytest.raises(ValueError, match="load the model's state dict"):
        ctl.load_state_dict(state)
