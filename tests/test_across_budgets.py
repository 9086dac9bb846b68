"""Δ uniform pooled over budgets: per-seed differences paired by budget and seed, one t-test."""

from __future__ import annotations

import numpy as np
import pytest

from qsearch.across_budgets import across_budgets, differences
from qsearch.leaderboard import footnotes, format_leaderboard, leaderboard, load_experiments
from tests.test_leaderboard import make_experiment

# per budget, per seed: tpe sits ~0.5 points under uniform, with more spread than 3 seeds
# at one budget can resolve
PLAN = {"32KB": {"uniform": [0.880, 0.890, 0.884], "tpe": [0.878, 0.882, 0.877]},
        "64KB": {"uniform": [0.900, 0.905, 0.898], "tpe": [0.897, 0.896, 0.894]}}


def board(root, plan=PLAN, first_seed=None):
    dirs = [make_experiment(root, s, b, None, 1.0, accs,
                            first_seed=(first_seed or {}).get((s, b), 0))
            for b, by_strategy in plan.items() for s, accs in by_strategy.items()]
    return leaderboard(load_experiments(dirs))


def test_pooled_difference_matches_a_hand_computation_and_decides_where_one_budget_cannot(
        tmp_path):
    from scipy import stats

    entries = board(tmp_path)
    per_budget = [np.subtract(PLAN[b]["tpe"], PLAN[b]["uniform"]) for b in ("32KB", "64KB")]
    # neither budget alone separates tpe from uniform ...
    for e in entries:
        if e["strategy"] == "tpe":
            assert e["vs_uniform_low"] < 0 < e["vs_uniform_high"]
    # ... the six differences pooled over both do
    d = np.concatenate(per_budget)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    p = stats.ttest_1samp(d, 0.0).pvalue
    assert d.mean() + half < 0 and p < 0.05
    [line] = across_budgets(entries)
    assert line.startswith("Δ uniform over size budgets, resnet20/fashion-mnist")
    assert (f"tpe {d.mean() * 100:+.2f} [{(d.mean() - half) * 100:+.2f}, "
            f"{(d.mean() + half) * 100:+.2f}], n 6, p={p:.3f} (32KB, 64KB; ") in line
    # by seed: the mean over both budgets per seed, 3 of them, a t-test on those
    seed_means = np.mean(per_budget, axis=0)
    test = stats.ttest_1samp(seed_means, 0.0)
    ci = test.confidence_interval(0.95)
    assert line.endswith(f"by seed {seed_means.mean() * 100:+.2f} [{ci.low * 100:+.2f}, "
                         f"{ci.high * 100:+.2f}], n 3, p={test.pvalue:.3f})")
    assert line in footnotes(entries) and line in format_leaderboard(entries, "md")


def test_budgets_that_ran_other_seeds_are_pooled_but_not_tested_by_seed(tmp_path):
    [line] = across_budgets(board(tmp_path, first_seed={("tpe", "64KB"): 10,
                                                        ("uniform", "64KB"): 10}))
    assert "n 6, p=" in line and line.endswith("by seed n 0, not tested)")


def test_strategies_without_two_paired_budgets_get_no_line(tmp_path):
    one_budget = {"32KB": PLAN["32KB"], "64KB": {"uniform": PLAN["64KB"]["uniform"]}}
    assert across_budgets(board(tmp_path / "one", one_budget)) == []
    # other seeds at one budget cannot be paired there: one budget left, no line
    assert across_budgets(board(tmp_path / "seeds", first_seed={("tpe", "64KB"): 10})) == []


def with_extra(root, strategy: str, accs: list[float]) -> list[dict]:
    """The PLAN's entries and one more at 32KB, on one leaderboard."""
    board(root / "a")
    extra = make_experiment(root / "b", strategy, "32KB", None, 1.0, accs)
    return leaderboard(load_experiments([*sorted((root / "a").iterdir()), extra]))


def test_two_entries_of_a_strategy_at_one_budget_are_left_out(tmp_path):
    entries = board(tmp_path / "plan")
    both = with_extra(tmp_path, "tpe", [0.87, 0.88, 0.87])
    assert differences(entries) and differences(both) == {}


def test_the_best_ranked_uniform_entry_is_the_reference(tmp_path):
    both = with_extra(tmp_path, "uniform", [0.80, 0.81, 0.80])
    by_budget = differences(both)[("resnet20", "fashion-mnist", "size", "tpe")]
    assert list(by_budget["32KB"].values()) == pytest.approx(
        list(np.subtract(PLAN["32KB"]["tpe"], PLAN["32KB"]["uniform"])))
