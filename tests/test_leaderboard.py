"""The leaderboard over a synthetic store: matched-size filter, aggregation, ranking, formats."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qsearch import QSearchError
from qsearch.budget import parse_budget
from qsearch.candidate import Candidate, bit_summary
from qsearch.leaderboard import (
    FORMATS,
    PAIRED,
    WELCH,
    footnotes,
    format_leaderboard,
    leaderboard,
    load_experiments,
)
from qsearch.store import ResultsStore

N_LAYERS = 22  # resnet20 on Fashion-MNIST: stem + 20 free layers + fc; first and last pinned

# (strategy, budget) -> (free-layer bits, final C_size / budget, final test accs per seed)
PLAN = {
    ("uniform", "32KB"): ([2] * 20, 0.995, [0.880, 0.884, 0.878]),
    ("dualprecision", "32KB"): ([4] * 20, 0.998, [0.900, 0.905, 0.897]),
    ("random", "32KB"): ([1] * 5 + [2] * 10 + [4] * 5, 0.991, [0.860, 0.850, 0.866]),
    ("uniform", "64KB"): ([4] * 20, 0.997, [0.920, 0.922, 0.917]),
    ("dualprecision", "64KB"): ([8] * 20, 0.993, [0.910, 0.915, 0.905]),
    # the most accurate, but only 95% of the budget: shown, flagged, never ranked
    ("random", "64KB"): ([2] * 10 + [8] * 10, 0.95, [0.950, 0.951, 0.949]),
}
SEARCH_OFFSET = {"dualprecision": 0.03, "random": -0.02}  # distinct search curves
GRID = {"rows": "depthwise", "cols": "other", "row_bits": [None], "col_bits": [1, 2, 4, 8],
        "table": [[0.81, 0.85, 0.9, None]], "cells": [],
        "best": {"other": 4, "val_acc": 0.9}, "budget": "32KB"}


def bits(free: list[int]) -> list[int]:
    return [8, *free, 8]


def make_experiment(root: Path, strategy: str, budget: str, free: list[int] | None,
                    ratio: float = 1.0, accs: list[float] = (), *, trials: int = 4,
                    cpus: float = 2.0, first_seed: int = 0) -> Path:
    """One experiment directory: spec.json, search rows, final rows (one per seed, from
    ``first_seed``)."""
    d = root / f"{strategy}-{budget}"
    d.mkdir(parents=True)
    spec = {"strategy": strategy, "budget": budget, "model": "resnet20",
            "dataset": "fashion-mnist", "cpus_per_trial": cpus, "pin_bits": 8, "seed": 0}
    (d / "spec.json").write_text(json.dumps(spec))
    b = parse_budget(budget)
    store = ResultsStore(d)
    common = {"experiment_id": d.name, "strategy": strategy, "model": "resnet20",
              "dataset": "fashion-mnist", "budget": budget, "budget_kind": b.kind,
              "budget_value": b.value, "status": "ok", "task": "train"}
    free = free or [4] * 20
    cand = Candidate(tuple(bits(free)), 4, 0.5).to_json()
    for i in range(trials):
        store.append({**common, "trial_id": f"s{i}", "trial_index": i, "stage": "search",
                      "candidate": cand, "c_size": 0.5 * b.value, "bitops": 1e8,
                      "val_acc": 0.7 + 0.05 * (i % 3) + SEARCH_OFFSET.get(strategy, 0.0),
                      "wall_seconds": 100.0 + i,
                      "finished_at": 1000.0 + 200 * i, "seed": 0})
    for seed, acc in enumerate(accs, first_seed):
        store.append({**common, "trial_id": f"f{seed}", "trial_index": seed, "stage": "final",
                      "candidate": cand, "c_size": ratio * b.value, "bitops": 2e8,
                      "val_acc": acc - 0.01, "test_acc": acc, "wall_seconds": 500.0,
                      "finished_at": 5000.0 + seed, "seed": seed})
    return d


def make_store(root: Path) -> list[Path]:
    """Six experiments (3 strategies x 2 budgets, one off-size) and one without a final."""
    dirs = [make_experiment(root, s, b, free, ratio, accs)
            for (s, b), (free, ratio, accs) in PLAN.items()]
    (root / "dualprecision-32KB" / "summary.json").write_text(json.dumps(GRID))
    dirs.append(make_experiment(root, "tpe", "32KB", None, trials=3))
    return dirs


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> list[Path]:
    return make_store(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def entries(store) -> list[dict]:
    return leaderboard(load_experiments(store))


def find(entries: list[dict], strategy: str, budget: str) -> dict:
    return next(e for e in entries if (e["strategy"], e["budget"]) == (strategy, budget))


def test_load_experiments_adds_spec_fields(store):
    df = load_experiments(store)
    assert len(df) == 6 * (4 + 3) + 3
    assert set(df["cpus_per_trial"]) == {2.0}
    assert set(df["experiment_dir"]) == {str(d) for d in store}


def test_not_an_experiment_names_the_directory(tmp_path, store):
    with pytest.raises(QSearchError, match="not a qsearch experiment.*--out directory"):
        load_experiments([tmp_path / "nowhere"])
    with pytest.raises(QSearchError, match=r"subdirectories are experiments.*/\*"):
        load_experiments([store[0].parent])


def test_matched_size_filter(entries):
    off = find(entries, "random", "64KB")
    assert not off["matched"] and off["rank"] is None
    assert off["budget_ratio"] == pytest.approx(0.95)
    assert "95.0% of budget" in off["note"]
    assert all(e["matched"] for e in entries if e["rank"] is not None)


def test_no_final_retrain_is_listed_not_ranked(entries):
    tpe = find(entries, "tpe", "32KB")
    assert tpe["rank"] is None and tpe["n_seeds"] == 0 and tpe["note"] == "no final retrain"
    assert tpe["search_val_acc"] == pytest.approx(0.8)
    assert tpe["test_acc_mean"] is None


def test_aggregation_over_seeds(entries):
    for (strategy, budget), (_, _, accs) in PLAN.items():
        e = find(entries, strategy, budget)
        assert e["n_seeds"] == 3
        assert e["test_acc_mean"] == pytest.approx(np.mean(accs))
        assert e["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))


def test_search_cost(entries):
    e = find(entries, "uniform", "32KB")
    walls = [100.0, 101.0, 102.0, 103.0]
    assert e["trials"] == 4
    assert e["cpu_hours"] == pytest.approx(sum(walls) * 2.0 / 3600)
    # trial i runs [1000 + 200 i - (100 + i), 1000 + 200 i]: gaps between them do not count
    assert e["wall_seconds"] == pytest.approx(sum(walls))
    assert e["search_val_acc"] == pytest.approx(0.8)


def test_ranking_within_budget(entries):
    ranked = {b: [e["strategy"] for e in sorted(
        (e for e in entries if e["budget"] == b and e["rank"]), key=lambda e: e["rank"])]
        for b in ("32KB", "64KB")}
    assert ranked == {"32KB": ["dualprecision", "uniform", "random"],
                      "64KB": ["uniform", "dualprecision"]}


def test_bit_summaries(entries):
    assert find(entries, "uniform", "32KB")["bits"] == "other 2"
    assert find(entries, "random", "32KB")["bits"] == "1b:5 2b:10 4b:5"


def test_bit_summary_groups_without_torch():
    class Space:  # a depthwise model's two groups, first and last layer pinned
        layers = [None] * 6
        groups = {"depthwise": [1, 3], "other": [2, 4]}
        free_layers = [1, 2, 3, 4]

    assert bit_summary([8, 4, 1, 4, 1, 8], Space()) == "dw 4 / other 1"
    assert bit_summary([8, 4, 2, 4, 1, 8], Space()) == "1b:1 2b:1 4b:2"
    assert bit_summary([8, 4, 2, 8]) == "2b:1 4b:1 8b:2"


def test_bitops_budget_is_matched_on_bitops(tmp_path):
    d = make_experiment(tmp_path, "uniform", "1e8bitops", None, 0.5, [0.9, 0.91])
    (e,) = leaderboard(load_experiments([d]))  # final BitOPs 2e8 = 200% of the budget
    assert not e["matched"] and "BitOPs 200.0% of budget" in e["note"]
    (e,) = leaderboard(load_experiments([d]), tolerance=(0.99, 2.0))
    assert e["matched"] and e["rank"] == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_renders(entries, fmt):
    text = format_leaderboard(entries, fmt)
    assert "dualprecision" in text
    if fmt == "json":
        rows = json.loads(text)
        assert len(rows) == len(entries) and rows[0]["rank"] == 1
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert "test_acc_mean" in rows[0] and len(rows) == len(entries)
    elif fmt == "md":
        assert text.splitlines()[1].startswith("|---")
    else:
        lines = text.splitlines()
        assert lines[0].split()[:2] == ["rank", "strategy"]
        assert lines[0].index("strategy") == lines[1].index(" -") + 1  # columns align
        assert "± " in text and "no final retrain" in text


def test_unknown_format_lists_the_valid_ones(entries):
    with pytest.raises(QSearchError, match="table, md, csv, json"):
        format_leaderboard(entries, "xlsx")


def test_wall_time_is_the_union_of_trial_intervals():
    from qsearch.leaderboard import _busy_seconds

    starts, ends = pd.Series([0.0, 5.0, 20.0, 21.0]), pd.Series([10.0, 15.0, 30.0, 25.0])
    assert _busy_seconds(starts, ends) == pytest.approx(15 + 10)  # [0, 15] and [20, 30]
    assert _busy_seconds(pd.Series([float("nan")]), pd.Series([1.0])) is None


# ----- ranks that say when they cannot decide -------------------------------------------
A = [0.900, 0.912, 0.891, 0.905]
B = [0.896, 0.9072, 0.8868, 0.9013]  # A minus ~0.4 points on every seed, seed noise shared


def rows_of(text: str) -> dict[str, list[str]]:
    """Table rows by strategy, split on the two-space column gaps."""
    return {r.split()[1]: [c.strip() for c in r.split("  ") if c.strip()]
            for r in text.splitlines()[2:] if re.fullmatch(r"=?\d+|-", r.split()[0])}


def test_paired_test_separates_a_constant_offset_welch_cannot(tmp_path):
    from scipy import stats

    assert stats.ttest_ind(A, B, equal_var=False).pvalue > 0.5  # the seed spread hides it
    assert stats.ttest_rel(A, B).pvalue < 0.001                 # the per-seed gap does not
    paired = leaderboard(load_experiments([make_experiment(tmp_path / "p", s, "32KB", None, 1.0, a)
                                           for s, a in (("tpe", A), ("random", B))]))
    assert [(e["strategy"], e["rank"], e["rank_shared"]) for e in paired] == [
        ("tpe", 1, False), ("random", 2, False)]
    assert paired[1]["rank_test"] == PAIRED and paired[1]["p_vs_best"] < 0.001
    text = format_leaderboard(paired)
    assert "paired p<0.001" in rows_of(text)["random"]
    assert "vs best: paired t-test on shared seeds" in text and "=1" not in text

    # the same accuracies on different seeds cannot be paired: Welch, and they share rank 1
    welch = leaderboard(load_experiments([
        make_experiment(tmp_path / "w", "tpe", "32KB", None, 1.0, A),
        make_experiment(tmp_path / "w", "random", "32KB", None, 1.0, B, first_seed=10)]))
    assert [(e["strategy"], e["rank"], e["rank_shared"]) for e in welch] == [
        ("tpe", 1, True), ("random", 1, True)]
    assert welch[1]["rank_test"] == WELCH and welch[1]["p_vs_best"] > 0.5
    text = format_leaderboard(welch)
    assert [rows_of(text)[s][0] for s in ("tpe", "random")] == ["=1", "=1"]
    assert ("=1: not distinguishable from the best at the same budget (Welch's t-test, "
            "p >= 0.05)") in text


def test_overlapping_noisy_entries_share_rank_one(tmp_path):
    plan = {"tpe": [0.90, 0.88, 0.91], "random": [0.89, 0.91, 0.885],
            "haq": [0.80, 0.81, 0.79]}
    entries = leaderboard(load_experiments(
        [make_experiment(tmp_path, s, "32KB", None, 1.0, a) for s, a in plan.items()]))
    assert {e["strategy"]: (e["rank"], e["rank_shared"]) for e in entries} == {
        "tpe": (1, True), "random": (1, True), "haq": (3, False)}
    assert find(entries, "random", "32KB")["p_vs_best"] > 0.5
    assert find(entries, "haq", "32KB")["p_vs_best"] < 0.05
    text = format_leaderboard(entries)
    assert [rows_of(text)[s][0] for s in ("tpe", "random", "haq")] == ["=1", "=1", "3"]
    assert "(paired t-test on shared seeds, p >= 0.05)" in text
    assert "- =1: not distinguishable" in format_leaderboard(entries, "md")


def test_one_seed_is_shown_not_ranked(tmp_path):
    entries = leaderboard(load_experiments([
        make_experiment(tmp_path, "tpe", "32KB", None, 1.0, [0.95]),
        make_experiment(tmp_path, "random", "32KB", None, 1.0, [0.90, 0.91])]))
    one = find(entries, "tpe", "32KB")
    assert one["rank"] is None and one["note"] == "n<2: not ranked"
    assert one["ci_low"] is None and one["test_acc_mean"] == pytest.approx(0.95)
    assert find(entries, "random", "32KB")["rank"] == 1  # alone once the n=1 entry is out
    row = rows_of(format_leaderboard(entries))["tpe"]
    assert row[0] == "-" and row[-1] == "n<2: not ranked" and "95.00% ± 0.00% (1)" in row


def test_fixed_width_entries_are_ranked_when_they_fit(tmp_path):
    """A bits-only search cannot fill the budget with a width: fitting is what it can match."""
    dirs = [make_experiment(tmp_path, "tpe", "32KB", None, 0.73, [0.90, 0.91, 0.92]),
            make_experiment(tmp_path, "uniform", "32KB", None, 0.68, [0.89, 0.90, 0.91]),
            make_experiment(tmp_path, "random", "32KB", None, 1.02, [0.95, 0.95, 0.96])]
    for d in dirs:
        spec = json.loads((d / "spec.json").read_text())
        (d / "spec.json").write_text(json.dumps({**spec, "checkpoint": "/w/float.pt"}))
    entries = leaderboard(load_experiments(dirs))
    tpe, uniform = find(entries, "tpe", "32KB"), find(entries, "uniform", "32KB")
    assert tpe["rank"] == 1 and uniform["rank"] == 2
    assert tpe["note"] == "fixed width: C_size 73.0% of budget"
    over = find(entries, "random", "32KB")  # over the budget: never ranked
    assert over["rank"] is None and "102.0% of budget: not ranked" in over["note"]
    plain = leaderboard(load_experiments([make_experiment(tmp_path / "w", "tpe", "32KB", None,
                                                          0.73, [0.9, 0.91])]))
    assert plain[0]["rank"] is None  # a width-aligned search must match the size


def test_entry_interval_is_student_t(entries):
    from scipy import stats

    accs = PLAN[("uniform", "32KB")][2]
    half = stats.t.ppf(0.975, 2) * np.std(accs, ddof=1) / np.sqrt(3)
    e = find(entries, "uniform", "32KB")
    assert (e["ci_low"], e["ci_high"]) == pytest.approx((np.mean(accs) - half,
                                                         np.mean(accs) + half))


def test_uniform_difference_interval_matches_a_hand_computation(tmp_path, entries):
    from scipy import stats

    # shared seeds: a one-sample t interval on the per-seed differences
    d = np.subtract(PLAN[("dualprecision", "32KB")][2], PLAN[("uniform", "32KB")][2])
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    e = find(entries, "dualprecision", "32KB")
    assert e["vs_uniform_test"] == PAIRED and e["vs_uniform"] == pytest.approx(d.mean())
    assert (e["vs_uniform_low"], e["vs_uniform_high"]) == pytest.approx(
        (d.mean() - half, d.mean() + half))
    assert find(entries, "uniform", "32KB")["vs_uniform"] is None

    # different seeds: Welch's interval with the Welch-Satterthwaite degrees of freedom
    u, t = [0.880, 0.884, 0.878, 0.885], [0.890, 0.905, 0.897]
    got = leaderboard(load_experiments([
        make_experiment(tmp_path, "uniform", "32KB", None, 1.0, u),
        make_experiment(tmp_path, "tpe", "32KB", None, 1.0, t, first_seed=5)]))
    va, vb = np.var(t, ddof=1) / len(t), np.var(u, ddof=1) / len(u)
    df = (va + vb) ** 2 / (va ** 2 / (len(t) - 1) + vb ** 2 / (len(u) - 1))
    diff, half = np.mean(t) - np.mean(u), stats.t.ppf(0.975, df) * np.sqrt(va + vb)
    e = find(got, "tpe", "32KB")
    assert e["vs_uniform_test"] == WELCH
    assert (e["vs_uniform"], e["vs_uniform_low"], e["vs_uniform_high"]) == pytest.approx(
        (diff, diff - half, diff + half))
    row = rows_of(format_leaderboard(got))
    assert row["tpe"][10] == (f"{diff * 100:+.2f} [{(diff - half) * 100:+.2f}, "
                              f"{(diff + half) * 100:+.2f}]")
    assert row["uniform"][10] == "ref"


def test_no_uniform_at_the_budget_shows_a_dash(tmp_path):
    entries = leaderboard(load_experiments([
        make_experiment(tmp_path, "tpe", "32KB", None, 1.0, [0.90, 0.91]),
        make_experiment(tmp_path, "uniform", "64KB", None, 1.0, [0.90, 0.91])]))
    assert all(e["vs_uniform"] is None for e in entries)
    assert rows_of(format_leaderboard(entries))["tpe"][10] == "-"


def test_footnote_states_the_final_retrain_noise_and_the_seeds_a_half_point_needs(tmp_path):
    from qsearch.seed_noise import half_width, noise_row, seeds_needed

    plan = {"tpe": [0.90, 0.88, 0.91], "random": [0.89, 0.91, 0.885],
            "uniform": [0.89, 0.91, 0.885]}  # the same candidate as random: counted once
    entries = leaderboard(load_experiments(
        [make_experiment(tmp_path, s, "32KB", None, 1.0, a) for s, a in plan.items()]))
    row = noise_row(0.0, {0: dict(enumerate(plan["tpe"])), 1: dict(enumerate(plan["random"]))})
    line = next(n for n in footnotes(entries) if n.startswith("final-retrain noise"))
    assert "over 2 entries x 3 shared seeds" in line
    assert f"seed std {row.seed_std * 100:.2f} points" in line
    assert f"paired std {row.paired_std * 100:.2f}" in line
    n = seeds_needed(row.seed_std, 0.005)
    assert half_width(row.seed_std, n) <= 0.005 < half_width(row.seed_std, n - 1)
    assert f"±0.5 needs {n} seeds" in line
    assert seeds_needed(0.5, 0.005) is None and seeds_needed(math.nan, 0.005) is None


def test_the_same_candidate_found_by_two_strategies_shows_same_results(tmp_path):
    accs = [0.85, 0.84, 0.82]
    entries = leaderboard(load_experiments(
        [make_experiment(tmp_path, s, "32KB", None, 1.0, accs) for s in ("dualprecision",
                                                                          "uniform")]))
    assert [(e["rank"], e["rank_shared"]) for e in entries] == [(1, True), (1, True)]
    text = format_leaderboard(entries)
    assert "same results" in " ".join(rows_of(text)["uniform"]) and "p=n/a" not in text


def supernet_experiment(root: Path, trained_here: bool, accs=(0.80, 0.81)) -> Path:
    """A random search on the supernet evaluator: 4 evaluations, one top-k retrain, a final;
    with the supernet's training row when this experiment trained it."""
    d = make_experiment(root, "random", "32KB", None, accs=list(accs), trials=4)
    b = parse_budget("32KB")
    common = {"experiment_id": d.name, "strategy": "random", "model": "resnet20",
              "dataset": "fashion-mnist", "budget": "32KB", "budget_kind": b.kind,
              "budget_value": b.value, "status": "ok", "seed": 0}
    store = ResultsStore(d)
    cand = Candidate(tuple(bits([2] * 20)), 4, 0.5).to_json()
    if trained_here:
        store.append({**common, "trial_id": "n0", "trial_index": 0, "stage": "supernet",
                      "task": "supernet-train", "wall_seconds": 900.0, "finished_at": 500.0})
    store.append({**common, "trial_id": "k0", "trial_index": 0, "stage": "topk",
                  "task": "train", "candidate": cand, "val_acc": 0.77, "c_size": b.value,
                  "wall_seconds": 60.0, "finished_at": 2000.0})
    return d


def test_a_supernet_search_costs_its_supernet_and_retrains_and_chooses_a_retrained_one(
        tmp_path):
    d = supernet_experiment(tmp_path / "here", trained_here=True)
    e = find(leaderboard(load_experiments([d])), "random", "32KB")
    assert e["cpu_hours"] == pytest.approx((900 + 4 * 100 + 6 + 60) * 2.0 / 3600)
    assert e["search_val_acc"] == pytest.approx(0.77)  # the retrain, not a supernet number
    assert "supernet reused" not in e["note"]
    d = supernet_experiment(tmp_path / "cached", trained_here=False)
    e = find(leaderboard(load_experiments([d])), "random", "32KB")
    assert "supernet reused: its training not counted" in e["note"]
    d = supernet_experiment(tmp_path / "one-seed", trained_here=False, accs=[0.80])
    e = find(leaderboard(load_experiments([d])), "random", "32KB")
    assert e["note"] == "n<2: not ranked, supernet reused: its training not counted"


def test_min_fill_sets_which_smaller_entries_are_ranked(tmp_path, capsys):
    from qsearch.cli import main

    dirs = [str(make_experiment(tmp_path, "uniform", "32KB", None, 1.0, [0.880, 0.884, 0.882])),
            str(make_experiment(tmp_path, "haq", "32KB", [2, 4] * 10, 0.986,
                                [0.890, 0.893, 0.891]))]
    assert main(["leaderboard", *dirs, "--format", "md"]) == 0
    default = capsys.readouterr().out
    assert "98.6% of budget: not ranked" in default
    assert "- ranked: entries whose final cost is within [99%, 100%] of the budget" in default
    assert main(["leaderboard", *dirs, "--format", "md", "--min-fill", "0.98"]) == 0
    looser = capsys.readouterr().out
    (haq,) = [line for line in looser.splitlines() if "| haq |" in line]
    assert haq.startswith("| 1 |") and "not ranked" not in looser and "+0.93 [" in haq
    assert main(["report", *dirs, "-o", str(tmp_path / "r.html"), "--min-fill", "0.98"]) == 0
    assert "within 98%&ndash;100% of the budget" in (tmp_path / "r.html").read_text()
    for bad in ("0", "1.5"):
        assert main(["leaderboard", *dirs, "--min-fill", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"--min-fill {float(bad)} out of range" in err
