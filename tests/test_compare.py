"""`dnr compare` / dnr.harness.compare on a tiny grid (embedded Fashion-MNIST subset, 1 epoch, 256 examples):
one real grid run through the CLI, then the files it wrote, the reuse of finished cells, resume, the config
validation and the parallel path."""

import json
import os
import shutil

import numpy as np
import pytest

from dnr import cli, methods
from dnr.harness import compare
from dnr.harness.compare import report as compare_report
from dnr.harness.config import ConfigError, TrainConfig, resolve_config
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
    planned = _load(os.path.join(out, "compare_spec.json"))["cells"]
    assert [c["run_dir"] for c in planned] == [os.path.join("runs", c["key"]) for c in planned]
    for c in data["cells"]:
        assert c["status"] == "evaluated"
        assert c["run_dir"] == os.path.join("runs", c["key"])  # relative: the folder can move
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
    # a run saved before an option existed (config.json without it) is the same run when the option is at
    # its default, and a different one when it is not
    saved = _load(os.path.join(run_dir, "config.json"))
    assert saved["curriculum"] == "none"
    del saved["curriculum"]
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(saved, f)
    assert compare.cell_state(run_dir, cell["config"]) == "done"
    with pytest.raises(RunError, match=r"different config \(curriculum\)"):
        compare.cell_state(run_dir, dict(cell["config"], curriculum="eps"))
    # a run directory holding a different run is an error, not overwritten
    other = dict(cell["config"], lr=0.01)
    with pytest.raises(RunError, match="different config .*lr"):
        compare.cell_state(run_dir, other)
    # same config, older defaults: a finished cell trained before the method's defaults changed is not reused
    summary_path = os.path.join(run_dir, "summary.json")
    summary = _load(summary_path)
    assert summary["defaults_revision"] == methods.get("dnr").defaults_revision == 1
    for stale in (dict(summary, defaults_revision=0), {k: v for k, v in summary.items() if k != "defaults_revision"}):
        with open(summary_path, "w") as f:
            json.dump(stale, f)
        with pytest.raises(RunError, match=r"revision 0 of method 'dnr'.*this dnr has revision 1.*delete it"):
            compare.cell_state(run_dir, cell["config"])


def test_an_interrupted_cell_evaluation_continues_after_its_last_batch(grid, tmp_path, monkeypatch):
    """A cell killed while it is evaluated keeps the batches it finished (robust_eval.partial.pt) and the next
    run evaluates only the rest, to the result of an uninterrupted evaluation."""
    import dataclasses
    from dnr.harness import builders
    from dnr.harness.compare.runner import EVAL_PROGRESS_FILE

    class Killed(Exception):
        pass

    real = builders.make_test_loader

    def small_batches(kill_at=None):
        def make(cfg, *args, **kwargs):  # 16-example batches: 4 of them
            loader = real(dataclasses.replace(cfg, eval_batch_size=16), *args, **kwargs)
            if kill_at is None:
                return loader
            return (batch if i < kill_at else (_ for _ in ()).throw(Killed()) for i, batch in enumerate(loader))
        return make

    src = os.path.join(grid[0], "runs", "static-irregular-d0.1-s0")
    run_dir = str(tmp_path / "runs" / "static-irregular-d0.1-s0")
    shutil.copytree(src, run_dir)
    eval_path, progress = os.path.join(run_dir, "robust_eval.json"), os.path.join(run_dir, EVAL_PROGRESS_FILE)
    spec = compare.validate_compare_spec(dict(SPEC, methods=["static"], seeds=[0]))
    cell = compare.plan_cells(spec)[0]
    task = {"key": cell["key"], "run_dir": run_dir, "config": cell["config"], "eval": spec["eval"], "seed": 0,
            "threads": 1, "worker": False}
    os.remove(eval_path)
    monkeypatch.setattr(builders, "make_test_loader", small_batches(kill_at=2))
    with pytest.raises(Killed):
        compare.run_cell(task)
    assert not os.path.exists(eval_path) and os.path.exists(progress)
    monkeypatch.setattr(builders, "make_test_loader", small_batches())
    res = compare.run_cell(task)
    assert res["status"] == "reused" and not res["eval_reused"] and not os.path.exists(progress)
    resumed = _load(eval_path)["result"]
    os.remove(eval_path)
    compare.run_cell(task)  # uninterrupted
    whole = _load(eval_path)["result"]
    resumed.pop("seconds"), whole.pop("seconds")
    assert resumed == whole and resumed["n"] == 64



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

    monkeypatch.setattr(compare_report, "draw_plots", no_matplotlib)
    res = compare.write_compare_report(out)
    assert res["plots"] == [] and "matplotlib" in res["note"]
    assert not os.path.exists(os.path.join(out, "plots"))
    md = open(os.path.join(out, "compare.md")).read()
    assert "plots skipped: matplotlib is not installed" in md
    data = _load(os.path.join(out, "compare.json"))
    # read from the moved folder (evaluated), named relative to it
    assert all(c["status"] == "evaluated" and c["run_dir"] == os.path.join("runs", c["key"]) for c in data["cells"])
    assert data["aggregate"] == _load(os.path.join(grid[0], "compare.json"))["aggregate"]


# ---------------------------------------------------------------------------------------- models and grids
def _cfg(**cell):
    """The training config a cell must get: the preset, the shared train block, then the cell's keys."""
    from dnr.harness.config import resolve_config
    return resolve_config("fashion-mnist-quick", None, dict(TRAIN, **cell)).to_dict()


def test_old_single_grid_config_plans_the_same_cells():
    """No models, no grids: the cells (names, order, configs, eval) of the original format, unchanged."""
    spec = compare.validate_compare_spec(SPEC)
    cells = compare.plan_cells(spec)
    expected = [("dense-at-s0", "dense-at", None, 1.0, 0), ("dense-at-s1", "dense-at", None, 1.0, 1),
                ("static-irregular-d0.1-s0", "static", "irregular", 0.1, 0),
                ("static-irregular-d0.1-s1", "static", "irregular", 0.1, 1),
                ("dnr-irregular-d0.1-s0", "dnr", "irregular", 0.1, 0),
                ("dnr-irregular-d0.1-s1", "dnr", "irregular", 0.1, 1)]
    assert [(c["key"], c["method"], c["mode"], c["target_density"], c["seed"]) for c in cells] == expected
    for c in cells:
        assert c["config"] == _cfg(method=c["method"], mode=c["mode"] or "irregular", density=c["target_density"],
                                   seed=c["seed"])
        assert c["model_name"] == "small_cnn" and c["eval"] == spec["eval"]
    assert spec["eval"]["restarts"] == 1 and spec["eval"]["sweep_eps"] == [0.1, 0.3]
    assert spec["grids"] is None and spec["models"] is None


GRIDS = [{"methods": ["dense-at", "dnr"], "modes": ["irregular"], "densities": [0.1], "seeds": [0, 1],
          "eval": {"restarts": 2}},
         {"methods": ["dnr", "static"], "modes": ["channel"], "densities": [0.5], "seeds": [0],
          "train": {"lr": 0.02}}]
MULTI = {"preset": "fashion-mnist-quick", "train": TRAIN, "models": ["small_cnn", "wide_cnn"], "grids": GRIDS,
         "eval": EVAL, "title": "two models"}


def test_plan_of_models_and_grids():
    cells = compare.plan_cells(MULTI)
    got = [(c["key"], c["model_name"], c["method"], c["mode"], c["target_density"], c["seed"], c["grids"])
           for c in cells]
    expected = []
    for m in ("small_cnn", "wide_cnn"):
        expected += [(f"{m}-dense-at-s0", m, "dense-at", None, 1.0, 0, ["grids[0]"]),
                     (f"{m}-dense-at-s1", m, "dense-at", None, 1.0, 1, ["grids[0]"]),
                     (f"{m}-dnr-irregular-d0.1-s0", m, "dnr", "irregular", 0.1, 0, ["grids[0]"]),
                     (f"{m}-dnr-irregular-d0.1-s1", m, "dnr", "irregular", 0.1, 1, ["grids[0]"]),
                     (f"{m}-dnr-channel-d0.5-s0", m, "dnr", "channel", 0.5, 0, ["grids[1]"]),
                     (f"{m}-static-channel-d0.5-s0", m, "static", "channel", 0.5, 0, ["grids[1]"])]
    assert got == expected
    for c in cells:
        in_first = c["grids"] == ["grids[0]"]
        assert c["eval"]["restarts"] == (2 if in_first else 1)  # the grid's eval over the top level's
        assert c["eval"]["pgd_steps"] == [2, 3] and c["eval"]["sweep_eps"] == [0.1, 0.3]
        assert c["config"] == _cfg(model=c["model_name"], method=c["method"], mode=c["mode"] or "irregular",
                                   density=c["target_density"], seed=c["seed"], **({} if in_first else {"lr": 0.02}))
    # one model named: no prefix, so the folders of a single-model config keep their names
    one = compare.plan_cells(dict(MULTI, models=["wide_cnn"]))
    assert [c["key"] for c in one] == [k.split("-", 1)[1] for k, *_ in expected[:6]]
    assert {c["config"]["model"] for c in one} == {"wide_cnn"}


def test_each_models_cells_get_that_models_lr_unless_the_config_sets_one():
    spec = dict(MULTI, models=["small_cnn", "lstm"], grids=None, methods=["dense-at"], seeds=[0], modes=["irregular"],
                densities=[0.1],
                train={k: v for k, v in TRAIN.items() if k != "lr"})
    assert {c["model_name"]: c["config"]["lr"] for c in compare.plan_cells(spec)} == {"small_cnn": 0.05, "lstm": 0.5}
    spec["train"] = dict(spec["train"], lr=0.1)
    assert {c["config"]["lr"] for c in compare.plan_cells(spec)} == {0.1}


def test_grids_take_missing_keys_from_the_top_level_and_merge_equal_cells():
    spec = dict(MULTI, models=None, methods=["dnr"], modes=["irregular"], densities=[0.1], seeds=[0],
                grids=[{"seeds": [0, 1]}, {"densities": [0.1, 0.2]}])
    cells = compare.plan_cells(spec)
    assert [(c["key"], c["grids"]) for c in cells] == [
        ("dnr-irregular-d0.1-s0", ["grids[0]", "grids[1]"]), ("dnr-irregular-d0.1-s1", ["grids[0]"]),
        ("dnr-irregular-d0.2-s0", ["grids[1]"])]


@pytest.mark.parametrize("second, words", [
    ({"eval": {"restarts": 3}}, ["dnr-irregular-d0.1-s0", "grids[0]", "grids[1]", "evaluation settings", "restarts"]),
    ({"train": {"lr": 0.5}}, ["dnr-irregular-d0.1-s0", "grids[0]", "grids[1]", "training configs", "lr"]),
])
def test_a_cell_planned_twice_with_different_settings_is_an_error(second, words, tmp_path):
    grids = [{"methods": ["dnr"], "modes": ["irregular"], "densities": [0.1], "seeds": [0]},
             dict({"methods": ["dnr", "static"], "modes": ["irregular"], "densities": [0.1], "seeds": [0]}, **second)]
    with pytest.raises(ConfigError) as err:
        compare.run_compare(dict(MULTI, models=None, grids=grids), str(tmp_path / "out"), log=None)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("change, words", [
    ({"models": ["small_cnn", "nope"]}, ["'models'", "'nope'", "one of"]),
    ({"models": ["wide_cnn"], "train": dict(TRAIN, model="small_cnn")}, ["'train'", "small_cnn", "models"]),
    ({"grids": []}, ["'grids'", "non-empty"]),
    ({"grids": [{"methods": ["dnr"], "colour": 1}]}, ["'grids[0]'", "'colour'"]),
    ({"grids": [{"modes": ["irregular"]}]}, ["'grids[0].methods'", "missing"]),
    ({"grids": [dict(GRIDS[0], eval={"restarts": 0})]}, ["grids[0].eval.restarts", "0", ">= 1"]),
    ({"grids": [dict(GRIDS[0], train={"seed": 1})]}, ["grids[0].train", "seed", "per cell"]),
    ({"grids": [dict(GRIDS[1], densities=[1.0])]}, ["model small_cnn", "method dnr", "grids[0]", "density"]),
])
def test_bad_models_and_grids_fail_before_training(change, words, tmp_path):
    with pytest.raises(ConfigError) as err:
        compare.run_compare(dict(MULTI, **change), str(tmp_path / "out"), log=None)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert not os.path.exists(tmp_path / "out")


def test_flags_override_every_grid():
    raw = compare.override_lists(MULTI, methods=["dnr"], seeds=[3], models=["wide_cnn"])
    cells = compare.plan_cells(raw)
    # the config lists two models: the cells keep the names the full config gives them
    assert [c["key"] for c in cells] == ["wide_cnn-dnr-irregular-d0.1-s3", "wide_cnn-dnr-channel-d0.5-s3"]
    assert MULTI["grids"][0]["methods"] == ["dense-at", "dnr"]  # the loaded config is not changed


@pytest.fixture(scope="module")
def multi_grid(tmp_path_factory):
    """A real two-model, two-grid run (one seed, 2 x 3 cells) through cli.main."""
    base = tmp_path_factory.mktemp("compare_multi")
    grids = [{"methods": ["dense-at", "dnr"], "modes": ["irregular"], "densities": [0.1], "seeds": [0],
              "eval": {"restarts": 2, "pgd_steps": [2]}},
             {"methods": ["dnr"], "modes": ["channel"], "densities": [0.5], "seeds": [0]}]
    cfg = base / "grid.json"
    cfg.write_text(json.dumps(dict(MULTI, grids=grids)))
    out = str(base / "out")
    assert cli.main(["compare", "--config", str(cfg), "--out", out, "--threads", "1"]) == 0
    return out, str(cfg)


MULTI_KEYS = [f"{m}-{k}" for m in ("small_cnn", "wide_cnn")
              for k in ("dense-at-s0", "dnr-irregular-d0.1-s0", "dnr-channel-d0.5-s0")]


def test_multi_grid_cells_get_their_model_and_their_grids_evaluation(multi_grid):
    out = multi_grid[0]
    assert sorted(os.listdir(os.path.join(out, "runs"))) == sorted(MULTI_KEYS)
    for key in MULTI_KEYS:
        run_dir = os.path.join(out, "runs", key)
        assert _load(os.path.join(run_dir, "config.json"))["model"] == key.split("-")[0]
        settings = _load(os.path.join(run_dir, "robust_eval.json"))["settings"]
        if "channel" in key:  # grids[1]: the top-level eval block
            assert (settings["restarts"], settings["pgd_steps"]) == (1, [2, 3])
        else:  # grids[0]'s own eval block
            assert (settings["restarts"], settings["pgd_steps"]) == (2, [2])
    data = _load(os.path.join(out, "compare.json"))
    assert {c["key"]: c["model_name"] for c in data["cells"]} == {k: k.split("-")[0] for k in MULTI_KEYS}
    assert all(c["status"] == "evaluated" for c in data["cells"])


def test_multi_grid_report_has_a_table_per_model_and_mode_from_the_run_files(multi_grid):
    out = multi_grid[0]
    md = open(os.path.join(out, "compare.md")).read()
    for model in ("small_cnn", "wide_cnn"):
        for mode in ("irregular", "channel"):
            table = md.split(f"## {model}: {mode} sparsity\n")[1].split("\n## ")[0]
            rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
            keys = [f"{model}-dense-at-s0", f"{model}-dnr-{mode}-d{0.1 if mode == 'irregular' else 0.5}-s0"]
            assert len(rows) == 2 and rows[0].startswith("| dense-at (dense) | 1 |") and rows[1].startswith("| dnr |")
            for row, key in zip(rows, keys):  # one seed: mean = the run's own number, std 0, "(1 seed)"
                res = _load(os.path.join(out, "runs", key, "robust_eval.json"))["result"]
                assert f"{100 * res['clean']:.2f} ± 0.00 (1 seed)" in row
                assert f"{100 * res['pgd']['2']:.2f} ± 0.00 (1 seed)" in row
        wins = md.split(f"### {model}\n")[1].split("### ")[0]
        assert "vs dense-at (dense, 1x), clean:" in wins and f"Overall ({model}):" in wins
    data = _load(os.path.join(out, "compare.json"))
    assert {(g["model_name"], g["method"], g["mode"]) for g in data["aggregate"]} == {
        (m, meth, mode) for m in ("small_cnn", "wide_cnn")
        for meth, mode in (("dense-at", None), ("dnr", "irregular"), ("dnr", "channel"))}
    assert {w["model_name"] for w in data["wins"]} == {"small_cnn", "wide_cnn"}
    for w in data["wins"]:  # PGD: the most steps both sides were evaluated with (grids[1] has PGD-3, dense-at not)
        assert w["metric"] in ("clean", "PGD-2")
    for name in ("clean_vs_compression-small_cnn.png", "robust_vs_compression-wide_cnn.png"):
        assert os.path.isfile(os.path.join(out, "plots", name)), name


def test_multi_grid_rerun_reuses_each_cell_with_its_own_evaluation(multi_grid, monkeypatch, capsys):
    out, cfg = multi_grid

    def no(*a, **k):
        raise AssertionError("must not be called on a rerun")

    import dnr.harness.run as hrun
    import dnr.evaluation as ev
    monkeypatch.setattr(hrun, "fit", no)
    monkeypatch.setattr(ev, "robust_evaluation", no)
    assert cli.main(["compare", "--config", cfg, "--out", out, "--threads", "1"]) == 0
    assert capsys.readouterr().out.count(": reused") == len(MULTI_KEYS)


def test_models_flag_on_the_folder_reuses_that_models_cells_and_keeps_its_record(multi_grid, monkeypatch, capsys):
    """--models narrows a two-model config: its cells keep their prefixed names, so they are reused, and the
    folder's compare_spec.json (all six cells) is kept, so the report still shows both models."""
    out, cfg = multi_grid
    spec_path = os.path.join(out, "compare_spec.json")
    before = open(spec_path).read()

    def no(*a, **k):
        raise AssertionError("must not be called: the cells are finished")

    import dnr.harness.run as hrun
    import dnr.evaluation as ev
    monkeypatch.setattr(hrun, "fit", no)
    monkeypatch.setattr(ev, "robust_evaluation", no)
    assert cli.main(["compare", "--config", cfg, "--out", out, "--threads", "1", "--models", "wide_cnn"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count(": reused") == 3 and all(f"] {k}: reused" in stdout for k in MULTI_KEYS[3:])
    assert "keeping its compare_spec.json" in stdout
    assert open(spec_path).read() == before
    assert sorted(os.listdir(os.path.join(out, "runs"))) == sorted(MULTI_KEYS)
    data = _load(os.path.join(out, "compare.json"))
    assert sorted(c["key"] for c in data["cells"]) == sorted(MULTI_KEYS)
    assert all(c["status"] == "evaluated" for c in data["cells"])


@pytest.mark.parametrize("model, same", [("small_cnn", True), ("lstm", False)])
def test_a_cell_saved_before_max_grad_norm_existed_ran_without_clipping(tmp_path, model, same):
    """An older dnr saved no max_grad_norm and never clipped: such a cell equals today's plan where the plan does
    not clip either (a CNN), and is not reused where today's default clips (a recurrent model)."""
    from dnr.harness.compare.runner import cell_state
    config = resolve_config(overrides={"model": model}).to_dict()
    old = {k: v for k, v in config.items() if k != "max_grad_norm"}
    run_dir = tmp_path / "cell"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(old))
    if same:
        assert cell_state(str(run_dir), config) == "restart"  # same config, no checkpoint yet
    else:
        with pytest.raises(RunError, match=r"different config \(max_grad_norm\)"):
            cell_state(str(run_dir), config)
    assert TrainConfig.from_saved(old).max_grad_norm == 0.0  # a resumed or re-read old run does not clip
