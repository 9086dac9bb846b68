"""`qsearch fidelity`: the report's statistics on hand-made rows, the strategy's grid, and
a real run through the CLI on the tiny synthetic dataset (local Ray, subprocess)."""

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from qsearch import QSearchError
from qsearch.budget import parse_budget
from qsearch.fidelity import (
    bootstrap_ci,
    budget_report,
    candidate_table,
    cpu_hours,
    fidelity_report,
    format_budget_report,
    format_report,
    trial_rows,
)
from qsearch.space import SearchSpace
from qsearch.strategy import FINISHED, Result, create_strategy


def row(length, cand, acc, *, wall=36.0, seed=0, status="ok"):
    metrics = {"length": length, "candidate_index": cand, "label": f"c{cand}", "unit": "steps",
               "seed_offset": seed}
    return {"stage": "search", "status": status, "val_acc": acc, "wall_seconds": wall,
            "metrics": json.dumps(metrics)}


def rows_for(short_accs, long_accs, **kw):
    return ([row(100, i, a, **kw) for i, a in enumerate(short_accs)]
            + [row(900, i, a, **kw) for i, a in enumerate(long_accs)])


LONG = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def test_identical_ranking_is_tau_one_and_reversed_is_minus_one():
    same = fidelity_report(rows_for([a - 0.3 for a in LONG], LONG), resamples=200)
    assert same[0].tau == pytest.approx(1.0) and same[0].verdict == "agrees"
    assert same[0].winner == "c5" and same[0].winner_acc == pytest.approx(0.65)
    rev = fidelity_report(rows_for(LONG[::-1], LONG), resamples=200)
    assert rev[0].tau == pytest.approx(-1.0) and rev[0].verdict.startswith("cannot tell")
    assert rev[0].winner == "c0" and rev[1].winner == "c5"  # the longest is the reference


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    short = [0.52, 0.61, 0.58, 0.83, 0.79, 0.97, 0.7, 0.66]
    long = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.65, 0.72]
    report = fidelity_report(rows_for(short, long), resamples=500)[0]
    lo, hi = report.ci
    assert -1 <= lo <= report.tau <= hi <= 1 and lo < hi
    assert bootstrap_ci(short, long, resamples=500, seed=3) == \
        bootstrap_ci(short, long, resamples=500, seed=3)


def test_cpu_hours_and_seed_means():
    rows = rows_for([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], wall=1800.0)
    rows += [row(100, 0, 0.9, wall=1800.0, seed=1), row(100, 1, 0.0, status="failed")]
    report = fidelity_report(rows, cpus_per_trial=2.0, resamples=100)
    assert report[0].cpu_hours == pytest.approx(4 * 1800 * 2 / 3600 + 36 * 2 / 3600)
    assert report[0].trials == 5 and report[0].failed == 1
    assert report[0].winner == "c0" and report[0].winner_acc == pytest.approx(0.5)  # seed mean
    assert cpu_hours([{"wall_seconds": 7200}], 4) == pytest.approx(8.0)


def test_table_says_cannot_tell_and_markdown_works():
    noisy = fidelity_report(rows_for([0.3, 0.9, 0.1, 0.7, 0.5], [0.1, 0.3, 0.5, 0.7, 0.9]),
                            resamples=300)
    text = format_report(noisy, title="t")
    assert "cannot tell" in text and "reference" in text and "CPU-h" in text
    md = format_report(noisy, fmt="md")
    assert md.splitlines()[0].startswith("| steps |") and "|---|" in md
    with pytest.raises(QSearchError, match="md"):
        format_report(noisy, fmt="html")
    with pytest.raises(QSearchError, match="qsearch fidelity"):
        fidelity_report([{"stage": "search", "metrics": "{}"}])


def test_candidate_table_ranks_each_length_with_its_seed_spread():
    rows = trial_rows(rows_for([0.9, 0.5, 0.7], [0.6, 0.8, 0.7])
                      + [row(900, 1, 0.7, seed=1), row(100, 2, 0.1, status="failed")])
    lines = candidate_table(rows).splitlines()
    assert lines[0] == "| candidate | 100 steps | 900 steps |"
    assert lines[2:5] == ["| c1 | #3 50.00% (1) | #1 75.00% ± 7.07% (2) |",
                          "| c2 | #2 70.00% (1) | #2 70.00% (1) |",
                          "| c0 | #1 90.00% (1) | #3 60.00% (1) |"]
    assert candidate_table([]) == ""


def with_bits(rows, bits_of=lambda i: [8, i % 4 + 1, 8]):
    for r in rows:
        r["candidate"] = json.dumps({"w_bits": bits_of(json.loads(r["metrics"])
                                                       ["candidate_index"])})
    return rows


def test_budget_report_compares_the_same_bits_at_two_budgets():
    small = with_bits(rows_for([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], LONG))
    large = with_bits(rows_for([0.6, 0.5, 0.4, 0.3, 0.2, 0.1], LONG))
    short, longest = budget_report(small, large, resamples=200)
    assert short["tau"] == pytest.approx(-1.0) and longest["tau"] == pytest.approx(1.0)
    assert short["winner_small"] == "c5" and short["winner_large"] == "c0"
    text = format_budget_report([short, longest], "t")
    assert "cannot tell" in text and "agrees" in text
    other = with_bits(rows_for(LONG, LONG), bits_of=lambda i: [8, 1, 8])
    with pytest.raises(QSearchError, match="same --seed and --candidates"):
        budget_report(small, other)


@pytest.fixture(scope="module")
def space():
    return SearchSpace("resnet20", "synthetic")


def test_strategy_proposes_every_cell_once_and_survives_a_round_trip(space):
    kw = {"candidates": 3, "steps": [5, 10], "seeds": 2}
    s = create_strategy("fidelity", space, parse_budget("6KB"), **kw)
    seen = []
    for i in range(5):
        p = s.ask(str(i))
        seen.append((p.params["length"], p.params["candidate_index"], p.params["seed_offset"]))
        s.tell(str(i), Result("ok", 0.5, p.candidate))
    labels = {s.label(i) for i in range(3)}
    assert labels == {"uniform-1b", "uniform-2b", "uniform-4b"}  # 3 of the bit choices
    again = create_strategy("fidelity", space, parse_budget("6KB"), **kw)
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))
    for i in range(5, 12):
        p = again.ask(str(i))
        seen.append((p.params["length"], p.params["candidate_index"], p.params["seed_offset"]))
        again.tell(str(i), Result("failed", error="x") if i == 7 else Result("ok", 0.5))
    assert sorted(seen) == [(n, c, s) for n in (5, 10) for c in range(3) for s in range(2)]
    assert again.ask("x") == FINISHED and again.ask("y") == FINISHED
    assert s.expected_steps() == (5 + 10) * 3 * 2  # each cell trains its length (ETA)
    epochs = create_strategy("fidelity", space, parse_budget("6KB"), candidates=3,
                             epochs=[1, 2])
    assert epochs.expected_steps() is None  # steps per epoch unknown here: count trials


def test_mixed_candidates_are_distinct_and_bad_options_refused(space):
    s = create_strategy("fidelity", space, parse_budget("6KB"), candidates=8, steps=[5, 10])
    assert len({json.dumps(b) for b in s.bits}) == 8 and s.label(7) == "mixed-7"
    for bad in ({"candidates": 2}, {"steps": [5]}, {"steps": [5, 5]}, {"seeds": 0},
                {"steps": [5, 10], "epochs": [1, 2]}, {"epochs": [0, 1]}):
        with pytest.raises(QSearchError, match="e.g."):
            create_strategy("fidelity", space, parse_budget("6KB"), **bad)


def test_halves_puts_the_extreme_mixes_first(space):
    s = create_strategy("fidelity", space, parse_budget("6KB"), candidates=9, steps=[5, 10],
                        mixes="halves")  # bit choices 1, 2, 4, 8: 4 uniform, then halves
    n = len(space.free_layers)
    assert [s.label(i) for i in range(4, 9)] == [
        "halves-1b-8b", "halves-8b-1b", "halves-1b-4b", "halves-4b-1b", "halves-2b-8b"]
    assert s.bits[4] == [1] * (n // 2) + [8] * (n - n // 2) and s.bits[5] == s.bits[4][::-1]
    costs = [space.c_size(s.align(b)) / parse_budget("6KB").value for b in s.bits]
    assert all(0.95 < c <= 1.0 for c in costs)  # width-aligned like every candidate
    more = create_strategy("fidelity", space, parse_budget("6KB"), candidates=18,
                           steps=[5, 10], mixes="halves")
    assert [more.label(i) for i in range(16, 18)] == ["mixed-16", "mixed-17"]  # 4 + 12, then
    with pytest.raises(QSearchError, match="fidelity mixes 'ends' not known: use one of "
                       "random, halves, e.g. --mixes halves"):
        create_strategy("fidelity", space, parse_budget("6KB"), steps=[5, 10], mixes="ends")


def qsearch(*args):
    return subprocess.run([sys.executable, "-m", "qsearch.cli", *args], capture_output=True,
                          text=True, timeout=400, env={**os.environ})


def test_bad_values_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "fid"
    for bad, what in ((["--steps", "5,x"], "--steps '5,x'"), (["--candidates", "1"], "= 1"),
                      (["--seeds", "0"], "seeds = 0"), (["--format", "html"], "html"),
                      (["--mixes", "ends"], "mixes 'ends' not known")):
        r = qsearch("fidelity", "--budget", "6KB", "--out", str(out), *bad)
        assert r.returncode == 2 and what in r.stderr and len(r.stderr.splitlines()) == 1
    assert not out.exists()
    r = qsearch("fidelity", "--compare", str(out), str(tmp_path / "other"))
    assert r.returncode == 2 and "holds no finished trials" in r.stderr


def test_end_to_end_run_stores_rows_and_prints_the_table(tmp_path):
    out = tmp_path / "fid"
    r = qsearch("fidelity", "--dataset", "synthetic", "--budget", "6KB", "--candidates", "3",
                "--steps", "5,10", "--batch-size", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert "Proxy fidelity: resnet20 on synthetic" in r.stdout and "reference" in r.stdout
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 6 and set(df.status) == {"ok"} and set(df.strategy) == {"fidelity"}
    metrics = [json.loads(m) for m in df.metrics]
    assert sorted((m["length"], m["candidate_index"]) for m in metrics) == \
        [(n, c) for n in (5, 10) for c in range(3)]
    assert sorted(m["steps"] for m in metrics) == [5, 5, 5, 10, 10, 10]  # trained that long
    big = tmp_path / "fid-big"
    r = qsearch("fidelity", "--dataset", "synthetic", "--budget", "8KB", "--candidates", "3",
                "--steps", "5,10", "--batch-size", "32", "--seeds", "2", "--out", str(big))
    assert r.returncode == 0, r.stderr
    assert "Seed noise against trial length" in r.stdout and "| 10 | 2 x 3 |" in r.stdout
    assert "Seed noise" not in qsearch("fidelity", "--report", str(out)).stdout  # one seed
    both = qsearch("fidelity", "--compare", str(out), str(big))
    assert both.returncode == 0, both.stderr
    assert "ranking at 6KB against 8KB" in both.stdout and "| 10 | 3 |" in both.stdout
    assert "| uniform-1b | #" in r.stdout  # the candidate table
    md = qsearch("fidelity", "--report", str(out), "--format", "md")
    assert md.returncode == 0 and "| steps | trials |" in md.stdout
    assert math.isfinite(float(md.stdout.split("| 5 | 3 | ")[1].split(" |")[0]))  # CPU-h
