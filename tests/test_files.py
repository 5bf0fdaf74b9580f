"""dnr._files: atomic replacement, write errors, the output guard, damaged JSON files and file hashes."""

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


def test_atomic_path_turns_a_wrapped_disk_full_error_into_one_naming_the_target(tmp_path):
    import errno
    from dnr._files import FileWriteError
    path = tmp_path / "c.bin"
    path.write_bytes(b"old")
    with pytest.raises(FileWriteError) as info:
        with atomic_path(path) as tmp:
            open(tmp, "wb").write(b"partial")
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
            except OSError as err:
                raise RuntimeError("PytorchStreamWriter failed writing file data/0") from err
    assert str(info.value) == f"cannot write {str(path)!r}: No space left on device (ENOSPC)"
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["c.bin"]


def test_atomic_path_keeps_the_previous_file(tmp_path):
    path, previous = tmp_path / "last.pt", tmp_path / "previous.pt"
    for content in (b"one", b"two", b"three"):
        with atomic_path(path, keep_previous=previous) as tmp:
            open(tmp, "wb").write(content)
    assert path.read_bytes() == b"three" and previous.read_bytes() == b"two"


def test_output_guard(tmp_path):
    from dnr._files import OutputRefused, check_output_file, protected_reason
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert "checkpoints folder" in protected_reason(str(run / "checkpoints" / "anything.pt"))
    assert "model.pt of the run directory" in protected_reason(str(run / "model.pt"))  # even before it exists
    assert protected_reason(str(run / "report.md")) is None  # derived, rewritten by dnr report
    planned = tmp_path / "planned"
    assert protected_reason(str(planned / "summary.json")) is None
    assert "summary.json" in protected_reason(str(planned / "summary.json"), run_dirs=[str(planned)])
    free = tmp_path / "free.json"
    assert check_output_file(free, argument="option --out") == str(free)
    free.write_text("x")
    with pytest.raises(OutputRefused, match=r"^option --out: .*free\.json' already exists; add --force"):
        check_output_file(free, argument="option --out")
    check_output_file(free, argument="option --out", force=True)
    check_output_file(free, argument="report file", own_output=True)
    with pytest.raises(OutputRefused, match="this command's input"):
        check_output_file(free, argument="option --out", inputs=[str(free)], force=True)
    with pytest.raises(OutputRefused, match="is a folder"):
        check_output_file(tmp_path, argument="option --out", force=True)


def test_read_json_names_damaged_files(tmp_path):
    from dnr._files import DamagedFileError, read_json, read_jsonl
    (tmp_path / "a.json").write_text('{"a": ')
    (tmp_path / "b.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n{"a"\n')
    with pytest.raises(DamagedFileError, match=r"a\.json' is not valid JSON \(line 1"):
        read_json(tmp_path / "a.json")
    with pytest.raises(DamagedFileError, match=r"b\.jsonl' line 4 is not valid JSON"):
        read_jsonl(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(tmp_path / "b.jsonl") == [{"a": 1}, {"a": 2}]
