"""Property tests of the integer budget allocation (plain Python, no torch)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnr.allocation import AllocationError, largest_remainder, round_exact, water_fill


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_water_fill_places_everything_within_caps(data):
    n = data.draw(st.integers(1, 12))
    weights = data.draw(st.lists(st.floats(0, 10), min_size=n, max_size=n))
    caps = data.draw(st.lists(st.floats(0, 1000), min_size=n, max_size=n))
    total = data.draw(st.floats(0, 1)) * sum(caps)
    share = water_fill(weights, caps, total)
    assert math.isclose(sum(share), total, rel_tol=1e-9, abs_tol=1e-6)
    for s, c in zip(share, caps):
        assert -1e-9 <= s <= c + 1e-9


def test_water_fill_is_proportional_without_caps_and_spills_excess():
    assert water_fill([1, 3], [100, 100], 8) == pytest.approx([2, 6])
    # layer 1 wants 6 but holds 4: the excess 2 goes to layer 0
    assert water_fill([1, 3], [100, 4], 8) == pytest.approx([4, 4])
    # all-zero weights spread uniformly
    assert water_fill([0, 0], [10, 10], 6) == pytest.approx([3, 3])
    with pytest.raises(AllocationError, match="caps only hold"):
        water_fill([1, 1], [1, 1], 3)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_largest_remainder_is_exact_and_bounded(data):
    n = data.draw(st.integers(1, 12))
    lo = data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    hi = [l + data.draw(st.integers(0, 50)) for l in lo]
    total = data.draw(st.integers(sum(lo), sum(hi)))
    targets = data.draw(st.lists(st.floats(-5, 60), min_size=n, max_size=n))
    g = largest_remainder(targets, lo, hi, total)
    assert sum(g) == total
    assert all(l <= x <= h for l, x, h in zip(lo, g, hi))


def test_largest_remainder_rounds_by_remainders():
    assert largest_remainder([1.6, 1.3, 1.1], [0] * 3, [9] * 3, 4) == [2, 1, 1]
    assert largest_remainder([1.6, 1.3, 1.1], [0] * 3, [9] * 3, 5) == [2, 2, 1]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_round_exact_finds_a_planted_solution(data):
    """A solution within one unit of the targets exists; the search must find an exact one."""
    n = data.draw(st.integers(1, 10))
    sizes = data.draw(st.lists(st.integers(1, 600), min_size=n, max_size=n))
    hi = data.draw(st.lists(st.integers(1, 64), min_size=n, max_size=n))
    planted = [data.draw(st.integers(0, h)) for h in hi]
    total = sum(g * s for g, s in zip(planted, sizes))
    targets = [g + data.draw(st.floats(-0.49, 0.49)) for g in planted]
    g = round_exact(targets, sizes, [0] * n, hi, total)
    assert sum(x * s for x, s in zip(g, sizes)) == total
    assert all(0 <= x <= h for x, h in zip(g, hi))


def test_round_exact_nearest_and_failure():
    # only multiples of 10 are reachable: 25 is not, nearest picks 20 (ties go low)
    assert round_exact([2.5], [10], [0], [5], 25, nearest=True) == [2]
    with pytest.raises(AllocationError, match="exactly"):
        round_exact([2.5], [10], [0], [5], 25)
    # mixed sizes: 3*4 + 1*5 = 17
    g = round_exact([3.2, 1.1], [4, 5], [0, 0], [10, 10], 17)
    assert g[0] * 4 + g[1] * 5 == 17
