"""The saved progress of a long evaluation, so that an interrupted one continues where it stopped.

:func:`dnr.evaluation.robust_evaluation` runs several attacks (AutoAttack on 1,000 images of a
robust model can take an hour on a CPU) batch by batch. With ``resume_file`` it saves, after every
batch and atomically, what it needs to go on: the per-example results so far, the number of batches
and examples done and the state of every PGD generator. A later call with the same settings and the
same weights skips the batches already done and gives the result an uninterrupted call would give.

Why that is exact: FGSM is deterministic; every PGD run draws its random starts from its own
generator, whose state is saved; torchattacks' AutoAttack seeds its sub-attacks on every call, so a
batch's AutoAttack result does not depend on the batches before it.

What identifies a file: the evaluation's settings (a JSON string the caller builds) and a SHA-256 of
the model's state dict (``dnr._files.tensors_sha256``). A file written for other settings or other weights is stale and is replaced.
The data cannot be identified up front (a loader is read once), so the file also holds a hash chained
over the batches it covers; when the skipped batches do not hash to it, the data changed and the call
fails with a one-line error instead of mixing two test sets.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Optional

import torch
from torch import Tensor

from ._files import atomic_path, tensor_bytes

__all__ = ["EvaluationProgress"]

FORMAT = 1


def _chain(digest: str, x: Tensor, y: Tensor) -> str:
    """The data hash after one more batch: sha256(previous digest, x and y with their dtypes and shapes)."""
    h = hashlib.sha256(digest.encode())
    for t in (x, y):
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


class EvaluationProgress:
    """Progress of one evaluation, kept in ``path`` (``None``: kept nowhere; :meth:`save` and :meth:`remove`
    do nothing, and nothing is hashed).

    Args:
        fn: the calling function's name, for error messages.
        path: the resume file, or None.
        fingerprint: what the results depend on besides the data: the settings and the weights' hash.
        generators: name -> the torch.Generator of each PGD run; restored in place on resume.

    After construction, ``done`` batches (``n`` examples) are already evaluated and ``parts`` (key ->
    list of per-example bool tensors) holds their results; the caller skips ``done`` batches, passing each
    to :meth:`skip`, and calls :meth:`save` after each batch it evaluates.
    """

    def __init__(self, fn: str, path: Optional[str], fingerprint: str, generators: Dict[str, torch.Generator]):
        self.fn, self.path, self.fingerprint, self.generators = fn, path, fingerprint, generators
        self.done, self.n, self.parts = 0, 0, {}  # what the file held when the evaluation started
        self._batches = 0  # batches covered so far: skipped ones, then evaluated ones
        self._digest = ""  # the data hash over the batches seen so far
        self._saved_digest = ""
        if path is None:
            return
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"{fn}: resume_file must be a path or None, got {type(path).__name__}")
        self.path = path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):  # fail before the first batch's attacks, not after
            raise ValueError(f"{fn}: resume_file {path}: its folder {folder} does not exist")
        if os.path.isdir(path):
            raise ValueError(f"{fn}: resume_file {path} is a folder, expected a file path")
        if not os.path.isfile(path):
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable progress file only costs the batches it held
            return
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("fingerprint") != fingerprint:
            return  # other settings or weights: start over (save() replaces the file)
        self.done, self.n = int(state["batches"]), int(state["n"])
        self.parts = {k: [v] if v.numel() else [] for k, v in state["parts"].items()}
        self._saved_digest = state["data_sha256"]
        for name, g in generators.items():
            g.set_state(state["generators"][name])

    def skip(self, x: Tensor, y: Tensor) -> None:
        """Account for one of the ``done`` batches (not evaluated again); after the last one, check that they
        are the batches the file was written for."""
        self._digest = _chain(self._digest, x, y)
        self._batches += 1
        if self._batches == self.done and self._digest != self._saved_digest:
            raise ValueError(f"{self.fn}: resume_file {self.path} holds the results of {self.done} batches of other "
                             f"data than this loader's; remove it (or pass another resume_file) to start over")

    def finish_skipping(self) -> None:
        """Called when the loader is exhausted: it must have covered the batches the file holds."""
        if self._batches < self.done:  # nothing is evaluated (nor counted) before the skipping is over
            raise ValueError(f"{self.fn}: resume_file {self.path} holds {self.done} batches but the loader yielded "
                             f"only {self._batches}; remove it (or pass another resume_file) to start over")

    def save(self, x: Tensor, y: Tensor, parts: Dict[str, List[Tensor]], n: int) -> None:
        """Record one more evaluated batch ``(x, y)``; ``parts`` and ``n`` include it."""
        if self.path is None:  # nothing kept: no hashing (for CUDA inputs, no copy to the host per batch)
            return
        self._digest = _chain(self._digest, x, y)
        self._batches += 1
        state = {"format": FORMAT, "fingerprint": self.fingerprint, "batches": self._batches, "n": n,
                 "data_sha256": self._digest,
                 "parts": {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool) for k, v in parts.items()},
                 "generators": {name: g.get_state() for name, g in self.generators.items()}}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def remove(self) -> None:
        """The evaluation finished: its result is the caller's to keep; the progress file goes."""
        if self.path is not None and os.path.isfile(self.path):
            os.unlink(self.path)
