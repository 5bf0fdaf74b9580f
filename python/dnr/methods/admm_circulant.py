"""ADMM to block-circulant weights (``admm-circulant``, the E-RNN way; issue 17).

    phase 1 (``cfg.pre_epochs`` epochs)  dense adversarial training + rho/2 ||W - Z + U||^2, Z <- Proj(W + U),
                                          U <- U + W - Z every few steps, rho growing (``dnr.baselines.CirculantADMM``)
    at the phase's end                   hard projection: every target layer becomes the block-circulant layer of
                                          Proj(W) (``dnr.circulant``), its optimizer entries moved to the vectors
    phase 2 (the remaining epochs)       adversarial fine-tuning of the defining vectors; the lr schedule restarts

The layers it converts are those ``--method circulant`` converts (every ``nn.Linear`` / ``nn.Conv2d``,
including the projections of the recurrent models' LSTM / GRU; ``--prune-first`` / ``--prune-last`` as
there), at ``--block-size`` k (default round(1 / --density)). Training the same structure from scratch is
``--method circulant``: the baseline this method is compared with. The run directory's ``admm.jsonl`` holds
the Z/U updates and the projection.

The model changes structure mid-run, so a checkpoint written after the projection holds the vectors; resume and
``load_trained_model`` rebuild that structure first (:meth:`restructure`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..baselines.admm_circulant import CirculantADMM
from ..nn.block_circulant import BlockCirculantLayer, circulant, circulant_layers
from .circulant import BlockCirculant
from .phased import admm_schedule
from .registry import register

__all__ = ["ADMMCirculant", "convert_layers"]


def convert_layers(model: nn.Module, names: list[str], block_size: int,
                   optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Replace the ``nn.Linear`` / ``nn.Conv2d`` layers ``names`` of ``model`` by block-circulant ones holding the
    projection of their weights (``dnr.circulant``), in place, and put the new parameters in ``optimizer``'s
    parameter groups where the old ones were: a bias keeps its optimizer state (momentum), a weight's state is
    dropped (the vectors start their own momentum). Returns the converted names."""
    wanted = set(names)
    before = {name: dict(model.get_submodule(name).named_parameters()) for name in names}
    circulant(model, block_size, exclude=lambda name, _: name not in wanted, convert_first=True, convert_last=True)
    if optimizer is None:
        return names
    moved: dict[int, nn.Parameter] = {}
    for name in names:
        new = model.get_submodule(name)
        moved[id(before[name]["weight"])] = new.vectors
        if "bias" in before[name]:
            moved[id(before[name]["bias"])] = new.bias
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if id(p) in moved:
                state = optimizer.state.pop(p, None)
                group["params"][i] = moved[id(p)]
                if state is not None and state_fits(state, moved[id(p)]):
                    optimizer.state[moved[id(p)]] = state
    return names


def state_fits(state: dict, param: torch.Tensor) -> bool:
    """The optimizer state of a replaced parameter still applies to ``param`` (same shape: a copied bias)."""
    return all(not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape == param.shape for v in state.values())


@register("admm-circulant")
class ADMMCirculant(BlockCirculant):
    """Dense AT with the ADMM penalty towards block-circulant weights, the hard projection, then adversarial
    fine-tuning of the defining vectors (see the module docstring). Reports, exports and checks its config like
    ``circulant`` (eps > 0); needs at least 2 epochs."""

    description = "dense AT + ADMM towards block-circulant weights, projection, vector fine-tuning (E-RNN; --block-size k)"
    phased = True  # the lr schedule restarts at the projection (as the pruning baselines' at their prune)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.targets: list[str] = []
        self.admm: CirculantADMM | None = None
        self.converted = False
        self.history: list[dict] = []

    @classmethod
    def check_config(cls, cfg) -> str | None:
        rule = super().check_config(cfg)
        if rule is None and cfg.epochs < 2:
            rule = (f"option --epochs: got {cfg.epochs!r}, expected at least 2 for --method {cls.name} (an ADMM phase "
                    "and a fine-tuning phase)")
        if rule is None and getattr(cfg, "compile", "off") != "off":
            # the trainer compiles the model once; the projection replaces its layers mid-run
            rule = (f"option --compile: got {cfg.compile!r}, expected off for --method {cls.name} (it replaces the "
                    "model's layers after the ADMM phase)")
        return rule

    def prepare_model(self, model: nn.Module, *, seed: int) -> nn.Module:
        """The dense model, unchanged (the targets are checked here, before any work: :meth:`find_targets`).

        Raises:
            ValueError: a model that is already block-circulant, or a block size that does not fit a layer.
        """
        self.find_targets(model, seed=seed)
        return model

    def find_targets(self, model: nn.Module, *, seed: int = 0) -> list[str]:
        """The layers to convert: those ``circulant`` would convert, found by converting a copy of the dense
        ``model`` (so a block size that does not fit raises the same error as there)."""
        if circulant_layers(model):
            raise ValueError(f"--method {self.name}: the model already has block-circulant layers; ADMM starts from "
                             "a dense model (train a block-circulant one with --method circulant)")
        probe = super().prepare_model(copy.deepcopy(model), seed=seed)
        self.targets = [name for name, _ in circulant_layers(probe)]
        return self.targets

    def attach(self, model, optimizer, *, total_steps, steps_per_epoch) -> None:
        super().attach(model, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        layers = [(name, model.get_submodule(name)) for name in self.find_targets(model)]
        self.admm = CirculantADMM(layers, optimizer, block_size=self.cfg.resolved_block_size,
                                  **admm_schedule(self.cfg, steps_per_epoch))

    def loss_term(self) -> torch.Tensor | None:
        return self.admm.penalty() if self.admm is not None and self.admm.active else None

    def epoch_end(self, epoch: int, *, last: bool) -> dict | None:
        """After the ADMM phase's last epoch: the hard projection and conversion; returns its record."""
        if self.converted or epoch + 1 != self.cfg.pre_epochs:
            return None
        record = {**self.admm.finish(), "method": self.name, "epoch": epoch + 1}
        convert_layers(self.model, self.targets, self.cfg.resolved_block_size, self.optimizer)
        self.converted = True
        self.history.append(record)
        return record

    def epoch_message(self, record: dict) -> str | None:
        return (f"epoch {record['epoch']}: {self.name} projected {len(record['layers'])} layers onto block-circulant "
                f"matrices (k = {record['block_size']}, distance {record['distance']:.4g}); fine-tuning the vectors")

    def restructure(self, model: nn.Module, saved: dict, *, input_size: tuple[int, ...]) -> None:
        """Convert the target layers that ``saved`` holds as block-circulant (a checkpoint after the projection)."""
        if circulant_layers(model):
            return
        names = [n for n in (self.targets or self.find_targets(model)) if f"{n}.vectors" in saved]
        if names:
            convert_layers(model, names, self.cfg.resolved_block_size, self.optimizer)
            self.converted = True
            if self.admm is not None:
                self.admm.active = False
                self.admm.remove()

    def log_records(self) -> dict[str, list[dict]]:
        updates = self.admm.history if self.admm is not None else []
        return {"admm.jsonl": [r for r in updates if r.get("event") == "admm_update"] + self.history}

    def state_dict(self) -> dict:
        # after the projection Z and U are spent: only the log is kept
        admm = self.admm.state_dict() if self.admm is not None and not self.converted else None
        return {"converted": self.converted, "history": list(self.history), "admm": admm,
                "admm_log": list(self.admm.history) if self.admm is not None else []}

    def load_state_dict(self, state: dict | None) -> None:
        self.converted, self.history = bool(state["converted"]), list(state["history"])
        if self.admm is not None:
            if state["admm"] is not None:
                self.admm.load_state_dict(state["admm"])
            else:
                self.admm.active = False
                self.admm.remove()
                self.admm.history = list(state["admm_log"])
