"""Filling a fixed-width budget through the bits: the exact subset-sum against
enumeration, the greedy fallback for rooms too large to solve exactly."""

import itertools

import numpy as np
import pytest

from qsearch import fill
from qsearch.budget import Budget
from qsearch.space import SearchSpace

LEVELS = [1, 2, 4, 8]


def _best_by_enumeration(units, start, room):
    options = [[b for b in LEVELS if b >= s] for s in start]
    adds = (sum(u * (b - s) for u, s, b in zip(units, start, bits))
            for bits in itertools.product(*options))
    return max(a for a in adds if a <= room)


@pytest.mark.parametrize("seed", range(20))
def test_raising_reaches_the_closest_cost_below_the_room(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 7))
    units = [int(u) for u in rng.integers(1, 300, size=n) * int(rng.choice([1, 9, 64]))]
    start = [int(b) for b in rng.choice(LEVELS, size=n)]
    room = int(rng.integers(0, 8 * sum(units)))
    bits = fill.raise_to_fill(units, start, LEVELS, room)
    added = sum(u * (b - s) for u, s, b in zip(units, start, bits))
    assert all(b >= s and b in LEVELS for b, s in zip(bits, start))
    assert added == _best_by_enumeration(units, start, room)


def test_a_room_too_large_to_solve_exactly_is_filled_greedily(monkeypatch):
    monkeypatch.setattr(fill, "EXACT_UNITS", 10)
    units, start, room = [7, 5, 3], [1, 1, 1], 40
    bits = fill.raise_to_fill(units, start, LEVELS, room)
    added = sum(u * (b - s) for u, s, b in zip(units, start, bits))
    assert added <= room
    for j, b in enumerate(bits):  # maximal: no layer can take a larger level and fit
        for up in (lv for lv in LEVELS if lv > b):
            assert added + units[j] * (up - b) > room


@pytest.mark.parametrize("kind", ["size", "bitops"])
def test_a_fixed_width_candidate_is_raised_to_the_closest_cost(kind):
    space = SearchSpace("torchvision:resnet18", "synthetic")
    cand = space.candidate(1)
    low, high = (space.cost(space.candidate(b), kind) for b in (1, 4))
    budget = Budget(kind, int(low + 0.37 * (high - low)))
    raised = space.raise_to_fill(cand, budget)
    cost = space.cost(raised, kind)
    assert cost <= budget.value and cost / budget.value > 0.99
    assert [raised.w_bits[i] for i in space.pinned] == [cand.w_bits[i] for i in space.pinned]
