"""The final stage: the search's winner re-aligned to the target budget, retrained once per
seed with the shared final recipe and evaluated on the test split. Ray-free.

A seed already retrained by another experiment of the same recipe (the same candidate,
final recipe, seed, data, model and quantization settings: only search settings differ,
as for DualPrecision's grid and the uniform baseline on a network without depthwise
layers) is not trained again: its trial returns that stored result, marked
``reused_from``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from qsearch import QSearchError
from qsearch.budget import Budget
from qsearch.candidate import Candidate
from qsearch.files import SPEC_FILE
from qsearch.space import SearchSpace
from qsearch.spec import Spec
from qsearch.store import ResultsStore
from qsearch.strategy import GridStrategy, Proposal, Result, best_at_highest_fidelity


class FinalRetrain(GridStrategy):
    """One cell per seed offset: the same candidate, a different seed, tested at the end."""

    name = "final"

    def __init__(self, space: SearchSpace, budget: Budget, *, candidate: Candidate,
                 seeds: int, seed: int = 0, reuse: dict[int, dict] | None = None):
        super().__init__(space, budget, seed=seed)
        self.candidate, self.cells = candidate, list(range(seeds))
        self.reuse = reuse or {}  # seed offset -> a stored result of the same retrain

    def propose(self, offset: int) -> Proposal:
        params = {"seed_offset": offset, "test": True}
        if offset in self.reuse:
            params["reuse"] = self.reuse[offset]
        return Proposal(self.candidate, params=params)

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


# Spec keys that choose what is searched and how the search runs, not how a given candidate
# is retrained: experiments differing only in these share their final retrains.
SEARCH_ONLY = ("strategy", "strategy_kwargs", "proxy_budget", "trials", "train", "scheduler",
               "min_steps", "reduction_factor", "evaluator", "supernet_train", "supernet_cache",
               "top_k", "final_seeds", "out", "name", "concurrency", "max_failures",
               "time_budget", "address")


def retrain_key(spec: dict) -> str:
    """What decides a final retrain's result besides its candidate and seed (a spec dict)."""
    return json.dumps({k: v for k, v in spec.items() if k not in SEARCH_ONLY},
                      sort_keys=True, default=str)


def earlier_retrains(out: Path, spec: Spec, cand: Candidate, seeds: int) -> dict[int, dict]:
    """Seed offset (below ``seeds``) -> the stored result (a ``Result`` dict, marked
    ``reused_from``) of the same final retrain in a sibling experiment of ``out`` (same
    recipe directory)."""
    here = Path(out).resolve()
    mine = json.loads(json.dumps(spec.to_dict(), default=str))  # as its spec file reads
    key, want, found = retrain_key(mine), cand.to_json(), {}
    for spec_file in sorted(here.parent.glob(f"*/{SPEC_FILE}")):
        other = spec_file.parent
        if other == here:
            continue
        try:
            if retrain_key(json.loads(spec_file.read_text())) != key:
                continue
            rows = ResultsStore(other).rows
        except (OSError, ValueError, QSearchError):
            continue  # unreadable: not a source of results
        for r in rows:
            offset = r["seed"] - spec.seed
            if (r["stage"] == "final" and r["status"] == "ok" and r["candidate"] == want
                    and 0 <= offset < seeds and offset not in found):
                metrics = {k: v for k, v in json.loads(r["metrics"] or "{}").items()
                           if k != "cpu_seconds"}
                metrics["reused_from"] = f"{other.name}/{r['trial_id']}"
                found[offset] = Result("ok", r["val_acc"], cand, metrics,
                                       fidelity=r["steps"]).to_dict()
    return found


def reuse_line(reuse: dict[int, dict]) -> str:
    """The console line saying which seeds' results come from which experiments."""
    sources = sorted({r["metrics"]["reused_from"].split("/")[0] for r in reuse.values()})
    seeds = ", ".join(str(k) for k in sorted(reuse))
    return (f"final: seed offset{'s' * (len(reuse) > 1)} {seeds} retrained before by "
            f"{', '.join(sources)} (same candidate, final recipe and settings): "
            "stored results reused, not trained again")
