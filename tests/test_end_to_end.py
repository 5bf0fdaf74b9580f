"""Real data end to end: the README's main job (`dnr train`, preset fashion-mnist-quick: DNR at 20x on the
embedded Fashion-MNIST subset) and a static random mask trained in the same budget, their accuracies, and
the claim that DNR's model is the more robust one under a strong attack (APGD-CE + APGD-T from the
independent torchattacks package); and the README's Python example.

The thresholds sit below the accuracies measured with the same commands (README "Results"), by more than
the spread measured across seeds and thread counts (docs/method.md).
"""

import json
import pathlib
import re
import runpy
import subprocess
import sys

import pytest
import torch

import dnr

ROOT = pathlib.Path(__file__).resolve().parents[1]

# measured with `dnr train` / `dnr train --method static` (README "Results")
MEASURED = {"dnr": {"clean": 0.746, "pgd": 0.528}, "static": {"clean": 0.752, "pgd": 0.523}}
# Seeds 0-2 x 1-2 threads moved these by up to 4.5 points (static PGD-20: 48.0-52.5; DNR with its dense-to-sparse
# start: clean 73.6-75.0, PGD-20 50.4-52.8): chaotic runs differ between machines as much as between seeds, so the
# floors sit 6 points below the measured values.
MARGIN = 0.06


def _train(tmp_path, *flags, name="run") -> dict:
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "dnr", "train", "--out", str(out), "--no-progress", *flags],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def main_jobs(tmp_path_factory):
    """The README's first two commands, once for the module: {method: summary}."""
    tmp = tmp_path_factory.mktemp("main-job")
    return {m: _train(tmp, "--method", m, name=m) for m in ("dnr", "static")}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dnr", "static"])
def test_main_job_reaches_measured_accuracy(main_jobs, method):
    result = main_jobs[method]
    prunable = sum(layer["prunable"] for layer in result["layers"] if layer["masked"])
    active = sum(layer["active"] for layer in result["layers"] if layer["masked"])
    assert active == round(0.05 * prunable)  # exact global budget: 20x
    assert result["compression"] == pytest.approx(prunable / active)
    assert result["clean"] >= MEASURED[method]["clean"] - MARGIN
    assert result["pgd"] >= MEASURED[method]["pgd"] - MARGIN
    assert result["pgd"] < result["fgsm"] <= result["clean"] + 0.02  # the attacks bite, PGD hardest


def _strong_attack_accuracy(run_dir, examples) -> float:
    """Accuracy under APGD-CE then APGD-T (DLR, targeted), 50 steps each, from the independent torchattacks
    package: AutoAttack's two gradient attacks, which PGD-20 over-estimates the static mask against."""
    torchattacks = pytest.importorskip("torchattacks")
    from dnr.harness import load_trained_model

    model, cfg, _ = load_trained_model(str(run_dir))
    test = dnr.data.fashion_mnist("test")
    x, y = test.tensors[0][:examples], test.tensors[1][:examples]
    ok = model(x).argmax(1) == y
    for attack in (torchattacks.APGD(model, norm="Linf", eps=cfg.eps, steps=50, n_restarts=1, loss="ce", seed=0),
                   torchattacks.APGDT(model, norm="Linf", eps=cfg.eps, steps=50, n_restarts=1, n_classes=10, seed=0)):
        idx = ok.nonzero().flatten()
        with torch.no_grad():
            ok[idx] = model(attack(x[idx], y[idx])).argmax(1) == y[idx]
    return float(ok.float().mean())


@pytest.mark.slow
def test_dnr_beats_a_static_mask_in_the_main_job(main_jobs):
    """The product's claim, where it is robust: same data, budget, seed and initial mask, and DNR's model is the
    more robust one under a strong attack. Measured on the 1,000 embedded test images (docs/method.md), DNR with
    its default dense-to-sparse start led by 4.7, 8.0 and 9.5 points for seeds 0, 1, 2 (one thread) and by
    5.1 points for seed 0 with two threads: mean 6.8, sample std 2.3. The test asserts any lead, about 2 std
    below the smallest one measured. (PGD-20, the harness's own number, over-states the static mask and shows no
    reliable lead.)"""
    acc = {m: _strong_attack_accuracy(r["run_dir"], 1000) for m, r in main_jobs.items()}
    assert acc["dnr"] > acc["static"], acc


def test_readme_example_is_the_tested_file():
    """The README's Python example is examples/api_example.py, verbatim."""
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "api_example.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert example in blocks


@pytest.mark.slow
def test_readme_example_runs(capsys):
    torch.set_num_threads(2)
    runpy.run_path(str(ROOT / "examples" / "api_example.py"), run_name="__main__")
    out = capsys.readouterr().out
    match = re.search(r"clean ([0-9.]+)  FGSM ([0-9.]+)  PGD-20 ([0-9.]+)  compression ([0-9.]+)x", out)
    assert match, out
    clean, fgsm, pgd, compression = map(float, match.groups())
    assert compression == pytest.approx(20.0, rel=1e-3)
    assert clean > 0.5 and pgd < clean  # learned something, and the attack bites
    assert "moved" in out  # rewiring happened
