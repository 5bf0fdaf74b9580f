"""Exact resume: a `dnr train` process killed with SIGKILL mid-epoch and resumed with --resume ends with
the same weights, masks and metrics as an uninterrupted run (CPU, deterministic mode), and a NaN loss
stops training with the step named while the last checkpoint stays loadable."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import final_model_state, metrics_rows

from dnr.harness import load_checkpoint

# 320 examples / batch 64 = 5 steps per epoch, 3 epochs; checkpoints every 2 steps
TINY = ["--train-size", "320", "--test-size", "64", "--batch-size", "64", "--epochs", "3", "--attack-steps", "2",
        "--eval-steps", "2", "--eval-size", "32", "--threads", "1", "--deterministic", "--checkpoint-every", "2",
        "--no-plots", "--no-progress", "--seed", "3"]


def _env(**extra):
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _train(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "dnr", "train", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=240)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc




@pytest.mark.slow
# admm and rsr: the kill lands in their first phase (ADMM Z/U/rho, RSR noise scales and RNG), the prune
# happens after the resume (end of epoch 2)
# dnr also augments its batches (the batched loader's draws come from the checkpointed data generator)
# cap: --phase-split 0.34 projects at the end of epoch 1 (step 5), so the kill lands in the fine-tuning of the
# projected network and the resume rebuilds its smaller structure (and the optimizer on its parameters);
# cap-robust projects at the end of epoch 2, after the resume
# dnr-sparsify: the dense-to-sparse start ends at step 9 of 15, so the kill (step 8) lands inside it and the resume
# checks the masks against the schedule's targets at step 8
@pytest.mark.parametrize("method, extra", [
    ("dnr", ["--augment"]), ("dnr", ["--sparsify-until", "0.6"]), ("admm", []), ("rsr", []),
    ("cap", ["--cap-flops", "0.5", "--cap-steps", "3", "--cap-calibration", "128", "--phase-split", "0.34"]),
    ("cap-robust", ["--cap-flops", "0.5", "--cap-steps", "2", "--cap-calibration", "128"])],
    ids=["dnr", "dnr-sparsify", "admm", "rsr", "cap", "cap-robust"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, method, extra):
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    _train(*TINY, *extra, "--method", method, "--out", ref)

    # the run sleeps 0.4 s after every step so the kill lands right after the marker of step 8
    # (epoch 2, batch 3 of 5), i.e. in the middle of epoch 2, before the next checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "dnr", "train", *TINY, *extra, "--method", method, "--out", killed],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(DNR_STEP_DELAY=0.4))
    marker = "checkpoint step 8 "
    deadline = time.time() + 200
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(marker):
            proc.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline, "".join(seen)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen) + proc.stderr.read()
    assert not os.path.exists(os.path.join(killed, "model.pt"))
    state = load_checkpoint(killed, kind="train")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 3, 8)  # mid-epoch 2

    out = _train("--resume", killed, "--no-progress")
    assert "resuming" in out.stdout and "batch 3/5" in out.stdout

    a, b = final_model_state(ref), final_model_state(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # weights, masks and BatchNorm statistics, bitwise
    assert any(k.endswith("mask") for k in a) or method not in ("dnr", "static")
    assert metrics_rows(ref) == metrics_rows(killed)
    with open(os.path.join(ref, "summary.json")) as f, open(os.path.join(killed, "summary.json")) as g:
        s_ref, s_res = json.load(f), json.load(g)
    for key in ("clean", "fgsm", "pgd", "density"):
        assert s_ref[key] == s_res[key], key
    log = {"dnr": "rewiring.jsonl", "cap": "projection.jsonl", "cap-robust": "projection.jsonl"}.get(method, "pruning.jsonl")
    with open(os.path.join(ref, log)) as f, open(os.path.join(killed, log)) as g:
        text = f.read()
        assert text and text == g.read()


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    run = str(tmp_path / "nan")
    proc = _train(*TINY, "--lr", "1e12", "--momentum", "0.99", "--out", run, check=False)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dnr: error: training stopped: non-finite loss at optimizer step ")
    step = int(err[0].split("optimizer step ")[1].split()[0])
    assert step > 1
    assert "last good checkpoint: " in err[0]
    state = load_checkpoint(run, kind="train")  # the last good checkpoint loads
    assert state["step"] < step
    assert state["step"] == 2 * ((step - 1) // 2) or state["batch"] == 0  # the newest one before the NaN
