"""A fixed random mask (``static``): the sparse model of ``dnr`` without the rewiring."""

from __future__ import annotations

from .base import MaskedMethod
from .registry import register

__all__ = ["StaticMask"]


@register("static")
class StaticMask(MaskedMethod):
    description = "fixed random mask + AT"

    def attach(self, model, optimizer, *, total_steps, steps_per_epoch) -> None:
        super().attach(model, optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        self.keep_masks(model, optimizer)
