"""`dnr compare` / dnr.harness.compare on a tiny grid (embedded Fashion-MNIST subset, 1 epoch, 256 examples):
one real grid run through the CLI, then the files it wrote, the reuse of finished cells, resume, the config
validation and the parallel path."""

import json
import os
import shutil

import numpy as np
import pytest

from dnr import cli
from dnr.harness import compare
from dnr.harness.config import ConfigError
from dnr.harness import RunError

pytestmark = pytest.mark.slow  # one real 6-cell grid (~20-40 s on 2 busy cores)

TRAIN = {"data_root": "embedded", "train_size": 256, "test_size": 64, "epochs": 1, "batch_size": 64,
         "attack_steps": 1, "eval_steps": 2, "eval_every": 0}
EVAL = {"test_size": 64, "pgd_steps": [2, 3], "restarts": 1, "autoattack": False, "sweep_eps": [0.1, 0.3],
        "sweep_steps": 2, "sweep_examples": 32}
SPEC = {"preset": "fashion-mnist-quick", "train": TRAIN, "methods": ["dense-at", "static", "dnr"],
        "modes": ["irregular"], "densities": [0.1], "seeds": [0, 1], "eval": EVAL, "title": "tiny grid"}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One real `dnr compare` run through cli.main: (output folder, stdout, exit code)."""
    base = tmp_path_factory.mktemp("compare")
    cfg = base / "grid.json"
    cfg.write_text(json.dumps(SPEC))
    out = str(base / "out")
    import io
    import contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["compare", "--config", str(cfg), "--out", out, "--threads", "1"])
    return out, buf.getvalue(), code, str(cfg)


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_cli_writes_the_report(grid):
    out, stdout, code, cfg = grid
    assert code == 0
    for name in ("compare.json", "compare.md", "compare_spec.json", "plots/clean_vs_compression.png",
                 "plots/robust_vs_compression.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    keys = ["dense-at-s0", "dense-at-s1", "static-irregular-d0.1-s0", "static-irregular-d0.1-s1",
            "dnr-irregular-d0.1-s0", "dnr-irregular-d0.1-s1"]
    assert sorted(os.listdir(os.path.join(out, "runs"))) == sorted(keys)
    for k in keys:
        assert f"[start] {k}" in stdout and f"] {k}: trained" in stdout
    md = open(os.path.join(out, "compare.md")).read()
    assert md.startswith("# tiny grid")
    assert f"dnr compare --config {cfg} --out {out} --threads 1" in md  # the exact command
    for s in ("## Machine", "cpu_count", "## Settings", "## Irregular sparsity", "PGD-2 | PGD-3 | AutoAttack (n)",
              "## Sanity checks", "## Where DNR wins and where it does not"):
        assert s in md, s
    data = _load(os.path.join(out, "compare.json"))
    assert data["command"] == f"dnr compare --config {cfg} --out {out} --threads 1"
    # dense-at ran at density 1.0 and is the 1x reference
    dense = [c for c in data["cells"] if c["method"] == "dense-at"]
    assert all(c["mode"] is None and c["target_density"] == 1.0 and c["config"]["density"] == 1.0 for c in dense)
    assert "| dense-at (dense) | 1 |" in md


def test_numbers_come_from_the_run_files(grid):
    out = grid[0]
    data = _load(os.path.join(out, "compare.json"))
    assert len(data["cells"]) == 6
    for c in data["cells"]:
        assert c["status"] == "evaluated"
        run_dir = os.path.join(out, "runs", c["key"])
        summary = _load(os.path.join(run_dir, "summary.json"))
        ev = _load(os.path.join(run_dir, "robust_eval.json"))
        config = _load(os.path.join(run_dir, "config.json"))
        assert config == c["config"]
        assert (config["method"], config["seed"]) == (c["method"], c["seed"])
        for k, v in c["summary"].items():
            assert v == summary.get(k), k
        assert (c["density"], c["compression"], c["train_seconds"]) == (
            summary["density"], summary["compression"], summary["train_seconds"])
        assert c["robust_eval"] == ev["result"] and c["eval_settings"] == ev["settings"] and c["model"] == ev["model"]
        assert ev["settings"]["pgd_steps"] == [2, 3] and ev["settings"]["seed"] == c["seed"]
        assert ev["result"]["n"] == 64 and set(ev["result"]["pgd"]) == {"2", "3"}
        assert c["model"]["total_params"] > c["model"]["active_weights"] > 0
    # sparse cells really are sparse, the dense reference is not
    for c in data["cells"]:
        if c["method"] == "dense-at":
            assert c["density"] == 1.0 and c["model"]["active_weights"] == c["model"]["prunable_weights"]
        else:
            assert c["density"] == pytest.approx(0.1, abs=1e-3) and c["compression"] > 9


def test_aggregates_are_numpy_mean_and_std_over_seeds(grid):
    data = _load(os.path.join(grid[0], "compare.json"))
    assert len(data["aggregate"]) == 3
    for g in data["aggregate"]:
        cells = [c for c in data["cells"] if (c["method"], c["mode"], c["target_density"]) ==
                 (g["method"], g["mode"], g["target_density"])]
        assert sorted(c["seed"] for c in cells) == [0, 1] and g["n_evaluated"] == 2
        per = {"clean": [c["robust_eval"]["clean"] for c in cells],
               "fgsm": [c["robust_eval"]["fgsm"] for c in cells],
               "pgd_3": [c["robust_eval"]["pgd"]["3"] for c in cells],
               "density": [c["density"] for c in cells],
               "train_seconds": [c["train_seconds"] for c in cells],
               "flops_effective": [c["model"]["flops_effective"] for c in cells]}
        for name, vals in per.items():
            m = g["metrics"][name]
            assert m["values"] == vals and m["n"] == 2
            assert m["mean"] == pytest.approx(float(np.mean(vals)), abs=1e-12)
            assert m["std"] == pytest.approx(float(np.std(vals, ddof=1)), abs=1e-12)
        assert "autoattack" not in g["metrics"]  # not evaluated: not invented


def test_table_shows_the_aggregates(grid):
    out = grid[0]
    data = _load(os.path.join(out, "compare.json"))
    md = open(os.path.join(out, "compare.md")).read()
    for g in data["aggregate"]:
        m = g["metrics"]["clean"]
        assert f"{100 * m['mean']:.2f} ± {100 * m['std']:.2f} (2 seeds)" in md


def test_wins_section_is_computed(grid):
    out = grid[0]
    data = _load(os.path.join(out, "compare.json"))
    md = open(os.path.join(out, "compare.md")).read()
    section = md.split("## Where DNR wins and where it does not")[1].split("\n## ")[0]
    assert "vs static, clean:" in section and "vs static, PGD-3:" in section
    assert "vs dense-at (dense, 1x), clean:" in section
    by = {g["method"]: g["metrics"] for g in data["aggregate"]}
    for w in data["wins"]:
        key = {"clean": "clean", "PGD-3": "pgd_3"}[w["metric"]]
        a, b = by["dnr"][key], by[w["other"]][key]
        assert w["margin"] == pytest.approx(a["mean"] - b["mean"])
        assert w["combined_std"] == pytest.approx(np.hypot(a["std"], b["std"]))
        assert w["noise"] == ("exceeds seed std" if abs(w["margin"]) > w["combined_std"] else "within seed noise")
        assert w["result"] == ("win" if w["margin"] > 0 else "loss" if w["margin"] < 0 else "tie")
    assert {w["other"] for w in data["wins"]} == {"static", "dense-at"}


def test_rerun_reuses_every_cell(grid, monkeypatch, capsys):
    out, _, _, cfg = grid
    mtimes = {k: (os.path.getmtime(os.path.join(out, "runs", k, "summary.json")),
                  os.path.getmtime(os.path.join(out, "runs", k, "robust_eval.json")))
              for k in os.listdir(os.path.join(out, "runs"))}
    before = _load(os.path.join(out, "compare.json"))

    def no(*a, **k):
        raise AssertionError("must not be called on a rerun")

    import dnr.harness.run as hrun
    monkeypatch.setattr(hrun, "fit", no)
    import dnr.evaluation as ev
    monkeypatch.setattr(ev, "robust_evaluation", no)
    code = cli.main(["compare", "--config", cfg, "--out", out, "--threads", "1"])
    stdout = capsys.readouterr().out
    assert code == 0 and stdout.count(": reused") == 6 and "(reused)" in stdout
    for k, t in mtimes.items():
        assert (os.path.getmtime(os.path.join(out, "runs", k, "summary.json")),
                os.path.getmtime(os.path.join(out, "runs", k, "robust_eval.json"))) == t
    after = _load(os.path.join(out, "compare.json"))
    assert after["cells"] == before["cells"] and after["aggregate"] == before["aggregate"]

    # --report-only rebuilds from the files without training
    os.remove(os.path.join(out, "compare.md"))
    assert cli.main(["compare", "--report-only", out]) == 0
    assert "report:" in capsys.readouterr().out and os.path.isfile(os.path.join(out, "compare.md"))


def test_resume_and_re_evaluation(grid, tmp_path, monkeypatch):
    """A cell with a checkpoint but no summary is resumed; changed eval settings re-evaluate."""
    src = os.path.join(grid[0], "runs", "dnr-irregular-d0.1-s0")
    run_dir = str(tmp_path / "runs" / "dnr-irregular-d0.1-s0")
    shutil.copytree(src, run_dir)
    old_summary = _load(os.path.join(run_dir, "summary.json"))
    os.remove(os.path.join(run_dir, "summary.json"))
    os.remove(os.path.join(run_dir, "model.pt"))
    spec = compare.validate_compare_spec(dict(SPEC, methods=["dnr"], seeds=[0]))
    cell = compare.plan_cells(spec)[0]
    assert compare.cell_state(run_dir, cell["config"]) == "resume"
    task = {"key": cell["key"], "run_dir": run_dir, "config": cell["config"], "eval": spec["eval"], "seed": 0,
            "threads": 1, "worker": False}
    res = compare.run_cell(task)
    assert res["status"] == "resumed" and not res["eval_reused"]  # model.pt changed (re-written): re-evaluated
    new_summary = _load(os.path.join(run_dir, "summary.json"))
    assert new_summary["clean"] == old_summary["clean"] and new_summary["density"] == old_summary["density"]
    assert compare.run_cell(task)["eval_reused"]
    task["eval"] = dict(spec["eval"], restarts=2)
    res = compare.run_cell(task)
    assert res["status"] == "reused" and not res["eval_reused"]
    assert _load(os.path.join(run_dir, "robust_eval.json"))["settings"]["restarts"] == 2
    # a run directory holding a different run is an error, not overwritten
    other = dict(cell["config"], lr=0.01)
    with pytest.raises(RunError, match="different config .*lr"):
        compare.cell_state(run_dir, other)


@pytest.mark.parametrize("change, words", [
    ({"methods": ["dnr", "magic"]}, ["'methods'", "'magic'", "one of"]),
    ({"methods": []}, ["'methods'", "non-empty"]),
    ({"densities": [0.1, 1.5]}, ["'densities'", "1.5", "<= 1"]),
    ({"densities": [0.0]}, ["'densities'", "0.0", "> 0"]),
    ({"densities": [1.0]}, ["method dnr", "density", "1.0"]),
    ({"modes": ["diagonal"]}, ["'modes'", "'diagonal'"]),
    ({"seeds": [0, 0]}, ["'seeds'", "duplicates"]),
    ({"seeds": ["a"]}, ["'seeds'", "'a'", "integer"]),
    ({"colour": "red"}, ["unknown key", "'colour'"]),
    ({"eval": {"pgd_stepz": [3]}}, ["'eval'", "'pgd_stepz'"]),
    ({"eval": {"pgd_steps": [0]}}, ["eval.pgd_steps", "0", ">= 1"]),
    ({"eval": {"autoattack": "yes"}}, ["eval.autoattack", "true or false"]),
    ({"train": {"lr": -1}}, ["method", "--lr", "-1"]),
    ({"train": {"lrr": 1}}, ["'train'", "'lrr'"]),
    ({"train": {"method": "dnr"}}, ["'train'", "method", "grid"]),
    ({"preset": "nope"}, ["'preset'", "'nope'"]),
])
def test_bad_config_fails_before_training(change, words, tmp_path):
    spec = dict(SPEC, **change)
    with pytest.raises(ConfigError) as err:
        compare.run_compare(spec, str(tmp_path / "out"), log=None)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert not os.path.exists(tmp_path / "out")


def test_cli_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps(dict(SPEC, densities=[2])))
    assert cli.main(["compare", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dnr: error: compare config key 'densities'") and "\n" not in err
    assert cli.main(["compare", "--out", str(tmp_path / "o")]) == 2
    assert "--config" in capsys.readouterr().err
    assert cli.main(["compare", "--report-only", str(tmp_path / "nothing")]) == 1
    assert "compare_spec.json" in capsys.readouterr().err
    # flags override the file's lists (validated the same way)
    cfg.write_text(json.dumps(SPEC))
    assert cli.main(["compare", "--config", str(cfg), "--out", str(tmp_path / "o"), "--methods", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err


def test_example_config_is_valid():
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "compare-fashion-mnist.yaml")
    spec = compare.validate_compare_spec(compare.load_compare_config(path))
    cells = compare.plan_cells(spec)
    assert spec["eval"]["sweep_eps"] == [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]
    assert len(cells) == 2 + 5 * 2 * 3 * 2  # dense-at once per seed
    assert all(c["config"]["data_root"] == "/usr/share/datasets/fashion-mnist" for c in cells)


def test_parallel_jobs(grid, tmp_path, capsys):
    """--jobs 2: one cell reused, one trained in a spawned worker; the same numbers as in-process."""
    out = str(tmp_path / "out")
    os.makedirs(os.path.join(out, "runs"))
    shutil.copytree(os.path.join(grid[0], "runs", "dense-at-s0"), os.path.join(out, "runs", "dense-at-s0"))
    code = cli.main(["compare", "--config", grid[3], "--out", out, "--jobs", "2", "--methods", "dense-at"])
    stdout = capsys.readouterr().out
    assert code == 0 and "dense-at-s0: reused" in stdout and "dense-at-s1: trained" in stdout
    mine = _load(os.path.join(out, "runs", "dense-at-s1", "robust_eval.json"))
    ref = _load(os.path.join(grid[0], "runs", "dense-at-s1", "robust_eval.json"))
    assert mine["result"]["clean"] == ref["result"]["clean"] and mine["result"]["pgd"] == ref["result"]["pgd"]


def test_report_without_matplotlib(grid, tmp_path, monkeypatch):
    """A moved output folder still reports; without matplotlib the md and json are written and say so."""
    out = str(tmp_path / "moved")
    shutil.copytree(grid[0], out)
    shutil.rmtree(os.path.join(out, "plots"))

    def no_matplotlib(*a, **k):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(compare, "_plots", no_matplotlib)
    res = compare.write_compare_report(out)
    assert res["plots"] == [] and "matplotlib" in res["note"]
    assert not os.path.exists(os.path.join(out, "plots"))
    md = open(os.path.join(out, "compare.md")).read()
    assert "plots skipped: matplotlib is not installed" in md
    data = _load(os.path.join(out, "compare.json"))
    assert all(c["status"] == "evaluated" and c["run_dir"].startswith(out) for c in data["cells"])
    assert data["aggregate"] == _load(os.path.join(grid[0], "compare.json"))["aggregate"]
