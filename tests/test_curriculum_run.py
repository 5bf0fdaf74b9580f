"""SAT curriculum through the harness: a run interrupted mid-ramp and resumed is bitwise the uninterrupted
run (CPU, deterministic); the run's files log lambda_t, the effective eps and lambda_max and its report
plots them; ``dnr train --curriculum`` and ``dnr analyze hessian`` from the command line."""

import json
import os

import pytest
import torch

from conftest import metrics_rows

from dnr import cli
from dnr.harness import callbacks, fit, load_checkpoint
from dnr.harness.config import resolve_config

# 320 examples / batch 64 = 5 steps per epoch, 2 epochs; the ramp spans the whole run, so a stop at step 4
# lands mid-ramp
TINY = dict(train_size=320, test_size=64, batch_size=64, epochs=2, attack_steps=2, eval_steps=2, eval_size=32,
            threads=1, deterministic=True, checkpoint_every=3, plots=False, seed=3, curriculum_ramp=1.0)
SCHEDULES = {
    "eps": dict(curriculum="eps", curriculum_shape="cosine"),
    "p-sat": dict(curriculum="p-sat", curriculum_prob=0.9),
    "h-sat": dict(curriculum="h-sat", curriculum_every=2, curriculum_iters=3),
}



class _Stop(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_resume_mid_ramp_is_bitwise_the_uninterrupted_run(tmp_path, monkeypatch, name):
    cfg = dict(TINY, **SCHEDULES[name])
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    fit(resolve_config(overrides=cfg), ref, quiet=True, progress=False)

    def stop_at_step_5(self, run, stats):  # StepDelay runs before the step's checkpoint: last one is step 3
        if run.step == 5:
            raise _Stop

    with monkeypatch.context() as m:
        m.setattr(callbacks.StepDelay, "on_batch_end", stop_at_step_5)
        with pytest.raises(_Stop):
            fit(resolve_config(overrides=cfg), cut, quiet=True, progress=False)
    state = load_checkpoint(cut, kind="train")
    assert state["step"] == 3 and state["curriculum"]["step"] == 3
    fit(None, None, resume=cut, quiet=True, progress=False)

    a = load_checkpoint(os.path.join(ref, "model.pt"), kind="model")["model"]
    b = load_checkpoint(os.path.join(cut, "model.pt"), kind="model")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_rows(ref) == metrics_rows(cut)
    lams = [r["curriculum_lambda"] for r in metrics_rows(ref)]
    assert 0 < lams[0] < 1 and lams[0] <= lams[1]
    if name == "h-sat":
        logs = [open(os.path.join(d, "curriculum.jsonl")).read() for d in (ref, cut)]
        assert logs[0] == logs[1] and len(logs[0].splitlines()) == 5  # steps 0, 2, 4, 6, 8


@pytest.fixture(scope="module")
def hsat_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sat") / "run")
    code = cli.main(["train", "--train-size", "320", "--test-size", "64", "--batch-size", "64", "--epochs", "2",
                     "--attack-steps", "2", "--eval-steps", "2", "--eval-size", "32", "--threads", "1",
                     "--no-progress", "--quiet", "--curriculum", "h-sat", "--curriculum-every", "2",
                     "--curriculum-iters", "3", "--curriculum-ramp", "1", "--out", out])
    assert code == 0
    return out


def test_run_files_log_the_curriculum_and_the_report_plots_it(hsat_run):
    rows = [json.loads(line) for line in open(os.path.join(hsat_run, "metrics.jsonl"))]
    meas = [json.loads(line) for line in open(os.path.join(hsat_run, "curriculum.jsonl"))]
    assert [m["step"] for m in meas] == [0, 2, 4, 6, 8]
    for r in rows:
        assert set(r) >= {"curriculum_lambda", "curriculum_eps", "effective_eps", "hessian_lambda_max"}
        assert r["curriculum_eps"] == pytest.approx(0.1 * r["curriculum_lambda"])
        assert 0 <= r["effective_eps"] <= 0.1 + 1e-6
    # each epoch's last measurement (steps 4 and 8), and the lambda of its last step (9: after step 8's decision)
    assert rows[0]["hessian_lambda_max"] == meas[2]["lambda_max"]
    assert rows[1]["hessian_lambda_max"] == meas[4]["lambda_max"]
    assert rows[1]["curriculum_lambda"] == meas[4]["lambda_next"]
    assert os.path.isfile(os.path.join(hsat_run, "plots", "curriculum.png"))
    report = open(os.path.join(hsat_run, "report.md")).read()
    assert "## Curriculum: h-sat" in report and "curriculum.png" in report
    header = open(os.path.join(hsat_run, "metrics.csv")).readline()
    assert "curriculum_lambda" in header and "hessian_lambda_max" in header


def test_analyze_hessian_prints_clean_and_adversarial_lambda_max(hsat_run, capsys):
    assert cli.main(["analyze", "hessian", hsat_run, "--examples", "32", "--iters", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["examples"] == 32 and res["eps"] == 0.1
    assert res["clean"] > 0 and res["adversarial"] > 0
    assert cli.main(["analyze", "hessian", hsat_run, "--examples", "32", "--iters", "5"]) == 0
    text = capsys.readouterr().out
    assert f"clean loss        {res['clean']:.6g}" in text  # seeded: the same numbers again
    assert f"adversarial loss  {res['adversarial']:.6g}" in text


@pytest.mark.parametrize("argv, match", [
    (["--iters", "0"], "option --iters: got 0"), (["--examples", "-3"], "option --examples: got -3"),
    (["--split", "val"], "option --split: got 'val'"), (["--eps", "-1"], "option --eps: got -1.0"),
    (["--threads", "0"], "option --threads: got 0"),
])
def test_analyze_hessian_bad_options(hsat_run, capsys, argv, match):
    assert cli.main(["analyze", "hessian", hsat_run, *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, match", [
    (["--curriculum", "q-sat"], "invalid choice: 'q-sat'"),
    (["--curriculum", "eps", "--curriculum-ramp", "0"], "option --curriculum-ramp: got 0.0"),
    (["--curriculum", "h-sat", "--curriculum-threshold", "-1"], "option --curriculum-threshold: got -1.0"),
])
def test_train_bad_curriculum_flags(tmp_path, capsys, argv, match):
    out = str(tmp_path / "never")
    with pytest.raises(SystemExit) if "q-sat" in argv else _nothing():
        assert cli.main(["train", *argv, "--out", out]) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(out)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
