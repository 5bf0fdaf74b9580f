"""Dense training, clean (``dense``) or adversarial (``dense-at``): the references of every comparison."""

from __future__ import annotations

from .base import CompressionMethod
from .registry import register

__all__ = ["Dense", "DenseAT"]


@register("dense")
class Dense(CompressionMethod):
    description = "clean dense training"
    adversarial = False


@register("dense-at")
class DenseAT(CompressionMethod):
    description = "dense PGD adversarial training"

    @classmethod
    def check_config(cls, cfg) -> str | None:
        if cfg.eps == 0:
            return "option --eps: got 0, but --method dense-at trains adversarially (eps > 0)"
        return None
