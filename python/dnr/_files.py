"""File helpers shared by every writer and reader: atomic replacement, the output guard that keeps a
command from destroying data, one-line errors for file-system failures and damaged JSON files, and
content hashes."""

from __future__ import annotations

import contextlib
import errno as errno_codes
import hashlib
import json
import os
import tempfile
import zipfile
from typing import IO, Iterable, Iterator, Mapping

import torch

__all__ = ["atomic_path", "atomic_open", "sha256_file", "tensor_bytes", "tensors_sha256", "FileWriteError", "OutputRefused", "DamagedFileError",
           "check_output_file", "check_output_dir", "protected_reason", "is_dnr_checkpoint", "read_json",
           "write_json", "read_jsonl", "RUN_FILES"]

# The files of a run directory (one that holds config.json) that no command may replace from outside:
# they are the run's record, its checkpoints and its final model. Reports and plots are derived from
# them and may be rewritten (by dnr report).
RUN_FILES = ("config.json", "initial_density.json", "metrics.jsonl", "metrics.csv", "rewiring.jsonl",
             "pruning.jsonl", "summary.json", "model.pt", "robust_eval.json",
             "curriculum.jsonl")  # SAT curriculum (issue 15): its Hessian measurements
CHECKPOINT_FOLDER = "checkpoints"


class FileWriteError(OSError):
    """A file that could not be written (disk full, read-only file system, a folder that is a file, ...).

    The one-line message names the target path (never a temp file) and the cause; ``errno`` is kept."""

    def __init__(self, path: str, cause: str, errno: int | None = None):
        self.message = f"cannot write {path!r}: {cause}"
        super().__init__(self.message)
        self.errno, self.path = errno, path

    def __str__(self) -> str:  # OSError's own would print "[Errno N] None" once errno is set
        return self.message


class OutputRefused(ValueError):
    """An output path a command refuses to write: its own input, a checkpoint or run file, or an existing
    file without ``--force``. The one-line message names the argument, the path and why."""


class DamagedFileError(ValueError):
    """A JSON / JSONL file that cannot be parsed; the one-line message names the file (and line)."""


# ---------------------------------------------------------------------------------------- writing
def _oserror_in(err: BaseException) -> OSError | None:
    """The OSError ``err`` is or was raised from (torch's zip writer wraps ENOSPC in a RuntimeError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _cause(path: str, err: OSError) -> str:
    """Why ``path`` could not be written, in words (a regular file where a folder should be, or strerror)."""
    ancestor = os.path.dirname(os.path.abspath(path))
    while ancestor and not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if os.path.exists(ancestor) and not os.path.isdir(ancestor):
        return f"{ancestor!r} is a regular file, not a folder"
    name = errno_codes.errorcode.get(err.errno or 0)
    text = err.strerror or str(err) or type(err).__name__
    return f"{text} ({name})" if name else text


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_previous: str | os.PathLike | None = None) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temp file is fsynced before ``os.replace`` and the folder after it, so a crash leaves either
    the old file or the new one, never a partial file at ``path``; on an error the temp file is
    removed and ``path`` is untouched. The new file gets the usual permissions (0o666 minus umask).

    Args:
        keep_previous: move the existing ``path`` here (one rename) just before the new file takes its
            place, so that at every moment one of the two holds a complete file.

    Raises:
        FileWriteError: a file-system error (also one wrapped by the writer, e.g. torch's zip writer),
            naming ``path`` and the cause.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if keep_previous is not None and os.path.exists(path):
            os.replace(path, os.fspath(keep_previous))
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        cause = _oserror_in(err) if isinstance(err, Exception) else None
        if cause is None or isinstance(err, FileWriteError):
            raise
        raise FileWriteError(path, _cause(path, cause), cause.errno) from err
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` that writes a temp file and replaces ``path`` only on success."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


# ---------------------------------------------------------------------------------------- the output guard
def is_dnr_checkpoint(path: str) -> bool:
    """Whether ``path`` is a dnr checkpoint by content: a torch.save zip archive whose pickle names the
    ``dnr-checkpoint`` format (read without unpickling anything)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.filename.endswith("data.pkl") and info.file_size < (64 << 20):
                    return b"dnr-checkpoint" in z.read(info)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return False
    return False


def protected_reason(path: str, run_dirs: Iterable[str] = ()) -> str | None:
    """Why no command may write ``path`` (resolved: symlinks followed), or None: a checkpoint (by its
    place in a run directory or by content) or one of the run files of :data:`RUN_FILES`.

    Args:
        run_dirs: folders to treat as run directories even before they hold one (the run a command is
            about to create).
    """
    real = os.path.realpath(path)
    folder, name = os.path.split(real)
    planned = {os.path.realpath(d) for d in run_dirs if d}

    def is_run_dir(d):
        return d in planned or os.path.isfile(os.path.join(d, "config.json"))

    if os.path.basename(folder) == CHECKPOINT_FOLDER and is_run_dir(os.path.dirname(folder)):
        return f"it is in the checkpoints folder of the run directory {os.path.dirname(folder)!r}"
    if name in RUN_FILES and is_run_dir(folder):
        return f"it is the {name} of the run directory {folder!r}"
    if os.path.isfile(real) and is_dnr_checkpoint(real):
        return "it is a dnr checkpoint"
    return None


def _writable_folder(path: str, argument: str) -> None:
    """Refuse a path whose folder cannot be created or written (a regular file on the way, no permission,
    a read-only file system)."""
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputRefused(f"{argument}: cannot write {path!r}: {ancestor!r} is a regular file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputRefused(f"{argument}: cannot write {path!r}: the folder {ancestor!r} is not writable "
                            "(no permission, or a read-only file system)")


def check_output_file(path: str | os.PathLike, *, argument: str, inputs: Iterable[str | os.PathLike] = (),
                      force: bool = False, own_output: bool = False, run_dirs: Iterable[str] = ()) -> str:
    """Refuse, before any work starts, an output file that would destroy data or cannot be written.

    Refused always: the command's own ``inputs`` (same file after resolving symlinks, or a hard link
    to it), a checkpoint or run file (:func:`protected_reason`), a folder, a path under a regular file
    and a folder that is not writable. Refused without ``force``: any other existing file, unless
    ``own_output`` (a file the command itself regenerates in a fixed place, e.g. ``report.md``).

    Args:
        argument: the option named in the error ("option --out").
        run_dirs: run directories the command is about to create (their run files are protected too).

    Returns:
        ``path`` as given (as a str).

    Raises:
        OutputRefused: one line naming ``argument``, the path and why.
    """
    path = os.fspath(path)
    if not path:
        raise OutputRefused(f"{argument}: got an empty path, expected a file name")
    real = os.path.realpath(path)
    shown = path if real == os.path.abspath(path) else f"{path} (-> {real})"
    for source in inputs:
        if source is None:
            continue
        source = os.fspath(source)
        same = os.path.realpath(source) == real
        if not same and os.path.exists(source) and os.path.exists(real):
            with contextlib.suppress(OSError):
                same = os.path.samefile(source, real)
        if same:
            raise OutputRefused(f"{argument}: refusing to write {shown!r}: it is this command's input")
    reason = protected_reason(real, run_dirs)
    if reason:
        raise OutputRefused(f"{argument}: refusing to write {shown!r}: {reason} (checkpoints and run files are "
                            "never overwritten; choose another path)")
    if os.path.isdir(real):
        raise OutputRefused(f"{argument}: {shown!r} is a folder, expected a file path")
    _writable_folder(real, argument)
    if os.path.lexists(path) and not force and not own_output:
        raise OutputRefused(f"{argument}: {shown!r} already exists; add --force to replace it")
    return path


def check_output_dir(path: str | os.PathLike, *, argument: str) -> str:
    """Refuse, before any work starts, an output folder that is a regular file, lies under one, or whose
    nearest existing folder is not writable. Returns ``path`` as a str."""
    path = os.fspath(path)
    if not path:
        raise OutputRefused(f"{argument}: got an empty path, expected a folder")
    real = os.path.realpath(path)
    if os.path.exists(real) and not os.path.isdir(real):
        raise OutputRefused(f"{argument}: {path!r} is a regular file, expected a folder")
    _writable_folder(os.path.join(real, "x"), argument)
    return path


# ---------------------------------------------------------------------------------------- reading
def read_json(path: str | os.PathLike):
    """``json.load`` of ``path``; a damaged or empty file raises DamagedFileError naming it."""
    path = os.fspath(path)
    with open(path) as f:
        text = f.read()
    if not text.strip():
        raise DamagedFileError(f"{path!r} is empty (expected JSON); it was damaged or not written to the end")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DamagedFileError(f"{path!r} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                               "it was damaged or not written to the end") from None


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically (a reader sees the old file or the whole new one)."""
    with atomic_open(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def read_jsonl(path: str | os.PathLike) -> list:
    """One JSON value per non-empty line of ``path``; a damaged line raises DamagedFileError naming the
    file and the line."""
    path = os.fspath(path)
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DamagedFileError(f"{path!r} line {number} is not valid JSON ({err.msg}); the file was "
                                       "damaged or not written to the end") from None
    return rows


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's elements as raw bytes, in row-major order (copied to the host; any dtype, 0-d included)."""
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over named tensors in sorted name order: each name, then its :func:`tensor_bytes`.

    The digest the dnr-sparse export format stores (dnr.export.sparse_format): its formula must not change."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensor_bytes(tensors[key]))
    return h.hexdigest()
