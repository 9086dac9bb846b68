"""Filling a fixed-width budget through the bits: the closest cost below it.

A fixed-width model meets its budget only through its bits, and a strategy's proposal,
once it fits, usually leaves some budget unused. :func:`raise_to_fill` raises free layers
(never lowers one) so the cost comes as close to the budget as the bit choices allow. Cost
(C_size, Eq. 6 of DualPrecision, or BitOPs, Eq. 6b of FracBits) is linear in each layer's
bits, so this is a subset-sum over the possible raises, solved exactly by dynamic
programming in units of the greatest common divisor of the raises' costs. A model whose
room is more than :data:`EXACT_UNITS` such units (a divisor of 1 on a large budget) is
filled greedily instead: the largest raise that fits first, until none fits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

EXACT_UNITS = 1 << 19  # the largest room, in gcd units, filled exactly


def raise_to_fill(units: Sequence[int], start: Sequence[int], levels: Sequence[int],
                  room: int) -> list[int]:
    """Bits per layer, each ``start[j]`` or a larger one of ``levels``, adding the most
    cost that is at most ``room``; ``units[j]`` is layer j's cost per bit (integers).
    No layer of the result can take a larger level and still fit."""
    if room <= 0:  # nothing left to fill (or already over: nothing to raise)
        return list(start)
    options = [[b for b in sorted({s, *levels}) if b >= s] for s in start]
    incs = [[u * (b - s) for b in opts] for u, s, opts in zip(units, start, options)]
    g = math.gcd(*(i for row in incs for i in row if i > 0)) or 1
    if room // g > EXACT_UNITS:
        return _greedy(incs, options, room)
    picks = _subset_sum([[i // g for i in row] for row in incs], room // g)
    return [opts[k] for opts, k in zip(options, picks)]


def _subset_sum(incs: list[list[int]], room: int) -> list[int]:
    """For each row one option (index), maximising the sum of the chosen increments
    under ``room``: a reachability table per layer, then a walk back from the best sum.
    Option 0 (no raise, increment 0) is always allowed."""
    reach = np.zeros(room + 1, bool)
    reach[0] = True
    choice = np.zeros((len(incs), room + 1), np.int8)
    for j, row in enumerate(incs):
        new = reach.copy()  # option 0
        for k, inc in enumerate(row[1:], start=1):
            if inc > room:
                break
            shifted = np.zeros_like(reach)
            shifted[inc:] = reach[:room + 1 - inc]
            choice[j, shifted & ~new] = k
            new |= shifted
        reach = new
    total = int(np.flatnonzero(reach)[-1])
    picks = []
    for j in reversed(range(len(incs))):
        k = int(choice[j, total])
        picks.append(k)
        total -= incs[j][k]
    return picks[::-1]


def _greedy(incs: list[list[int]], options: list[list[int]], room: int) -> list[int]:
    """The largest single raise that still fits, repeatedly (for rooms too large to solve
    exactly); ends when no layer can go up and fit."""
    at = [0] * len(incs)
    used = 0
    while True:
        steps = [(row[k] - row[at[j]], j, k) for j, row in enumerate(incs)
                 for k in range(at[j] + 1, len(row)) if used + row[k] - row[at[j]] <= room]
        if not steps:
            return [opts[k] for opts, k in zip(options, at)]
        add, j, k = max(steps)
        used, at[j] = used + add, k
