"""The screening patch that docs/method.md tells readers to apply (docs/ablations/channel-mode-variants.patch)
still applies to the current sources, so its documented numbers stay reproducible after the controller changes."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PATCH = ROOT / "docs" / "ablations" / "channel-mode-variants.patch"


def test_channel_variants_patch_applies_to_the_current_controller():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of dnr")
    proc = subprocess.run(["git", "apply", "--check", str(PATCH)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
