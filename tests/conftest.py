"""Shared pytest setup: markers, device parametrisation, seeding.

Markers (declared in pyproject.toml):
  needs_cuda  skipped when torch.cuda.is_available() is False
  slow        longer than ~20 s on CPU; deselect with -m "not slow"
"""

import pytest
import torch

# Use as @pytest.mark.parametrize("device", DEVICES) or through the `device` fixture.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.needs_cuda)]


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
