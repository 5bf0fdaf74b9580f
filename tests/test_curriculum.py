"""SAT curriculum (dnr.curriculum): each schedule's lambda_t and attack against its formula, P-SAT's
per-example early stopping against an explicit per-example loop, H-SAT's decisions, the power iteration
against the exact Hessian of small models, bad parameters, and that ``none`` changes nothing."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import dnr
from dnr import curriculum as cur
from dnr.analysis import hessian_top_eigenvalue
from dnr.harness.config import ConfigError, TrainConfig


class _Recorder:
    """Stands in for dnr.attacks.pgd: records each call's budget and returns x."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, x, y, eps, alpha, steps, **kw):
        self.calls.append((eps, alpha, kw.get("stop_prob")))
        return x.clone()


def _drive(curriculum, monkeypatch, T, eps=0.2, alpha=0.05):
    rec = _Recorder()
    monkeypatch.setattr(cur.attacks, "pgd", rec)
    model, x, y = nn.Linear(3, 2), torch.rand(4, 3), torch.zeros(4, dtype=torch.long)
    lams = []
    for _ in range(T):
        lams.append(curriculum.difficulty())
        curriculum.adversarial_examples(model, x, y, eps=eps, alpha=alpha, steps=3)
    return lams, rec.calls


@pytest.mark.parametrize("shape", ["linear", "cosine"])
@pytest.mark.parametrize("ramp", [0.3, 1.0])
def test_eps_ramp_follows_its_formula(monkeypatch, shape, ramp):
    T, eps, alpha = 20, 0.2, 0.05
    lams, calls = _drive(cur.create("eps", total_steps=T, ramp=ramp, shape=shape), monkeypatch, T, eps, alpha)
    for t in range(T):
        u = min(1.0, (t + 1) / (ramp * T))
        want = u if shape == "linear" else (1 - math.cos(math.pi * u)) / 2
        assert lams[t] == pytest.approx(want, abs=1e-12)
    # eps_t = lambda_t eps and alpha_t = lambda_t alpha
    assert len(calls) == T
    for t, (e, a, stop) in enumerate(calls):
        assert (e, a, stop) == (pytest.approx(lams[t] * eps), pytest.approx(lams[t] * alpha), None)
    assert lams[-1] == 1.0 and calls[-1][0] == pytest.approx(eps)
    assert lams[int(ramp * T) - 2] < 1.0 == lams[int(ramp * T) - 1]  # full strength from the ramp's last step


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_p_sat_stop_probability_follows_its_formula(monkeypatch, shape):
    T, prob, ramp = 12, 0.6, 0.5
    lams, calls = _drive(cur.create("p-sat", total_steps=T, ramp=ramp, shape=shape, prob=prob), monkeypatch, T)
    for t, (e, a, stop) in enumerate(calls):
        u = min(1.0, (t + 1) / (ramp * T))
        lam = u if shape == "linear" else (1 - math.cos(math.pi * u)) / 2
        assert (e, a) == (0.2, 0.05)  # the full radius and step at every step
        if lam < 1:
            assert stop == pytest.approx((1 - lam) * prob, abs=1e-12)
        else:  # after the ramp: plain PGD (a bound of 0 would stop nothing: pgd without the checks)
            assert stop is None
    assert calls[-1][2] is None and calls[0][2] > 0


def test_none_is_plain_pgd_with_the_run_budget(monkeypatch):
    lams, calls = _drive(cur.create("none", total_steps=5), monkeypatch, 5)
    assert lams == [1.0] * 5 and calls == [(0.2, 0.05, None)] * 5


@pytest.mark.parametrize("rule", ["threshold", "ratio"])
def test_h_sat_advances_only_on_acceptable_curvature(monkeypatch, rule):
    T, every, ramp = 40, 2, 0.5  # increment = every / (ramp T) = 0.1
    values = iter([1.0, 1.2, 3.0, 2.9, 5.0, -1.0, 0.5, 0.6, 10.0, 0.1] * 3)
    monkeypatch.setattr(cur, "hessian_top_eigenvalue", lambda *a, **k: next(values))
    kw = dict(threshold=2.0) if rule == "threshold" else dict(ratio=1.5)
    c = cur.create("h-sat", total_steps=T, every=every, ramp=ramp, **kw)
    lams, _ = _drive(c, monkeypatch, T)
    # the oracle, written out: accept if h <= 2 (threshold) or h <= max(prev, 1.5 prev) (ratio)
    lam, prev, expected = 0.0, None, []
    seq = [1.0, 1.2, 3.0, 2.9, 5.0, -1.0, 0.5, 0.6, 10.0, 0.1] * 3
    for t in range(T):
        expected.append(lam)
        if t % every == 0:
            h = seq[t // every]
            ok = h <= 2.0 if rule == "threshold" else (prev is None or h <= max(prev, 1.5 * prev))
            prev = h
            lam = min(1.0, lam + 0.1) if ok else lam
    assert lams == pytest.approx(expected, abs=1e-12)
    assert [m["step"] for m in c.measurements] == list(range(0, T, every))
    assert c.log_records()["curriculum.jsonl"][2]["lambda_max"] == 3.0


# ------------------------------------------------------------------ P-SAT's early stopping in dnr.attacks.pgd
def _per_example_pgd(model, x, y, eps, alpha, steps, stop_prob, noise):
    """The oracle: one example at a time, the textbook loop with an explicit stop."""
    out = []
    for i in range(x.shape[0]):
        x0 = x[i:i + 1]
        xa = (x0 + (2 * noise[i:i + 1] - 1) * eps).clamp(0, 1)
        for _ in range(steps):
            xa = xa.detach().requires_grad_(True)
            logits = model(xa)
            if logits.softmax(1)[0, y[i]] < stop_prob[i]:
                break
            (g,) = torch.autograd.grad(F.cross_entropy(logits, y[i:i + 1], reduction="sum"), xa)
            xa = (x0 + (xa.detach() + alpha * g.sign() - x0).clamp(-eps, eps)).clamp(0, 1)
        out.append(xa.detach())
    return torch.cat(out)


def test_pgd_early_stopping_matches_a_per_example_loop(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).double().to(device)
    x = torch.rand(16, 3, 2, 2, dtype=torch.float64, device=device)
    y = torch.randint(0, 4, (16,), device=device)
    stop = torch.linspace(0.0, 0.5, 16, dtype=torch.float64, device=device)
    eps, alpha, steps = 0.3, 0.08, 6
    gen = torch.Generator().manual_seed(1)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    got = dnr.attacks.pgd(model, x, y, eps, alpha, steps, stop_prob=stop, generator=gen)
    want = _per_example_pgd(model, x, y, eps, alpha, steps, stop, noise)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # the examples really differ in how far they went (the test is not vacuous)
    plain = _per_example_pgd(model, x, y, eps, alpha, steps, torch.zeros(16, dtype=torch.float64), noise)
    moved = (got - plain).flatten(1).abs().amax(1) > 0
    assert 0 < int(moved.sum()) < 16


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stopped_examples_leave_the_batch_in_eval_mode_with_the_same_result(device, dtype, layout):
    """bn_mode="eval": the examples that stopped are not computed again (the forward passes shrink), and the
    result is the one of the uncompacted run (each example's gradient is its own in eval mode); with
    bn_mode="train" (batch statistics) every pass keeps the whole batch."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5)).to(device=device, dtype=dtype)
    with torch.no_grad():
        model[1].running_mean.normal_(0, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
        model[4].weight.mul_(4)  # confident and unconfident examples: some stop early, some never
    x = torch.rand(32, 3, 6, 6, device=device, dtype=dtype).contiguous(memory_format=layout)
    y = torch.randint(0, 5, (32,), device=device)
    stop = torch.linspace(0.0, 0.6, 32, device=device, dtype=dtype)
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    got = dnr.attacks.pgd(model, x, y, 0.2, 0.05, 8, stop_prob=stop, generator=torch.Generator().manual_seed(4))
    hook.remove()
    assert sizes[0] == 32 and min(sizes) < 32 and sizes == sorted(sizes, reverse=True), sizes
    assert got.is_contiguous(memory_format=layout)
    # the same attack without compaction (the internal switch; the public pgd compacts in eval mode)
    x0 = x
    noise_gen = torch.Generator().manual_seed(4)
    eps_t = torch.tensor(0.2, device=device, dtype=dtype)
    alpha_t = torch.tensor(0.05, device=device, dtype=dtype)
    with dnr.attacks.attack_mode(model, "eval"):
        want = dnr.attacks._pgd_once(model, x0, y, eps_t, alpha_t, 8, True, False, None, 0.0, 1.0, noise_gen,
                                     "pgd", stop, compact=False)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    sizes.clear()
    hook = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    dnr.attacks.pgd(model, x, y, 0.2, 0.05, 8, stop_prob=stop, bn_mode="train")
    hook.remove()
    assert set(sizes) == {32}


def test_p_sat_examples_match_the_per_example_loop_at_its_bound():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    with torch.no_grad():
        model[3].weight.mul_(8)  # true-class probabilities from 0.01 to 0.54: some examples stop, some do not
    x, y = torch.rand(16, 3, 2, 2, dtype=torch.float64), torch.randint(0, 4, (16,))
    c = cur.create("p-sat", total_steps=10, ramp=1.0, prob=0.3)
    c.adversarial_examples(model, x, y, eps=0.3, alpha=0.08, steps=6)  # step 0
    bound = (1 - 0.2) * 0.3  # step 1: lambda = 2 / 10
    got = c.adversarial_examples(model, x, y, eps=0.3, alpha=0.08, steps=6, generator=torch.Generator().manual_seed(5))
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = _per_example_pgd(model, x, y, 0.3, 0.08, 6, torch.full((16,), bound, dtype=torch.float64), noise)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    start = (x + (2 * noise - 1) * 0.3).clamp(0, 1)
    plain = _per_example_pgd(model, x, y, 0.3, 0.08, 6, torch.zeros(16, dtype=torch.float64), noise)
    at_start = (got == start).flatten(1).all(1)
    full = (got == plain).flatten(1).all(1)
    assert at_start.any() and (~at_start).any() and (~full).any()  # some stop at their start, some move: not plain PGD


def test_pgd_stop_prob_bounds_and_plain_equivalence():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,))
    a = dnr.attacks.pgd(model, x, y, 0.1, 0.03, 4, generator=torch.Generator().manual_seed(0))
    b = dnr.attacks.pgd(model, x, y, 0.1, 0.03, 4, stop_prob=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)  # 0 never stops
    start = dnr.attacks.pgd(model, x, y, 0.1, 0.03, 4, stop_prob=1.0, generator=torch.Generator().manual_seed(0))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(start, (x + (2 * u - 1) * 0.1).clamp(0, 1))  # 1 stops at the random start
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="stop_prob"):
            dnr.attacks.pgd(model, x, y, 0.1, 0.03, 4, stop_prob=bad)
    with pytest.raises(ValueError, match="targeted"):
        dnr.attacks.pgd(model, x, y, 0.1, 0.03, 4, stop_prob=0.5, targeted=True)


# ------------------------------------------------------------------ the power iteration against the exact Hessian
def _exact_top_eigenvalue(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]
    buffers = dict(model.named_buffers())

    def loss(flat):
        chunks = [c.view(p.shape) for c, p in zip(torch.split(flat, sizes), params)]
        out = torch.func.functional_call(model, {**dict(zip(names, chunks)), **buffers}, (x,))
        return F.cross_entropy(out, y)

    H = torch.autograd.functional.hessian(loss, torch.cat([p.flatten() for p in params]))
    return torch.linalg.eigvalsh(H)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_power_iteration_matches_the_exact_top_eigenvalue_through_masked_layers(device, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
    model = dnr.sparsify(model, density=0.5, generator=torch.Generator().manual_seed(seed)).to(device)
    x = torch.rand(8, 1, 5, 5, dtype=torch.float64, device=device)
    y = torch.randint(0, 3, (8,), device=device)
    ev = _exact_top_eigenvalue(model, x, y)
    got = hessian_top_eigenvalue(model, F.cross_entropy, (x, y), iters=2000, tol=1e-12,
                                 generator=torch.Generator().manual_seed(seed))
    assert got == pytest.approx(float(ev[-1]), rel=1e-3)
    assert all(p.grad is None for p in model.parameters())


def test_power_iteration_finds_the_top_eigenvalue_when_a_negative_one_dominates():
    # f(w) = 0.5 w^T A w through a "loss" on a linear model: the Hessian is A exactly
    A = torch.diag(torch.tensor([-5.0, 2.0, 1.0, -0.5], dtype=torch.float64))
    model = nn.Linear(4, 1, bias=False).double()

    def loss_fn(out, y):
        w = model.weight.flatten()
        return 0.5 * w @ A @ w + 0 * out.sum()

    x, y = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1)
    got = hessian_top_eigenvalue(model, loss_fn, (x, y), iters=500, generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(2.0, rel=1e-3)


def test_hessian_bad_arguments():
    model = nn.Linear(2, 2)
    batch = (torch.rand(3, 2), torch.zeros(3, dtype=torch.long))
    for kw, match in ((dict(iters=0), "iters"), (dict(bn_mode="x"), "bn_mode"), (dict(tol=-1.0), "tol")):
        with pytest.raises(ValueError, match=match):
            hessian_top_eigenvalue(model, F.cross_entropy, batch, **kw)


# ------------------------------------------------------------------ bad parameters: one-line errors
@pytest.mark.parametrize("kw, match", [
    (dict(ramp=0.0), "ramp: got 0.0"), (dict(ramp=1.5), "ramp: got 1.5"), (dict(ramp=-0.2), "ramp"),
    (dict(threshold=-1.0), "threshold: got -1.0"), (dict(ratio=0.5), "ratio: got 0.5"),
    (dict(prob=0.0), "prob"), (dict(power_iters=0), "power_iters"), (dict(shape="square"), "shape"),
    (dict(every=0), "every: got 0"),
])
def test_bad_curriculum_arguments_give_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        cur.create("h-sat", total_steps=10, **{"every": 1, **kw})
    assert "\n" not in str(err.value)


def test_unknown_curriculum_name():
    with pytest.raises(ValueError, match=r"curriculum name: got 'q-sat', expected one of") as err:
        cur.create("q-sat", total_steps=10)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("values, match", [
    (dict(curriculum="q-sat"), r"option --curriculum: got 'q-sat'"),
    (dict(curriculum="eps", curriculum_ramp=0.0), r"option --curriculum-ramp: got 0.0, expected a fraction"),
    (dict(curriculum="eps", curriculum_ramp=1.01), r"option --curriculum-ramp: got 1.01"),
    (dict(curriculum="h-sat", curriculum_threshold=-0.5), r"option --curriculum-threshold: got -0.5"),
    (dict(curriculum="h-sat", curriculum_ratio=0.9), r"option --curriculum-ratio: got 0.9"),
    (dict(curriculum="h-sat", curriculum_every=0), r"option --curriculum-every: got 0"),
    (dict(curriculum="p-sat", curriculum_prob=1.2), r"option --curriculum-prob: got 1.2"),
    (dict(curriculum="none", curriculum_iters=0), r"option --curriculum-iters: got 0"),
    (dict(curriculum="eps", method="dense"), r"option --curriculum: got 'eps', but --method dense"),
    (dict(curriculum="eps", beta=1.0), r"option --curriculum: got 'eps'.*--beta 1"),
    (dict(curriculum_every=5, method="dense"), r"option --curriculum-every: got 5, but --method dense"),
    (dict(curriculum="h-sat", compile="default"), r"option --curriculum-every: Hessian measurements need"),
])
def test_bad_curriculum_options_give_one_line_config_errors(values, match):
    with pytest.raises(ConfigError, match=match) as err:
        TrainConfig(**values).validate()
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ none changes nothing
def _steps(curriculum, n=3):
    torch.manual_seed(0)
    model = dnr.sparsify(dnr.models.small_cnn(num_classes=10), density=0.2,
                         generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = dnr.data.fashion_mnist("train", subset=32)
    x, y = data.tensors
    losses = [dnr.engine.adversarial_step(model, x, y, opt, eps=0.1, alpha=0.025, steps=2,
                                          curriculum=curriculum)["loss"] for _ in range(n)]
    return losses, model.state_dict(), torch.get_rng_state()


def test_curriculum_none_is_bitwise_the_plain_engine_step_even_while_measuring():
    plain = _steps(None)
    for c in (cur.create("none", total_steps=3), cur.create("none", total_steps=3, every=1, power_iters=2)):
        got = _steps(c)
        assert got[0] == plain[0]
        assert all(torch.equal(got[1][k], plain[1][k]) for k in plain[1])  # weights, masks, BN statistics
        assert torch.equal(got[2], plain[2])  # the measurement draws nothing from the global stream
    assert len(c.measurements) == 3 and all(m["lambda_max"] > 0 for m in c.measurements)
