"""Integer budget allocation across layers: proportional water-filling and exact rounding.

Everything here is plain Python on small lists (one entry per layer), so it is exact and
deterministic. Two problems are solved:

* ``water_fill``: split a real budget across layers in proportion to weights, respecting per-layer
  caps, spreading what capped layers cannot take over the layers that still have room.
* ``round_exact``: turn real per-layer targets into integer unit counts in ``[lo, hi]`` whose
  weight total ``sum(count_l * size_l)`` equals a given integer EXACTLY. With unit size 1 (irregular
  sparsity) this is largest-remainder rounding; with channel units of different sizes it is a small
  bounded subset-sum problem, solved with bitset dynamic programming in a window around the targets.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["water_fill", "largest_remainder", "round_exact", "AllocationError"]


class AllocationError(ValueError):
    """Raised when no integer allocation satisfies the constraints."""


def water_fill(weights: Sequence[float], caps: Sequence[float], total: float) -> list[float]:
    """Split ``total`` proportionally to ``weights`` with ``share_l <= caps[l]``.

    What capped layers cannot take is spread again over the layers with room, in proportion to their
    weights (uniformly if all of their weights are zero), until everything is placed.

    Raises:
        AllocationError: if ``total`` exceeds ``sum(caps)``.
    """
    n = len(weights)
    if len(caps) != n:
        raise ValueError(f"weights and caps must have the same length, got {n} and {len(caps)}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    cap_sum = float(sum(caps))
    if total > cap_sum * (1 + 1e-12) + 1e-9:
        raise AllocationError(f"cannot place {total} units: the caps only hold {cap_sum}")
    share = [0.0] * n
    open_ = [i for i in range(n) if caps[i] > 0]
    remaining = float(total)
    for _ in range(n + 1):
        if remaining <= 1e-12 * max(1.0, total) or not open_:
            break
        w = [max(0.0, float(weights[i])) for i in open_]
        wsum = sum(w)
        if wsum <= 0:
            w = [1.0] * len(open_)
            wsum = float(len(open_))
        saturated = []
        placed = 0.0
        for i, wi in zip(open_, w):
            want = remaining * (wi / wsum)  # ratio first: tiny weights must not underflow
            room = caps[i] - share[i]
            take = min(want, room)
            share[i] += take
            placed += take
            if want >= room:
                saturated.append(i)
        remaining -= placed
        if not saturated:
            break
        open_ = [i for i in open_ if i not in saturated]
    return share


def largest_remainder(targets: Sequence[float], lo: Sequence[int], hi: Sequence[int], total: int) -> list[int]:
    """Integers ``g`` with ``sum(g) == total`` and ``lo <= g <= hi``, rounding ``targets`` by largest remainders.

    Targets are first clipped to ``[lo, hi]``; any surplus or deficit left by the clipping and the
    flooring is settled one unit at a time on the layers with the largest (or smallest) fractional parts.
    Ties go to the lower index, so the result is deterministic.
    """
    n = len(targets)
    if not (len(lo) == len(hi) == n):
        raise ValueError("targets, lo and hi must have the same length")
    if any(lo[i] > hi[i] for i in range(n)):
        raise AllocationError(f"some lower bound exceeds its upper bound: lo={list(lo)}, hi={list(hi)}")
    if not sum(lo) <= total <= sum(hi):
        raise AllocationError(f"total {total} is outside [sum(lo), sum(hi)] = [{sum(lo)}, {sum(hi)}]")
    clipped = [min(max(float(t), lo[i]), hi[i]) for i, t in enumerate(targets)]
    g = [int(math.floor(c)) for c in clipped]
    frac = [c - gi for c, gi in zip(clipped, g)]
    diff = total - sum(g)
    while diff != 0:
        if diff > 0:
            order = sorted((i for i in range(n) if g[i] < hi[i]), key=lambda i: (-frac[i], i))
        else:
            order = sorted((i for i in range(n) if g[i] > lo[i]), key=lambda i: (frac[i], i))
        step = 1 if diff > 0 else -1
        for i in order[: abs(diff)]:
            g[i] += step
            frac[i] -= step  # a layer moved once is the last to move again
        diff = total - sum(g)
    return g


def round_exact(
    targets: Sequence[float],
    sizes: Sequence[int],
    lo: Sequence[int],
    hi: Sequence[int],
    total: int,
    *,
    nearest: bool = False,
    max_window: int = 64,
) -> list[int]:
    """Integer unit counts ``g`` in ``[lo, hi]`` with ``sum(g[l] * sizes[l]) == total``, close to ``targets``.

    Args:
        targets: real unit counts per layer (what a proportional split asks for).
        sizes: weights per unit for each layer (1 for single weights, in_ch*kh*kw for a conv filter).
        lo, hi: integer bounds on the unit counts.
        total: the exact weight total to reach.
        nearest: if no combination reaches ``total`` exactly, return the one with the nearest total
            (ties: the smaller total) instead of raising.
        max_window: widest search window, in units per layer, around the rounded targets.

    Returns:
        list of ints, one per layer.

    Raises:
        AllocationError: if ``nearest`` is False and no allocation in the search window is exact.
    """
    n = len(targets)
    if not (len(sizes) == len(lo) == len(hi) == n):
        raise ValueError("targets, sizes, lo and hi must have the same length")
    if any(s < 1 for s in sizes):
        raise ValueError(f"unit sizes must be >= 1, got {list(sizes)}")
    if all(s == 1 for s in sizes):
        clamped = min(max(total, sum(lo)), sum(hi)) if nearest else total
        return largest_remainder(targets, lo, hi, clamped)
    base = [min(max(int(math.floor(float(t))), lo[i]), hi[i]) for i, t in enumerate(targets)]
    window = 1
    while True:
        found = _window_search(targets, sizes, lo, hi, total, base, window, nearest=False)
        if found is not None:
            return found
        if window >= max_window:
            break
        window = min(max_window, window * 2)
    if nearest:
        found = _window_search(targets, sizes, lo, hi, total, base, max_window, nearest=True)
        if found is not None:
            return found
    raise AllocationError(
        f"no unit counts within +-{max_window} of the targets reach the weight total {total} exactly "
        f"(unit sizes {list(sizes)})"
    )


def _window_search(targets, sizes, lo, hi, total, base, window, *, nearest):
    """Bitset subset-sum over per-layer offsets in [-window, window] around ``base``."""
    n = len(targets)
    low = [max(lo[i] - base[i], -window) for i in range(n)]
    high = [min(hi[i] - base[i], window) for i in range(n)]
    start = sum((base[i] + low[i]) * sizes[i] for i in range(n))
    span = sum((high[i] - low[i]) * sizes[i] for i in range(n))
    # reach[l] has bit k set when layers 0..l-1 can add exactly k weights above their lowest choice
    reach = [1]
    for i in range(n):
        prev = reach[-1]
        acc = 0
        for k in range(high[i] - low[i] + 1):
            acc |= prev << (k * sizes[i])
        reach.append(acc)
    want = total - start
    if not (0 <= want <= span) or not (reach[-1] >> want) & 1:
        if not nearest:
            return None
        want = _nearest_bit(reach[-1], want, span)
        if want is None:
            return None
    counts = [0] * n
    for i in reversed(range(n)):
        ideal = float(targets[i]) - (base[i] + low[i])
        options = sorted(range(high[i] - low[i] + 1), key=lambda k: (abs(k - ideal), k))
        for k in options:
            rest = want - k * sizes[i]
            if rest >= 0 and (reach[i] >> rest) & 1:
                counts[i] = base[i] + low[i] + k
                want = rest
                break
        else:  # pragma: no cover - impossible when reach[-1] had the bit set
            raise AssertionError("bitset reconstruction failed")
    return counts


def _nearest_bit(bits: int, want: int, span: int):
    """Index of the set bit nearest to ``want`` (the lower one on ties), or None if no bit is set."""
    if bits == 0:
        return None
    want = min(max(want, 0), span)
    for d in range(span + 1):
        for k in (want - d, want + d):
            if 0 <= k <= span and (bits >> k) & 1:
                return k
    return None
