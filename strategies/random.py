"""Random baseline: independent uniform bits per free layer, width-aligned to the budget; on
a fixed-width model lowered until it fits and raised to fill it (repair, not rejection: every
proposal is trained, and fills what its bits allow of the budget)."""

from __future__ import annotations

from collections.abc import Sequence

from qsearch.budget import Budget
from qsearch.space import SearchSpace
from qsearch.strategy import Proposal, Result, Strategy, bit_subset, register_strategy


@register_strategy("random")
class RandomSearch(Strategy):
    def __init__(self, space: SearchSpace, budget: Budget, *, seed: int = 0,
                 bits: Sequence[int] | None = None):
        super().__init__(space, budget, seed=seed)
        self.bits = bit_subset("random", bits, space)

    def ask(self, trial_id: str) -> Proposal:
        choice = self.rng.choice(self.bits, size=len(self.space.free_layers))
        return Proposal(self.fill([int(b) for b in choice], self.bits))

    def tell(self, trial_id: str, result: Result) -> None:
        pass  # proposals do not depend on results
