"""docs/cap/cap_report.py: the CaP report's tables at equal FLOPs, from a compare.json and latency.py's JSON."""

import json
import os

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def cap_report():
    return load_script("docs/cap/cap_report.py")


def _cell(key, method, mode, density, flops, clean, pgd50, aa):
    return {"key": key, "model_name": "m", "method": method, "mode": mode, "target_density": density,
            "summary": {"flops_effective": flops}, "model": {"nonzero_params": flops // 10},
            "robust_eval": {"clean": clean, "pgd": {"20": 0.99, "50": pgd50}, "autoattack": aa, "n": 1000,
                            "autoattack_n": 1000}}


def _grid(tmp_path, with_latency=True):
    """dense 1000 FLOPs; cap at 0.5 (500); DNR's cells at 600 and 400 bracket it; one-shot's (300, 200) do not."""
    cells = [_cell("m-dense-at-s0", "dense-at", None, 1.0, 1000, 0.80, 0.60, 0.55),
             _cell("m-cap-irregular-d0.5-s0", "cap", "irregular", 0.5, 500, 0.75, 0.50, 0.45),
             _cell("m-cap-robust-irregular-d0.5-s0", "cap-robust", "irregular", 0.5, 500, 0.74, 0.52, 0.47),
             _cell("m-dnr-channel-d0.5-s0", "dnr", "channel", 0.5, 600, 0.78, 0.56, 0.50),
             _cell("m-dnr-channel-d0.25-s0", "dnr", "channel", 0.25, 400, 0.70, 0.48, 0.40),
             _cell("m-oneshot-channel-d0.5-s0", "oneshot", "channel", 0.5, 300, 0.72, 0.40, 0.38),
             _cell("m-oneshot-channel-d0.25-s0", "oneshot", "channel", 0.25, 200, 0.65, 0.35, 0.30),
             {"key": "m-oneshot-channel-d0.1-s0", "model_name": "m", "method": "oneshot", "mode": "channel",
              "target_density": 0.1, "summary": None, "robust_eval": None}]  # not evaluated yet: left out
    (tmp_path / "compare.json").write_text(json.dumps({"cells": cells}))
    if with_latency:  # latency.py counts the compacted network: it overrides compare's FLOPs
        lat = {c["key"]: {"flops": c["summary"]["flops_effective"], "params": 7, "ms_batch1": 0.5, "ms_batch64": 4.0}
               for c in cells if c["summary"]}
        (tmp_path / "latency.json").write_text(json.dumps({"cells": lat}))
    return tmp_path


def test_channel_methods_are_read_at_the_cap_cells_flops(cap_report, tmp_path):
    grid = _grid(tmp_path)
    assert cap_report.main([str(grid), "--latency", str(grid / "latency.json"), "--out", str(grid / "cap.md")]) == 0
    data = json.loads((grid / "cap.json").read_text())
    assert len(data["cells"]) == 7
    (comp,) = data["comparisons"]
    assert comp["target"] == 0.5 and comp["fraction"] == pytest.approx(0.5)
    dnr = comp["channel"]["dnr"]
    # halfway between 0.6 (78 / 56 / 50) and 0.4 (70 / 48 / 40)
    assert dnr["interpolated"]["clean"] == pytest.approx(74.0)
    assert dnr["interpolated"]["pgd"] == pytest.approx(52.0)
    assert dnr["interpolated"]["autoattack"] == pytest.approx(45.0)
    oneshot = comp["channel"]["oneshot"]
    assert oneshot["interpolated"] is None and oneshot["nearest"]["key"] == "m-oneshot-channel-d0.5-s0"
    lines = {(ln["cap"], ln["other"]): ln for ln in comp["lines"]}
    assert lines[("cap", "dnr")]["how"] == "at equal FLOPs"
    assert lines[("cap", "dnr")]["deltas"]["autoattack"] == pytest.approx(0.0)
    assert lines[("cap-robust", "dnr")]["deltas"]["pgd"] == pytest.approx(0.0)
    assert lines[("cap-robust", "dnr")]["deltas"]["clean"] == pytest.approx(0.0)
    assert lines[("cap", "oneshot")]["how"].startswith("nearest cell, 0.30")
    assert lines[("cap", "oneshot")]["deltas"]["clean"] == pytest.approx(3.0)
    md = (grid / "cap.md").read_text()
    assert "| m: every cell by FLOPs" not in md and "## m: every cell by FLOPs" in md
    assert "PGD-50" in md and "not reached (its cells span 0.200-0.300)" in md
    assert "| 0.500 / 4.00 |" in md


def test_without_latency_the_masks_flops_are_used(cap_report, tmp_path):
    grid = _grid(tmp_path, with_latency=False)
    assert cap_report.main([str(grid), "--out", str(grid / "cap.md")]) == 0
    data = json.loads((grid / "cap.json").read_text())
    assert {r["params"] for r in data["cells"]} == {100, 50, 60, 40, 30, 20}


def test_bad_input_is_refused(cap_report, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cap_report.main([str(tmp_path), "--out", str(tmp_path / "cap.md")])
    assert "has no compare.json" in capsys.readouterr().err
    grid = _grid(tmp_path, with_latency=False)
    data = json.loads((grid / "compare.json").read_text())
    data["cells"] = [c for c in data["cells"] if not c["method"].startswith("cap")]
    (grid / "compare.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit):
        cap_report.main([str(grid), "--out", str(grid / "cap.md")])
    assert "no evaluated cap / cap-robust cell" in capsys.readouterr().err


def test_it_never_overwrites_its_inputs(cap_report, tmp_path, capsys):
    grid = _grid(tmp_path)
    before = (grid / "compare.json").read_text()
    for out in ("compare.md", "latency.md"):
        with pytest.raises(SystemExit):
            cap_report.main([str(grid), "--latency", str(grid / "latency.json"), "--out", str(grid / out)])
        assert "would overwrite the input" in capsys.readouterr().err
    assert (grid / "compare.json").read_text() == before


def test_the_committed_report_is_what_the_committed_grid_gives(cap_report, tmp_path):
    """docs/cap/cap.md and cap.json are exactly cap_report.py's output on the committed grid's compare.json and
    latency.json: the report's tables are computed from the committed results, not edited by hand."""
    root = os.path.join(os.path.dirname(__file__), "..", "docs", "cap")
    grid = os.path.join(root, "grid")
    if not os.path.isfile(os.path.join(grid, "compare.json")):
        pytest.skip("docs/cap/grid/compare.json is not committed in this checkout")
    out = tmp_path / "cap.md"
    assert cap_report.main([grid, "--latency", os.path.join(root, "latency.json"), "--out", str(out)]) == 0
    # the header names the folders it was given; the tables below it must match line for line
    rebuilt = out.read_text().split("\n", 1)[1]
    committed = open(os.path.join(root, "cap.md")).read().split("\n", 1)[1]
    assert rebuilt == committed
    assert json.loads((tmp_path / "cap.json").read_text())["comparisons"] == \
        json.load(open(os.path.join(root, "cap.json")))["comparisons"]
