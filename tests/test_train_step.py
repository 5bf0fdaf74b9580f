"""dnr.engine.adversarial_step / train_epoch options: bf16 autocast and the channels-last memory format, and
the harness options that select them (--precision, --channels-last)."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from dnr import engine
from dnr.harness import ConfigError, fit, load_checkpoint, resolve_config
from dnr.models import build_model
from dnr.nn import masked_layers, sparsify


def _model(device, seed=0):
    torch.manual_seed(seed)
    model = build_model("small_cnn", 10, 1, 28, (0.5,), (0.25,))
    sparsify(model, density=0.3, generator=torch.Generator().manual_seed(seed))
    return model.to(device)


def _batch(device, n=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def _conv_output_dtypes(model):
    seen = []
    first = masked_layers(model)[0][1]
    first.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


def test_bf16_autocast_runs_every_forward_in_bf16_and_keeps_float32_state(device):
    x, y = _batch(device)
    runs = {}
    for dtype in (None, torch.bfloat16):
        model = _model(device)
        seen = _conv_output_dtypes(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        out = engine.adversarial_step(model, x, y, opt, eps=0.1, alpha=0.05, steps=3, autocast_dtype=dtype,
                                     generator=torch.Generator(device=device).manual_seed(0))
        # the PGD attack's 3 forwards and the clean and adversarial training forwards
        assert seen == [dtype or torch.float32] * 5
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
        assert all(v["momentum_buffer"].dtype == torch.float32 for v in opt.state.values())
        runs[dtype] = (out, model)
    (o32, m32), (o16, m16) = runs[None], runs[torch.bfloat16]
    assert o16["loss"] == pytest.approx(o32["loss"], rel=3e-2)
    for (name, p32), p16 in zip(m32.named_parameters(), m16.parameters()):
        torch.testing.assert_close(p16, p32, atol=2e-2, rtol=0, msg=name)  # one step apart by bf16 rounding


def test_autocast_is_off_again_after_the_step(device):
    model = _model(device)
    x, y = _batch(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine.adversarial_step(model, x, y, opt, eps=0.1, alpha=0.05, steps=1, autocast_dtype=torch.bfloat16)
    assert not torch.is_autocast_enabled(x.device.type)
    assert model(x).dtype == torch.float32


def test_train_epoch_feeds_channels_last_batches(device):
    model = _model(device).to(memory_format=torch.channels_last)
    layouts = []
    model.register_forward_pre_hook(lambda m, args: layouts.append(args[0].is_contiguous(
        memory_format=torch.channels_last)))
    x, y = _batch(device, 32)
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stats = engine.train_epoch(model, loader, opt, steps=1, channels_last=True, device=device)
    assert stats["images"] == 32 and layouts and all(layouts)


TINY = dict(train_size=128, test_size=32, batch_size=32, epochs=2, attack_steps=2, eval_steps=2, eval_size=32,
            threads=1, plots=False, seed=3, density=0.2, deterministic=True)


def test_channels_last_run_matches_the_contiguous_run(tmp_path):
    states = {}
    for cl in (False, True):
        # one rewiring (the paper's schedule: at the first epoch end) in 8 steps; the default's rewiring after
        # every step turns float32 layout rounding into different magnitude rankings within a few steps
        cfg = resolve_config(None, {}, {**TINY, "channels_last": cl, "rewire": "paper"})
        s = fit(cfg, str(tmp_path / str(cl)), quiet=True, progress=False)
        states[cl] = load_checkpoint(s["model_path"])["model"]
    a, b = states[False], states[True]
    conv = [k for k, v in b.items() if k.endswith("weight") and v.dim() == 4]
    assert conv and all(b[k].is_contiguous(memory_format=torch.channels_last) for k in conv)
    for key in a:
        if key.endswith("mask"):
            assert torch.equal(a[key], b[key]), key  # the same rewiring
        elif a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4, msg=key)


def test_bf16_run_trains_and_records_its_precision(tmp_path):
    cfg = resolve_config(None, {}, {**TINY, "precision": "bf16", "epochs": 3})
    s = fit(cfg, str(tmp_path / "bf16"), quiet=True, progress=False)
    state = load_checkpoint(s["model_path"])
    assert state["config"]["precision"] == "bf16"
    assert all(v.dtype in (torch.float32, torch.bool, torch.int64) for v in state["model"].values())
    assert s["density"] == pytest.approx(0.2, abs=2e-3)
    with open(os.path.join(s["run_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)


def test_precision_option_names_its_choices():
    with pytest.raises(ConfigError, match=r"--precision.*'fp16'.*fp32.*bf16"):
        resolve_config(None, {}, {**TINY, "precision": "fp16"})


@pytest.mark.slow  # inductor compiles the training and attack graphs (about a minute on 2 CPU cores)
def test_compiled_training_follows_the_eager_run(tmp_path):
    """One optimizer step, compiled and eager, from the same start: the same loss and the same weights up to
    float32 rounding. Only one step: inductor's fused kernels round differently, and over epochs (PGD's
    sign steps, rewiring decisions) those differences grow chaotically, so end states of longer runs
    differ from machine to machine and say nothing about the compiled path."""
    runs = {}
    for mode in ("off", "default"):
        # 32 examples, batch 32, one epoch: exactly one optimizer step (the last epoch does not rewire)
        cfg = resolve_config(None, {}, {**TINY, "compile": mode, "epochs": 1, "train_size": 32,
                                         "deterministic": False})
        s = fit(cfg, str(tmp_path / mode), quiet=True, progress=False)
        with open(os.path.join(s["run_dir"], "metrics.jsonl")) as f:
            runs[mode] = ([json.loads(line) for line in f], load_checkpoint(s["model_path"])["model"])
    (rows_e, eager), (rows_c, compiled) = runs["off"], runs["default"]
    assert [r["step"] for r in rows_e] == [r["step"] for r in rows_c] == [1]
    assert rows_c[0]["loss"] == pytest.approx(rows_e[0]["loss"], rel=1e-3)
    assert eager.keys() == compiled.keys()  # the saved state dict is the model's, not the compiled wrapper's
    for key in eager:
        if eager[key].is_floating_point():
            # rounding (and a PGD sign flipped by it) moves one step's update by ~1e-6; a compiled path that
            # trained other tensors than the model's would leave them a whole step (lr * grad ~ 1e-3) apart
            torch.testing.assert_close(compiled[key], eager[key], atol=1e-4, rtol=1e-3, msg=key)
        else:
            assert torch.equal(compiled[key], eager[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [None, 1e-3, 1e3])
@pytest.mark.parametrize("synced", [False, True])
def test_gradient_clipping_bounds_the_step_by_the_global_norm(device, dtype, max_norm, synced):
    """The oracle: the gradient by torch.autograd.grad, its global norm and the step p - lr * min(1, c / norm) * g
    by hand; ``synced`` takes the data-parallel path (a one-rank grad_sync), which clips after the averaging."""
    model = _model(device).to(dtype)
    x, y = _batch(device)
    x = x.to(dtype)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    scale = 1.0 if max_norm is None else min(1.0, max_norm / (norm.item() + 1e-6))
    expected = [p.detach() - 0.1 * scale * g for p, g in zip(params, grads)]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    engine.adversarial_step(model, x, y, opt, eps=0.1, alpha=0.05, steps=1, beta=1.0, max_grad_norm=max_norm,
                            grad_sync=(lambda stats: stats) if synced else None)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, **tol)
    if max_norm == 1e-3:  # the bound binds: the whole step is lr * max_norm long
        assert norm.item() > 1e-2
        moved = torch.sqrt(sum(((p.detach() - b).double() ** 2).sum() for p, b in zip(params, before)))
        assert moved.item() == pytest.approx(0.1 * 1e-3, rel=1e-4)


def test_the_recurrent_models_clip_by_default_and_zero_turns_it_off():
    assert resolve_config(overrides={"model": "gru"}).max_grad_norm == 1.0
    assert resolve_config(overrides={"model": "small_cnn"}).max_grad_norm == 0.0
    assert resolve_config(overrides={"model": "lstm", "max_grad_norm": 0}).max_grad_norm == 0.0
    with pytest.raises(ConfigError, match=r"option --max-grad-norm: got -1.0, expected a number >= 0"):
        resolve_config(overrides={"max_grad_norm": -1})
