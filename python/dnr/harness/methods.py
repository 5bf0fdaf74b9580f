"""The baseline methods' phases in the harness: train, prune once to the exact budget, fine-tune masked.

    oneshot  dense adversarial training -> one-shot magnitude prune -> adversarial fine-tuning
    admm     adversarial training + ADMM penalty (Z/U updates) -> prune to Proj_S(W) -> masked retraining
    rsr      adversarial training + channel-wise weight noise + L1 -> global magnitude prune -> fine-tuning

All run ``cfg.epochs`` epochs with the same attack as DNR (the same budget of epochs x attack steps):
``cfg.pre_epochs`` before the prune, the rest after it, the learning-rate schedule restarting at the
prune (learning-rate rewinding, Renda et al. 2020). The model is a dense-masked one (``sparsify`` at
density 1), so the prune only changes masks and the run directory has the same files as DNR's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..baselines import ADMM, RSR, prune_by_magnitude
from ..nn.sparsify import apply_masks
from .config import TrainConfig

__all__ = ["PhasedMethod"]


class PhasedMethod:
    """One baseline run's state: its regulariser (ADMM or RSR), whether the prune happened, the log.

    Args:
        cfg: the run's config (method oneshot, admm or rsr).
        model: the dense-masked model.
        optimizer: its optimizer; RSR's noise scales are added as a second parameter group (no weight
            decay), and a step post-hook re-applies the masks after every step.
        steps_per_epoch: optimizer steps per epoch (ADMM's default update interval is a quarter epoch).
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
        if not cfg.phased:
            raise ValueError(f"PhasedMethod: method {cfg.method!r} is not one of oneshot, admm, rsr")
        self.cfg, self.model = cfg, model
        self.pruned = False
        self.history: list[dict[str, Any]] = []
        scope = cfg.resolved_prune_scope
        self.admm = self.rsr = None
        if cfg.method == "admm":
            every = cfg.admm_every or max(1, steps_per_epoch // 4)
            updates = max(1, cfg.pre_epochs * steps_per_epoch // every)
            # rho grows geometrically from admm_rho to admm_rho_max over the phase's updates
            growth = (cfg.admm_rho_max / cfg.admm_rho) ** (1.0 / max(1, updates - 1))
            self.admm = ADMM(model, optimizer, density=cfg.density, scope=scope, init=cfg.init, rho=cfg.admm_rho,
                             rho_growth=growth, rho_max=cfg.admm_rho_max, update_every=every)
        elif cfg.method == "rsr":
            self.rsr = RSR(model, density=cfg.density, l1=cfg.rsr_l1, noise_init=cfg.rsr_noise_init, scope=scope,
                           init=cfg.init)
            optimizer.add_param_group({"params": self.rsr.parameters(), "weight_decay": 0.0})
        optimizer.register_step_post_hook(lambda *_: apply_masks(model))

    def penalty(self) -> torch.Tensor | None:
        """The regulariser added to the loss in the first phase (None when there is none)."""
        if self.pruned:
            return None
        if self.admm is not None:
            return self.admm.penalty()
        if self.rsr is not None:
            return self.rsr.penalty()
        return None

    def end_epoch(self, epoch: int) -> dict | None:
        """After epoch ``epoch`` (0-based): prune when the first phase is over; returns the prune record."""
        if self.pruned or epoch + 1 != self.cfg.pre_epochs:
            return None
        if self.admm is not None:
            record = self.admm.finish()
        elif self.rsr is not None:
            record = self.rsr.finish()
        else:
            record = prune_by_magnitude(self.model, self.cfg.density, scope=self.cfg.resolved_prune_scope,
                                        init=self.cfg.init)
        self.pruned = True
        record = {**record, "method": self.cfg.method, "epoch": epoch + 1}
        self.history.append(record)
        return record

    @property
    def log(self) -> list[dict]:
        """Every event of the run: ADMM updates, noise-scale summaries and the prune."""
        inner = self.admm.history if self.admm is not None else []
        return [r for r in inner if r.get("event") == "admm_update"] + self.history

    def state_dict(self) -> dict:
        return {"pruned": self.pruned, "history": list(self.history),
                "admm": self.admm.state_dict() if self.admm is not None else None,
                "rsr": self.rsr.state_dict() if self.rsr is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.pruned, self.history = bool(state["pruned"]), list(state["history"])
        if self.admm is not None:
            self.admm.load_state_dict(state["admm"])
        if self.rsr is not None:
            self.rsr.load_state_dict(state["rsr"])
