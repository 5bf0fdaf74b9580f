"""Checkpoint files: atomic writes, ``weights_only=True`` loads, clear errors.

A checkpoint is a dict of tensors and plain Python values (no pickled objects), so it loads with
``torch.load(weights_only=True)``. It always carries ``format`` (``"dnr-checkpoint"``), ``version``,
``kind`` (``"train"`` for a full training state, ``"model"`` for a final model) and ``config`` (the
TrainConfig as a dict), plus ``model`` (the state dict, masks included).
"""

from __future__ import annotations

import os
import pickle
import random
import warnings

import numpy as np
import torch

from .._files import atomic_path

__all__ = ["CheckpointError", "CheckpointFallbackWarning", "save_checkpoint", "load_checkpoint", "load_model_state",
           "rng_state", "set_rng_state", "previous_checkpoint_path", "FORMAT", "VERSION"]

FORMAT = "dnr-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, of another format or of another architecture."""


class CheckpointFallbackWarning(UserWarning):
    """``last.pt`` failed its check and the previous checkpoint is used instead."""


def previous_checkpoint_path(path: str) -> str:
    """Where :func:`save_checkpoint` with ``keep_previous`` keeps the file it replaces: ``previous.pt``
    beside ``last.pt`` (``<name>.previous<ext>`` for other names)."""
    folder, name = os.path.split(os.fspath(path))
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, "previous.pt" if name == "last.pt" else f"{stem}.previous{ext}")


def save_checkpoint(path: str, state: dict, *, keep_previous: bool = False) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsync, then os.replace.

    A crash at any point leaves either the old file or the new one, never a partial file at ``path``.
    With ``keep_previous`` the file being replaced moves to :func:`previous_checkpoint_path` first (one
    rename), so a damaged newest checkpoint still leaves the one before it to fall back to.

    Raises:
        FileWriteError: disk full, read-only file system, ...: one line naming ``path``; the existing
            checkpoint is untouched.
    """
    with atomic_path(path, keep_previous=previous_checkpoint_path(path) if keep_previous else None) as tmp, \
            open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, **state}, f)


def load_checkpoint(path: str, *, kind: str | None = None) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` onto the CPU.

    Args:
        path: the file, or a run directory: its ``model.pt`` (final model) when there is one and ``kind``
            is not ``"train"``, else its ``checkpoints/last.pt``.
        kind: require this kind (``"train"`` or ``"model"``); None accepts both.

    Raises:
        CheckpointError: missing, truncated/corrupt, not a dnr checkpoint, or of the wrong kind.
    """
    path = resolve_checkpoint_path(path, prefer_final=kind != "train")
    previous = previous_checkpoint_path(path)
    if os.path.basename(path) == "last.pt" and os.path.isfile(previous):
        try:
            return _load_checked(path, kind)
        except CheckpointError as err:
            state = _load_checked(previous, kind)  # both damaged: this error names previous.pt
            warnings.warn(f"{err}; using the previous checkpoint {previous!r} instead (epoch "
                          f"{state.get('epoch', '?')}, batch {state.get('batch', '?')})",
                          CheckpointFallbackWarning, stacklevel=2)
            return state
    return _load_checked(path, kind)


def _load_checked(path: str, kind: str | None) -> dict:
    """:func:`load_checkpoint` of one existing file, without the fallback."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # the weights-only unpickler names a GLOBAL (a class or function to import) it refused; other
        # complaints (an unknown opcode in damaged bytes) mean corruption, not a malicious file
        if "unsupported global" not in str(err).lower():
            raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt and cannot be loaded "
                                  f"({type(err).__name__})") from None
        # never echo torch's hint to load with weights_only=False: that would run the file's code
        raise CheckpointError(f"{path!r} holds Python objects that dnr will not unpickle (dnr loads only tensors "
                              "and plain values); it is not a dnr checkpoint, or it was tampered with: do not "
                              "load it") from None
    except Exception as err:  # torch raises several types for damaged zip archives
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in first:  # never pass on torch's advice to load unsafely
            first = type(err).__name__
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt and cannot be loaded ({first[:200]})"
                              ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a dnr checkpoint (no format={FORMAT!r} entry)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {state.get('version')!r}; this dnr reads "
                              f"version {VERSION}")
    for key in ("kind", "config", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path!r} is incomplete: no {key!r} entry")
    if kind is not None and state["kind"] != kind:
        raise CheckpointError(f"checkpoint {path!r} is a {state['kind']!r} checkpoint, expected a {kind!r} one")
    state["path"] = path
    return state


def resolve_checkpoint_path(path: str, prefer_final: bool = True) -> str:
    """A file path as given; for a run directory its final ``model.pt`` or its ``checkpoints/last.pt``,
    in the order ``prefer_final`` says, whichever exists first."""
    path = os.fspath(path)
    if os.path.isdir(path):
        last = os.path.join(path, "checkpoints", "last.pt")
        candidates = [os.path.join(path, "model.pt"), last]
        for candidate in candidates if prefer_final else candidates[::-1]:
            # a crash between save_checkpoint's two renames leaves previous.pt without last.pt
            if os.path.isfile(candidate) or candidate == last and os.path.isfile(previous_checkpoint_path(last)):
                return candidate
        raise CheckpointError(f"run directory {path!r} holds no checkpoint (checkpoints/last.pt or model.pt)")
    if not os.path.isfile(path) and not (os.path.basename(path) == "last.pt"
                                         and os.path.isfile(previous_checkpoint_path(path))):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    return path


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    """Load ``state["model"]`` into ``model`` strictly; a mismatch raises CheckpointError naming both
    architectures."""
    cfg = state.get("config", {})
    try:
        model.load_state_dict(state["model"], strict=True)
    except (RuntimeError, KeyError, ValueError) as err:
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(
            f"checkpoint {state.get('path', '?')!r} holds a {cfg.get('model', '?')!r} model for "
            f"{cfg.get('dataset', '?')!r} that does not fit this {type(model).__name__} ({detail})") from None


# ---------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and Python ``random`` states as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
