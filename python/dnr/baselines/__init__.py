"""Baselines DNR is compared against: one-shot magnitude pruning, ADMM robust pruning and RSR.

Each is a pruning mechanism for a model converted with ``dnr.sparsify`` (at density 1 while it trains
dense); the harness (``dnr train --method oneshot|admm|rsr``) runs the phases: dense or regularised
adversarial training, one exact-budget prune, masked adversarial fine-tuning.
"""

from .admm import ADMM, ADMMBase
from .admm_circulant import CirculantADMM, project_block_circulant  # ADMM to block-circulant (issue 17)
from .pruning import SCOPES, magnitude_masks, prune_by_magnitude, unit_counts
from .rsr import RSR

__all__ = ["ADMM", "ADMMBase", "CirculantADMM", "project_block_circulant", "RSR", "SCOPES", "magnitude_masks", "prune_by_magnitude", "unit_counts"]
