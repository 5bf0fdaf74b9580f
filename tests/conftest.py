"""Shared pytest setup: markers, device parametrisation, seeding.

Markers (declared in pyproject.toml):
  needs_cuda  skipped when torch.cuda.is_available() is False
  slow        longer than ~20 s on CPU; deselect with -m "not slow"
"""

import json
import os

import pytest
import torch

from dnr.precision import ieee_float32

# Use as @pytest.mark.parametrize("device", DEVICES) or through the `device` fixture.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.needs_cuda)]


def metrics_rows(run_dir):
    """A run's metrics.jsonl rows without their wall-clock values (which differ between equal runs)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        for key in ("seconds", "images_per_s", "eval_seconds"):
            r.pop(key)
    return rows


def final_model_state(run_dir):
    """The state dict a finished run saved in its model.pt."""
    from dnr.harness import load_checkpoint
    return load_checkpoint(os.path.join(run_dir, "model.pt"), kind="model")["model"]


def assert_same_final_model(ref_dir, other_dir):
    """Two finished runs ended bitwise equal: model.pt's every tensor, and the summary's clean / PGD accuracy."""
    a, b = final_model_state(ref_dir), final_model_state(other_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (ref_dir, other_dir))
    assert (sa["clean"], sa["pgd"]) == (sb["clean"], sb["pgd"])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each test that takes `device` runs on "cpu" and (needs_cuda) "cuda"."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _ieee_float32():
    """Every test computes float32 in IEEE float32, also on the GPU (dnr.precision says why; the first GPU
    run failed 7 comparisons against torch's TF32 convolutions)."""
    with ieee_float32():
        yield


def load_script(relpath: str):
    """A script of the repository that is not a package module (docs/cap/cap_report.py, docs/sat/sat_study.py),
    imported from its path relative to the repository root."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", relpath)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
