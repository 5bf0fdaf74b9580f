"""``dnr explore`` (issue 17): the early-stopping rule checked on synthetic learning curves whose answer is
known (which configurations stop, when, the epochs saved, the smallest model that meets the requirement and
the Pareto fronts), the analytic FLOPs, bad configs, and one real tiny exploration through the command line."""

from __future__ import annotations

import json
import os

import pytest

from dnr import cli
from dnr.explore import ExploreSpec, explore, pareto_front, run_explore, sequence_flops, stop_bound
from dnr.harness import ConfigError
from dnr.models import SequenceClassifier

BUDGET = 6


class CurveTrial:
    """A synthetic task with a known answer: configuration -> a concave learning curve
    acc_e = final * (1 - 0.5 ** e) (e = 1..BUDGET), final = 0.9 - 0.1 * log2(k) - (0.05 if hidden 32);
    parameters fall with k and the hidden size. Records how many epochs each configuration was trained."""

    def __init__(self):
        self.trained = {}

    @staticmethod
    def final(c):
        return 0.9 - 0.1 * (c["block_size"].bit_length() - 1) - (0.05 if c["hidden_size"] == 32 else 0.0)

    def curve(self, c):
        return [self.final(c) * (1 - 0.5 ** e) for e in range(1, BUDGET + 1)]

    def __call__(self, c):
        key = (c["cell"], c["hidden_size"], c["block_size"])
        for e, acc in enumerate(self.curve(c), start=1):
            self.trained[key] = e
            yield acc

    def describe(self, c):
        return {"params": 1000 * c["hidden_size"] // c["block_size"], "flops": 10 * c["hidden_size"] // c["block_size"]}


SPEC = dict(requirement=0.7, cells=["gru"], hidden_sizes=[32, 64], block_sizes=[1, 2, 4, 8], budget_epochs=BUDGET,
            check_fraction=0.5)


def test_early_stopping_on_curves_with_a_known_answer():
    spec = ExploreSpec(**SPEC).validate()
    trial = CurveTrial()
    res = explore(spec, trial)
    rows = {r["name"]: r for r in res["rows"]}
    # the oracle: the final accuracies are known; a configuration whose final < requirement must stop, and it
    # stops at the first epoch >= 3 where acc_e + last gain * (6 - e) < 0.7 (the curve's gains halve each epoch)
    for c in spec.configurations():
        name = f"gru-h{c['hidden_size']}-k{c['block_size']}"
        curve = trial.curve(c)
        # the oracle: the curve is concave, so the larger of the last two gains is the earlier one
        expected_stop = next((e for e in range(3, BUDGET)
                              if curve[e - 1] + (curve[e - 2] - curve[e - 3]) * (BUDGET - e) < 0.7), None)
        assert rows[name]["stopped"] == (expected_stop is not None), name
        assert rows[name]["epochs"] == (expected_stop or BUDGET) == trial.trained[("gru", c["hidden_size"],
                                                                                    c["block_size"])]
        if rows[name]["stopped"]:  # the rule's promise: a stopped configuration would have missed the requirement
            assert curve[-1] < 0.7, name
        else:
            assert rows[name]["accuracy"] == curve[-1]
    # known: h32-k8 (final 0.55) stops after epoch 4, h32-k4 (0.65) after epoch 5; the best four are kept
    assert rows["gru-h32-k8"]["epochs"] == 4 and rows["gru-h32-k4"]["epochs"] == 5
    kept = {n for n, r in rows.items() if not r["stopped"]}
    assert {"gru-h64-k1", "gru-h64-k2", "gru-h32-k1", "gru-h32-k2"} <= kept
    assert res["epochs_saved"] == sum(BUDGET - r["epochs"] for r in rows.values()) > 0
    assert res["stopped"] == sum(r["stopped"] for r in rows.values())
    # smallest model that meets the requirement at the end of its budget: fewest parameters among those
    meeting = [r for r in rows.values() if not r["stopped"] and r["accuracy"] >= 0.7]
    assert res["smallest"] == min(meeting, key=lambda r: r["params"])["name"]


def test_stop_bound_and_pareto_front():
    assert stop_bound([0.2, 0.5, 0.6], 5) == pytest.approx(0.6 + 0.3 * 2)   # the larger of the last two gains
    assert stop_bound([0.2, 0.5, 0.4], 5) == pytest.approx(0.4 + 0.3 * 2)   # one dip does not stop it
    assert stop_bound([0.1, 0.5, 0.6, 0.65], 6) == pytest.approx(0.65 + 0.1 * 2)  # the first gain is forgotten
    assert stop_bound([0.5, 0.4], 4) == pytest.approx(0.4)                  # no gain: no credit
    rows = [{"params": 1, "accuracy": 0.5}, {"params": 2, "accuracy": 0.4}, {"params": 3, "accuracy": 0.9},
            {"params": 3, "accuracy": 0.8}]
    assert pareto_front(rows, "params") == [rows[0], rows[2]]


def test_sequence_flops_counts_every_step():
    dense = SequenceClassifier("gru", "rows", hidden_size=16, mean=None, std=None)
    assert sequence_flops(dense) == 28 * 2 * (48 * 28 + 48 * 16) + 2 * 10 * 16
    circ = SequenceClassifier("gru", "rows", hidden_size=16, block_size=8, mean=None, std=None)
    assert 0 < sequence_flops(circ) < sequence_flops(dense)


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="requirement"):
        ExploreSpec(**dict(SPEC, requirement=1.5)).validate()
    with pytest.raises(ConfigError, match="budget_epochs"):
        ExploreSpec(**dict(SPEC, budget_epochs=1)).validate()
    with pytest.raises(ConfigError, match="cells"):
        ExploreSpec(**dict(SPEC, cells=["rnn"])).validate()
    with pytest.raises(ConfigError, match="'lr'"):
        ExploreSpec(**dict(SPEC, lr=0.0)).validate()
    with pytest.raises(ConfigError, match="'max_grad_norm'"):
        ExploreSpec(**dict(SPEC, max_grad_norm=-1.0)).validate()
    with pytest.raises(ConfigError, match="'circulant_gradient'"):
        ExploreSpec(**dict(SPEC, circulant_gradient="median")).validate()
    cfg = tmp_path / "x.json"
    cfg.write_text(json.dumps({"cells": ["gru"], "requirment": 0.5}))
    assert cli.main(["explore", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("settings, lr, bound, averaged", [
    ({}, 0.5, 1.0, True),     # dnr train's recurrent defaults (README: lr 0.5, norm 1) and the "mean" rule
    ({"lr": 0.05, "max_grad_norm": 0.0, "circulant_gradient": "sum"}, 0.05, None, False),  # 0 never clips
    ({"max_grad_norm": 3.0}, 0.5, 3.0, True)])
def test_the_real_trial_trains_at_the_recurrent_defaults_unless_told(monkeypatch, settings, lr, bound, averaged):
    """Every SGD the trial builds gets ``lr``, and every step (2 epochs x 2 steps x 2 cells) clips to ``bound``
    (or not at all) and then averages the block-circulant vectors' gradients (or not)."""
    import torch
    import dnr.explore
    from dnr.explore import RecurrentTrial
    real_sgd, real_clip = torch.optim.SGD, torch.nn.utils.clip_grad_norm_
    real_average = dnr.explore.average_circulant_gradients
    lrs, bounds, calls = [], [], []
    monkeypatch.setattr(torch.optim, "SGD", lambda params, lr, **kw: lrs.append(lr) or real_sgd(params, lr=lr, **kw))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: calls.append("clip") or bounds.append(max_norm)
                        or real_clip(params, max_norm))
    monkeypatch.setattr(dnr.explore, "average_circulant_gradients",
                        lambda model: calls.append("average") or real_average(model))
    spec = ExploreSpec(requirement=0.5, cells=["gru", "lstm"], hidden_sizes=[8], block_sizes=[4], budget_epochs=2,
                       train_size=64, test_size=32, batch_size=32, **settings).validate()
    trial = RecurrentTrial(spec)
    for cell in ("gru", "lstm"):
        accs = list(trial({"cell": cell, "hidden_size": 8, "block_size": 4}))
        assert len(accs) == 2
    assert lrs == [lr, lr]
    assert bounds == ([] if bound is None else [bound] * 8)
    step = (["clip"] if bound is not None else []) + (["average"] if averaged else [])
    assert calls == step * 8


def test_writes_json_markdown_plot_and_refuses_to_overwrite(tmp_path):
    out = str(tmp_path / "ex")
    res = run_explore(ExploreSpec(**SPEC).validate(), out, trial=CurveTrial())
    assert json.load(open(os.path.join(out, "explore.json")))["smallest"] == res["smallest"]
    md = open(os.path.join(out, "explore.md")).read()
    assert f"**Smallest model meeting the requirement:** {res['smallest']}" in md
    assert res["plot"] is None or os.path.isfile(os.path.join(out, "explore.png"))
    with pytest.raises(ConfigError, match="already holds an exploration"):
        run_explore(ExploreSpec(**SPEC).validate(), out, trial=CurveTrial())


def test_real_tiny_exploration_from_the_command_line(tmp_path, capsys):
    """Real training on the embedded subset: a requirement no 2-epoch-sized model reaches, so every
    configuration is stopped at the check epoch (2 of 3) unless its curve rises by > 0.4 per epoch."""
    cfg = tmp_path / "explore.json"
    cfg.write_text(json.dumps({"requirement": 0.99, "cells": ["gru", "lstm"], "hidden_sizes": [8],
                               "block_sizes": [1, 4], "budget_epochs": 3, "check_fraction": 0.5,
                               "train_size": 128, "test_size": 64, "batch_size": 32}))
    out = tmp_path / "ex"
    assert cli.main(["explore", "--config", str(cfg), "--out", str(out), "--threads", "1"]) == 0
    res = json.load(open(out / "explore.json"))
    assert len(res["rows"]) == 4 and res["smallest"] is None
    for r in res["rows"]:
        assert r["epochs"] in (2, 3) and r["stopped"] == (r["epochs"] == 2)
        assert r["stopped"] == (r["bound"] < 0.99)
    printed = capsys.readouterr().out
    assert "explore: 4 configurations" in printed
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("[")] == [
        "[1/4] gru-h8-k1", "[2/4] gru-h8-k4", "[3/4] lstm-h8-k1", "[4/4] lstm-h8-k4"]


class Interrupted(Exception):
    pass


class InterruptedTrial(CurveTrial):
    """CurveTrial that raises when it reaches configuration number ``stop_at`` (1-based), as a killed run."""

    def __init__(self, stop_at):
        super().__init__()
        self.stop_at, self.started = stop_at, 0

    def __call__(self, c):
        self.started += 1
        if self.started == self.stop_at:
            raise Interrupted
        return super().__call__(c)


def test_an_interrupted_exploration_resumes_without_retraining(tmp_path):
    spec = ExploreSpec(**SPEC).validate()
    whole = run_explore(spec, str(tmp_path / "whole"), trial=CurveTrial())
    out = str(tmp_path / "ex")
    with pytest.raises(Interrupted):
        run_explore(spec, out, trial=InterruptedTrial(stop_at=4))
    saved = json.load(open(os.path.join(out, "explore_partial.json")))
    assert [r["name"] for r in saved["rows"]] == ["gru-h32-k1", "gru-h32-k2", "gru-h32-k4"]
    assert not os.path.exists(os.path.join(out, "explore.json"))
    lines = []
    resumed_trial = CurveTrial()
    resumed = run_explore(spec, out, trial=resumed_trial, progress=lines.append)
    # only the five configurations left were trained; the three saved rows were reused
    assert sorted(resumed_trial.trained) == sorted(("gru", c["hidden_size"], c["block_size"])
                                                   for c in spec.configurations()[3:])
    strip = lambda res: [{k: v for k, v in r.items() if k != "seconds"} for r in res["rows"]]  # noqa: E731
    assert strip(resumed) == strip(whole)
    for key in ("pareto_params", "pareto_flops", "smallest", "stopped", "epochs_saved"):
        assert resumed[key] == whole[key], key
    assert lines[0] == "resuming: 3 of 8 configurations already explored"
    assert len(lines) == 6 and lines[1].startswith("[4/8] gru-h32-k8: accuracy ")
    assert "stopped after epoch 4" in lines[1]
    assert not os.path.exists(os.path.join(out, "explore_partial.json"))  # every row is in explore.json now


def test_resuming_with_another_config_is_refused(tmp_path):
    out = str(tmp_path / "ex")
    with pytest.raises(Interrupted):
        run_explore(ExploreSpec(**SPEC).validate(), out, trial=InterruptedTrial(stop_at=2))
    before = open(os.path.join(out, "explore_partial.json")).read()
    other = ExploreSpec(**dict(SPEC, requirement=0.8)).validate()
    with pytest.raises(ConfigError, match=r"interrupted exploration of another config \(keys requirement differ\)"):
        run_explore(other, out, trial=CurveTrial())
    assert open(os.path.join(out, "explore_partial.json")).read() == before  # nothing lost
