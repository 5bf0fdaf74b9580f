"""Real data end to end: the README's main job (`dnr train`, preset fashion-mnist-quick: DNR at 20x
on the embedded Fashion-MNIST subset) and a static random mask trained in the same budget; and the
same comparison on the full Fashion-MNIST files (Debian's dataset-fashion-mnist), in the setting of
the reproduction report's grid (docs/fashion-mnist/), where DNR beats the static mask.

The thresholds sit a few points below the accuracies measured with the same commands (README,
"Results"; docs/fashion-mnist/compare.json).
"""

import json
import pathlib
import re
import runpy
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# measured with `dnr train` / `dnr train --method static` (README "Results")
MEASURED = {"dnr": {"clean": 0.737, "pgd": 0.451}, "static": {"clean": 0.747, "pgd": 0.525}}
MARGIN = 0.04


def _train(tmp_path, *flags, name="run") -> dict:
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "dnr", "train", "--out", str(out), "--no-progress", *flags],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dnr", "static"])
def test_main_job_reaches_measured_accuracy(tmp_path, method):
    result = _train(tmp_path, "--method", method)
    prunable = sum(layer["prunable"] for layer in result["layers"] if layer["masked"])
    active = sum(layer["active"] for layer in result["layers"] if layer["masked"])
    assert active == round(0.05 * prunable)  # exact global budget: 20x
    assert result["compression"] == pytest.approx(prunable / active)
    assert result["clean"] >= MEASURED[method]["clean"] - MARGIN
    assert result["pgd"] >= MEASURED[method]["pgd"] - MARGIN
    assert result["pgd"] < result["fgsm"] <= result["clean"] + 0.02  # the attacks bite, PGD hardest


FULL_DATA = pathlib.Path("/usr/share/datasets/fashion-mnist")
# the report grid's cells {dnr, static}-irregular-d0.05-s0 (configs/compare-fashion-mnist.yaml): the first
# 4,000 training images, PGD-7 adversarial training for 4 epochs, PGD-20 on the first 500 test images
GRID_CELL = ["--data-root", str(FULL_DATA), "--train-size", "4000", "--test-size", "500", "--epochs", "4",
             "--attack-steps", "7", "--alpha", "0.025", "--eps", "0.1", "--eval-every", "0", "--density", "0.05",
             "--seed", "0", "--threads", "1", "--no-plots"]
MEASURED_FULL = {"dnr": {"clean": 0.748, "pgd": 0.492}, "static": {"clean": 0.728, "pgd": 0.468}}


@pytest.mark.slow
@pytest.mark.skipif(not (FULL_DATA / "train-images-idx3-ubyte.gz").is_file(),
                    reason="needs the full Fashion-MNIST files (apt install dataset-fashion-mnist)")
def test_dnr_beats_a_static_mask_in_the_report_setting(tmp_path):
    res = {m: _train(tmp_path, *GRID_CELL, "--method", m, name=m) for m in ("dnr", "static")}
    for method, r in res.items():
        assert r["density"] == pytest.approx(0.05, abs=1e-4)
        assert r["clean"] >= MEASURED_FULL[method]["clean"] - MARGIN
        assert r["pgd"] >= MEASURED_FULL[method]["pgd"] - MARGIN
    # same data, budget, seed and initial mask: rewiring gives the better sparse model
    assert res["dnr"]["clean"] > res["static"]["clean"]
    assert res["dnr"]["pgd"] > res["static"]["pgd"]


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
