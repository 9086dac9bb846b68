"""Proxy fidelity report: does a short trial rank candidates as the longest one does?

Pure functions over stored result rows (``results.parquet`` of a ``qsearch fidelity`` run,
strategy ``fidelity``): for each trial length, Kendall's tau between its ranking of the
candidates (mean validation accuracy over seeds) and the longest length's, with a
bootstrap 95% interval over candidates, the CPU-hours that length cost and its winner.
Ray-free; scipy is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qsearch import QSearchError

RESAMPLES = 2000
MIN_CANDIDATES = 5  # fewer make a bootstrap interval meaningless


@dataclass(frozen=True)
class LengthRow:
    """One trial length's line of the report. ``tau``/``ci`` are NaN when fewer than three
    candidates have results at both this length and the reference one."""

    length: float
    trials: int
    failed: int
    cpu_hours: float
    winner: str
    winner_acc: float
    tau: float
    ci: tuple[float, float]
    compared: int  # candidates with results at this length and at the reference

    @property
    def verdict(self) -> str:
        low = self.ci[0]
        if math.isnan(self.tau) or math.isnan(low):
            return "too few results"
        if self.compared < MIN_CANDIDATES:
            return f"cannot tell: under {MIN_CANDIDATES} candidates"
        if low < 0:
            return "cannot tell: CI reaches below 0"
        return "agrees" if low >= 0.5 else "weak: CI starts below 0.5"


def trial_rows(rows: list[dict]) -> list[dict]:
    """The fidelity trials among stored rows, with the metrics JSON decoded."""
    out = []
    for r in rows:
        m = r.get("metrics")
        m = json.loads(m) if isinstance(m, str) else dict(m or {})
        if r.get("stage", "search") == "search" and "length" in m and "candidate_index" in m:
            out.append({**r, "metrics": m})
    return out


def accuracies(rows: list[dict]) -> dict[float, dict[int, list[float]]]:
    """length -> candidate index -> validation accuracies of its successful seeds."""
    accs: dict[float, dict[int, list[float]]] = {}
    for r in rows:
        acc = r.get("val_acc")
        if r.get("status") in ("ok", "stopped") and acc is not None and math.isfinite(acc):
            m = r["metrics"]
            accs.setdefault(m["length"], {}).setdefault(m["candidate_index"], []).append(acc)
    return accs


def mean_accuracies(rows: list[dict]) -> dict[float, dict[int, float]]:
    """length -> candidate index -> mean validation accuracy over its successful seeds."""
    return _means(accuracies(rows))


def _means(accs: dict[float, dict[int, list[float]]]) -> dict[float, dict[int, float]]:
    return {length: {i: float(np.mean(a)) for i, a in by.items()} for length, by in accs.items()}


def candidate_table(rows: list[dict], unit: str = "steps") -> str:
    """Markdown: each candidate's rank and validation accuracy at every length (mean, and
    the sample std over seeds where there are several), best at the longest first."""
    accs = accuracies(rows)
    means = _means(accs)
    lengths = sorted(accs)
    if not lengths:
        return ""
    ranks = {n: {i: k + 1 for k, i in enumerate(sorted(by, key=lambda i: (-by[i], i)))}
             for n, by in means.items()}
    labels = {r["metrics"]["candidate_index"]: r["metrics"].get("label", "?") for r in rows}
    ref = means[lengths[-1]]
    order = sorted(labels, key=lambda i: (i not in ref, -ref.get(i, 0.0), i))

    def cell(n: float, i: int) -> str:
        a = accs[n].get(i)
        if not a:
            return "-"
        spread = f" ± {np.std(a, ddof=1):.2%}" if len(a) > 1 else ""
        return f"#{ranks[n][i]} {means[n][i]:.2%}{spread} ({len(a)})"

    head = ["candidate", *(f"{n:g} {unit}" for n in lengths)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([labels[i], *(cell(n, i) for n in lengths)]) + " |"
              for i in order]
    return "\n".join(lines + ["", "#rank at that length, mean val acc ± std over seeds (n)."])


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b of two score lists (NaN when either is constant)."""
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).statistic)


def bootstrap_ci(x: list[float], y: list[float], *, resamples: int = RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of Kendall's tau, resampling candidates with replacement;
    resamples where tau is undefined (all ties) are left out."""
    from scipy.stats import kendalltau

    x, y = np.asarray(x, float), np.asarray(y, float)
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(resamples):
        idx = rng.integers(0, len(x), len(x))
        t = kendalltau(x[idx], y[idx]).statistic
        if math.isfinite(t):
            taus.append(t)
    if not taus:
        return (math.nan, math.nan)
    lo, hi = np.percentile(taus, [2.5, 97.5])
    return (float(lo), float(hi))


def cpu_hours(rows: list[dict], cpus_per_trial: float) -> float:
    """CPU-hours of these trials: wall seconds x CPUs per trial / 3600."""
    return sum(float(r.get("wall_seconds") or 0) for r in rows) * cpus_per_trial / 3600


def fidelity_report(rows: list[dict], *, cpus_per_trial: float = 1.0,
                    resamples: int = RESAMPLES, seed: int = 0) -> list[LengthRow]:
    """One :class:`LengthRow` per trial length, shortest first; the last is the reference."""
    rows = trial_rows(rows)
    if not rows:
        raise QSearchError("no fidelity trials in these results: give the --out directory "
                           "of a `qsearch fidelity` run")
    means = mean_accuracies(rows)
    lengths = sorted({r["metrics"]["length"] for r in rows})
    ref = means.get(lengths[-1], {})
    labels = {r["metrics"]["candidate_index"]: r["metrics"].get("label", "?") for r in rows}
    out = []
    for length in lengths:
        mine = [r for r in rows if r["metrics"]["length"] == length]
        acc = means.get(length, {})
        shared = sorted(set(acc) & set(ref))
        x, y = [acc[i] for i in shared], [ref[i] for i in shared]
        enough = len(shared) >= 3
        best = max(acc, key=lambda i: (acc[i], -i)) if acc else None
        out.append(LengthRow(
            length=length, trials=len(mine),
            failed=sum(r.get("status") not in ("ok", "stopped") for r in mine),
            cpu_hours=cpu_hours(mine, cpus_per_trial),
            winner=labels[best] if best is not None else "-",
            winner_acc=acc[best] if best is not None else math.nan,
            tau=kendall_tau(x, y) if enough else math.nan,
            ci=bootstrap_ci(x, y, resamples=resamples, seed=seed) if enough
            else (math.nan, math.nan),
            compared=len(shared)))
    return out


def format_report(report: list[LengthRow], *, unit: str = "steps", title: str = "",
                  fmt: str = "table") -> str:
    """The report as an aligned text table (``table``) or Markdown (``md``)."""
    if fmt not in ("table", "md"):
        raise QSearchError(f"format {fmt!r} not known: use table or md, e.g. --format md")
    head = [unit, "trials", "CPU-h", "winner (val acc)", "tau vs longest", "95% CI", "n",
            "verdict"]
    body = [_cells(r, i == len(report) - 1) for i, r in enumerate(report)]
    if fmt == "md":
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(c) for c in col) for col in zip(head, *body)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                 for row in [head, *body]]
    notes = [f"tau: Kendall's tau-b of the candidates' mean val acc against the longest "
             f"length; 95% CI: {RESAMPLES} bootstrap resamples of candidates; CPU-h: wall "
             "x CPUs per trial."]
    return "\n".join(([title, ""] if title else []) + lines + ([""] + notes))


def _cells(r: LengthRow, reference: bool) -> list[str]:
    def num(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.2f}"

    winner = f"{r.winner} ({r.winner_acc:.2%})" if r.winner != "-" else "-"
    trials = f"{r.trials}" + (f" ({r.failed} failed)" if r.failed else "")
    if reference:
        return [f"{r.length:g}", trials, f"{r.cpu_hours:.3f}", winner, "reference", "-",
                str(r.compared), "-"]
    return [f"{r.length:g}", trials, f"{r.cpu_hours:.3f}", winner, num(r.tau),
            f"[{num(r.ci[0])}, {num(r.ci[1])}]", str(r.compared), r.verdict]


def experiment_report(directory: str | Path, fmt: str = "table") -> str:
    """The formatted report of an experiment directory (its spec and stored rows)."""
    from qsearch.budget import parse_budget
    from qsearch.files import RESULTS_FILE, SPEC_FILE
    from qsearch.seed_noise import format_noise, noise_report
    from qsearch.spec import read_spec
    from qsearch.store import ResultsStore

    d = Path(directory)
    if not (d / SPEC_FILE).exists() or not (d / RESULTS_FILE).exists():
        raise QSearchError(f"{str(d)!r} holds no finished trials of an experiment: give the "
                           "--out directory of a `qsearch fidelity` run")
    spec, rows = read_spec(d / SPEC_FILE), trial_rows(ResultsStore(d).rows)  # decoded once
    report = fidelity_report(rows, cpus_per_trial=spec.cpus_per_trial, seed=spec.seed)
    kw = spec.strategy_kwargs
    unit = "epochs" if kw.get("epochs") is not None else "steps"
    searched = parse_budget(rows[0].get("proxy_budget") or spec.budget)
    at = spec.budget if searched.value == parse_budget(spec.budget).value else \
        f"{searched} (proxy of {spec.budget})"
    title = (f"Proxy fidelity: {spec.model} on {spec.dataset} at {at}, "
             f"{kw.get('candidates', 12)} candidates x {kw.get('seeds', 1)} seed(s)")
    text = format_report(report, unit=unit, title=title, fmt=fmt)
    text += f"\n\nCandidates, best at the longest length first:\n\n{candidate_table(rows, unit)}"
    noise = format_noise(noise_report(rows), unit=unit)
    return text + (f"\n\nSeed noise against trial length:\n\n{noise}" if noise else "")


def budget_report(small: list[dict], large: list[dict], *, resamples: int = RESAMPLES,
                  seed: int = 0) -> list[dict]:
    """Does the ranking at a small (proxy) budget hold at a larger one? For each trial length
    both runs trained: Kendall's tau between the two rankings of the same bit assignments
    (width-aligned to each budget), its bootstrap 95% interval and each run's winner. The
    runs must hold the same candidates (same ``--seed`` and ``--candidates``)."""
    small, large = trial_rows(small), trial_rows(large)
    if not small or not large:
        raise QSearchError("--compare needs two `qsearch fidelity` run directories, each "
                           "with finished trials")
    bits = [{r["metrics"]["candidate_index"]: json.loads(r["candidate"])["w_bits"]
             for r in rows if r.get("candidate")} for rows in (small, large)]
    shared_bits = set(bits[0]) & set(bits[1])
    if any(bits[0][i] != bits[1][i] for i in shared_bits):
        raise QSearchError("the two runs trained different bit assignments: run both with "
                           "the same --seed and --candidates (only --budget differs)")
    labels = {r["metrics"]["candidate_index"]: r["metrics"].get("label", "?") for r in small}
    a, b = mean_accuracies(small), mean_accuracies(large)
    out = []
    for length in sorted(set(a) & set(b)):
        shared = sorted(set(a[length]) & set(b[length]))
        x, y = [a[length][i] for i in shared], [b[length][i] for i in shared]
        enough = len(shared) >= 3
        out.append({
            "length": length, "compared": len(shared),
            "winner_small": labels.get(max(shared, key=lambda i: a[length][i]), "-"),
            "winner_large": labels.get(max(shared, key=lambda i: b[length][i]), "-"),
            "tau": kendall_tau(x, y) if enough else math.nan,
            "ci": bootstrap_ci(x, y, resamples=resamples, seed=seed) if enough
            else (math.nan, math.nan)})
    return out


def format_budget_report(rows: list[dict], title: str) -> str:
    """The budget comparison as Markdown, one line per trial length."""
    lines = [title, "", "| length | n | winner at the small budget | winner at the large | "
             "tau | 95% CI | verdict |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        v = LengthRow(r["length"], 0, 0, 0.0, "", 0.0, r["tau"], r["ci"], r["compared"])
        lo, hi = (("-" if math.isnan(c) else f"{c:.2f}") for c in r["ci"])
        tau = "-" if math.isnan(r["tau"]) else f"{r['tau']:.2f}"
        lines.append(f"| {r['length']:g} | {r['compared']} | {r['winner_small']} | "
                     f"{r['winner_large']} | {tau} | [{lo}, {hi}] | {v.verdict} |")
    return "\n".join(lines + ["", "tau: Kendall's tau-b between the two budgets' rankings "
                              "of the same bit assignments (mean val acc over seeds)."])


def compare_report(small_dir: str | Path, large_dir: str | Path) -> str:
    """The budget comparison of two `qsearch fidelity` run directories."""
    from qsearch.files import RESULTS_FILE, SPEC_FILE
    from qsearch.spec import read_spec
    from qsearch.store import ResultsStore

    dirs = [Path(small_dir), Path(large_dir)]
    for d in dirs:
        if not (d / SPEC_FILE).exists() or not (d / RESULTS_FILE).exists():
            raise QSearchError(f"{str(d)!r} holds no finished trials of an experiment: give "
                               "the --out directories of two `qsearch fidelity` runs")
    specs = [read_spec(d / SPEC_FILE) for d in dirs]
    title = (f"Proxy budget: {specs[0].model} on {specs[0].dataset}, ranking at "
             f"{specs[0].budget} against {specs[1].budget}")
    rows = budget_report(ResultsStore(dirs[0]).rows, ResultsStore(dirs[1]).rows,
                         seed=specs[0].seed)
    return format_budget_report(rows, title)


def parse_lengths(text: str, unit: str) -> list:
    """``"100,300,900"`` as trial lengths in ``unit`` (steps: integers; epochs: numbers)."""
    try:
        values = [(int if unit == "steps" else float)(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not 0 < v < math.inf for v in values):
        example = "--steps 100,300,900" if unit == "steps" else "--epochs 1,3"
        raise QSearchError(f"--{unit} {text!r} not understood: give comma-separated "
                           f"positive trial lengths, e.g. {example}")
    return values


def fidelity_spec(budget: str | None, *, candidates: int, steps: str | None,
                  epochs: str | None, seeds: int, batch_size: int | None = None,
                  data_root: str | None = None, mixes: str = "random", **settings):
    """The Spec of a `qsearch fidelity` run (``settings``: other spec keys, None = default),
    checked before anything is written: strategy ``fidelity``, the trial length set to the
    longest length, one trial per (candidate, length, seed)."""
    from qsearch.spec import Spec
    from qsearch.strategies.fidelity import check_options

    if budget is None:
        raise QSearchError("qsearch fidelity needs --budget (e.g. --budget 32KB), or "
                           "--report DIR to print the table of an earlier run")
    if steps is not None and epochs is not None:
        raise QSearchError("--steps and --epochs both given: the trial lengths are one of them")
    unit = "epochs" if epochs is not None else "steps"
    lengths = parse_lengths(epochs or steps or "100,300,900", unit)
    check_options(candidates, lengths, seeds, unit)
    train = {unit: max(lengths)} | ({"batch_size": batch_size} if batch_size else {})
    return Spec(strategy="fidelity", budget=budget, train=train,
                strategy_kwargs={"candidates": candidates, unit: sorted(lengths),
                                 "seeds": seeds} | ({"mixes": mixes} if mixes != "random"
                                                    else {}),
                data={"root": data_root} if data_root else {},
                trials=candidates * len(lengths) * seeds,
                **{k: v for k, v in settings.items() if v is not None})
