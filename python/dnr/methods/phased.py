"""The baselines that prune once: train, prune to the exact budget, fine-tune with the mask fixed.

    oneshot  dense adversarial training -> one-shot magnitude prune -> adversarial fine-tuning
    admm     adversarial training + ADMM penalty (Z/U updates) -> prune to Proj_S(W) -> masked retraining
    rsr      adversarial training + channel-wise weight noise + L1 -> global magnitude prune -> fine-tuning

All run ``cfg.epochs`` epochs with the same attack as DNR (the same budget of epochs x attack steps):
``cfg.pre_epochs`` before the prune, the rest after it, the learning-rate schedule restarting at the
prune (learning-rate rewinding, Renda et al. 2020; ``phased = True``). The model is a dense-masked one
(``sparsify`` at density 1), so the prune only changes masks and the run directory has the same files
as DNR's, plus ``pruning.jsonl``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..baselines import ADMM, RSR, prune_by_magnitude
from .base import MaskedMethod
from .registry import register

__all__ = ["PhasedPruning", "OneShot", "ADMMPruning", "RSRPruning", "admm_schedule"]


def admm_schedule(cfg, steps_per_epoch: int) -> dict:
    """The Z/U update period and the rho schedule of an ADMM phase of ``cfg.pre_epochs`` epochs: keywords
    ``rho``, ``rho_growth``, ``rho_max``, ``update_every`` of :class:`dnr.baselines.admm.ADMMBase`. rho grows
    geometrically from ``cfg.admm_rho`` to ``cfg.admm_rho_max`` over the phase's updates (default period: 4 per
    epoch)."""
    every = cfg.admm_every or max(1, steps_per_epoch // 4)
    updates = max(1, cfg.pre_epochs * steps_per_epoch // every)
    growth = (cfg.admm_rho_max / cfg.admm_rho) ** (1.0 / max(1, updates - 1))
    return {"rho": cfg.admm_rho, "rho_growth": growth, "rho_max": cfg.admm_rho_max, "update_every": every}


class PhasedPruning(MaskedMethod):
    """One baseline run's state: its regulariser (ADMM or RSR), whether the prune happened, the log.

    ``attach`` builds the regulariser (RSR adds its noise scales to the optimizer as a second parameter
    group, without weight decay) and a step post-hook that re-applies the masks after every step.
    """

    phased = True
    needs_sparse_target = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pruned = False
        self.history: list[dict[str, Any]] = []
        self.admm: ADMM | None = None
        self.rsr: RSR | None = None

    @classmethod
    def check_config(cls, cfg) -> str | None:
        if cfg.epochs < 2:
            return (f"option --epochs: got {cfg.epochs!r}, expected at least 2 for --method {cls.name} (a training "
                    "phase and a fine-tuning phase)")
        return None

    def initial_density(self) -> float:
        return 1.0  # dense until the prune

    def make_regulariser(self, model, optimizer, steps_per_epoch: int) -> None:
        """Build ``self.admm`` / ``self.rsr`` (before the mask hook: its hooks run first)."""

    def attach(self, model, optimizer, *, total_steps, steps_per_epoch) -> None:
        super().attach(model, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        self.make_regulariser(model, optimizer, steps_per_epoch)
        self.keep_masks(model, optimizer)

    def loss_term(self) -> torch.Tensor | None:
        """The regulariser in the first phase (None when there is none)."""
        if self.pruned:
            return None
        if self.admm is not None:
            return self.admm.penalty()
        if self.rsr is not None:
            return self.rsr.penalty()
        return None

    def prune(self) -> dict:
        """Prune to the budget; returns the prune record."""
        return prune_by_magnitude(self.model, self.cfg.density, scope=self.cfg.resolved_prune_scope,
                                  init=self.cfg.init)

    def epoch_end(self, epoch: int, *, last: bool) -> dict | None:
        """After epoch ``epoch`` (0-based): prune when the first phase is over; returns the prune record."""
        if self.pruned or epoch + 1 != self.cfg.pre_epochs:
            return None
        record = {**self.prune(), "method": self.cfg.method, "epoch": epoch + 1}
        self.pruned = True
        self.history.append(record)
        return record

    def epoch_message(self, record: dict) -> str | None:
        return (f"epoch {record['epoch']}: {self.cfg.method} pruned to density {record['density']:.4f} "
                f"({record['active']} weights, scope {record['scope']}); fine-tuning with the mask fixed")

    @property
    def log(self) -> list[dict]:
        """Every event of the run: ADMM updates, noise-scale summaries and the prune."""
        inner = self.admm.history if self.admm is not None else []
        return [r for r in inner if r.get("event") == "admm_update"] + self.history

    def log_records(self) -> dict[str, list[dict]]:
        return {"pruning.jsonl": self.log}

    def state_dict(self) -> dict:
        return {"pruned": self.pruned, "history": list(self.history),
                "admm": self.admm.state_dict() if self.admm is not None else None,
                "rsr": self.rsr.state_dict() if self.rsr is not None else None}

    def load_state_dict(self, state: dict | None) -> None:
        self.pruned, self.history = bool(state["pruned"]), list(state["history"])
        if self.admm is not None:
            self.admm.load_state_dict(state["admm"])
        if self.rsr is not None:
            self.rsr.load_state_dict(state["rsr"])


@register("oneshot")
class OneShot(PhasedPruning):
    description = "dense AT, one-shot magnitude prune, AT fine-tuning"


@register("admm")
class ADMMPruning(PhasedPruning):
    description = "ADMM robust pruning (Ye et al. 2019)"

    def make_regulariser(self, model, optimizer, steps_per_epoch: int) -> None:
        cfg = self.cfg
        self.admm = ADMM(model, optimizer, density=cfg.density, scope=cfg.resolved_prune_scope, init=cfg.init,
                         **admm_schedule(cfg, steps_per_epoch))

    def prune(self) -> dict:
        return self.admm.finish()


@register("rsr")
class RSRPruning(PhasedPruning):
    description = "robust sparse regularization (noise injection + L1 + AT, then prune and fine-tune)"

    def make_regulariser(self, model, optimizer, steps_per_epoch: int) -> None:
        cfg = self.cfg
        self.rsr = RSR(model, density=cfg.density, l1=cfg.rsr_l1, noise_init=cfg.rsr_noise_init,
                       scope=cfg.resolved_prune_scope, init=cfg.init)
        optimizer.add_param_group({"params": self.rsr.parameters(), "weight_decay": 0.0})

    def prune(self) -> dict:
        return self.rsr.finish()
