"""The per-op benchmark scripts run, pass their own correctness checks and write their JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = [
    pytest.param("pgd_step", "pgd_step", id="pgd_step"),
    pytest.param("masked_conv", "masked_conv", id="masked_conv", marks=pytest.mark.slow),
    pytest.param("momentum_stats", "momentum_stats", id="momentum_stats", marks=pytest.mark.slow),
    pytest.param("masked_sgd", "masked_sgd", id="masked_sgd", marks=pytest.mark.slow),
    pytest.param("train_step", "train_step", id="train_step", marks=pytest.mark.slow),
    pytest.param("batch_loader", "batch_loader", id="batch_loader"),
    pytest.param("pooling", "pooling", id="pooling", marks=pytest.mark.slow),
    pytest.param("batch_norm", "batch_norm", id="batch_norm", marks=pytest.mark.slow),
    pytest.param("curriculum", "curriculum", id="curriculum", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("script, op", SCRIPTS)
def test_benchmark_writes_json(script, op, tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH / f"bench_{script}.py"), "--device", "cpu", "--repeats", "1", "--threads", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / f"{op}-cpu.json").read_text())
    assert payload["op"] == op
    env = payload["environment"]
    assert env["device_type"] == "cpu" and env["torch"] and "dnr_backend" in env
    assert payload["results"], "no timing rows"
    for row in payload["results"]:
        times = {k: v for k, v in row.items() if k.endswith("_ms") and v is not None}
        assert times and all(v > 0 for v in times.values())
        assert any(k.startswith(("speedup", "dnr_over", "cost_vs")) for k in row)
    assert f"wrote {tmp_path}" in done.stdout


def test_circulant_benchmark_quick_grid_writes_json_with_crossover(tmp_path):
    """bench_circulant.py (issue 16) on its --quick grid: checks the FFT layers against their dense matrices,
    then writes the timings and the crossover block sizes."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "bench_circulant.py"), "--device", "cpu", "--repeats", "1", "--threads", "1",
         "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "circulant-cpu.json").read_text())
    assert payload["op"] == "circulant" and payload["block_sizes"] == [4, 16]
    kinds = {(r["kind"], r["k"]) for r in payload["results"]}
    assert kinds == {("linear", 4), ("linear", 16), ("conv", 4), ("conv", 16)}
    for row in payload["results"]:
        assert all(row[k] > 0 for k in row if k.endswith("_ms"))
        assert row["saved_bytes_fft"] > 0
    assert {c["pass"] for c in payload["crossover"]} == {"fwd", "fwd_bwd"}


def test_circulant_forms_benchmark_quick_grid_writes_json(tmp_path):
    """bench_circulant_forms.py on its --quick grid: both product forms checked against each other, timed per
    layer and per model step, and the rule's pick recorded next to the faster form."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "bench_circulant_forms.py"), "--device", "cpu", "--repeats", "1", "--threads",
         "1", "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads((tmp_path / "circulant_forms-cpu.json").read_text())
    assert payload["op"] == "circulant_forms"
    assert {(r["layer"], r["k"]) for r in payload["layers"]} == {
        ("small_cnn conv3", 4), ("small_cnn conv3", 16), ("linear 1024", 4), ("linear 1024", 16)}
    for row in payload["layers"]:
        assert row["fft_fwd_bwd_ms"] > 0 and row["dense_fwd_bwd_ms"] > 0
        assert row["auto"] == row["rule"]  # the layer resolves "auto" by the documented rule
    assert [(r["model"], r["k"]) for r in payload["results"]] == [("small_cnn", 4)]
    assert "impl='auto' took the faster form in" in done.stdout
