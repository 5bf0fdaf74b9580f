"""`dnr eval --autoattack` through the independent torchattacks implementation (when installed)."""

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("torchattacks")
pytestmark = pytest.mark.slow

TINY = ["--train-size", "256", "--test-size", "64", "--batch-size", "64", "--epochs", "2", "--attack-steps", "2",
        "--eval-steps", "2", "--eval-size", "32", "--threads", "2", "--no-progress", "--seed", "1"]


def _dnr(*args):
    proc = subprocess.run([sys.executable, "-m", "dnr", *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_autoattack_is_reported_and_not_above_clean(tmp_path):
    out = str(tmp_path / "run")
    _dnr("train", *TINY, "--out", out)
    res = json.loads(_dnr("eval", out, "--test-size", "8", "--steps", "10", "--autoattack", "--quiet"))
    assert res["n"] == 8
    assert res["autoattack"] is not None
    # robust accuracy under AutoAttack is a fraction of the 8 examples and cannot exceed clean accuracy
    assert res["autoattack"] * 8 == pytest.approx(round(res["autoattack"] * 8))
    assert 0.0 <= res["autoattack"] <= res["clean"]
    assert res["apgd"] is None  # only on request


def test_apgd_is_reported_and_not_above_clean(tmp_path):
    out = str(tmp_path / "run")
    _dnr("train", *TINY, "--out", out)
    res = json.loads(_dnr("eval", out, "--test-size", "16", "--steps", "10", "--apgd", "--quiet"))
    assert res["n"] == 16 and res["autoattack"] is None
    assert res["apgd"] * 16 == pytest.approx(round(res["apgd"] * 16)) and 0.0 <= res["apgd"] <= res["clean"]


def test_an_interrupted_apgd_evaluation_resumes_from_its_resume_dir(tmp_path):
    """`dnr eval --apgd --resume-dir D`, killed once its progress file holds a batch, then run again: the
    result equals an uninterrupted run's, and the progress file is gone."""
    out = str(tmp_path / "run")
    _dnr("train", *TINY, "--out", out)
    args = ["eval", out, "--test-size", "64", "--batch-size", "8", "--no-pgd", "--no-fgsm", "--apgd", "--quiet",
            "--threads", "1"]
    whole = json.loads(_dnr(*args))
    progress_dir = tmp_path / "progress"
    progress = progress_dir / "eval-apgd.partial.pt"
    proc = subprocess.Popen([sys.executable, "-m", "dnr", *args, "--resume-dir", str(progress_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not progress.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert progress.exists(), "no progress file was written"
        proc.kill()  # mid-evaluation (8 batches; the file is written atomically after each)
    finally:
        proc.kill()
        proc.wait()
    resumed = json.loads(_dnr(*args, "--resume-dir", str(progress_dir)))
    assert resumed["apgd"] == whole["apgd"] and resumed["n"] == 64
    assert os.listdir(progress_dir) == []
