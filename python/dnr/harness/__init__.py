"""Training harness: validated configs and presets, atomic checkpoints, the ``fit`` driver, reports.

    config      TrainConfig, presets, config files and CLI flags (the one place options are validated)
    builders    dataset, model (prepared by the compression method), data order, optimizer, LR schedule
    trainer     one process's training loop: build, restore, epochs, final evaluation
    callbacks   what a run reports and writes (Callback hooks: progress, per-epoch evaluation,
                checkpoints, metrics and log files, TensorBoard, console lines); console: ConsoleLog
    evaluate    the evaluation policy; checkpoint: atomic checkpoints and exact resume
    run         ``fit``: the driver (what to train or resume, process settings)
    compare     ``dnr compare``: spec, runner, report
    report      report.md and plots of a run

``dnr train`` / ``dnr eval`` / ``dnr report`` / ``dnr info`` (:mod:`dnr.cli`) are thin wrappers over it.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import DEFAULT_PRESET, PRESETS, ConfigError, TrainConfig, load_config_file, resolve_config
from .report import format_summary, write_report
from .errors import RunError, TrainingDiverged
from .evaluate import final_evaluation
from .run import fit, load_trained_model

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "DEFAULT_PRESET", "PRESETS", "ConfigError",
           "TrainConfig", "load_config_file", "resolve_config", "format_summary", "write_report", "RunError",
           "TrainingDiverged", "fit", "load_trained_model", "final_evaluation"]
