"""Proxy fidelity: the same candidates trained at several trial lengths, to see whether a
short trial ranks them as a longer one does (`qsearch fidelity`; the report is
:mod:`qsearch.fidelity`).

The candidates are the uniform bit-widths of the space's bit choices plus mixed ones, all
width-aligned to the budget: random per-layer mixes, or (``mixes="halves"``) first the
extreme mixes that give each half of the network one end of a pair of bit-widths (front
1-bit and back 8-bit, and the reverse; widest pairs first), then random ones. Each
(length, candidate, seed offset) is one trial, shortest lengths first, so a cut-short run
has complete rankings at the short lengths.
The longest length is the run's trial length (``--steps``/``--epochs``); a shorter one
trains its share of it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from qsearch import QSearchError
from qsearch.budget import Budget
from qsearch.space import SearchSpace
from qsearch.strategy import GridStrategy, Proposal, Result, register_strategy
from qsearch.tasks import TaskContext, register_task, train_task

TASK = "train-length"


@register_task(TASK)
def train_length(ctx: TaskContext) -> Result:
    """The ``train`` task for ``length / reference`` of the run's trial length (``params
    ["unit"]``: steps or epochs). `qsearch fidelity` sets the trial length to the longest
    length, so each trial trains exactly its length; the metrics name the candidate and
    the length trained, for the report."""
    p, unit = ctx.proposal.params, ctx.proposal.params["unit"]
    if not ctx.train.get(unit):
        return Result("failed", candidate=ctx.proposal.candidate, error=(
            f"fidelity lengths are in {unit} but the trial length is not: set it in {unit}, "
            "e.g. --steps 900 (as `qsearch fidelity` does)"))
    share = ctx.train[unit] * p["length"] / p["reference"]
    length = max(1, round(share)) if unit == "steps" else share
    train = {k: v for k, v in ctx.train.items() if k not in ("steps", "epochs")}
    result = train_task(dataclasses.replace(ctx, train={**train, unit: length}))
    keep = ("candidate_index", "label", "unit", "seed_offset")
    return dataclasses.replace(result, metrics={**result.metrics, "length": length,
                                                **{k: p[k] for k in keep if k in p}})


MIXES = ("random", "halves")


def half_mixes(bit_choices: Sequence[int], n: int) -> list[list[int]]:
    """For each pair of bit-widths lo < hi, the front half of the ``n`` layers at one and the
    back half at the other, both ways round; pairs with the larger ratio hi/lo first."""
    pairs = sorted(((lo, hi) for lo in bit_choices for hi in bit_choices if lo < hi),
                   key=lambda p: (-p[1] / p[0], p))
    front = n // 2
    return [[a] * front + [b] * (n - front) for lo, hi in pairs for a, b in ((lo, hi), (hi, lo))]


def check_options(candidates: object, lengths: object, seeds: object, unit: str) -> None:
    """Refuse bad fidelity options with one line naming the value and the fix."""
    def whole(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not whole(candidates) or candidates < 3:
        raise QSearchError(f"fidelity candidates = {candidates!r}: give at least 3 (a rank "
                           "correlation needs several), e.g. --candidates 12")
    if not whole(seeds) or not 1 <= seeds <= 100:
        raise QSearchError(f"fidelity seeds = {seeds!r}: give 1 to 100 repeats of each "
                           "trial, e.g. --seeds 2")
    number = whole if unit == "steps" else (lambda v: isinstance(v, (int, float))
                                            and not isinstance(v, bool) and math.isfinite(v))
    ok = isinstance(lengths, (list, tuple)) and all(number(v) and v > 0 for v in lengths)
    if not ok or len(set(lengths)) < 2 or len(set(lengths)) != len(lengths):
        example = "--steps 100,300,900" if unit == "steps" else "--epochs 1,3"
        raise QSearchError(f"fidelity {unit} {lengths!r}: give two or more different "
                           f"positive trial lengths, e.g. {example}")


@register_strategy("fidelity")
class Fidelity(GridStrategy):
    """Trains K candidates at several trial lengths to measure how well short trials rank."""

    searches = False  # a measurement, not a search: not in a recipe's `strategy: all`
    train_trials = False  # its own task (the train task at a share of the length)

    def __init__(self, space: SearchSpace, budget: Budget, *, seed: int = 0,
                 candidates: int = 12, steps: Sequence[int] | None = None,
                 epochs: Sequence[float] | None = None, seeds: int = 1,
                 mixes: str = "random"):
        super().__init__(space, budget, seed=seed)
        if mixes not in MIXES:
            raise QSearchError(f"fidelity mixes {mixes!r} not known: use one of "
                               f"{', '.join(MIXES)}, e.g. --mixes halves")
        if steps is not None and epochs is not None:
            raise QSearchError("fidelity: give steps or epochs, not both (e.g. "
                               "--steps 100,300,900)")
        self.unit = "epochs" if epochs is not None else "steps"
        lengths = epochs if epochs is not None else (steps or [100, 300, 900])
        check_options(candidates, list(lengths), seeds, self.unit)
        self.lengths = sorted(lengths)
        self.bits = self._candidate_bits(candidates, halves=mixes == "halves")
        self.cells = [[length, i, s] for length in self.lengths
                      for i in range(candidates) for s in range(seeds)]

    def _candidate_bits(self, k: int, *, halves: bool = False) -> list[list[int]]:
        """Per-free-layer bits: one uniform candidate per bit choice (up to k), then (with
        ``halves``) the half-and-half extremes, then distinct random mixed ones."""
        n = len(self.space.free_layers)
        out = [[b] * n for b in self.space.bit_choices[:k]]
        if halves:
            out += [h for h in half_mixes(self.space.bit_choices, n) if h not in out][
                :max(0, k - len(out))]
        for _ in range(100 * k):
            if len(out) == k:
                break
            bits = [int(b) for b in self.rng.choice(self.space.bit_choices, size=n)]
            if bits not in out:
                out.append(bits)
        if len(out) < k:
            raise QSearchError(f"fidelity: this space has only {len(out)} distinct "
                               f"candidates: ask for fewer, e.g. --candidates {len(out)}")
        return out

    def label(self, i: int) -> str:
        bits, n = self.bits[i], len(self.bits[i])
        if len(set(bits)) == 1:
            return f"uniform-{bits[0]}b"
        front, back = set(bits[:n // 2]), set(bits[n // 2:])
        if len(front) == len(back) == 1 and n > 1:
            return f"halves-{bits[0]}b-{bits[-1]}b"
        return f"mixed-{i}"

    def propose(self, cell: list) -> Proposal:
        length, i, s = cell
        return Proposal(self.align(self.bits[i]), task=TASK, params={
            "candidate_index": i, "label": self.label(i), "unit": self.unit,
            "length": length, "reference": self.lengths[-1], "seed_offset": s})

    def expected_steps(self) -> int | None:
        """Each cell trains its length (the trial length is the longest one)."""
        return sum(length for length, _, _ in self.cells) if self.unit == "steps" else None

    def summary(self) -> dict:
        return {"unit": self.unit, "lengths": self.lengths,
                "candidates": [self.label(i) for i in range(len(self.bits))]}

    def summary_text(self) -> str:
        return "the proxy fidelity table: `qsearch fidelity --report DIR`"
