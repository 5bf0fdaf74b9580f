"""DNR rewiring: the controller, exact budget allocation and prune-rate schedules."""

from ..allocation import AllocationError, largest_remainder, round_exact, water_fill
from .controller import DNR
from .schedule import (PRUNE_SCHEDULES, REWIRE_SETTINGS, auto_rewire_interval, auto_sparsify_until, cosine_prune_rate,
                       prune_rate_at)

__all__ = ["DNR", "AllocationError", "largest_remainder", "round_exact", "water_fill",
           "PRUNE_SCHEDULES", "REWIRE_SETTINGS", "auto_rewire_interval", "auto_sparsify_until", "cosine_prune_rate",
           "prune_rate_at"]
