"""Dynamic network rewiring (``dnr``): the method of this package, through the controller of
:mod:`dnr.rewiring` (the algorithm and its defaults: docs/method.md)."""

from __future__ import annotations

import torch

from ..rewiring import DNR
from .base import MaskedMethod
from .registry import register

__all__ = ["DynamicRewiring"]


@register("dnr")
class DynamicRewiring(MaskedMethod):
    """DNR as a compression method: the controller re-applies the masks after every optimizer step and
    rewires on its own cadence (``cfg.rewiring_settings``); its records go to ``rewiring.jsonl``."""

    description = "dynamic network rewiring + AT"
    needs_sparse_target = True
    # 1: sparsify_until="auto" (the dense-to-sparse start in irregular mode) became the default
    defaults_revision = 1

    def __init__(self, cfg):
        super().__init__(cfg)
        self.controller: DNR | None = None

    def attach(self, model, optimizer, *, total_steps, steps_per_epoch) -> None:
        super().attach(model, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        # its own generator (random regrowth, re-initialised channels): the global RNG stays the attack's
        self.controller = DNR(model, optimizer, total_steps=total_steps, **self.cfg.rewiring_settings,
                              generator=torch.Generator().manual_seed(self.cfg.seed + 2))

    def epoch_end(self, epoch: int, *, last: bool) -> dict | None:
        return self.controller.end_epoch(last=last)

    def epoch_metrics(self, first_step: int, step: int) -> dict:
        # the rewirings only: the dense-to-sparse start's pruning steps ("event": "sparsify") move nothing
        moved = [r["pruned"] for r in self.controller.history if first_step < r["step"] <= step and "event" not in r]
        return {"prune_rate": self.controller.prune_rate, "rewired_weights": sum(moved) if moved else None}

    def log_records(self) -> dict[str, list[dict]]:
        return {"rewiring.jsonl": self.controller.history}

    def state_dict(self) -> dict:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.controller.load_state_dict(state)
