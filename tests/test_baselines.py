"""The baselines' defining mechanics: one-shot magnitude pruning, ADMM (Z projection, U, rho), RSR (noise, L1).

Oracles are written here independently: sorting by magnitude, the ADMM update formulas, the plain
model's output without the noise hooks.
"""

import json
import math
import os

import pytest
import torch
from torch import nn

import dnr
from dnr.baselines import ADMM, RSR, magnitude_masks, prune_by_magnitude, unit_counts
from dnr.harness import ConfigError, fit, load_checkpoint, resolve_config
from dnr.harness.builders import lr_factor
from dnr.nn import masked_layers
from dnr.nn.sparsify import initial_unit_counts


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Flatten(), nn.Linear(12 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 5))


def _dense_masked(mode="irregular", seed=0):
    return dnr.sparsify(_cnn(seed), density=1.0, mode=mode)


def _budget(model, density):
    return int(round(density * sum(l.weight.numel() for _, l in masked_layers(model))))


def _active(model):
    return sum(int(l.mask.sum()) for _, l in masked_layers(model))


# ---------------------------------------------------------------------------------------- magnitude pruning
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_irregular_prune_hits_the_exact_budget_and_keeps_the_largest(scope):
    model = _dense_masked()
    weights = {n: l.weight.detach().clone() for n, l in masked_layers(model)}
    rec = prune_by_magnitude(model, 0.1, scope=scope)
    assert _active(model) == _budget(model, 0.1) == rec["active"]
    for name, layer in masked_layers(model):
        assert layer.mask.sum() >= 1
        kept, dropped = weights[name][layer.mask].abs(), weights[name][~layer.mask].abs()
        assert kept.min() >= dropped.max()  # within a layer: the largest survive
        assert not layer.weight[~layer.mask].any()
    if scope == "global":  # across layers: one threshold, except a layer's reserved best weight
        kept = torch.cat([weights[n][l.mask].abs() for n, l in masked_layers(model)])
        dropped = torch.cat([weights[n][~l.mask].abs() for n, l in masked_layers(model)])
        reserved = [weights[n].abs().max() for n, _ in masked_layers(model)]
        assert torch.sort(kept).values[len(reserved):].min() >= dropped.max()


def test_layer_scope_uses_the_sparsify_allocation():
    model = _dense_masked()
    ws = [l.weight for _, l in masked_layers(model)]
    assert unit_counts(ws, 0.05, "irregular", "layer") == initial_unit_counts(ws, 0.05, "irregular", "uniform")
    assert unit_counts(ws, 0.05, "irregular", "layer", "erk") == initial_unit_counts(ws, 0.05, "irregular", "erk")


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_channel_prune_removes_whole_channels_and_their_outputs(scope):
    model = _dense_masked("channel")
    norms = {n: l.weight.detach().flatten(1).norm(dim=1) for n, l in masked_layers(model)}
    prune_by_magnitude(model, 0.3, scope=scope)
    ws = [l.weight for _, l in masked_layers(model)]
    # the same budget rule as the initial masks: sum of kept weights == sparsify's (nearest reachable) K
    assert _active(model) == sum(c * w[0].numel() for c, w in zip(initial_unit_counts(ws, 0.3, "channel", "uniform"), ws))
    outputs = {}
    model[1].register_forward_hook(lambda m, i, o: outputs.setdefault("bn1", o))
    model.train()
    model(torch.rand(4, 1, 6, 6))
    for name, layer in masked_layers(model):
        rows = layer.mask.flatten(1)
        assert (rows.all(1) | ~rows.any(1)).all()  # whole channels
        alive = rows.any(1)
        if (~alive).any():
            assert norms[name][alive].min() >= norms[name][~alive].max()
    dead = ~masked_layers(model)[0][1].channel_mask
    assert dead.any() and not outputs["bn1"][:, dead].any()  # pruned channels output exactly zero after BN


def test_magnitude_masks_oracle_topk():
    t = torch.randn(7, 5)
    (m,) = magnitude_masks([t], [9], "irregular")
    assert set(torch.nonzero(m.flatten()).flatten().tolist()) == set(torch.topk(t.abs().flatten(), 9).indices.tolist())


def test_prune_errors_name_the_argument():
    with pytest.raises(ValueError, match="density must be a number in \\(0, 1\\], got 0"):
        prune_by_magnitude(_dense_masked(), 0)
    with pytest.raises(ValueError, match="scope must be one of"):
        prune_by_magnitude(_dense_masked(), 0.1, scope="net")
    with pytest.raises(ValueError, match="no masked layer"):
        prune_by_magnitude(_cnn(), 0.1)


# ---------------------------------------------------------------------------------------- ADMM
@pytest.mark.parametrize("mode", ["irregular", "channel"])
def test_admm_projection_keeps_exactly_the_budget_and_u_accumulates_w_minus_z(mode):
    model = _dense_masked(mode)
    density = 0.2
    admm = ADMM(model, density=density, rho=0.01, rho_growth=2.0, rho_max=0.03)
    layers = masked_layers(model)
    ws = [l.weight for _, l in layers]
    counts = initial_unit_counts(ws, density, mode, "uniform")
    expected_nnz = [c * (1 if mode == "irregular" else w[0].numel()) for c, w in zip(counts, ws)]

    def check_z(z_list, source):
        for z, src, nnz in zip(z_list, source, expected_nnz):
            kept = z != 0
            assert int(kept.sum()) == nnz  # exactly the target number of weights
            assert torch.equal(z[kept], src[kept])  # Z copies the kept values of W + U
            norms = src.flatten(1).norm(dim=1).view(-1, *([1] * (src.dim() - 1)))
            score = src.abs() if mode == "irregular" else norms.expand_as(src)
            if (~kept).any():
                assert score[kept].min() >= score[~kept].max()

    check_z(admm.Z, [w.detach() for w in ws])  # Z0 = Proj(W), U0 = 0
    assert all(not u.any() for u in admm.U)
    for it in range(3):
        with torch.no_grad():  # the weights move between updates, as training would move them
            for w in ws:
                w.add_(0.05 * torch.randn_like(w))
        u_before = [u.clone() for u in admm.U]
        w_now = [w.detach().clone() for w in ws]
        rho_before = admm.rho
        rec = admm.update()
        check_z(admm.Z, [w + u for w, u in zip(w_now, u_before)])
        for u, u0, w, z in zip(admm.U, u_before, w_now, admm.Z):
            torch.testing.assert_close(u, u0 + (w - z), rtol=0, atol=0)
        assert rec["rho"] == rho_before and admm.rho == min(rho_before * 2.0, 0.03)
    assert admm.rho == 0.03  # capped


def test_admm_penalty_matches_the_formula_and_has_gradients():
    model = _dense_masked()
    admm = ADMM(model, density=0.1, rho=0.05)
    admm.update()
    rho = admm.rho  # grown by the update
    assert rho == pytest.approx(0.05 * 1.3)
    expected = sum(0.5 * rho * float(((l.weight.detach() - z + u) ** 2).sum()) for (_, l), z, u in
                   zip(masked_layers(model), admm.Z, admm.U))
    p = admm.penalty()
    assert float(p.detach()) == pytest.approx(expected, rel=1e-6)
    p.backward()
    for (_, l), z, u in zip(masked_layers(model), admm.Z, admm.U):
        torch.testing.assert_close(l.weight.grad, rho * (l.weight.detach() - z + u))


def test_admm_updates_every_k_optimizer_steps_and_finish_prunes_exactly():
    model = _dense_masked()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    admm = ADMM(model, opt, density=0.1, update_every=3)
    x, y = torch.rand(8, 1, 6, 6), torch.randint(0, 5, (8,))
    for _ in range(7):
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + admm.penalty()).backward()
        opt.step()
    assert [r["step"] for r in admm.history] == [3, 6]
    state = admm.state_dict()
    rec = admm.finish()
    assert rec["active"] == _active(model) == _budget(model, 0.1)
    assert float(admm.penalty()) == 0.0
    opt.step()
    assert admm.steps == 7  # detached from the optimizer
    # state round trip into a fresh ADMM
    other = ADMM(_dense_masked(), density=0.1)
    other.load_state_dict(state)
    assert other.rho == state["rho"] and other.steps == 7 and other.active
    assert all(torch.equal(a, b) for a, b in zip(other.U, state["U"]))


def test_admm_argument_errors():
    with pytest.raises(ValueError, match="rho must be > 0, got 0"):
        ADMM(_dense_masked(), density=0.1, rho=0)
    with pytest.raises(ValueError, match="rho_max must be >= rho"):
        ADMM(_dense_masked(), density=0.1, rho=0.1, rho_max=0.01)
    with pytest.raises(ValueError, match="update_every must be an integer >= 1"):
        ADMM(_dense_masked(), density=0.1, update_every=0)
    with pytest.raises(ValueError, match="density must be a number in \\(0, 1\\], got 1.5"):
        ADMM(_dense_masked(), density=1.5)


# ---------------------------------------------------------------------------------------- RSR
def _no_bn_model():
    torch.manual_seed(1)
    return dnr.sparsify(nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)),
                        density=1.0)


def test_rsr_noise_scales_are_trainable_per_channel_and_off_in_eval():
    model = _no_bn_model()
    x = torch.rand(4, 1, 6, 6)
    with torch.no_grad():
        plain = model(x)
    rsr = RSR(model, density=0.2, noise_init=0.25)
    assert [tuple(a.shape) for a in rsr.parameters()] == [(6,), (5,)]
    assert all(a.requires_grad for a in rsr.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain)  # evaluation sees the plain weights
    model.train()
    noisy = model(x)
    assert not torch.allclose(noisy, plain)
    noisy.square().sum().backward()
    for a in rsr.parameters():
        assert a.grad is not None and a.grad.abs().sum() > 0  # the scales learn
    rsr.noise_scales[0].data.zero_()
    rsr.noise_scales[1].data.zero_()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain)  # zero scale = no noise


def test_rsr_l1_penalty_and_final_global_prune():
    model = _no_bn_model()
    rsr = RSR(model, density=0.2, l1=1e-3)
    expected = 1e-3 * sum(float(l.weight.detach().abs().sum()) for _, l in masked_layers(model))
    assert float(rsr.penalty().detach()) == pytest.approx(expected, rel=1e-6)
    rec = rsr.finish()
    assert rec["scope"] == "global" and rec["active"] == _active(model) == _budget(model, 0.2)
    assert float(rsr.penalty()) == 0.0
    x = torch.rand(4, 1, 6, 6)
    model.train()
    a, b = model(x), model(x)
    assert torch.equal(a, b)  # hooks removed: deterministic in training mode too


# ---------------------------------------------------------------------------------------- harness
TINY = dict(train_size=128, test_size=32, batch_size=32, epochs=2, attack_steps=1, eval_steps=1, eval_size=16,
            threads=1, plots=False, seed=4, density=0.1)


@pytest.mark.parametrize("method", ["oneshot", "admm", "rsr"])
def test_harness_baselines_prune_once_to_the_exact_budget(tmp_path, method):
    cfg = resolve_config(None, {}, {**TINY, "method": method})
    s = fit(cfg, str(tmp_path / method), quiet=True, progress=False)
    state = load_checkpoint(s["model_path"])["model"]
    masks = [v for k, v in state.items() if k.endswith(".mask")]
    total = sum(m.numel() for m in masks)
    assert sum(int(m.sum()) for m in masks) == int(round(0.1 * total))
    assert s["density"] == pytest.approx(0.1, abs=1e-4)
    events = [json.loads(line) for line in open(os.path.join(s["run_dir"], "pruning.jsonl"))]
    prunes = [e for e in events if e["event"] == "prune"]
    assert len(prunes) == 1 and prunes[0]["epoch"] == cfg.pre_epochs == 1
    assert prunes[0]["scope"] == ("global" if method == "rsr" else "layer")
    if method == "admm":
        updates = [e for e in events if e["event"] == "admm_update"]
        assert len(updates) == 4 and updates[-1]["rho"] == pytest.approx(cfg.admm_rho_max)  # 4 steps / epoch
        assert updates[0]["rho"] == pytest.approx(cfg.admm_rho)
    rows = [json.loads(line) for line in open(os.path.join(s["run_dir"], "metrics.jsonl"))]
    assert [r["density"] for r in rows] == pytest.approx([0.1, 0.1], abs=1e-4)  # pruned at the end of epoch 1


def test_phased_lr_schedule_restarts_at_the_prune():
    cfg = resolve_config(None, {}, {"method": "oneshot", "epochs": 4, "lr_schedule": "cosine"})
    spe, total = 10, 40
    f = [lr_factor(cfg, k, total, spe) for k in range(total)]
    assert f[0] == 1.0 and f[20] == 1.0  # the fine-tuning phase starts again at the peak
    assert f[19] == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert f[39] == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))


def test_phased_config_errors():
    with pytest.raises(ConfigError, match="--epochs: got 1, expected at least 2 for --method admm"):
        resolve_config(None, {}, {"method": "admm", "epochs": 1})
    with pytest.raises(ConfigError, match="--phase-split: got 1.0, expected a number in \\(0, 1\\)"):
        resolve_config(None, {}, {"method": "oneshot", "phase_split": 1.0})
    with pytest.raises(ConfigError, match="--density: got 1.0, but --method rsr needs a sparse model"):
        resolve_config(None, {}, {"method": "rsr", "density": 1.0})
    with pytest.raises(ConfigError, match="--admm-rho-max"):
        resolve_config(None, {}, {"method": "admm", "admm_rho": 0.5, "admm_rho_max": 0.1})
