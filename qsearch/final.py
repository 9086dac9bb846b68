"""The final stage: the search's winner re-aligned to the target budget, retrained once per
seed with the shared final recipe and evaluated on the test split. Ray-free."""

from __future__ import annotations

import math

import numpy as np

from qsearch.budget import Budget
from qsearch.candidate import Candidate
from qsearch.space import SearchSpace
from qsearch.strategy import GridStrategy, Proposal, best_at_highest_fidelity


class FinalRetrain(GridStrategy):
    """One cell per seed offset: the same candidate, a different seed, tested at the end."""

    name = "final"

    def __init__(self, space: SearchSpace, budget: Budget, *, candidate: Candidate,
                 seeds: int, seed: int = 0):
        super().__init__(space, budget, seed=seed)
        self.candidate, self.cells = candidate, list(range(seeds))

    def propose(self, offset: int) -> Proposal:
        return Proposal(self.candidate, params={"seed_offset": offset, "test": True})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "candidate": self.candidate.to_dict()}

    @staticmethod
    def candidate_from_state(state: dict) -> Candidate:
        """The candidate a saved final stage retrains (its state names it)."""
        return Candidate.from_dict(state["candidate"])


def best_row(rows: list[dict]) -> dict | None:
    """The most accurate trial at the highest fidelity reached (first one on ties): a
    full-length trial (status ok) if any, else one of those a scheduler stopped at the
    most steps. Accuracies at different fidelities are never compared."""
    scored = [r for r in rows if r["status"] in ("ok", "stopped") and r["candidate"]
              and r["val_acc"] is not None and math.isfinite(r["val_acc"])]
    return best_at_highest_fidelity(
        scored, accuracy=lambda r: r["val_acc"],
        fidelity=lambda r: math.inf if r["status"] == "ok" else r.get("steps") or 0)


def final_candidate(rows: list[dict], space: SearchSpace,
                    target: Budget) -> tuple[dict, Candidate, float] | None:
    """The best trial, its bits re-aligned to the target budget, and the aligned cost."""
    best = best_row(rows)
    if best is None:
        return None
    aligned = space.align(Candidate.from_json(best["candidate"]), target)
    return best, aligned.candidate, aligned.cost


def seed_summary(rows: list[dict]) -> dict | None:
    """Mean and sample standard deviation of the final rows' test accuracy."""
    accs = [r["test_acc"] for r in rows if r["status"] == "ok" and r["test_acc"]]
    if not accs:
        return None
    std = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
    return {"test_acc_mean": float(np.mean(accs)), "test_acc_std": std, "n": len(accs)}
