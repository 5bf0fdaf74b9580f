"""The registered methods ``cap`` and ``cap-robust``: dense AT -> cascaded projection -> fine-tuning in the
harness; the saved projected model reloads (resume, eval, export) from its own shapes; bad ranks stop the
run before any work, naming the option and the layer. The bitwise SIGKILL resume is in
tests/test_harness_resume.py."""

import json
import os

import pytest
import torch
from torch import nn

from dnr.harness import ConfigError, fit, load_checkpoint, load_trained_model, resolve_config
from dnr.harness.builders import build_model_for
from dnr.harness.run import load_trained_model as load_model
from dnr.methods.cap import ProjectedNetwork, parse_cap_ranks

TINY = dict(train_size=128, test_size=32, batch_size=64, epochs=2, attack_steps=1, eval_steps=1, eval_size=16,
            threads=1, plots=False, seed=3, cap_steps=2, cap_calibration=64, deterministic=True)


def _cfg(**extra):
    return resolve_config(None, {}, {**TINY, **extra})


@pytest.mark.parametrize("method", ["cap", "cap-robust"])
def test_cap_trains_projects_and_fine_tunes(tmp_path, method):
    cfg = _cfg(method=method, cap_flops=0.5)
    assert cfg.phased and cfg.pre_epochs == 1
    s = fit(cfg, str(tmp_path / "run"), quiet=True, progress=False)
    with open(tmp_path / "run" / "projection.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    assert record["epoch"] == 1 and record["loss_first"] is not None
    assert record["flops"] <= 0.5 * record["flops_dense"]
    model, _, _ = load_trained_model(s["model_path"])
    assert isinstance(model, ProjectedNetwork)
    # each projected conv keeps a BatchNorm on its r channels (defaults revision 1), under the dense norm's name
    norms = {n: m.num_features for n, m in model.net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    conv_ranks = {k: r for k, r in record["ranks"].items() if k.startswith("features.")}
    assert conv_ranks and norms == {f"features.{int(k.split('.')[1]) + 1}": r for k, r in conv_ranks.items()}
    # the saved model is the predicted size, and the summary reports it against the dense model
    assert sum(p.numel() for p in model.parameters()) == record["params"]
    assert s["density"] == pytest.approx(record["params"] / record["params_dense"], rel=1e-12)
    assert s["flops_effective"] == record["flops"] and s["flops_dense"] == record["flops_dense"]
    assert model.net.get_submodule("features.0").out_channels == record["ranks"]["features.0"]
    with open(tmp_path / "run" / "metrics.jsonl") as f:  # projected at epoch 1's end, before its row
        assert [json.loads(line)["density"] for line in f] == [pytest.approx(s["density"], rel=1e-12)] * 2


def test_a_checkpoint_after_the_projection_reloads_into_the_smaller_structure(tmp_path):
    cfg = _cfg(method="cap", cap_ranks=["features.0=5", "classifier.1=40"], epochs=3)
    fit(cfg, str(tmp_path / "run"), quiet=True, progress=False)
    state = load_checkpoint(str(tmp_path / "run"), kind="train")
    model, _, _ = load_model(os.path.join(tmp_path, "run", "checkpoints", "last.pt"))
    torch.testing.assert_close(model.state_dict(), state["model"])
    assert model.net.get_submodule("features.4").in_channels == 5
    assert model.net.get_submodule("classifier.3").in_features == 40
    assert model.net.get_submodule("features.1").num_features == 5  # features.0's norm, kept on its 5 channels
    # a dense model of the same config does not load it: restructure is what makes it fit
    with pytest.raises(RuntimeError):
        build_model_for(cfg).load_state_dict(state["model"])


def test_a_revision_0_model_with_its_norms_folded_still_reloads(tmp_path):
    """Runs saved before defaults revision 1 hold the projected network without BatchNorms on the projected
    channels; restructure rebuilds that form from the state dict's keys."""
    from dnr.compress import build_projected, find_projection_spaces
    from dnr.methods import create

    cfg = _cfg(method="cap", cap_ranks=["features.0=5"])
    model = build_model_for(cfg)  # the method's ProjectedNetwork around the dense small_cnn
    assert isinstance(model, ProjectedNetwork)
    plan = find_projection_spaces(model.net.eval(), torch.zeros(1, 1, 28, 28))
    folded = build_projected(plan, {"features.0": torch.eye(16, 5)})
    state = {f"net.{k}": v for k, v in folded.state_dict().items()}
    assert "net.features.1.running_mean" not in state and state["net.features.0.weight"].shape[0] == 5
    create(cfg).restructure(model, state, input_size=(1, 28, 28))
    model.load_state_dict(state)  # strict
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(model.eval()(x), folded(x))


@pytest.mark.parametrize("extra,match", [
    (dict(cap_ranks=["features.0=99"]), "option --cap-ranks: layer 'features.0': rank 99 is invalid, expected an "
                                        "integer in \\[1, 16\\]"),
    (dict(cap_ranks=["classifier.3=4"]), "option --cap-ranks: layer 'classifier.3'.*network's output"),
    (dict(cap_ranks=["features.0"]), "option --cap-ranks: got 'features.0', expected LAYER=RANK"),
    (dict(cap_flops=1e-4), "option --cap-flops: flop_ratio: got 0.0001, but projecting every projectable space "
                           "to rank 1 keeps"),
    (dict(cap_flops=1.5), "option --cap-flops: got 1.5, expected a number in \\(0, 1\\]"),
    (dict(cap_steps=-1), "option --cap-steps: got -1"),
    (dict(epochs=1), "option --epochs: got 1, expected at least 2 for --method cap"),
])
def test_bad_cap_options_stop_before_any_work(tmp_path, extra, match):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        fit(_cfg(method="cap", **extra), str(out), quiet=True, progress=False)
    assert not out.exists()


def test_parse_cap_ranks():
    assert parse_cap_ranks(["a.0=3", "b=12"]) == {"a.0": 3, "b": 12}
    assert parse_cap_ranks(None) == {}
    with pytest.raises(ValueError, match="layer 'a' is given twice"):
        parse_cap_ranks(["a=1", "a=2"])
    with pytest.raises(ValueError, match="expected LAYER=RANK"):
        parse_cap_ranks(["a=x"])


def test_the_cap_report_configs_plan_a_cell_per_flop_fraction():
    """dnr compare: cap's densities are its FLOP fractions (density_axis), dense-at stays one reference cell."""
    from dnr.harness import compare

    root = os.path.join(os.path.dirname(__file__), "..", "docs", "cap")
    for name in ("compare-cap.yaml", "smoke.yaml"):
        spec = compare.validate_compare_spec(compare.load_compare_config(os.path.join(root, name)))
        cells = compare.plan_cells(spec)
        keys = {c["key"] for c in cells}
        for model in ("small_cnn", "vgg_cnn"):
            for method in ("cap", "cap-robust"):
                for d in (0.5, 0.25):
                    assert f"{model}-{method}-irregular-d{d:g}-s0" in keys, name
            assert f"{model}-dense-at-s0" in keys
        cap = [c for c in cells if c["method"] == "cap"]
        assert {c["config"]["density"] for c in cap} == {0.5, 0.25}


def test_the_finetune_probe_fine_tunes_the_dense_folded_and_kept_forms(tmp_path):
    """docs/cap/finetune_probe.py on a tiny dense-at run: three forms, the requested steps, finite records; the
    dense model it reads is left as it was."""
    from conftest import load_script

    s = fit(_cfg(method="dense-at", epochs=1), str(tmp_path / "dense"), quiet=True, progress=False)
    before = {k: v.clone() for k, v in load_trained_model(s["model_path"])[0].state_dict().items()}
    probe = load_script("docs/cap/finetune_probe.py")
    out = tmp_path / "probe.json"
    assert probe.main([s["model_path"], "--method", "cap", "--density", "0.5", "--steps", "3", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["method"] == "cap" and rec["lr"] > 0 and set(rec["forms"]) == {"dense", "folded", "kept"}
    for rows in rec["forms"].values():
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in rows)
    # the projected forms start from the same function, the dense one from the model itself (not projected)
    assert rec["forms"]["folded"][0]["loss"] != rec["forms"]["dense"][0]["loss"]
    after = load_trained_model(s["model_path"])[0].state_dict()
    torch.testing.assert_close(after, before)
    assert rec["warmup"] == 0 and all(r["lr"] == rec["lr"] for rows in rec["forms"].values() for r in rows)
    # a warm-up ramps each form's learning rate linearly to the peak, then holds it
    warm = tmp_path / "warm.json"
    assert probe.main([s["model_path"], "--method", "cap", "--density", "0.5", "--steps", "3", "--warmup", "2",
                       "--out", str(warm)]) == 0
    wrec = json.loads(warm.read_text())
    assert wrec["warmup"] == 2
    for rows in wrec["forms"].values():
        assert [r["lr"] for r in rows] == pytest.approx([rec["lr"] / 2, rec["lr"], rec["lr"]])
    # the same batches and random state: the first step (its loss is computed before the update) is unchanged
    assert wrec["forms"]["kept"][0]["loss"] == pytest.approx(rec["forms"]["kept"][0]["loss"])
    for bad in (["--steps", "0"], ["--warmup", "-1"], ["--out", str(out)]):  # refused before any work
        with pytest.raises(SystemExit):
            probe.main([s["model_path"], *bad])
    assert json.loads(out.read_text()) == rec
