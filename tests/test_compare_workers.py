"""`dnr compare --jobs N`: its worker processes end when the compare process is killed (they would otherwise go
on training their cells unseen, for hours on a real grid)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")

# two cells that train for minutes (far longer than the test waits), so both workers are busy when it kills
SLOW_GRID = {"preset": "fashion-mnist-quick", "title": "slow",
             "train": {"data_root": "embedded", "train_size": 2048, "test_size": 64, "epochs": 50, "batch_size": 64,
                       "attack_steps": 3, "eval_every": 0},
             "methods": ["dense-at", "static"], "modes": ["irregular"], "densities": [0.1], "seeds": [0],
             "eval": {"test_size": 64, "pgd_steps": [2], "restarts": 1, "autoattack": False}}


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    """Running, not a zombie (a container's pid 1 may never reap an orphan)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"spawn_main" in f.read()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killing_compare_ends_its_workers(tmp_path, sig):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(SLOW_GRID))
    proc = subprocess.Popen([sys.executable, "-m", "dnr", "compare", "--config", str(config), "--out",
                             str(tmp_path / "out"), "--jobs", "2", "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline:  # spawned workers import torch: seconds
            time.sleep(0.5)
            workers = [p for p in _children(proc.pid) if _is_worker(p)]
        assert len(workers) == 2, f"the compare process did not start two workers: {workers}"
        time.sleep(2.0)
        assert proc.poll() is None, "the grid finished before the test could kill it"
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert not [p for p in workers if _alive(p)], "workers still training after their compare process died"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in workers:  # a failed test leaves no orphan training
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
