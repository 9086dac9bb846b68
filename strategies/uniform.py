"""Uniform baseline (One-Bitwidth paper, Sec. 4.2): one bit-width for every free layer.

Each bit-width in the set is width-aligned to the budget, so the proposals compare
precisions at matched size; first and last layers keep the space's pinned bits. A
fixed-width model has no width to align, so nothing trades for bits left unused: its one
cell is the largest bit-width that fits as it is (fewer bits on the same channels are
listed as ``dominated``, more as ``over_budget``).
"""

from __future__ import annotations

from collections.abc import Sequence

from qsearch.budget import Budget
from qsearch.space import SearchSpace
from qsearch.strategy import GridStrategy, Proposal, bit_subset, register_strategy


@register_strategy("uniform")
class Uniform(GridStrategy):
    def __init__(self, space: SearchSpace, budget: Budget, *, seed: int = 0,
                 bits: Sequence[int] | None = None):
        super().__init__(space, budget, seed=seed)
        self.cells = bit_subset("uniform", bits, space)
        self.over_budget: list[int] = []  # fixed width: bit-widths too large to fit
        self.dominated: list[int] = []  # fixed width: fewer bits than the largest that fits
        if space.family.fixed_width:
            fits = sorted(b for b in self.cells
                          if space.cost(space.candidate(b), budget.kind) <= budget.value)
            self.over_budget = sorted(set(self.cells) - set(fits))
            self.dominated = fits[:-1]
            self.cells = fits[-1:] or [min(self.cells)]  # none fits: lowered to fit (align)

    def propose(self, bits: int) -> Proposal:
        return Proposal(self.align(bits), params={"bits": bits})

    def summary(self) -> dict:
        fixed = {k: v for k, v in (("over_budget_bits", self.over_budget),
                                   ("dominated_bits", self.dominated)) if v}
        return {"accuracy_by_bits": {str(b): acc for b, acc in self.results()}, **fixed}
