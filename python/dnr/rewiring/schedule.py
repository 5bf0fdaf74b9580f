"""Prune-rate schedules: p(t) for optimizer step t of T."""

from __future__ import annotations

import math

__all__ = ["cosine_prune_rate", "PRUNE_SCHEDULES", "prune_rate_at", "auto_rewire_interval", "REWIRE_SETTINGS"]

PRUNE_SCHEDULES = ("cosine", "constant", "linear")


def cosine_prune_rate(step: int, total_steps: int, initial: float = 0.5, final: float = 0.005) -> float:
    """p(t) = final + (initial - final) * (1 + cos(pi * t / T)) / 2, with t clamped to [0, T]."""
    t = min(max(step, 0), total_steps)
    return final + (initial - final) * (1.0 + math.cos(math.pi * t / total_steps)) / 2.0


def prune_rate_at(schedule: str, step: int, total_steps: int, initial: float, final: float) -> float:
    """The prune rate of ``schedule`` ("cosine", "linear" or "constant") at optimizer step ``step``."""
    if schedule == "cosine":
        return cosine_prune_rate(step, total_steps, initial, final)
    if schedule == "linear":
        t = min(max(step, 0), total_steps)
        return initial + (final - initial) * t / total_steps
    if schedule == "constant":
        return initial
    raise ValueError(f"prune schedule must be one of {PRUNE_SCHEDULES}, got {schedule!r}")


def auto_rewire_interval(total_steps: int, until: float = 1.0, rewirings: int = 20, longest: int = 100) -> int:
    """Optimizer steps between two rewirings: ``clamp(round(until * T / rewirings), 1, longest)``.

    A short run (a few epochs: a few hundred steps) gets about ``rewirings`` small rewirings before its
    horizon ``until * T``, so that every regrown weight has hundreds of steps left to train; a long run
    (200 epochs: ~78,000 steps) rewires every ``longest`` steps, often enough for the momentum to see
    each layer's current structure. The values are the ones measured best in docs/method.md.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    return max(1, min(longest, round(until * total_steps / rewirings)))


def auto_sparsify_until(rewire_until: float, mode: str = "irregular") -> float:
    """``sparsify_until="auto"``. Irregular sparsity: the dense-to-sparse start takes the first third of the
    rewiring window, ``rewire_until / 3`` (0.25 with the default horizon 0.75: +7.7 APGD points over starting at the
    budget in a 1,248-step run, -1.2 in a 184-step one; docs/method.md). Channel sparsity: 0, the start at the
    budget (the dense start measured 0.9 APGD points worse on the 184-step main job over three seeds, and 0.8
    worse in the 1,248-step run)."""
    if mode not in ("irregular", "channel"):
        raise ValueError(f"mode must be 'irregular' or 'channel', got {mode!r}")
    return rewire_until / 3 if mode == "irregular" else 0.0


#: Named rewiring settings of ``dnr.DNR`` (``dnr train --rewire NAME``). "auto" is the default of the library (the
#: constructor's defaults); "paper" is the DNR paper's schedule, made for 200-epoch runs. See docs/method.md.
REWIRE_SETTINGS: dict[str, dict] = {
    "auto": dict(rewire_every="auto", rewire_until=0.75, prune_rate=0.3, prune_rate_min=0.005, schedule="cosine",
                 regrowth="auto", min_active=None, sparsify_until="auto"),
    "paper": dict(rewire_every=None, rewire_until=1.0, prune_rate=0.5, prune_rate_min=0.005, schedule="cosine",
                  regrowth="momentum", min_active=1, sparsify_until=0.0),
}
