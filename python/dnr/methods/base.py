"""The compression-method interface: what the training harness asks of every method.

A compression method decides what the model looks like (``prepare_model``: masks, replaced layers),
what it adds to the training objective (``loss_term``), what it does after optimizer steps and at epoch
ends (``after_step``, ``epoch_end``: pruning, rewiring, projections), what the trained model costs
(``report``), how its state is saved for an exact resume (``state_dict`` / ``load_state_dict``) and
which checkpoint and export formats apply to its models. Everything that applies to every method (the
adversarial attack, the hybrid loss, the learning-rate schedule, data order, a training curriculum)
belongs to the harness and the engine, not here. ``docs/architecture.md`` shows where each hook runs.

A method reads its options from the run's config (a ``dnr.harness.TrainConfig``: any object with the
fields it needs); this layer never imports the harness.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..nn import apply_masks, density_report, masked_layers, sparsify

__all__ = ["CompressionMethod", "MaskedMethod", "EXPORT_FORMATS", "CHECKPOINT_FORMATS"]

#: every export format of ``dnr export`` (dnr.export): a compact dense model, sparse safetensors, ONNX
EXPORT_FORMATS = ("compact", "sparse", "onnx")
#: the harness's checkpoint format (dnr.harness.checkpoint)
CHECKPOINT_FORMATS = ("dnr-checkpoint",)


class CompressionMethod:
    """Base class of a compression method; the defaults are those of dense training.

    One instance serves one run: the harness builds it from the run's config, then calls, in order,
    ``prepare_model`` (also when it rebuilds a saved model), ``attach`` (once the optimizer exists),
    ``loss_term`` every step, ``after_step`` after every optimizer step, ``epoch_end`` after every
    epoch, ``epoch_metrics`` for the epoch's metrics row, ``state_dict`` at every checkpoint, and
    ``report`` for the final summary.

    Class attributes (declarations the config, the CLI and the harness read without an instance):
        name: the registry name (set by :func:`dnr.methods.register`).
        description: one line for ``dnr train --help``.
        sparse: the trained model carries masks (``dnr.sparsify``), so the optimizer may use the fused
            masked step and the report counts active weights.
        adversarial: trains with the run's attack (False: clean training, ``beta`` = 1).
        phased: prunes once after a first phase of ``cfg.pre_epochs`` epochs; the learning-rate
            schedule restarts there (learning-rate rewinding).
        needs_sparse_target: the config's density must be < 1.
        density_axis: ``dnr compare`` gives it a cell per density (None: when ``sparse``).
        checkpoint_formats / export_formats: the formats its models can be saved / exported in.
        defaults_revision: the revision of the method's defaults (see below).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    sparse: ClassVar[bool] = False
    adversarial: ClassVar[bool] = True
    phased: ClassVar[bool] = False
    needs_sparse_target: ClassVar[bool] = False
    #: ``dnr compare`` trains the method at each density of a grid (None: exactly when ``sparse``; CaP reads
    #: the density as its FLOP fraction and circulant as its block size 1 / k, so they set True; a method
    #: without masks gets these cells in the grid's first mode only)
    density_axis: ClassVar[bool | None] = None
    #: the method's own options, name -> default (bool / int / float / str): set with ``--method-options
    #: NAME=VALUE`` (``TrainConfig.method_options``), read with ``self.option(name)``; how a plugin gets options
    #: without new TrainConfig fields
    options: ClassVar[dict[str, Any]] = {}
    checkpoint_formats: ClassVar[tuple[str, ...]] = CHECKPOINT_FORMATS
    export_formats: ClassVar[tuple[str, ...]] = EXPORT_FORMATS
    #: bumped whenever a change of the method's defaults changes what a config that leaves options unset
    #: trains; recorded in ``summary.json``, so that ``dnr compare`` refuses to reuse a cell trained under
    #: older defaults (its config is unchanged, its behaviour is not). A run without the record counts as 0.
    defaults_revision: ClassVar[int] = 0

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def option(self, name: str) -> Any:
        """The value of one of the class's ``options`` for this run (its default unless ``--method-options``
        set it)."""
        return self.cfg.method_settings[name]

    # ------------------------------------------------------------------ config
    @classmethod
    def check_config(cls, cfg: Any) -> str | None:
        """An extra rule of this method on the config: None when fine, else ``"option --x: got ..., expected
        ..."`` (``TrainConfig.validate`` raises it as a ConfigError). Runs after the generic checks."""
        return None

    # ------------------------------------------------------------------ model and optimizer
    def initial_density(self) -> float:
        """The density of the model's initial mask (sparse methods)."""
        return float(self.cfg.density)

    def prepare_model(self, model: nn.Module, *, seed: int) -> nn.Module:
        """The model this method trains, built from a freshly initialised or a user's model (may replace
        layers; returns the model to train). Must be deterministic given ``seed``: the harness rebuilds
        saved models through it before loading their state dict."""
        return model

    def check_model(self, model: nn.Module, input_size: tuple[int, ...]) -> str | None:
        """An extra rule of this method on the built model (inputs ``input_size`` [C, H, W]): None when
        fine, else a one-line problem that names the option (the harness raises it as a ConfigError before
        any work). Runs on a fresh run and on resume."""
        return None

    def use_training_data(self, dataset, input_size: tuple[int, ...]) -> None:
        """Called once before ``attach`` with the run's training set (``dataset[i]`` = (x, y)) and the
        inputs' shape, for a method that computes from data (CaP's calibration and projection training)."""

    def restructure(self, model: nn.Module, model_state: dict, *, input_size: tuple[int, ...]) -> None:
        """Before a saved ``model_state`` is loaded into ``model`` (resume, ``dnr eval``, ``dnr export``): give
        ``model`` the structure the state was saved from, for a method that changes the architecture
        during training (CaP swaps in a smaller network; admm-circulant converts layers to block-circulant
        after its ADMM phase and keeps its optimizer, attached by then on resume, on the new parameters).
        Default: nothing to do."""

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, total_steps: int,
               steps_per_epoch: int) -> None:
        """Called once before training (before the LR scheduler is built, so a method may add parameter
        groups) and on resume before ``load_state_dict``; may register optimizer hooks."""
        self.model, self.optimizer = model, optimizer

    # ------------------------------------------------------------------ training hooks
    def loss_term(self) -> torch.Tensor | None:
        """A scalar added to every training step's loss (e.g. a regulariser), or None."""
        return None

    def after_step(self, step: int) -> dict | None:
        """After optimizer step ``step`` (1-based, counted over the run); returns a log record or None."""
        return None

    def epoch_end(self, epoch: int, *, last: bool) -> dict | None:
        """After epoch ``epoch`` (0-based; ``last`` for the run's last one), before its evaluation;
        returns a log record (shown by ``epoch_message``) or None."""
        return None

    def epoch_message(self, record: dict) -> str | None:
        """A console line for a record returned by ``after_step`` or ``epoch_end`` (None: say nothing)."""
        return None

    def epoch_metrics(self, first_step: int, step: int) -> dict:
        """Method columns of the metrics row of the epoch of steps ``first_step + 1 .. step``: any of
        ``prune_rate``, ``rewired_weights`` (the others stay empty), and ``density`` for a method whose
        compression is not a mask (the row's default counts masked layers only)."""
        return {}

    def log_records(self) -> dict[str, list[dict]]:
        """The method's records for the run directory: file name -> records (one JSON line each)."""
        return {}

    # ------------------------------------------------------------------ results and state
    def report(self, model: nn.Module, input_size: tuple[int, ...] | None = None) -> dict:
        """What the trained model costs: ``density``, ``effective_density`` and ``compression`` of the
        prunable weights, ``params`` (parameters left after pruning) of ``params_dense``, ``flops_dense``
        and ``flops_effective`` (one forward pass at ``input_size`` [C, H, W]), ``storage_bytes`` (the
        remaining parameters' fp32 values, without index overhead) and the per-layer ``layers`` of
        :func:`dnr.density_report`. A method that changes the layers (e.g. block-circulant) overrides it."""
        rep = density_report(model, input_size=input_size)
        return {
            "density": rep.density, "effective_density": rep.effective_density,
            "compression": rep.compression if rep.prunable else 1.0,
            "params": rep.nonzero_params, "params_dense": rep.total_params, "storage_bytes": 4 * rep.nonzero_params,
            "flops_dense": rep.flops_dense, "flops_effective": rep.flops_effective,
            "layers": [{"name": l.name, "density": l.density, "active": l.active, "prunable": l.prunable,
                        "masked": l.masked} for l in rep.layers],
        }

    def state_dict(self) -> dict | None:
        """Everything outside the model and optimizer that an exact resume needs (None: nothing)."""
        return None

    def load_state_dict(self, state: dict | None) -> None:
        """Restore ``state_dict()``'s result (called after ``attach``)."""



class MaskedMethod(CompressionMethod):
    """A method whose model is sparsified with masked layers (``dnr.sparsify``) that stay applied: the
    masks are re-applied after every optimizer step (one hook, here)."""

    sparse = True

    def prepare_model(self, model: nn.Module, *, seed: int) -> nn.Module:
        """Sparsify as configured (mode, init, first/last layer) at ``initial_density()``; a model that
        already has masks (a user's sparsified model) keeps them."""
        cfg = self.cfg
        if not masked_layers(model):
            sparsify(model, density=self.initial_density(), mode=cfg.mode, init=cfg.init,
                     prune_first=cfg.prune_first, prune_last=cfg.prune_last,
                     generator=torch.Generator().manual_seed(seed))
        return model

    def keep_masks(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply the masks after every optimizer step (a fixed mask must stay fixed under momentum
        and weight decay)."""
        optimizer.register_step_post_hook(lambda *_: apply_masks(model))
