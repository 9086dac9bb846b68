"""A strategy against uniform over several budgets: does it beat the single bit-width in
general, not only at one budget?

At one budget the leaderboard's Δ uniform is a paired interval over 3-5 seeds, often too wide
to call. Here each strategy's per-seed differences to the ``uniform`` entry of the same
budget are pooled over the budgets where both were ranked and ran the same seeds: n =
budgets x seeds differences, each paired by budget and seed, and a one-sample Student t-test
on them. The mean is the difference averaged over those budgets; a difference that changes
with the budget widens the interval rather than hiding in it. One seed shares its data
split and order across the budgets, so its differences there may move together and the
pooled interval may be too narrow; each line also gives the by-seed test (each seed's mean
difference over the budgets, the seeds as the independent units), the safer call. Pure
functions over leaderboard entries; scipy is imported when a line is built.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from qsearch.seed_noise import ALPHA, quiet_ttests

KIND_NAMES = {"bitops": "BitOPs"}  # how a footnote names a budget kind


def differences(entries: Sequence[dict[str, Any]]) -> dict[tuple, dict[str, dict]]:
    """(model, dataset, budget kind, strategy) -> budget -> seed -> test-accuracy difference
    to the uniform entry the leaderboard compared it with (``vs_uniform_ref``), where the two
    ran the same seeds. A strategy with two entries at one budget is left out: its
    differences would share the reference."""
    found: dict[tuple, dict[str, dict]] = defaultdict(dict)
    twice: set[tuple] = set()
    for e in entries:
        ref, mine = e.get("vs_uniform_ref"), e["final_by_seed"]
        if (e["strategy"] == "uniform" or ref is None or not mine
                or set(mine) != set(ref["final_by_seed"] or ())):
            continue
        key = (e["model"], e["dataset"], e["budget_kind"], e["strategy"])
        if e["budget"] in found[key]:
            twice.add(key)
        found[key][e["budget"]] = {s: mine[s] - ref["final_by_seed"][s] for s in sorted(mine)}
    return {k: v for k, v in found.items() if len(v) >= 2 and k not in twice}


def pooled(diffs: Sequence[float]) -> tuple[float, float, float, float]:
    """Mean, (1 - ALPHA) interval and p-value of a one-sample t-test of ``diffs`` against 0."""
    from scipy import stats

    with quiet_ttests():
        res = stats.ttest_1samp(diffs, 0.0)
    ci = res.confidence_interval(1 - ALPHA)
    return float(np.mean(diffs)), float(ci.low), float(ci.high), float(res.pvalue)


def by_seed(by_budget: dict[str, dict]) -> list[float]:
    """Each seed's mean difference over the budgets, for the seeds every budget ran."""
    seeds = set.intersection(*(set(d) for d in by_budget.values()))
    return [float(np.mean([d[s] for d in by_budget.values()])) for s in sorted(seeds)]


def shown(diffs: Sequence[float]) -> str:
    """A one-sample t-test of ``diffs`` in points: mean [interval], n and p (under 2 values,
    no test)."""
    if len(diffs) < 2:
        return f"n {len(diffs)}, not tested"
    mean, low, high, p = pooled(diffs)
    p_text = "p<0.001" if p < 0.001 else f"p={p:.3f}" if p == p else "no spread"
    return f"{mean * 100:+.2f} [{low * 100:+.2f}, {high * 100:+.2f}], n {len(diffs)}, {p_text}"


def across_budgets(entries: Sequence[dict[str, Any]]) -> list[str]:
    """One footnote per (model, dataset, budget kind) with strategies compared to uniform at
    two or more budgets: each strategy's pooled difference in points with its interval, and
    the by-seed one."""
    lines: dict[tuple, list[str]] = defaultdict(list)
    for (model, dataset, kind, strategy), by_budget in sorted(differences(entries).items()):
        diffs = [d for ds in by_budget.values() for d in ds.values()]
        lines[(model, dataset, kind)].append(
            f"{strategy} {shown(diffs)} ({', '.join(by_budget)}; "
            f"by seed {shown(by_seed(by_budget))})")
    return [f"Δ uniform over {KIND_NAMES.get(kind, kind)} budgets, {model}/{dataset} (per-seed "
            f"differences pooled over budgets, one-sample t-test, {1 - ALPHA:.0%} CI; by seed: "
            "each seed's mean over the budgets, the safer call): " + "; ".join(parts)
            for (model, dataset, kind), parts in lines.items()]
