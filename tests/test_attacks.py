"""Tests for dnr.attacks: FGSM, PGD and evaluate.

Oracles: an independent float64 PGD for a linear model with the cross-entropy gradient written
out by hand, FGSM as the one-step PGD, explicit accuracy counts, and a model trained here on a
separable synthetic task (so that attacks have something to break).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dnr.attacks import evaluate, fgsm, pgd
from dnr.nn.normalize import Normalize

# tests/conftest.py skips the `needs_cuda` marker without a GPU; the skipif keeps this file safe alone.
needs_cuda = [pytest.mark.needs_cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
DTYPES = [torch.float32, torch.float64]



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is fastest and avoids OpenMP oversubscription on shared cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


K, D = 3, 16  # classes, pixels (images are [1, 4, 4])


# ---------------------------------------------------------------------------------------------
# models and data
# ---------------------------------------------------------------------------------------------
def _blobs(n, gen, centers):
    y = torch.randint(0, K, (n,), generator=gen)
    x = (centers[y] + 0.08 * torch.randn(n, D, generator=gen)).clamp(0, 1)
    return x.view(n, 1, 4, 4), y


@pytest.fixture(scope="module")
def task():
    """An MLP trained (about a second) on three Gaussian blobs in [0, 1]^16, and a test set."""
    gen = torch.Generator().manual_seed(0)
    centers = 0.25 + 0.5 * torch.rand(K, D, generator=gen)
    x_tr, y_tr = _blobs(600, gen, centers)
    x_te, y_te = _blobs(300, gen, centers)
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.5], [0.25]), nn.Flatten(), nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, K))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x_tr), y_tr).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return model, x_te, y_te


def _bn_cnn(dtype=torch.float32, device="cpu", seed=0):
    """A small CNN with BatchNorm (2d and 1d, one with cumulative momentum) and dropout."""
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize([0.5, 0.4], [0.2, 0.3]),
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 8),
        nn.BatchNorm1d(8, momentum=None),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(8, K),
    ).to(device=device, dtype=dtype)


def _images(b=8, device="cpu", dtype=torch.float32, seed=1):
    """[b, 2, 5, 5] pixels in [0, 1] with some exactly at 0 and 1 (so clipping matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 2, 5, 5, generator=g, dtype=torch.float64)
    x[:, :, 0, :] = 0.0
    x[:, :, -1, :] = 1.0
    y = torch.randint(0, K, (b,), generator=g)
    return x.to(device=device, dtype=dtype), y.to(device)


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def _trained(task, device):
    model, x, y = task
    return copy.deepcopy(model).to(device), x.to(device), y.to(device)


# ---------------------------------------------------------------------------------------------
# constraints: eps-ball, pixel range, dtype/device, input untouched
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("attack", ["fgsm", "pgd", "pgd_targeted", "pgd_restarts"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_adversarial_examples_in_ball_and_range(device, dtype, attack, per_sample, bn_mode):
    model = _bn_cnn(dtype, device)
    x, y = _images(8, device, dtype)
    x_before = x.clone()
    eps = torch.linspace(0.0, 0.2, 8, device=device, dtype=dtype) if per_sample else 0.1
    gen = torch.Generator(device=device).manual_seed(3)
    if attack == "fgsm":
        adv = fgsm(model, x, y, eps, bn_mode=bn_mode)
    else:
        adv = pgd(model, x, y, eps, 0.03, 4, bn_mode=bn_mode, generator=gen,
                  targeted=attack == "pgd_targeted", restarts=3 if attack == "pgd_restarts" else 1)
    assert adv.shape == x.shape and adv.dtype == dtype and adv.device == x.device
    assert not adv.requires_grad and adv.grad_fn is None
    assert torch.equal(x, x_before)
    eps_b = eps.view(-1, 1, 1, 1) if per_sample else torch.tensor(eps, dtype=dtype)
    assert bool(((adv - x).abs() <= eps_b + 1e-6).all())
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
    assert bool((adv != x).any())  # the attack did move
    if per_sample:  # eps = 0 for the first example: it must not move
        assert torch.equal(adv[0], x[0])


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_custom_clip_range(attack):
    model = nn.Sequential(nn.Flatten(), nn.Linear(50, K)).double()
    x, y = _images(6, dtype=torch.float64)
    x = 2 * x - 1  # pixels in [-1, 1]
    if attack == "fgsm":
        adv = fgsm(model, x, y, 0.3, clip=(-1.0, 1.0))
    else:
        adv = pgd(model, x, y, 0.3, 0.1, 5, clip=(-1.0, 1.0))
    assert adv.min().item() >= -1.0 and adv.max().item() <= 1.0
    assert (adv - x).abs().max().item() <= 0.3 + 1e-12
    assert adv.min().item() < 0.0  # would be impossible if (0, 1) were used


# ---------------------------------------------------------------------------------------------
# attacks work on a trained model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_attacks_lower_accuracy_of_trained_model(task, device):
    model, x, y = _trained(task, device)
    clean = _acc(model, x, y)
    acc_fgsm = _acc(model, fgsm(model, x, y, 0.06), y)
    acc_pgd = _acc(model, pgd(model, x, y, 0.06, 0.015, 10, generator=torch.Generator(device).manual_seed(0)), y)
    assert clean > 0.95
    assert acc_fgsm < clean - 0.2
    assert acc_pgd < clean - 0.2
    assert acc_pgd <= acc_fgsm + 0.02
    # random noise of the same size hardly hurts: the drop is due to the attack direction
    g = torch.Generator().manual_seed(1)
    noise = (2 * torch.rand(x.shape, generator=g) - 1).to(device) * 0.06
    assert _acc(model, (x + noise).clamp(0, 1), y) > clean - 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_targeted_pgd_reaches_targets(task, device):
    model, x, y = _trained(task, device)
    target = (y + 1) % K
    adv = pgd(model, x, target, 0.1, 0.025, 10, targeted=True, generator=torch.Generator(device).manual_seed(0))
    with torch.no_grad():
        hit = (model(adv).argmax(1) == target).double().mean().item()
        hit_clean = (model(x).argmax(1) == target).double().mean().item()
    assert hit_clean < 0.05
    assert hit > 1.0 / K + 0.3
    # targeted FGSM also moves towards the target
    adv_f = fgsm(model, x, target, 0.1, targeted=True)
    with torch.no_grad():
        assert (model(adv_f).argmax(1) == target).double().mean().item() > 1.0 / K


def test_restarts_keep_best_per_sample(task):
    """restarts=R equals, per sample, the best of R single runs (same generator stream)."""
    model, x, y = task
    x, y = x[:120], y[:120]
    eps, alpha, steps, R = 0.06, 0.02, 3, 4
    got = pgd(model, x, y, eps, alpha, steps, restarts=R, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    cands = [pgd(model, x, y, eps, alpha, steps, generator=g) for _ in range(R)]
    with torch.no_grad():
        logits = [model(c) for c in cands]
    succ = torch.stack([lg.argmax(1) != y for lg in logits])  # [R, B]
    loss = torch.stack([F.cross_entropy(lg, y, reduction="none") for lg in logits])
    # independent selection: successful first, then highest loss, then earliest restart
    key = succ.double() * 1e6 + loss.double()
    best = torch.stack([torch.argmax(key[:, i]) for i in range(x.shape[0])])
    expected = torch.stack([cands[int(best[i])][i] for i in range(x.shape[0])])
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert not torch.equal(cands[0], cands[1])  # the restarts really differ
    # robust accuracy with restarts is at most the best single restart's
    assert _acc(model, got, y) <= min(_acc(model, c, y) for c in cands)


class _TwoRegions(nn.Module):
    """Piecewise-constant 3-class model on one pixel (zero input gradient, so PGD stays at its
    random start): x < 0.5 -> misclassified with LOW loss, x >= 0.5 -> correct with HIGH loss."""

    def forward(self, x):
        low = torch.tensor([0.45, 0.55, 1e-6], dtype=x.dtype).log()  # argmax 1 != 0, CE 0.80
        high = torch.tensor([0.34, 0.33, 0.33], dtype=x.dtype).log()  # argmax 0 == 0, CE 1.08
        xf = x.reshape(x.shape[0], 1)
        return torch.where(xf < 0.5, low, high) + 0.0 * xf


def test_restarts_prefer_success_over_higher_loss():
    model = _TwoRegions()
    x = torch.full((64, 1), 0.5, dtype=torch.float64)
    y = torch.zeros(64, dtype=torch.long)
    got = pgd(model, x, y, 0.4, 0.1, 2, restarts=4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    cands = torch.stack([pgd(model, x, y, 0.4, 0.1, 2, generator=g) for _ in range(4)])  # [R, B, 1]
    any_low = (cands < 0.5).any(0).squeeze(1)
    assert 0 < int(any_low.sum()) < 64  # both cases occur
    assert torch.equal((got < 0.5).squeeze(1), any_low)  # a misclassified start wins when there is one
    # without a successful restart the highest loss wins: all candidates >= 0.5 have equal loss,
    # so the earliest restart is kept
    torch.testing.assert_close(got[~any_low], cands[0][~any_low], atol=0, rtol=0)


def test_channels_last_input_keeps_layout_and_values():
    model = _bn_cnn().eval()
    x, y = _images(4)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    a = pgd(model, x, y, 0.1, 0.03, 3, generator=torch.Generator().manual_seed(0))
    b = pgd(model, x_cl, y, 0.1, 0.03, 3, generator=torch.Generator().manual_seed(0))
    assert b.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_restarts_targeted_selects_target_hits(task):
    model, x, y = task
    x, y = x[:90], y[:90]
    target = (y + 2) % K
    got = pgd(model, x, target, 0.08, 0.02, 3, restarts=3, targeted=True, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    cands = [pgd(model, x, target, 0.08, 0.02, 3, targeted=True, generator=g) for _ in range(3)]
    with torch.no_grad():
        hits = torch.stack([model(c).argmax(1) == target for c in cands]).any(0)
        got_hits = model(got).argmax(1) == target
    assert torch.equal(got_hits, hits)


def test_random_start_is_reproducible_with_generator(task):
    model, x, y = task
    a = pgd(model, x, y, 0.05, 0.01, 2, generator=torch.Generator().manual_seed(7))
    b = pgd(model, x, y, 0.05, 0.01, 2, generator=torch.Generator().manual_seed(7))
    c = pgd(model, x, y, 0.05, 0.01, 2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# oracles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_pgd_one_step_without_random_start_equals_fgsm(device, dtype, targeted, per_sample):
    model = _bn_cnn(dtype, device)
    x, y = _images(8, device, dtype)
    eps = torch.linspace(0.01, 0.2, 8, device=device, dtype=dtype) if per_sample else 0.07
    a = fgsm(model, x, y, eps, targeted=targeted)
    b = pgd(model, x, y, eps, eps, 1, random_start=False, targeted=targeted)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(a, b, atol=tol, rtol=0)


def _linear_model(seed=0, c=2, hw=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * hw * hw, K)).double()


def _oracle_pgd(W, b, x, y, eps, alpha, steps, start, targeted, lo=0.0, hi=1.0):
    """Plain float64 PGD for logits = x_flat @ W.T + b; d CE / dx = W.T (softmax - onehot)."""
    n = x.shape[0]
    xf = x.reshape(n, -1).double()
    eps = torch.as_tensor(eps, dtype=torch.float64).reshape(-1, 1)
    alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
    cur = start.reshape(n, -1).double().clone()
    iterates = []
    for _ in range(steps):
        p = torch.softmax(cur @ W.T + b, dim=1)
        grad = (p - F.one_hot(y, K).double()) @ W
        direction = -grad.sign() if targeted else grad.sign()
        d = torch.minimum(torch.maximum(cur - xf + alpha * direction, -eps), eps)
        cur = torch.clamp(xf + d, lo, hi)
        iterates.append(cur.reshape(x.shape).clone())
    return iterates


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_iterates_match_float64_oracle(targeted, per_sample, random_start):
    model = _linear_model()
    W, b = model[1].weight.detach(), model[1].bias.detach()
    x, y = _images(10, dtype=torch.float64, seed=4)
    x = x[:, :, 1:4, 1:4].contiguous()
    x[:3] = 1.0  # saturated examples: the pixel-range projection is active
    if per_sample:
        eps = torch.linspace(0.02, 0.3, 10, dtype=torch.float64)
        alpha = torch.linspace(0.01, 0.05, 10, dtype=torch.float64)
    else:
        eps, alpha = 0.1, 0.03
    if random_start:  # documented: uniform(-eps, eps) from one torch.rand(x.shape) draw, then clipped
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        e = torch.as_tensor(eps, dtype=torch.float64).reshape(-1, 1, 1, 1)
        start = (x + (2 * u - 1) * e).clamp(0, 1)
    else:
        start = x
    steps = 6
    expected = _oracle_pgd(W, b, x, y, eps, alpha, steps, start, targeted)
    for k in range(1, steps + 1):
        got = pgd(model, x, y, eps, alpha, k, random_start=random_start, targeted=targeted,
                  generator=torch.Generator().manual_seed(11))
        torch.testing.assert_close(got, expected[k - 1], atol=1e-12, rtol=0, msg=f"iterate {k}")
    # the eps-ball projection was active at some point (alpha * steps > eps for some samples)
    e = torch.as_tensor(eps, dtype=torch.float64).reshape(-1, 1, 1, 1)
    assert bool(((expected[-1] - x).abs() >= e - 1e-12).any())


def test_zero_eps_returns_input(task):
    model, x, y = task
    assert torch.equal(fgsm(model, x, y, 0.0), x)
    assert torch.equal(pgd(model, x, y, 0.0, 0.01, 3), x)


def test_custom_loss_fn_is_used():
    model = _linear_model()
    x, y = _images(6, dtype=torch.float64, seed=2)
    x = x[:, :, 1:4, 1:4].contiguous()
    # loss = -CE: ascending it is descending CE, i.e. the same as targeted on y
    neg_ce = lambda z, t: -F.cross_entropy(z, t, reduction="none")  # noqa: E731
    neg = pgd(model, x, y, 0.1, 0.03, 3, random_start=False, loss_fn=neg_ce)
    tgt = pgd(model, x, y, 0.1, 0.03, 3, random_start=False, targeted=True)
    torch.testing.assert_close(neg, tgt, atol=1e-12, rtol=0)
    # a scalar-valued loss is fine for the gradient
    mean_loss = pgd(model, x, y, 0.1, 0.03, 3, random_start=False, loss_fn=lambda z, t: F.cross_entropy(z, t))
    plain = pgd(model, x, y, 0.1, 0.03, 3, random_start=False)
    torch.testing.assert_close(mean_loss, plain, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# no side effects: parameter grads, training flags, BatchNorm statistics
# ---------------------------------------------------------------------------------------------
def _set_mixed_grads(model):
    """Give every other parameter a known .grad and leave the rest None; return the record."""
    record = []
    for i, p in enumerate(model.parameters()):
        if i % 2 == 0:
            p.grad = torch.full_like(p, 0.25 + i)
            record.append((p, p.grad, p.grad.clone()))
        else:
            p.grad = None
            record.append((p, None, None))
    return record


def _check_grads(record):
    for p, obj, value in record:
        if obj is None:
            assert p.grad is None
        else:
            assert p.grad is obj and torch.equal(p.grad, value)


def _set_mixed_flags(model):
    model.train()
    for i, m in enumerate(model.modules()):
        m.training = i % 3 != 0
    return [(m, m.training) for m in model.modules()]


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


class _Probe(nn.Module):
    """Records the training flag seen at each forward call; raises on call number `fail_at`."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.seen, self.fail_at = [], fail_at

    def forward(self, x):
        self.seen.append(self.training)
        if self.fail_at is not None and len(self.seen) >= self.fail_at:
            raise RuntimeError("boom in forward")
        return x


def _probed_cnn(fail_at=None, device="cpu"):
    model = _bn_cnn(device=device)
    probe = _Probe(fail_at)
    model.insert(4, probe)
    return model, probe


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_no_side_effects(device, bn_mode, attack):
    model, probe = _probed_cnn(device=device)
    with torch.no_grad():  # make running stats non-trivial
        model.train()
        model(_images(16, device, seed=9)[0])
    x, y = _images(8, device)
    grads, flags, bn = _set_mixed_grads(model), _set_mixed_flags(model), _bn_state(model)
    req = [p.requires_grad for p in model.parameters()]
    probe.seen.clear()
    if attack == "fgsm":
        fgsm(model, x, y, 0.05, bn_mode=bn_mode)
    else:
        pgd(model, x, y, 0.05, 0.02, 3, restarts=2, bn_mode=bn_mode)
    _check_grads(grads)
    assert [(m, m.training) for m in model.modules()] == flags
    after = _bn_state(model)
    assert after.keys() == bn.keys() and len(bn) == 6
    for k in bn:
        assert torch.equal(after[k], bn[k]), k
    assert [p.requires_grad for p in model.parameters()] == req
    # the whole model ran in the requested mode during the attack
    assert probe.seen and all(s == (bn_mode == "train") for s in probe.seen)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("attack", ["fgsm", "pgd", "pgd_restarts"])
def test_state_restored_when_forward_raises(bn_mode, attack):
    fail_at = {"fgsm": 1, "pgd": 3, "pgd_restarts": 4}[attack]  # pgd: mid-attack, after updates
    model, probe = _probed_cnn(fail_at=fail_at)
    x, y = _images(8)
    grads, flags, bn = _set_mixed_grads(model), _set_mixed_flags(model), _bn_state(model)
    with pytest.raises(RuntimeError, match="boom in forward"):
        if attack == "fgsm":
            fgsm(model, x, y, 0.05, bn_mode=bn_mode)
        else:
            pgd(model, x, y, 0.05, 0.02, 3, restarts=1 if attack == "pgd" else 2, bn_mode=bn_mode)
    assert len(probe.seen) == fail_at
    _check_grads(grads)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again
    assert [(m, m.training) for m in model.modules()] == flags
    for k, v in _bn_state(model).items():
        assert torch.equal(v, bn[k]), k


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "evaluate"])
def test_attacks_run_with_parameters_out_of_the_graph(attack):
    """Only the input gradient is taken: every parameter stops requiring grad during the attack (so the
    compiled masked conv skips its weight gradient) and gets its own flag back afterwards."""
    import dnr

    torch.manual_seed(0)
    model = dnr.sparsify(_bn_cnn(), density=0.3, generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())
    params[1].requires_grad_(False)  # the user's own frozen parameter stays frozen
    during = []
    model.register_forward_pre_hook(lambda m, a: during.append([p.requires_grad for p in params]))
    x, y = _images(8)
    if attack == "fgsm":
        fgsm(model, x, y, 0.05)
    elif attack == "pgd":
        pgd(model, x, y, 0.05, 0.02, 2)
    else:
        evaluate(model, DataLoader(TensorDataset(x, y), batch_size=4), steps=2)
    assert during and not any(any(flags) for flags in during)
    assert [p.requires_grad for p in params] == [i != 1 for i in range(len(params))]
    assert all(p.grad is None for p in params)


def test_bn_train_mode_uses_batch_statistics():
    """bn_mode='train' is not a no-op: batch statistics give a different attack than eval."""
    model = _bn_cnn()
    model[-2].p = 0.0  # dropout off so only BatchNorm differs
    with torch.no_grad():
        model.train()
        model(_images(16, seed=9)[0] * 0.3)  # running stats far from the attack batch's stats
    model.eval()
    x, y = _images(8)
    a = fgsm(model, x, y, 0.05, bn_mode="eval")
    b = fgsm(model, x, y, 0.05, bn_mode="train")
    assert not torch.equal(a, b)
    # oracle: the train-mode attack equals FGSM on a copy whose BN layers are in train mode
    ref = copy.deepcopy(model).train()
    x0 = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(ref(x0), y, reduction="sum"), x0)
    torch.testing.assert_close(b, (x + 0.05 * g.sign()).clamp(0, 1))


def test_works_inside_no_grad_and_with_frozen_parameters(task):
    model, x, y = copy.deepcopy(task[0]), task[1][:50], task[2][:50]
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        a = pgd(model, x, y, 0.05, 0.02, 3, random_start=False)
        f = fgsm(model, x, y, 0.05)
    b = pgd(task[0], x, y, 0.05, 0.02, 3, random_start=False)
    assert torch.equal(a, b)
    assert not torch.equal(f, x)
    assert all(not p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------
def _small():
    model = _linear_model()
    x, y = _images(4, dtype=torch.float64)
    return model, x[:, :, 1:4, 1:4].contiguous(), y


BAD_COMMON = [
    (dict(eps=-0.1), ValueError, r"eps must be finite and >= 0, got eps=-0\.1"),
    (dict(eps=float("nan")), ValueError, r"eps must be finite and >= 0, got eps=nan"),
    (dict(eps=torch.tensor([0.1, -0.2, 0.1, 0.1])), ValueError, r"every eps must be finite and >= 0, got eps=\[0\.1"),
    (dict(eps=torch.ones(3)), ValueError, r"eps must be a number, a 0-d tensor or a per-sample tensor of shape \[B\] = \[4\], got shape \(3,\)"),
    (dict(eps="0.1"), TypeError, r"eps must be a real number or a tensor, got '0\.1'"),
    (dict(clip=(1.0, 0.0)), ValueError, r"clip must satisfy lo < hi, got clip=\(1\.0, 0\.0\)"),
    (dict(clip=(0.5, 0.5)), ValueError, r"clip must satisfy lo < hi, got clip=\(0\.5, 0\.5\)"),
    (dict(clip=0.5), TypeError, r"clip must be a pair of floats \(lo, hi\), got clip=0\.5"),
    (dict(x_set=1.5), ValueError, r"x must lie in the clip range \[0\.0, 1\.0\] .*got min=.*, max=1\.5"),
    (dict(x_set=-0.01), ValueError, r"x must lie in the clip range \[0\.0, 1\.0\] .*got min=-0\.01"),
    (dict(y_len=3), ValueError, r"x and y must have the same batch size, got x\.shape\[0\]=4 and y\.shape=\(3,\)"),
    (dict(bn_mode="fast"), ValueError, r"bn_mode must be one of \('eval', 'train'\), got bn_mode='fast'"),
    (dict(model_device="meta"), ValueError, r"x is on cpu but model parameter '1\.weight' is on meta"),
    (dict(y_device="meta"), ValueError, r"y must be on x's device cpu, got y on meta"),
    (dict(x_int=True), TypeError, r"x must be a floating-point tensor, got dtype torch\.int64"),
    (dict(loss_fn=3), TypeError, r"loss_fn must be callable or None, got int"),
]

BAD_PGD = [
    (dict(alpha=0.0), ValueError, r"alpha must be finite and > 0, got alpha=0\.0"),
    (dict(alpha=-1), ValueError, r"alpha must be finite and > 0, got alpha=-1\.0"),
    (dict(alpha=torch.tensor([0.1, 0.0, 0.1, 0.1])), ValueError, r"every alpha must be finite and > 0"),
    (dict(steps=0), ValueError, r"steps must be >= 1, got steps=0"),
    (dict(steps=2.0), TypeError, r"steps must be an int, got 2\.0"),
    (dict(restarts=0), ValueError, r"restarts must be >= 1, got restarts=0"),
    (dict(generator=5), TypeError, r"generator must be a torch\.Generator or None, got int"),
    (dict(restarts=2, loss_fn=lambda z, t: F.cross_entropy(z, t)), ValueError,
     r"restarts=2 needs loss_fn to return per-sample losses of shape \[B\]"),
    (dict(loss_fn=lambda z, t: z), ValueError, r"loss_fn must return a scalar or per-sample losses of shape \[B\], got \(4, 3\)"),
]


def _call(attack, kw):
    model, x, y = _small()
    kw = dict(kw)
    if "x_set" in kw:
        x = x.clone()
        x[0, 0, 0, 0] = kw.pop("x_set")
    if "y_len" in kw:
        y = y[: kw.pop("y_len")]
    if "model_device" in kw:
        model = model.to(kw.pop("model_device"))
    if "y_device" in kw:
        y = y.to(kw.pop("y_device"))
    if kw.pop("x_int", False):
        x = x.long()
    flags = _set_mixed_flags(model)
    eps = kw.pop("eps", 0.1)
    try:
        if attack == "fgsm":
            return fgsm(model, x, y, eps, **kw)
        alpha, steps = kw.pop("alpha", 0.02), kw.pop("steps", 2)
        return pgd(model, x, y, eps, alpha, steps, **kw)
    finally:  # nothing modified on error
        assert [(m, m.training) for m in model.modules()] == flags


@pytest.mark.parametrize("kw,exc,msg", BAD_COMMON)
@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_bad_inputs_raise(attack, kw, exc, msg):
    with pytest.raises(exc, match=f"^{attack}: {msg}"):
        _call(attack, kw)


@pytest.mark.parametrize("kw,exc,msg", BAD_PGD)
def test_bad_pgd_inputs_raise(kw, exc, msg):
    with pytest.raises(exc, match=f"^pgd: {msg}"):
        _call("pgd", kw)


def test_x_within_tiny_tolerance_is_accepted():
    model, x, y = _small()
    x = x.clone()
    x[0, 0, 0, 0] = 1.0 + 1e-9
    x[1, 0, 0, 0] = -1e-9
    adv = pgd(model, x, y, 0.1, 0.02, 2)
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_matches_manual_counts(task, device, capsys):
    model, x, y = task
    model = copy.deepcopy(model).to(device)
    flags = _set_mixed_flags(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    kw = dict(eps=0.06, alpha=0.015, steps=5)
    res = evaluate(model, loader, **kw, generator=torch.Generator(device).manual_seed(2), progress=True)
    assert [(m, m.training) for m in model.modules()] == flags
    assert "[dnr.evaluate] batch 5: n=300" in capsys.readouterr().err

    model.eval()
    g = torch.Generator(device).manual_seed(2)
    clean = adv_f = adv_p = 0
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        clean += int((model(xb).argmax(1) == yb).sum())
        adv_f += int((model(fgsm(model, xb, yb, 0.06)).argmax(1) == yb).sum())
        adv_p += int((model(pgd(model, xb, yb, 0.06, 0.015, 5, generator=g)).argmax(1) == yb).sum())
    assert res["n"] == 300
    assert res["clean"] == clean / 300
    assert res["fgsm"] == adv_f / 300
    assert res["pgd"] == adv_p / 300
    assert 0.0 <= res["pgd"] <= res["clean"] <= 1.0 and res["fgsm"] < res["clean"]
    assert res["eps"] == 0.06 and res["alpha"] == 0.015 and res["steps"] == 5 and res["restarts"] == 1


def test_evaluate_defaults_skips_and_max_batches(task):
    model, x, y = task
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    res = evaluate(model, loader, fgsm=False, pgd=False, max_batches=2)
    assert res["n"] == 128 and res["fgsm"] is None and res["pgd"] is None
    manual = int((model(x[:128]).argmax(1) == y[:128]).sum())
    assert res["clean"] == manual / 128
    assert res["eps"] == 8 / 255 and res["alpha"] == 2 / 255 and res["steps"] == 7 and res["restarts"] == 1
    res = evaluate(model, [(x[:10], y[:10])], pgd=False)  # any iterable of (x, y)
    assert res["n"] == 10 and res["pgd"] is None and res["fgsm"] is not None


@pytest.mark.parametrize(
    "kw,exc,msg",
    [
        (dict(eps=-0.1), ValueError, r"evaluate: eps must be >= 0, got eps=-0\.1"),
        (dict(alpha=0.0), ValueError, r"evaluate: alpha must be > 0, got alpha=0\.0"),
        (dict(steps=0), ValueError, r"evaluate: steps must be >= 1, got steps=0"),
        (dict(restarts=0), ValueError, r"evaluate: restarts must be >= 1, got restarts=0"),
        (dict(max_batches=0), ValueError, r"evaluate: max_batches must be >= 1, got max_batches=0"),
        (dict(loader=[]), ValueError, r"evaluate: loader yielded no examples"),
        (dict(loader=[torch.zeros(2)]), ValueError, r"evaluate: loader must yield \(x, y\) pairs, got Tensor"),
        (dict(clip=(1.0, 0.0)), ValueError, r"evaluate: clip must satisfy lo < hi, got clip=\(1\.0, 0\.0\)"),
        (dict(device="meta"), ValueError, r"evaluate: device='meta' but model parameter '2\.weight' is on cpu"),
        (dict(eps=0.5, loader=[(torch.full((2, 1, 4, 4), 2.0), torch.zeros(2, dtype=torch.long))]), ValueError,
         r"fgsm: x must lie in the clip range \[0\.0, 1\.0\]"),
    ],
)
def test_evaluate_bad_inputs_raise(task, kw, exc, msg):
    model, x, y = task
    model = copy.deepcopy(model)
    flags = _set_mixed_flags(model)
    kw = dict(kw)
    loader = kw.pop("loader", [(x[:8], y[:8])])
    with pytest.raises(exc, match=msg):
        evaluate(model, loader, **kw)
    assert [(m, m.training) for m in model.modules()] == flags
