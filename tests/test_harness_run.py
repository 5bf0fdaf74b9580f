"""The fit driver: the four methods, quiet mode, run-directory contents, quickstart on top of it."""

import json
import math
import os

import pytest
import torch

from dnr.harness import ConfigError, fit, load_checkpoint, resolve_config
from dnr.harness.builders import EpochBatchSampler, build_model_for
from dnr.nn import masked_layers
from dnr.rewiring import auto_rewire_interval, auto_sparsify_until

TINY = dict(train_size=128, test_size=32, batch_size=64, epochs=2, attack_steps=1, eval_steps=1, eval_size=16,
            threads=1, plots=False, seed=2)


def _fit(tmp_path, **overrides):
    cfg = resolve_config(None, {}, {**TINY, **overrides})
    return cfg, fit(cfg, str(tmp_path / overrides.get("method", "dnr")), quiet=True, progress=False)


@pytest.mark.parametrize("method", ["dense", "dense-at"])
def test_dense_methods_train_unpruned_models(tmp_path, method):
    cfg, s = _fit(tmp_path, method=method)
    model = load_checkpoint(s["model_path"])["model"]
    assert not any(k.endswith(".mask") for k in model)
    assert s["density"] == 1.0 and s["compression"] == 1.0 and s["method"] == method
    rows = [json.loads(line) for line in open(os.path.join(s["run_dir"], "metrics.jsonl"))]
    assert rows[-1]["prune_rate"] is None and rows[-1]["rewired_weights"] is None
    # dense: clean training only (no adversarial accuracy); dense-at: adversarial training
    assert (rows[-1]["train_adv_acc"] is None) == (method == "dense")


def test_static_method_keeps_the_initial_mask_and_zero_pruned_weights(tmp_path):
    cfg, s = _fit(tmp_path, method="static", density=0.1)
    initial = build_model_for(cfg)  # the same seeded initial mask the run started from
    final = load_checkpoint(s["model_path"])["model"]
    for name, layer in masked_layers(initial):
        assert torch.equal(final[name + ".mask"], layer.mask), name
        assert not final[name + ".weight"][~layer.mask].any(), name  # pruned weights stayed exactly zero
    assert s["density"] == pytest.approx(0.1, abs=1e-3)
    assert os.path.getsize(os.path.join(s["run_dir"], "rewiring.jsonl")) == 0


@pytest.mark.parametrize("mode", ["irregular", "channel"])
@pytest.mark.parametrize("rewire", ["auto", "paper"])
def test_dnr_rewires_with_an_exact_budget(tmp_path, mode, rewire):
    cfg, s = _fit(tmp_path, method="dnr", epochs=3, mode=mode, density=0.2, rewire=rewire)
    initial = build_model_for(cfg)
    final = load_checkpoint(s["model_path"])["model"]
    budget = sum(int(layer.mask.sum()) for _, layer in masked_layers(initial))
    assert sum(int(final[n + ".mask"].sum()) for n, _ in masked_layers(initial)) == budget
    assert any(not torch.equal(final[n + ".mask"], l.mask) for n, l in masked_layers(initial))  # it rewired
    history = [json.loads(line) for line in open(os.path.join(s["run_dir"], "rewiring.jsonl"))]
    records = [r for r in history if "event" not in r]  # the rewirings
    starts = [r for r in history if r.get("event") == "sparsify"]  # the dense-to-sparse start's pruning steps
    assert all(r["active"] == budget for r in records)
    if rewire == "paper":  # at the end of every epoch but the last, from the random masks
        assert [r["epoch"] for r in records] == [1, 2] and not starts
    else:  # every k steps before the horizon 0.75 T, after the dense start (irregular mode: S = T / 4)
        total = [json.loads(line) for line in open(os.path.join(s["run_dir"], "metrics.jsonl"))][-1]["step"]
        k = auto_rewire_interval(total, 0.75)
        S = round(auto_sparsify_until(0.75, mode) * total)
        assert S == (round(total / 4) if mode == "irregular" else 0)
        assert [r["step"] for r in starts] == sorted(set(range(k, S, k)) | ({S} if S else set()))
        assert all(a["active"] > b["active"] for a, b in zip(starts, starts[1:]))
        assert not starts or starts[-1]["active"] == budget
        assert [r["step"] for r in records] == [t for t in range(k, math.ceil(0.75 * total), k) if t > S]


def test_quiet_mode_prints_nothing(tmp_path, capsys):
    _fit(tmp_path, epochs=1, method="dense")
    assert capsys.readouterr().out == ""


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        _fit(tmp_path, tensorboard=True)
    assert not (tmp_path / "dnr").exists()


def test_epoch_batch_sampler_resumes_the_same_order():
    s = EpochBatchSampler(10, 3, seed=4)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 3 and sorted(i for b in full for i in b) == sorted(set(i for b in full for i in b))
    s.set_epoch(2, start=1)
    assert list(s) == full[1:] and len(s) == 2
    s.set_epoch(3)
    assert list(s) != full  # a new order every epoch


@pytest.mark.slow  # evaluates on the 1000 embedded test images
def test_quickstart_runs_on_the_fit_driver():
    from dnr.quickstart import build_parser, format_summary, run
    args = build_parser().parse_args(["--epochs", "1", "--train-size", "128", "--batch-size", "64", "--attack-steps",
                                      "1", "--eval-steps", "1", "--threads", "1", "--quiet", "--method", "static"])
    s = run(args)
    assert {"method", "mode", "density", "compression", "clean", "fgsm", "pgd"} <= set(s)
    assert (s["method"], s["mode"], s["test_examples"]) == ("static", "irregular", 1000)
    assert s["compression"] == pytest.approx(20.0, rel=1e-3)
    assert "clean accuracy" in format_summary(s)
    with pytest.raises(ConfigError, match="--density"):
        run(build_parser().parse_args(["--density", "0"]))


def test_progress_bars_on_a_terminal(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    from dnr.harness.console import ConsoleLog
    from dnr.harness.evaluate import final_evaluation
    from dnr.models import small_cnn
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    log = ConsoleLog(quiet=False, progress=True)
    assert log.tqdm is not None and ConsoleLog(quiet=True, progress=True).tqdm is None
    model = small_cnn().eval()
    data = [(torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))) for _ in range(3)]
    res = final_evaluation(model, data, eps=0.1, alpha=0.05, steps=1, restarts=1, seed=0, log=log, desc="evalbar")
    assert res["n"] == 12
    assert "evalbar" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["dnr", "admm"])
def test_sparse_runs_use_the_fused_masked_sgd_and_match_torch_sgd_bitwise(tmp_path, monkeypatch, method):
    from dnr.harness import builders as hrun
    from dnr.optim import MaskedSGD

    cfg = resolve_config(None, {}, {**TINY, "method": method, "density": 0.2, "deterministic": True})
    model = build_model_for(cfg)
    fused = hrun.use_kernel("masked_sgd_step_", torch.device("cpu"))
    assert isinstance(hrun.make_optimizer(cfg, model, torch.device("cpu")), MaskedSGD) == fused
    dense_cfg = resolve_config(None, {}, {**TINY, "method": "dense-at"})
    assert type(hrun.make_optimizer(dense_cfg, build_model_for(dense_cfg), torch.device("cpu"))) is torch.optim.SGD
    if not fused:
        pytest.skip("the masked_sgd_step_ kernel is not compiled (DNR_DISABLE_EXT or no extension)")
    a = fit(cfg, str(tmp_path / "fused"), quiet=True, progress=False)
    monkeypatch.setattr(hrun, "use_kernel", lambda op, device: False)  # torch.optim.SGD + apply_masks
    b = fit(cfg, str(tmp_path / "plain"), quiet=True, progress=False)
    sa, sb = load_checkpoint(a["model_path"])["model"], load_checkpoint(b["model_path"])["model"]
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_min_active_keeps_channel_layers_from_collapsing(tmp_path):
    """Channel-mode DNR moves channels to the layers with the largest mean momentum; --min-active bounds
    how far the others shrink (the default 1 lets the head's hidden layer fall to 2 channels here)."""
    ends = {}
    for floor in (1, 4):
        cfg, s = _fit(tmp_path / str(floor), method="dnr", mode="channel", density=0.05, epochs=4, train_size=256,
                      min_active=floor)
        final = load_checkpoint(s["model_path"])["model"]
        start = {n: int(layer.channel_mask.sum()) for n, layer in masked_layers(build_model_for(cfg))}
        end = {n: int(final[n + ".mask"].reshape(final[n + ".mask"].shape[0], -1).any(dim=1).sum()) for n in start}
        ends[floor] = (start, end)
        assert sum(int(final[n + ".mask"].sum()) for n in start) == sum(
            int(layer.mask.sum()) for _, layer in masked_layers(build_model_for(cfg)))  # the budget holds
    start, end = ends[4]
    assert all(end[n] >= min(4, start[n]) for n in start), end
    assert min(ends[1][1].values()) < 4  # without the floor a layer does shrink below it


def test_summary_names_the_sparsity_mode_of_masked_methods_only():
    from dnr.harness.report import format_summary
    base = {"mode": "irregular", "density": 0.25, "compression": 4.0, "clean": 0.5, "fgsm": 0.4, "pgd": 0.3,
            "pgd_steps": 20, "flops_dense": 100, "flops_effective": 25, "train_seconds": 1.0, "epochs": 1,
            "eps": 0.1, "test_examples": 10}
    assert "circulant (irregular)" not in format_summary(dict(base, method="circulant", sparse=False))
    assert "dnr (irregular)" in format_summary(dict(base, method="dnr", sparse=True))
    assert "static (irregular)" in format_summary(dict(base, method="static"))  # a summary without the key
