"""Seed noise against trial length (qsearch.seed_noise) on hand-made fidelity rows."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from qsearch.seed_noise import format_noise, half_width, noise_report, retrain_noise


def row(length, cand, seed, acc, status="ok"):
    return {"stage": "search", "status": status, "val_acc": acc,
            "metrics": {"length": length, "candidate_index": cand, "seed_offset": seed}}


# per seed, a shared shift (the seed's luck, common to every candidate) and a small own part
SHARED = [0.00, 0.03, -0.02, 0.01]
OWN = {0: [0.001, -0.001, 0.002, -0.002], 1: [-0.002, 0.001, 0.0, 0.001]}


def paired_rows(length=100, gap=0.01):
    base = {0: 0.80, 1: 0.80 - gap}
    return [row(length, c, s, base[c] + SHARED[s] + OWN[c][s]) for c in (0, 1) for s in range(4)]


def test_pooled_std_and_paired_std_match_a_direct_computation():
    (r,) = noise_report(paired_rows())
    a = np.array([[0.80 + SHARED[s] + OWN[0][s] for s in range(4)],
                  [0.79 + SHARED[s] + OWN[1][s] for s in range(4)]])
    assert r.seeds == 4 and r.candidates == 2 and r.pairs == 1
    assert r.seed_std == pytest.approx(math.sqrt(np.var(a, axis=1, ddof=1).mean()))
    assert r.paired_std == pytest.approx(np.std(a[0] - a[1], ddof=1))
    assert r.paired_std < r.seed_std / 5  # the shared seed noise cancels in a difference


def test_shared_seed_noise_hides_a_gap_from_welch_but_not_from_a_paired_test():
    (r,) = noise_report(paired_rows(gap=0.01))
    assert (r.separated_paired, r.separated_welch) == (1, 0)
    (same,) = noise_report(paired_rows(gap=0.0))
    assert same.separated_paired == 0


def test_nearly_identical_seeds_give_a_table_without_scipy_warnings():
    rows = [row(100, c, s, acc) for c, accs in enumerate(([0.8222] * 2, [0.8122] * 2, [0.81, 0.82]))
            for s, acc in enumerate(accs)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's precision-loss warning would raise here
        (r,) = noise_report(rows)
    assert r.pairs == 3 and r.seeds == 2


def test_half_width_is_the_student_t_interval():
    assert half_width(0.01, 3) == pytest.approx(stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3))
    assert math.isnan(half_width(0.01, 1))
    (r,) = noise_report(paired_rows())
    assert r.entry_half_width(5) < r.entry_half_width(3) == pytest.approx(
        half_width(r.seed_std, 3))


def test_lengths_with_one_seed_or_failed_trials_are_left_out():
    rows = paired_rows(100) + [row(300, c, 0, 0.9) for c in (0, 1)]
    rows += [row(100, 0, 4, 0.1, status="error")]  # a failed seed changes nothing
    report = noise_report(rows)
    assert [r.length for r in report] == [100] and report[0].seeds == 4


def test_seeds_missing_for_one_candidate_are_dropped_for_all():
    rows = [r for r in paired_rows() if not (r["metrics"]["candidate_index"] == 1
                                             and r["metrics"]["seed_offset"] == 3)]
    assert noise_report(rows)[0].seeds == 3


def test_markdown_table_lists_measured_and_projected_seed_counts():
    text = format_noise(noise_report(paired_rows()), unit="epochs")
    head = text.splitlines()[0]
    assert head.startswith("| epochs | seeds x candidates | seed std |")
    assert "entry CI ± (4 seeds)" in head and "entry CI ± (3 seeds)" in head
    assert "| 100 | 4 x 2 |" in text and "1 / 0 of 1" in text
    assert format_noise([]) == ""
    assert noise_report([]) == [] and retrain_noise([]) is None and retrain_noise([{}]) is None
