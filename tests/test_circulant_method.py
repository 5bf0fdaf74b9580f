"""The ``circulant`` compression method: training through ``fit`` and ``dnr train``, checkpoints that hold only
the defining vectors, an exact resume, clear errors for block sizes that do not fit, and the exports
(compact round trip bit-exact, ONNX in the form the card names)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import assert_same_final_model

import dnr.methods as methods
from dnr import cli
from dnr.export import load_compact, run_onnx
from dnr.export.cli import run_export
from dnr.harness import fit, load_checkpoint, resolve_config
from dnr.harness.config import PRESETS
from dnr.harness.run import load_trained_model
from dnr.nn.block_circulant import BlockCirculantConv2d, BlockCirculantLinear, circulant_layers

TINY = dict(method="circulant", block_size=4, train_size=128, test_size=32, batch_size=64, epochs=2, attack_steps=1,
            eval_steps=1, eval_size=16, threads=1, plots=False, seed=3, deterministic=True, checkpoint_every=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny circulant run (2 epochs x 2 steps, a checkpoint after every step), shared by the tests."""
    out = str(tmp_path_factory.mktemp("circ") / "run")
    summary = fit(resolve_config(None, {}, TINY), out, quiet=True, progress=False)
    return summary


def test_registered_with_presets():
    cls = methods.get("circulant")
    assert not cls.sparse and cls.adversarial and cls.export_formats == ("compact", "onnx")
    for name, model in (("fashion-mnist-circulant", "small_cnn"), ("cifar10-vgg16-circulant", "vgg16"),
                        ("cifar10-resnet18-circulant", "resnet18")):
        cfg = resolve_config(name, {}, {})
        assert (cfg.method, cfg.model) == ("circulant", model) and cfg.block_size >= 2


def test_trains_through_fit_and_stores_only_the_vectors(trained):
    s = trained
    assert s["method"] == "circulant"
    assert s["compression"] == pytest.approx(98192 / 24720)  # small_cnn at k = 4: the first conv has 1 input
    assert s["flops_dense"] == 3988480 and 0 < s["flops_effective"] < s["flops_dense"]
    state = load_checkpoint(s["model_path"])["model"]
    converted = ["features.0", "features.4", "features.8", "classifier.1", "classifier.3"]
    for name in converted:
        assert name + ".vectors" in state and name + ".weight" not in state
    assert tuple(state["features.4.vectors"].shape) == (8, 4, 4, 3, 3)
    stored = sum(state[n + ".vectors"].numel() for n in converted)
    assert stored == 24720  # the dense layers hold 98,192 weights
    model, cfg, _ = load_trained_model(s["model_path"])
    assert len(circulant_layers(model)) == 5 and cfg.block_size == 4
    with open(os.path.join(s["run_dir"], "metrics.jsonl")) as f:  # the rows' density is the stored fraction
        rows = [json.loads(line) for line in f]
    assert [r["density"] for r in rows] == [pytest.approx(24720 / 98192)] * 2


def test_resume_from_a_checkpoint_is_bitwise_identical(trained, tmp_path):
    """The run is continued from its checkpoint after step 3 (epoch 2, batch 1) and must end bitwise equal."""
    ref = trained["run_dir"]
    resumed = tmp_path / "resumed"
    os.makedirs(resumed / "checkpoints")
    shutil.copy(os.path.join(ref, "config.json"), resumed / "config.json")
    shutil.copy(os.path.join(ref, "checkpoints", "previous.pt"), resumed / "checkpoints" / "last.pt")
    assert load_checkpoint(str(resumed), kind="train")["step"] == 3
    fit(None, None, resume=str(resumed), quiet=True, progress=False)
    assert_same_final_model(ref, str(resumed))


def test_bad_block_sizes_are_one_line_errors_before_any_file(tmp_path, capsys):
    for value, expected in (("0", "option --block-size: got 0, expected an integer >= 1"),
                            ("-2", "option --block-size: got -2, expected an integer >= 1"),
                            ("32", "option --block-size: got 32: cannot make layer 'features.0'")):
        out = tmp_path / f"k{value}"
        assert cli.main(["train", "--method", "circulant", "--block-size", value, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dnr: error: " + expected) and "\n" not in err, err
        assert not out.exists()


def test_export_compact_is_bit_exact_and_smaller(trained, tmp_path):
    run = trained["run_dir"]
    card = run_export(run, "compact", str(tmp_path / "m.pt2"))
    assert card["check"]["round_trip"] == "bit-exact"
    model, _, _ = load_trained_model(os.path.join(run, "model.pt"))
    model.eval()
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_compact(tmp_path / "m.pt2")(x), model(x))
    circ = card["circulant"]
    assert circ["block_sizes"] == [4] and circ["stored_weights"] == 24720 and circ["dense_weights"] == 98192
    storage = card["circulant_storage"]
    # the stored weights: the vectors, BatchNorm and biases; the dense file: the dense matrices
    assert 3.5 < storage["weight_ratio_vs_dense"] < 4.0
    assert card["export"]["file_bytes"] < card["export"]["dense_file_bytes"]


def test_export_onnx_says_which_form_and_matches(trained, tmp_path):
    card = run_export(trained["run_dir"], "onnx", str(tmp_path / "m.onnx"))
    assert card["onnx"]["model"] in ("circulant-fft", "circulant-dense")
    if card["onnx"]["model"] == "circulant-dense":
        assert card["onnx"]["fft_form_refused"]  # the reason is recorded
    assert card["check"]["max_abs_diff_onnxruntime_vs_torch"] < 1e-4
    model, _, _ = load_trained_model(os.path.join(trained["run_dir"], "model.pt"))
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(tmp_path / "m.onnx", x), model.eval()(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception, match="exports only \\['compact', 'onnx'\\]"):
        run_export(trained["run_dir"], "sparse", str(tmp_path / "m.safetensors"))


def test_the_layers_are_public_names():
    import dnr
    assert dnr.BlockCirculantLinear is BlockCirculantLinear and dnr.BlockCirculantConv2d is BlockCirculantConv2d
    assert callable(dnr.circulant) and dnr.nn.block_circulant_matmul is not None
    assert "fashion-mnist-circulant" in PRESETS


def test_compare_plans_one_circulant_cell_per_density_with_k_from_it():
    """docs/circulant/compare.yaml: the density axis sets the block size (k = round(1 / density)), one cell per
    density in the grid's first mode, next to DNR at the same densities."""
    from dnr.harness.compare.spec import CompareSpec, load_compare_config
    root = os.path.join(os.path.dirname(__file__), "..", "docs", "circulant")
    for name in ("compare.yaml", "compare-smoke.yaml"):
        cells = CompareSpec.from_mapping(load_compare_config(os.path.join(root, name))).plan()
        circ = [c for c in cells if c["method"] == "circulant"]
        assert [c["key"] for c in circ] == [f"circulant-irregular-d{d:g}-s0" for d in (0.5, 0.25, 0.125, 0.0625)]
        for c in circ:
            cfg = resolve_config(None, {}, {k: v for k, v in c["config"].items()})
            assert cfg.resolved_block_size == round(1 / c["target_density"])
        assert {c["target_density"] for c in cells if c["method"] == "dnr"} == {0.5, 0.25, 0.125, 0.0625}
    two_modes = CompareSpec.from_mapping({"methods": ["circulant"], "modes": ["irregular", "channel"],
                                          "densities": [0.25], "seeds": [0]}).plan()
    assert [c["key"] for c in two_modes] == ["circulant-irregular-d0.25-s0"]  # no sparsity mode to vary
    assert resolve_config(None, {}, {"method": "circulant", "density": 0.25, "block_size": 8}).resolved_block_size == 8


def test_trains_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--method", "circulant", "--block-size", "8", "--train-size", "128", "--test-size", "32",
            "--batch-size", "64", "--epochs", "1", "--attack-steps", "1", "--eval-steps", "1", "--eval-size", "16",
            "--threads", "1", "--no-plots", "--no-progress", "--out", str(out)]
    assert cli.main(args) == 0, capsys.readouterr().err
    summary = json.load(open(out / "summary.json"))
    assert summary["method"] == "circulant" and summary["compression"] > 7
    assert json.load(open(out / "config.json"))["block_size"] == 8
