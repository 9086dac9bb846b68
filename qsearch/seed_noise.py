"""Seed noise against trial length: how many seeds, and how long, before results can decide?

Pure functions over the trials of a ``qsearch fidelity`` run with ``--seeds`` >= 2. Every
candidate trains once per seed offset and the offsets are shared by all candidates (same
initialisation seed, same data order, same validation split), so two candidates can be
compared seed by seed. For each trial length:

- ``seed std``: the pooled within-candidate standard deviation of validation accuracy over
  seeds (root of the mean per-candidate variance, ddof 1), the noise of one entry;
- ``entry CI``: the half-width of the Student t 95% interval of an entry's mean over
  ``n`` seeds, ``t(0.975, n-1) * std / sqrt(n)`` (what the leaderboard prints);
- ``paired std``: the pooled standard deviation over seeds of the per-seed difference of two
  candidates, over all candidate pairs (what a paired test sees once shared noise cancels);
- ``pairs separated``: how many candidate pairs a paired t-test, and Welch's t-test on the
  same numbers, find different at the 5% level.

scipy is imported inside the functions that need it; Ray-free.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations

import numpy as np

ALPHA = 0.05


@dataclass(frozen=True)
class NoiseRow:
    """Seed noise at one trial length (accuracies as fractions)."""

    length: float
    seeds: int  # seed offsets every compared candidate has a result for
    candidates: int
    seed_std: float
    paired_std: float
    pairs: int
    separated_paired: int
    separated_welch: int

    def entry_half_width(self, n: int | None = None) -> float:
        """Half-width of the 95% t interval of a mean over ``n`` seeds (default: measured)."""
        return half_width(self.seed_std, n or self.seeds)

    def paired_half_width(self, n: int | None = None) -> float:
        """Half-width of the 95% t interval of a paired mean difference over ``n`` seeds."""
        return half_width(self.paired_std, n or self.seeds)


def half_width(std: float, n: int) -> float:
    """``t(1 - ALPHA/2, n-1) * std / sqrt(n)``; NaN below two seeds."""
    from scipy import stats

    if n < 2 or not math.isfinite(std):
        return math.nan
    return float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * std / math.sqrt(n)


def accuracy_grid(rows: list[dict]) -> dict[float, dict[int, dict[int, float]]]:
    """length -> candidate index -> seed offset -> validation accuracy (successful trials
    of decoded fidelity rows, as :func:`qsearch.fidelity.trial_rows` returns them)."""
    grid: dict[float, dict[int, dict[int, float]]] = {}
    for r in rows:
        acc, m = r.get("val_acc"), r["metrics"]
        if r.get("status") in ("ok", "stopped") and acc is not None and math.isfinite(acc):
            by_seed = grid.setdefault(m["length"], {}).setdefault(m["candidate_index"], {})
            by_seed[int(m.get("seed_offset", 0))] = float(acc)
    return grid


@contextmanager
def quiet_ttests() -> Iterator[None]:
    """scipy's t-tests warn of precision loss on nearly identical samples (two seeds with
    the same accuracy); the result stands, so the warning is not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def noise_row(length: float, by_candidate: dict[int, dict[int, float]]) -> NoiseRow | None:
    """The :class:`NoiseRow` of one length over the seed offsets all candidates share;
    None when fewer than two seeds or two candidates remain."""
    from scipy import stats

    cands = sorted(by_candidate)
    seeds = sorted(set.intersection(*(set(s) for s in by_candidate.values()))) if cands else []
    if len(seeds) < 2 or len(cands) < 2:
        return None
    acc = np.array([[by_candidate[c][s] for s in seeds] for c in cands])
    seed_std = math.sqrt(float(np.mean(np.var(acc, axis=1, ddof=1))))
    diffs, paired, welch = [], 0, 0
    with quiet_ttests():
        for i, j in combinations(range(len(cands)), 2):
            diffs.append(np.var(acc[i] - acc[j], ddof=1))
            paired += _significant(stats.ttest_rel(acc[i], acc[j]).pvalue)
            welch += _significant(stats.ttest_ind(acc[i], acc[j], equal_var=False).pvalue)
    return NoiseRow(length, len(seeds), len(cands), seed_std,
                    math.sqrt(float(np.mean(diffs))), len(diffs), paired, welch)


def _significant(p: float) -> bool:
    return bool(math.isfinite(p) and p < ALPHA)


def noise_report(rows: list[dict]) -> list[NoiseRow]:
    """One :class:`NoiseRow` per trial length with at least two shared seeds, shortest first."""
    grid = accuracy_grid(rows)
    out = [noise_row(length, grid[length]) for length in sorted(grid)]
    return [r for r in out if r is not None]


def format_noise(report: list[NoiseRow], *, unit: str = "steps",
                 seeds_for: tuple[int, ...] = (3, 5)) -> str:
    """Markdown table of the report; the interval columns are also given for ``seeds_for``
    seeds (what a leaderboard with that many final seeds would show)."""
    if not report:
        return ""
    n = report[0].seeds
    counts = [n, *(k for k in seeds_for if k != n)]
    head = [unit, "seeds x candidates", "seed std", *(f"entry CI ± ({k} seeds)" for k in counts),
            "paired std", *(f"paired CI ± ({k} seeds)" for k in counts),
            "pairs separated: paired / Welch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report:
        pct = [f"{r.seed_std:.2%}", *(f"{r.entry_half_width(k):.2%}" for k in counts),
               f"{r.paired_std:.2%}", *(f"{r.paired_half_width(k):.2%}" for k in counts)]
        lines.append(f"| {r.length:g} | {r.seeds} x {r.candidates} | " + " | ".join(pct)
                     + f" | {r.separated_paired} / {r.separated_welch} of {r.pairs} |")
    notes = ("seed std: pooled within-candidate std of val acc over seeds; paired std: pooled "
             "std of per-seed differences between two candidates (shared seeds); CI ±: "
             "half-width of the Student t 95% interval of a mean over that many seeds; pairs "
             f"separated: candidate pairs different at p < {ALPHA} by each test.")
    return "\n".join(lines + ["", notes])


def seeds_needed(std: float, target: float, *, limit: int = 100) -> int | None:
    """The fewest seeds whose 95% t interval half-width is at most ``target`` (None if more
    than ``limit``, or the std is unknown)."""
    if not math.isfinite(std):
        return None
    return next((n for n in range(2, limit + 1) if half_width(std, n) <= target), None)


def retrain_noise(by_entry: list[dict[float, float]], *, target: float = 0.005) -> str | None:
    """One line on the final retrain's seed noise across entries that ran the same seeds
    (``by_entry``: seed -> test accuracy, one dict per entry): pooled seed std, paired std,
    the interval these seeds give, and the seeds a +-``target`` interval would need.
    Entries with identical results (the same candidate found twice) count once."""
    distinct = {tuple(sorted(d.items())): d for d in by_entry if d}
    row = noise_row(0.0, dict(enumerate(distinct.values())))
    if row is None:
        return None

    def need(std: float) -> str:
        n = seeds_needed(std, target)
        return f"{n} seeds" if n else "over 100 seeds"
    return (f"final-retrain noise over {row.candidates} entries x {row.seeds} shared seeds: "
            f"seed std {row.seed_std * 100:.2f} points (an entry's 95% CI ± "
            f"{row.entry_half_width() * 100:.2f}; ±{target * 100:g} needs {need(row.seed_std)}),"
            f" paired std {row.paired_std * 100:.2f} (a difference's CI ± "
            f"{row.paired_half_width() * 100:.2f}; ±{target * 100:g} needs "
            f"{need(row.paired_std)})")
