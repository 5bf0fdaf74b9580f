"""The harness's run errors (with ConfigError, :mod:`dnr.harness.config`, and CheckpointError,
:mod:`dnr.harness.checkpoint`): each carries a one-line message for ``dnr: error: ...``."""

__all__ = ["RunError", "TrainingDiverged"]


class RunError(RuntimeError):
    """A run that cannot start or continue (e.g. an occupied run directory); one-line message."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the optimizer step and the last good checkpoint."""
