"""dnr.evaluation: robust_evaluation (clean / FGSM / PGD / AutoAttack / eps sweep + gradient-masking sanity checks),
autoattack_accuracy and format_sanity, on a tiny linear model trained on a separable 4-class toy problem."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from dnr import attacks, evaluation
from dnr.evaluation import autoattack_accuracy, format_sanity, robust_evaluation

from conftest import DEVICES

K, N, BATCH, EPS = 4, 64, 24, 0.08
AA_EPS = 0.1
SWEEP = [0.0, EPS / 2, EPS, 2 * EPS, 0.3, 0.5]
CHECKS = ["pgd_below_fgsm", "more_steps_not_stronger", "autoattack_not_above_pgd", "monotone_in_eps",
          "zero_at_large_eps"]


def _toy():
    g = torch.Generator().manual_seed(0)
    mu = 0.3 + 0.4 * torch.rand(K, 1, 8, 8, generator=g)
    y = torch.arange(N) % K
    x = (mu[y] + 0.05 * torch.randn(N, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def data():
    return _toy()


@pytest.fixture(scope="module")
def trained(data):
    """A linear classifier with clean accuracy 1 on the toy data (trained with its own generator)."""
    x, y = data
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, K))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
    return model


class Quantised(nn.Module):
    """Gradient masking on purpose: rounds its input to 5 levels; round() has a zero gradient everywhere."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


def _loader(data, batch=BATCH):
    x, y = data
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


def _fraction_of(acc, n):
    return 0.0 <= acc <= 1.0 and math.isclose(acc * n, round(acc * n), abs_tol=1e-6)


def _no_grads(model):
    return all(p.grad is None for p in model.parameters())


def _strip(res):
    return {k: v for k, v in res.items() if k != "seconds"}


def test_trained_model_numbers_and_all_checks_pass(trained, data):
    model = trained
    model.train()  # must come back in train mode
    rng = torch.get_rng_state()
    res = robust_evaluation(model, _loader(data), eps=EPS, pgd_steps=(10, 3), sweep_eps=SWEEP, sweep_steps=10)
    assert model.training and all(m.training for m in model.modules()) and _no_grads(model)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not touched
    model.eval()
    json.dumps(res)  # JSON-serialisable

    x, y = data
    n = N
    assert res["n"] == n and res["eps"] == EPS and res["restarts"] == 1
    with torch.no_grad():  # independent oracle for the clean accuracy
        assert res["clean"] == (model(x).argmax(1) == y).float().mean().item() == 1.0
    assert list(res["pgd"]) == ["3", "10"]  # sorted step counts
    assert res["pgd_alpha"] == {"3": pytest.approx(2.5 * EPS / 3), "10": pytest.approx(2.5 * EPS / 10)}
    for acc in [res["clean"], res["fgsm"], *res["pgd"].values()]:
        assert _fraction_of(acc, n)
    for v in res["pgd"].values():
        assert v <= res["clean"]
    assert [p["eps"] for p in res["sweep"]] == sorted(SWEEP) and all(p["n"] == n for p in res["sweep"])
    assert res["sweep"][0]["acc"] == res["clean"]  # eps 0: PGD cannot move the input
    assert all(_fraction_of(p["acc"], n) for p in res["sweep"])
    assert res["autoattack"] is res["autoattack_n"] is res["autoattack_pgd"] is None

    sanity = {c["check"]: c for c in res["sanity"]}
    assert list(sanity) == CHECKS
    for name in CHECKS:
        expected = None if name == "autoattack_not_above_pgd" else True
        assert sanity[name]["passed"] is expected, sanity[name]
        assert isinstance(sanity[name]["detail"], str) and sanity[name]["detail"]
    assert "AutoAttack was not run" in sanity["autoattack_not_above_pgd"]["detail"]
    text = format_sanity(res)
    assert text.count("\n  PASS ") == 4 and "skipped  autoattack_not_above_pgd" in text and "FAIL" not in text


def test_pgd_matches_attacks_pgd_oracle_and_is_deterministic(trained, data):
    loader = _loader(data)
    a = robust_evaluation(trained, loader, eps=EPS, pgd_steps=(4,), fgsm=False, seed=3)
    b = robust_evaluation(trained, loader, eps=EPS, pgd_steps=(4,), fgsm=False, seed=3)
    assert _strip(a) == _strip(b)
    assert a["fgsm"] is None and a["sanity"][0]["passed"] is None and a["sanity"][1]["passed"] is None
    # oracle: dnr.attacks.evaluate with the same settings and seeded generator
    ref = attacks.evaluate(trained, loader, eps=EPS, alpha=2.5 * EPS / 4, steps=4, fgsm=False,
                           generator=torch.Generator().manual_seed(3))
    assert a["pgd"]["4"] == ref["pgd"] and a["clean"] == ref["clean"]


def test_restarts_only_make_pgd_stronger(trained, data):
    # one batch: restart 0 of the 3-restart run is the 1-restart run's start, so it can only find more
    loader = _loader(data, batch=N)
    one = robust_evaluation(trained, loader, eps=EPS, pgd_steps=(2,), restarts=1, fgsm=False, alpha=0.01)
    three = robust_evaluation(trained, loader, eps=EPS, pgd_steps=(2,), restarts=3, fgsm=False, alpha=0.01)
    assert three["restarts"] == 3 and three["pgd_alpha"] == {"2": 0.01}
    assert three["pgd"]["2"] <= one["pgd"]["2"]


def test_masked_gradients_are_flagged(trained, data):
    masked = Quantised(trained)
    res = robust_evaluation(masked, _loader(data), eps=EPS, pgd_steps=(3, 10), sweep_eps=SWEEP, sweep_steps=10)
    sanity = {c["check"]: c for c in res["sanity"]}
    assert res["clean"] > 0.9
    # zero gradient: PGD reduces to its random start, so even eps 0.5 leaves the model "robust"
    assert res["sweep"][-1]["eps"] == 0.5 and res["sweep"][-1]["acc"] > 0.05
    assert sanity["zero_at_large_eps"]["passed"] is False
    assert "0.5" in sanity["zero_at_large_eps"]["detail"]
    text = format_sanity(res)
    assert "FAIL     zero_at_large_eps" in text and "WARNING" in text and _no_grads(trained)


def test_zero_at_large_eps_skipped_for_small_sweep(trained, data):
    lines = []
    res = robust_evaluation(trained, _loader(data), eps=EPS, pgd_steps=(2,), fgsm=False,
                            sweep_eps=[EPS, 0.0, EPS], sweep_steps=2, sweep_examples=30, progress=lines.append)
    assert len(lines) == 3 and "n=64" in lines[-1] and "pgd2" in lines[-1]  # one progress line per batch
    assert [p["eps"] for p in res["sweep"]] == [0.0, EPS] and [p["n"] for p in res["sweep"]] == [30, 30]
    check = res["sanity"][4]
    assert check["check"] == "zero_at_large_eps" and check["passed"] is None and "below 0.3" in check["detail"]
    assert res["sanity"][3]["passed"] is True


def test_checks_fail_on_inconsistent_numbers():
    base = {"n": 200, "eps": 0.1, "clean": 0.9, "fgsm": 0.5, "pgd": {"10": 0.6, "50": 0.7}, "autoattack": 0.8,
            "autoattack_n": 100, "autoattack_pgd": 0.7, "sweep": [{"eps": 0.0, "acc": 0.9, "n": 100},
                                                                  {"eps": 0.1, "acc": 0.6, "n": 100},
                                                                  {"eps": 0.3, "acc": 0.7, "n": 100}],
            "sweep_steps": 20}
    checks = evaluation._sanity_checks(base)
    assert [c["passed"] for c in checks] == [False, False, False, False, False]
    # within the tolerance max(1 example, 0.5 %): 1/200 = 0.5 %
    ok = dict(base, fgsm=0.695, pgd={"10": 0.7, "50": 0.7}, autoattack=0.71,
              sweep=[{"eps": 0.0, "acc": 0.9, "n": 100}, {"eps": 0.3, "acc": 0.05, "n": 100}])
    assert [c["passed"] for c in evaluation._sanity_checks(ok)] == [True, True, True, True, True]


def test_autoattack_path_on_the_same_subset(trained, data):
    pytest.importorskip("torchattacks")
    # AA_EPS: large enough that APGD breaks (almost) everything, so AutoAttack's Square / FAB stages stay cheap
    loader = _loader(data)
    trained.train()
    rng = torch.get_rng_state()
    res = robust_evaluation(trained, loader, eps=AA_EPS, pgd_steps=(3, 10), autoattack=True, autoattack_examples=30)
    assert trained.training and _no_grads(trained) and torch.equal(torch.get_rng_state(), rng)
    trained.eval()
    assert res["autoattack_n"] == 30  # crosses a batch boundary (24 + 6)
    assert _fraction_of(res["autoattack"], 30) and _fraction_of(res["autoattack_pgd"], 30)
    # oracle for autoattack_pgd: PGD-10 per example over the same batches and seed, first 30 examples
    g = torch.Generator().manual_seed(0)
    per = torch.cat([(trained(attacks.pgd(trained, x, y, AA_EPS, 2.5 * AA_EPS / 10, 10, generator=g)).argmax(1) == y)
                     for x, y in loader])
    assert res["autoattack_pgd"] == per[:30].float().mean().item()
    check = res["sanity"][2]
    assert check["check"] == "autoattack_not_above_pgd" and check["passed"] is True, check
    aa = autoattack_accuracy(trained, loader, eps=AA_EPS, max_examples=30)
    assert aa["n"] == 30 and aa["acc"] == res["autoattack"]
    assert aa["correct"].dtype == torch.bool and aa["correct"].shape == (30,) and aa["correct"].device.type == "cpu"
    with torch.no_grad():
        clean = trained(data[0][:30]).argmax(1) == data[1][:30]
    assert not (aa["correct"] & ~clean).any()  # robust implies correct


def test_apgd_accuracy_equals_the_two_attacks_run_directly(trained, data):
    torchattacks = pytest.importorskip("torchattacks")
    loader = _loader(data)
    trained.train()
    rng = torch.get_rng_state()
    res = evaluation.apgd_accuracy(trained, loader, eps=AA_EPS, steps=5, max_examples=30)
    assert trained.training and _no_grads(trained) and torch.equal(torch.get_rng_state(), rng)
    trained.eval()
    # oracle: the torchattacks calls written out, batch by batch (the same batches: 24 + 6 examples)
    expected = []
    for x, y in loader:
        x, y = x[:30 - sum(map(len, expected))], y[:30 - sum(map(len, expected))]
        if len(x) == 0:
            break
        with torch.no_grad():
            ok = trained(x).argmax(1) == y
        for attack in (torchattacks.APGD(trained, norm="Linf", eps=AA_EPS, steps=5, n_restarts=1, loss="ce", seed=0),
                       torchattacks.APGDT(trained, norm="Linf", eps=AA_EPS, steps=5, n_restarts=1, n_classes=10,
                                          seed=0)):
            idx = ok.nonzero().flatten()
            if len(idx):
                with torch.no_grad():
                    ok[idx] = trained(attack(x[idx], y[idx])).argmax(1) == y[idx]
        expected.append(ok)
    expected = torch.cat(expected)
    assert res["n"] == 30 and torch.equal(res["correct"], expected) and res["acc"] == expected.float().mean().item()
    with torch.no_grad():
        clean = trained(data[0][:30]).argmax(1) == data[1][:30]
    assert not (res["correct"] & ~clean).any() and res["acc"] < clean.float().mean().item()
    with pytest.raises(ValueError, match=r"steps must be >= 1, got steps=0"):
        evaluation.apgd_accuracy(trained, loader, eps=AA_EPS, steps=0)


def test_autoattack_without_torchattacks_names_the_install(trained, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks -> ImportError
    with pytest.raises(ImportError, match=r"pip install torchattacks"):
        autoattack_accuracy(trained, _loader(data), eps=EPS)
    with pytest.raises(ImportError, match=r"dnr\[attacks\]"):
        robust_evaluation(trained, _loader(data), eps=EPS, autoattack=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=-0.1), r"eps must be finite and >= 0, got eps=-0.1"),
    (dict(eps=float("nan")), r"eps must be finite"),
    (dict(alpha=0.0), r"alpha must be finite and > 0, got alpha=0.0"),
    (dict(pgd_steps=()), r"pgd_steps must name at least one step count, got pgd_steps=\(\)"),
    (dict(pgd_steps=(5, 0)), r"pgd_steps entry must be >= 1, got pgd_steps entry=0"),
    (dict(restarts=0), r"restarts must be >= 1, got restarts=0"),
    (dict(autoattack_examples=0), r"autoattack_examples must be >= 1, got autoattack_examples=0"),
    (dict(sweep_examples=0), r"sweep_examples must be >= 1, got sweep_examples=0"),
    (dict(sweep_steps=0), r"sweep_steps must be >= 1, got sweep_steps=0"),
    (dict(sweep_eps=[0.1, -1]), r"sweep_eps entry must be finite and >= 0, got sweep_eps entry=-1"),
    (dict(sweep_eps=[]), r"sweep_eps must hold at least one eps"),
    (dict(seed=-1), r"seed must be >= 0, got seed=-1"),
    (dict(clip=(1.0, 0.0)), r"clip must satisfy lo < hi"),
    (dict(autoattack=True, clip=(-1.0, 1.0)), r"AutoAttack .* needs inputs in \[0, 1\]"),
])
def test_argument_errors(trained, data, kwargs, match):
    kwargs = {"eps": EPS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        robust_evaluation(trained, _loader(data), **kwargs)


def test_argument_errors_of_autoattack_accuracy_and_empty_loader(trained, data):
    with pytest.raises(ValueError, match=r"max_examples must be >= 1, got max_examples=0"):
        autoattack_accuracy(trained, _loader(data), eps=EPS, max_examples=0)
    with pytest.raises(TypeError, match=r"pgd_steps entry must be an int, got pgd_steps entry=2.5"):
        robust_evaluation(trained, _loader(data), eps=EPS, pgd_steps=(2.5,))
    with pytest.raises(ValueError, match=r"loader yielded no examples"):
        robust_evaluation(trained, [], eps=EPS, pgd_steps=(1,))
    with pytest.raises(ValueError, match=r"format_sanity: result must be"):
        format_sanity({"n": 3})


def test_default_alpha_is_the_harness_rule():
    from dnr.harness.config import TrainConfig, default_pgd_alpha
    assert default_pgd_alpha is evaluation.default_pgd_alpha  # one rule, not a twin
    for eps, steps, expected in [(0.0, 10, 1 / 255), (8 / 255, 20, 2.5 * (8 / 255) / 20), (0.3, 50, 0.015)]:
        assert evaluation.default_pgd_alpha(eps, steps) == pytest.approx(expected)
    cfg = TrainConfig(eps=0.1, eval_steps=20).validate()
    assert cfg.resolved_eval_alpha == pytest.approx(0.0125)


@pytest.mark.slow
def test_cli_eval_sanity(tmp_path, capsys, monkeypatch):
    from dnr import cli
    out = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "dnr", "train", "--train-size", "64", "--test-size", "16",
                           "--batch-size", "64", "--epochs", "1", "--attack-steps", "1", "--eval-steps", "1",
                           "--eval-size", "16", "--threads", "1", "--no-progress", "--quiet", "--seed", "1",
                           "--out", out], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = cli.main(["eval", out, "--test-size", "8", "--steps", "2", "--sanity", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0
    res = json.loads(captured.out)
    for key in ("checkpoint", "n", "clean", "fgsm", "pgd", "autoattack", "eps", "alpha", "pgd_steps",
                "pgd_restarts", "seed", "density", "compression"):
        assert key in res
    robust = res["robust"]
    assert robust["n"] == res["n"] == 8 and list(robust["pgd"]) == ["2", "50"]
    # same loader, seed and step size: the robust PGD-2 is the plain PGD-2 number
    assert robust["pgd"]["2"] == res["pgd"] and robust["clean"] == res["clean"] and robust["fgsm"] == res["fgsm"]
    eps = res["eps"]
    assert [p["eps"] for p in robust["sweep"]] == pytest.approx(sorted({0.0, eps / 2, eps, 2 * eps, 0.3, 0.5}))
    assert [c["check"] for c in robust["sanity"]] == CHECKS
    assert "sanity checks (gradient masking):" in captured.err and "zero_at_large_eps" in captured.err
    # without torchattacks, --autoattack (with or without --sanity) is a one-line usage error naming the install
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    for extra in ([], ["--sanity"]):
        code = cli.main(["eval", out, "--test-size", "4", "--steps", "1", "--autoattack", "--quiet", *extra])
        err = capsys.readouterr().err
        assert code == 2 and "dnr: error: option --autoattack needs the torchattacks package" in err, err
        assert "pip install torchattacks" in err and err.strip().splitlines()[-1].startswith("dnr: error:")


# ------------------------------------------------------------------ resume_file: an interrupted evaluation continues

# PGD with one or two large steps: the random starts decide some examples (seeds 5 and 6 differ), so an equal
# result after a resume needs the generators' states restored, not only the finished batches' results. At AA_EPS
# AutoAttack's APGD attacks break every example, so the gradient-free Square attack (~40 s per batch on this CPU)
# has nothing left to run on: the AutoAttack case checks that its results and subset survive the resume.
RESUME = dict(eps=AA_EPS, pgd_steps=(1, 2), alpha=AA_EPS / 2, sweep_eps=[AA_EPS / 2, AA_EPS], sweep_steps=1,
              sweep_examples=40)


class _Killed(Exception):
    pass


def _killed_after(loader, batches):
    """The loader, interrupted (as by a kill) when it is asked for batch number ``batches``."""
    for i, batch in enumerate(loader):
        if i == batches:
            raise _Killed
        yield batch


class _CountingPGD:
    def __init__(self):
        self.calls, self.pgd = 0, attacks.pgd

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.pgd(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autoattack", [False, True])
def test_an_interrupted_evaluation_resumes_to_the_uninterrupted_result(trained, data, tmp_path, device, autoattack,
                                                                      monkeypatch):
    if autoattack:
        pytest.importorskip("torchattacks")
    model = copy.deepcopy(trained).to(device)
    loader = [(x.to(device), y.to(device)) for x, y in _loader(data, batch=8)]  # 8 batches; killed after 3
    kwargs = dict(RESUME, autoattack=autoattack, autoattack_examples=40 if autoattack else None, seed=5)
    counter = _CountingPGD()
    monkeypatch.setattr(evaluation._attacks, "pgd", counter)
    whole = robust_evaluation(model, loader, **kwargs)
    whole_calls, counter.calls = counter.calls, 0
    assert _strip(robust_evaluation(model, loader, **dict(kwargs, seed=6))) != _strip(whole)  # the starts matter
    counter.calls = 0

    path = str(tmp_path / "progress.pt")
    with pytest.raises(_Killed):
        robust_evaluation(model, _killed_after(loader, 3), resume_file=path, **kwargs)
    first_calls, counter.calls = counter.calls, 0
    saved = torch.load(path, weights_only=True)  # a plain tensor file: loads with weights_only
    assert saved["batches"] == 3 and saved["n"] == 24
    lines = []
    resumed = robust_evaluation(model, loader, resume_file=path, progress=lines.append, **kwargs)
    assert _strip(resumed) == _strip(whole)
    assert first_calls + counter.calls == whole_calls  # no batch was attacked twice
    assert "resuming after batch 3 (n=24)" in lines[0] and lines[1].startswith("[dnr.robust_evaluation] batch 4:")
    assert not os.path.exists(path)  # finished: the progress file is gone
    # killed after the last batch but before the caller kept the result: nothing is attacked again
    with pytest.raises(_Killed):
        robust_evaluation(model, _killed_after(loader + [None], 8), resume_file=path, **kwargs)
    counter.calls = 0
    assert _strip(robust_evaluation(model, loader, resume_file=path, **kwargs)) == _strip(whole)
    assert counter.calls == 0


def test_a_progress_file_of_other_settings_or_weights_is_replaced(trained, data, tmp_path):
    loader = _loader(data, batch=8)
    path = str(tmp_path / "progress.pt")
    with pytest.raises(_Killed):
        robust_evaluation(trained, _killed_after(loader, 3), resume_file=path, **RESUME, seed=5)
    # other settings: seed 6's evaluation starts over and is seed 6's
    assert _strip(robust_evaluation(trained, loader, resume_file=path, **RESUME, seed=6)) == \
        _strip(robust_evaluation(trained, loader, **RESUME, seed=6))
    # other weights: the same settings on a changed model start over too
    with pytest.raises(_Killed):
        robust_evaluation(trained, _killed_after(loader, 3), resume_file=path, **RESUME, seed=5)
    changed = copy.deepcopy(trained)
    with torch.no_grad():
        changed[1].bias[0] += 0.5
    assert _strip(robust_evaluation(changed, loader, resume_file=path, **RESUME, seed=5)) == \
        _strip(robust_evaluation(changed, loader, **RESUME, seed=5))


def test_a_progress_file_of_other_data_is_a_one_line_error(trained, data, tmp_path):
    loader = _loader(data, batch=8)
    path = str(tmp_path / "progress.pt")
    with pytest.raises(_Killed):
        robust_evaluation(trained, _killed_after(loader, 3), resume_file=path, **RESUME)
    x, y = data
    other = _loader((x.flip(0), y.flip(0)), batch=8)
    with pytest.raises(ValueError, match=r"^robust_evaluation: resume_file .*progress.pt holds the results of 3 "
                                         r"batches of other data than this loader's; remove it"):
        robust_evaluation(trained, other, resume_file=path, **RESUME)
    with pytest.raises(ValueError, match=r"holds 3 batches but the loader yielded only 2"):
        robust_evaluation(trained, loader[:2], resume_file=path, **RESUME)
    assert os.path.exists(path)  # not destroyed by a refused call


def test_resume_file_errors_come_before_any_attack(trained, data, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation._attacks, "pgd", lambda *a, **k: pytest.fail("attacked before the error"))
    with pytest.raises(ValueError, match=r"resume_file .*no-such-folder.*p.pt: its folder .* does not exist"):
        robust_evaluation(trained, _loader(data), eps=EPS, resume_file=str(tmp_path / "no-such-folder" / "p.pt"))
    with pytest.raises(ValueError, match=r"resume_file .* is a folder, expected a file path"):
        robust_evaluation(trained, _loader(data), eps=EPS, resume_file=str(tmp_path))
    with pytest.raises(TypeError, match=r"resume_file must be a path or None, got int"):
        robust_evaluation(trained, _loader(data), eps=EPS, resume_file=3)


# AutoAttack alone and APGD alone (dnr eval --autoattack / --apgd): the same resume_file contract. Each batch's
# attacks are seeded, so the resumed per-example results must equal the uninterrupted ones, with every batch
# attacked once. APGD at AA_EPS with 2 steps breaks some of the 64 examples and not others (checked below), so an
# equal result after a resume says something; AutoAttack at AA_EPS breaks all (fast: Square has nothing to run on).
def _aa(model, loader, **kw):
    return autoattack_accuracy(model, loader, eps=AA_EPS, seed=3, **kw)


def _apgd(model, loader, **kw):
    return evaluation.apgd_accuracy(model, loader, eps=AA_EPS, steps=2, seed=3, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("evaluate", [_aa, _apgd], ids=["autoattack", "apgd"])
def test_autoattack_and_apgd_resume_to_the_uninterrupted_result(trained, data, tmp_path, device, evaluate,
                                                                monkeypatch):
    torchattacks = pytest.importorskip("torchattacks")
    model = copy.deepcopy(trained).to(device)
    loader = [(x.to(device), y.to(device)) for x, y in _loader(data, batch=8)]  # 8 batches; killed after 3
    attacked = []  # the first label of every batch an attack ran on
    for name in ("AutoAttack", "APGD"):
        cls = getattr(torchattacks, name)
        counting = type(name, (cls,), {"forward": lambda self, x, y, _c=cls: attacked.append(int(y[0])) or
                                       _c.forward(self, x, y)})
        monkeypatch.setattr(torchattacks, name, counting)
    whole = evaluate(model, loader)
    if evaluate is _apgd:
        assert 0 < whole["acc"] < 1, whole["acc"]  # the attacks decide: a resume that mixes results would show
    whole_attacked, attacked[:] = len(attacked), []

    path = str(tmp_path / "progress.pt")
    with pytest.raises(_Killed):
        evaluate(model, _killed_after(loader, 3), resume_file=path)
    first = len(attacked)
    saved = torch.load(path, weights_only=True)
    assert saved["batches"] == 3 and saved["n"] == 24
    resumed = evaluate(model, loader, resume_file=path)
    assert torch.equal(resumed["correct"], whole["correct"]) and resumed["acc"] == whole["acc"] and resumed["n"] == 64
    assert len(attacked) == whole_attacked  # no batch was attacked twice
    assert first < whole_attacked
    assert not os.path.exists(path)
    # a file of other settings (another seed) is replaced, not mixed in
    with pytest.raises(_Killed):
        evaluate(model, _killed_after(loader, 3), resume_file=path)
    fn = autoattack_accuracy if evaluate is _aa else evaluation.apgd_accuracy
    kw = dict(eps=AA_EPS, seed=4, **({} if evaluate is _aa else dict(steps=2)))
    assert torch.equal(fn(model, loader, resume_file=path, **kw)["correct"], fn(model, loader, **kw)["correct"])
    # other data: a one-line error, the file kept
    with pytest.raises(_Killed):
        evaluate(model, _killed_after(loader, 3), resume_file=path)
    flipped = [(x.flip(0), y.flip(0)) for x, y in loader]
    with pytest.raises(ValueError, match=r"resume_file .*progress.pt holds the results of 3 batches of other data"):
        evaluate(model, flipped, resume_file=path)
    assert os.path.exists(path)
