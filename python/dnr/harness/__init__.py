"""Training harness: validated configs and presets, atomic checkpoints, the ``fit`` driver, reports.

``dnr train`` / ``dnr eval`` / ``dnr report`` / ``dnr info`` (:mod:`dnr.cli`) are thin wrappers over it.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import DEFAULT_PRESET, PRESETS, ConfigError, TrainConfig, load_config_file, resolve_config
from .report import format_summary, write_report
from .run import RunError, TrainingDiverged, fit, load_trained_model

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "DEFAULT_PRESET", "PRESETS", "ConfigError",
           "TrainConfig", "load_config_file", "resolve_config", "format_summary", "write_report", "RunError",
           "TrainingDiverged", "fit", "load_trained_model"]
