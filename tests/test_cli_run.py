"""`dnr train / eval / report / info` end to end on the embedded Fashion-MNIST subset (tiny budgets): one real
training run, then the files it wrote, the numbers it printed and the commands that read it."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from dnr import cli
from dnr.harness import load_checkpoint, load_trained_model
from dnr.harness.config import TrainConfig
from test_cli import _one_line_error

pytestmark = pytest.mark.slow  # one real training run and two more processes (~30-60 s on 2 busy cores)

TINY = ["--train-size", "256", "--test-size", "64", "--batch-size", "64", "--epochs", "2", "--attack-steps", "1",
        "--eval-steps", "2", "--eval-size", "32", "--threads", "1", "--no-progress", "--seed", "1"]


def _dnr(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "dnr", *args], capture_output=True, text=True, timeout=240)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real `python -m dnr train` run: (run directory, its stdout)."""
    out = str(tmp_path_factory.mktemp("cli") / "run")
    proc = _dnr("train", *TINY, "--out", out)
    return out, proc.stdout


def _main(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_writes_the_run_directory(run):
    out, stdout = run
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "rewiring.jsonl", "model.pt", "summary.json",
                 "checkpoints/last.pt"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "config.json")) as f:
        cfg = TrainConfig(**json.load(f)).validate()
    assert (cfg.epochs, cfg.train_size, cfg.batch_size, cfg.method, cfg.density) == (2, 256, 64, "dnr", 0.05)
    assert "resolved config (preset fashion-mnist-quick):" in stdout and "  train_size: 256" in stdout

    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [4, 8]
    for r in rows:
        assert 0 <= r["test_clean_acc"] <= 1 and 0 <= r["test_pgd_acc"] <= 1 and r["loss"] > 0
        assert r["images_per_s"] > 0 and 0 < r["prune_rate"] < 0.5 and abs(r["density"] - 0.05) < 1e-3
    with open(os.path.join(out, "metrics.csv")) as f:
        csv_rows = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in csv_rows] == pytest.approx([r["loss"] for r in rows])
    assert {"density", "prune_rate", "seconds", "images_per_s", "test_pgd_acc", "lr"} <= set(csv_rows[0])

    history = [json.loads(line) for line in open(os.path.join(out, "rewiring.jsonl"))]
    # the default cadence: every round(0.75 * 8 / 20) -> 1 step before the horizon 0.75 * 8 = 6, after the
    # dense-to-sparse start, whose pruning steps end at round(0.25 * 8) = 2
    assert [(r["step"], r.get("event")) for r in history] == [(1, "sparsify"), (2, "sparsify"), (3, None), (4, None),
                                                              (5, None)]
    rewires = history[2:]
    assert all(r["pruned"] == r["regrown"] > 0 for r in rewires)
    assert [r["rewired_weights"] for r in rows] == [sum(r["pruned"] for r in rewires[:2]), rewires[2]["pruned"]]
    state = load_checkpoint(out, kind="train")
    assert (state["epoch"], state["batch"], state["step"]) == (2, 0, 8)


def test_printed_summary_matches_summary_json(run):
    out, stdout = run
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)

    def pct(label):
        return float(re.search(rf"^{re.escape(label)}.*?\s([\d.]+)%$", stdout, re.M).group(1)) / 100

    assert pct("clean accuracy") == pytest.approx(s["clean"], abs=5e-5)
    assert pct("FGSM accuracy (eps 0.1)") == pytest.approx(s["fgsm"], abs=5e-5)
    assert pct("PGD-2 accuracy (eps 0.1)") == pytest.approx(s["pgd"], abs=5e-5)
    assert re.search(r"^density\s+0\.0500 \(20\.0x compression\)$", stdout, re.M)
    assert f"{s['flops_dense']:,} -> {s['flops_effective']:,}" in stdout
    assert s["test_examples"] == 64 and s["flops_effective"] < s["flops_dense"]
    if s.get("plots"):
        assert f"plots: {os.path.join(out, 'plots')}" in stdout


def test_eval_reproduces_the_final_evaluation_and_clean_accuracy(run):
    out, _ = run
    res = json.loads(_dnr("eval", os.path.join(out, "model.pt"), "--quiet").stdout)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert (res["clean"], res["fgsm"], res["pgd"], res["n"]) == (s["clean"], s["fgsm"], s["pgd"], 64)
    # independent oracle for the clean accuracy: a plain loop over the test images
    import dnr
    model, cfg, _ = load_trained_model(os.path.join(out, "model.pt"))
    test = dnr.data.fashion_mnist("test")
    x, y = test.tensors[0][:64], test.tensors[1][:64]
    with torch.no_grad():
        assert res["clean"] == (model(x).argmax(1) == y).float().mean().item()
    assert res["autoattack"] is None and res["density"] == pytest.approx(0.05, abs=1e-3)


def test_eval_options_and_json_file(run, capsys, tmp_path):
    out, _ = run
    code, stdout, _ = _main(capsys, "eval", out, "--test-size", "16", "--steps", "1", "--no-fgsm", "--restarts", "2",
                            "--eps", "0", "--out", str(tmp_path / "e.json"), "--quiet")
    res = json.loads(stdout)
    assert code == 0 and res["n"] == 16 and res["fgsm"] is None and res["pgd_restarts"] == 2
    assert res["pgd"] == res["clean"]  # eps 0: PGD cannot change the input
    assert json.load(open(tmp_path / "e.json")) == res


def test_eval_threads(run, capsys, tmp_path):
    out, _ = run
    before = torch.get_num_threads()
    try:
        code, stdout, _ = _main(capsys, "eval", out, "--test-size", "8", "--steps", "1", "--threads", "1", "--quiet")
        assert code == 0 and json.loads(stdout)["n"] == 8 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    code, _, err = _main(capsys, "eval", out, "--threads", "0", "--out", str(tmp_path / "e.json"))
    assert code == 2 and "option --threads: got 0" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "e.json")


def test_eval_resume_dir_that_is_a_file_is_refused_before_loading(run, capsys, tmp_path, monkeypatch):
    out, _ = run
    blocker = tmp_path / "progress"
    blocker.write_text("not a folder")
    monkeypatch.setattr(cli.hrun, "load_trained_model", lambda *a, **k: pytest.fail("loaded before the error"))
    code, _, err = _main(capsys, "eval", out, "--apgd", "--resume-dir", str(blocker))
    assert code == 2 and err.count("\n") == 1, err
    assert "option --resume-dir" in err and "is a regular file, expected a folder" in err
    assert blocker.read_text() == "not a folder"


def test_eval_autoattack_needs_torchattacks(run, capsys):
    out, _ = run
    try:
        import torchattacks  # noqa: F401
        pytest.skip("torchattacks is installed")
    except ImportError:
        pass
    code, _, err = _main(capsys, "eval", out, "--test-size", "8", "--autoattack", "--quiet", "--no-pgd", "--no-fgsm")
    assert code == 2 and err.strip().count("\n") == 0 and "pip install torchattacks" in err


def test_info_prints_the_density_report(run, capsys):
    out, _ = run
    code, stdout, _ = _main(capsys, "info", os.path.join(out, "model.pt"))
    assert code == 0 and "compression 20.0x" in stdout and "features.0" in stdout and "FLOPs per example" in stdout
    code, stdout, _ = _main(capsys, "info", out, "--json")  # a run directory: its final model
    info = json.loads(stdout)
    assert info["kind"] == "model" and info["density"] == pytest.approx(0.05, abs=1e-3)
    assert sum(l["active"] for l in info["layers"]) == info["active"]
    code, stdout, _ = _main(capsys, "info", os.path.join(out, "checkpoints", "last.pt"))
    assert code == 0 and "(train, end of epoch 2/2, step 8)" in stdout  # as the training log counts


def test_report_writes_markdown_and_plots(run, capsys, tmp_path):
    out, _ = run
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("plots", "report.md"))
    code, stdout, _ = _main(capsys, "report", copy)
    assert code == 0
    text = open(os.path.join(copy, "report.md")).read()
    assert "## Final evaluation" in text and "## Per epoch" in text and "features.0" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped: matplotlib is not installed" in stdout
        return
    for name in ("accuracy.png", "layer_density.png", "final_density.png"):
        with open(os.path.join(copy, "plots", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        assert f"plots/{name}" in text


def test_existing_run_directory_is_not_overwritten(run, capsys):
    out, _ = run
    before = open(os.path.join(out, "config.json")).read()
    code, _, err = _main(capsys, "train", "--out", out)
    _one_line_error(code, err, 1, "already holds a run", "--resume")
    assert open(os.path.join(out, "config.json")).read() == before


def test_resume_refuses_config_changes(run, capsys):
    out, _ = run
    code, _, err = _main(capsys, "train", "--resume", out, "--lr", "0.5")
    _one_line_error(code, err, 2, "--lr")


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_checkpoint_is_one_line_error(run, capsys, tmp_path, damage):
    out, _ = run
    data = open(os.path.join(out, "model.pt"), "rb").read()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\0" * 64 + data[64:])
    for command in ("eval", "info"):
        code, _, err = _main(capsys, command, str(bad))
        _one_line_error(code, err, 1, "truncated or corrupt", str(bad))


def test_checkpoint_of_another_architecture_is_one_line_error(run, capsys, tmp_path):
    out, _ = run
    state = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    state["config"]["model"] = "resnet18"  # the weights are a small_cnn's
    torch.save(state, tmp_path / "other.pt")
    code, _, err = _main(capsys, "info", str(tmp_path / "other.pt"))
    _one_line_error(code, err, 1, "'resnet18' model", "does not fit")

