"""dnr._files: atomic replacement and file hashes."""

import hashlib
import os

import pytest

from dnr._files import atomic_open, atomic_path, sha256_file


def test_atomic_open_replaces_only_on_success(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]  # no temp file left
    with atomic_open(path, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_path_gives_normal_permissions_and_creates_the_folder(tmp_path):
    path = tmp_path / "sub" / "blob.bin"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"\x00\x01")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_bytes() == b"\x00\x01"
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert sha256_file(path) == hashlib.sha256(b"\x00\x01").hexdigest()
