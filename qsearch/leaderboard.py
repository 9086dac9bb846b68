"""The leaderboard: a query over experiment directories, never a second copy of the results.

Each experiment directory holds ``spec.json`` and ``results.parquet`` (:mod:`qsearch.store`).
An entry is one experiment, i.e. one (strategy, model, dataset, budget): its final-stage
retrains aggregated over seeds, the final candidate's costs, and what the search cost.

Only *matched-size* entries are ranked. A model well under the budget is not comparable to one
that fills it (DualPrecision compares strategies at equal C_size, Eq. 6), so an entry whose cost
(C_size for a size budget, BitOPs for a BitOPs budget) lies outside ``tolerance`` x budget is
listed but flagged, as is an entry with no final retrain or with fewer than two final seeds.
A fixed-width search (bits only: a checkpoint, ``--width fixed``, a torchvision or factory
model) has no width to fill the budget with: its entries are ranked when they fit.

Ranks say when they cannot decide: each entry is tested against the best of its budget group
(a paired t-test on the per-seed differences when both ran the same seeds, pairing removing
the shared seed noise; else Welch's t-test), and those not distinguishable at ``ALPHA`` share
rank 1 (shown ``=1``). Accuracies carry a Student t 95% interval over the final seeds, and the
difference to the same budget's ``uniform`` entry carries the paired (or Welch) interval.
scipy is imported only when a leaderboard is built.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qsearch import QSearchError
from qsearch.across_budgets import across_budgets
from qsearch.budget import format_cost
from qsearch.candidate import bit_summary
from qsearch.files import FINAL_FILE, SPEC_FILE
from qsearch.seed_noise import quiet_ttests, retrain_noise
from qsearch.store import ResultsStore

FORMATS = ("table", "md", "csv", "json")
EPS = 1e-9  # float slack on the tolerance bounds
ALPHA = 0.05  # significance level of the rank tests; intervals are 1 - ALPHA
PAIRED, WELCH = "paired t-test", "Welch's t-test"

# Fields of an entry that the csv and json formats export (raw values, not display strings).
FIELDS = ("rank", "strategy", "model", "dataset", "budget", "budget_kind", "budget_value",
          "c_size", "bitops", "budget_ratio", "matched", "test_acc_mean", "test_acc_std",
          "n_seeds", "ci_low", "ci_high", "rank_shared", "rank_test", "p_vs_best",
          "vs_uniform", "vs_uniform_low", "vs_uniform_high", "vs_uniform_test",
          "search_val_acc", "trials", "cpu_hours", "wall_seconds", "bits", "note",
          "experiment", "dir")
COLUMNS = ("rank", "strategy", "model", "budget", "C_size", "ratio", "BitOPs",
           "test acc mean ± std (n)", "95% CI", "vs best", "Δ uniform [95% CI]",
           "search val", "trials", "CPU-h", "wall", "bits", "note")
_LEFT = {"strategy", "model", "bits", "note"}  # other columns are right-aligned


# ----- loading --------------------------------------------------------------------------
def load_experiments(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """All trial rows of several experiment directories, with the spec's fields as columns.

    A row's own column wins over a spec field of the same name (e.g. a final row's ``seed``
    is the retrain seed). ``experiment_dir`` names the directory each row came from.
    """
    frames = []
    for d in map(Path, dirs):
        spec = _read_spec(d)
        df = ResultsStore(d).to_pandas()
        for key, value in spec.items():
            if key not in df.columns:
                df[key] = [value] * len(df)
        df["experiment_dir"] = str(d)
        frames.append(df)
    if not frames:
        raise QSearchError("no experiment directories given: pass the --out directories of "
                           "`qsearch run`, e.g. runs/*")
    frames = [f for f in frames if len(f)] or frames[:1]
    return pd.concat(frames, ignore_index=True)


def _read_spec(d: Path) -> dict[str, Any]:
    path = d / SPEC_FILE
    if not path.is_file():
        nested = d.is_dir() and any((c / SPEC_FILE).is_file() for c in d.iterdir())
        hint = f"; its subdirectories are experiments: pass them, e.g. {d}/*" if nested else ""
        raise QSearchError(f"{str(d)!r} is not a qsearch experiment (no {SPEC_FILE}): pass the "
                           f"--out directory of a `qsearch run`{hint}")
    try:
        spec = json.loads(path.read_bytes().decode())
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, not JSON
        raise QSearchError(f"{path} is unreadable ({e}): restore it, or leave {str(d)!r} "
                           "out of the list") from None
    if not isinstance(spec, dict):
        raise QSearchError(f"{path} is not a spec (a JSON object): leave {str(d)!r} out")
    return spec


# ----- the query ------------------------------------------------------------------------
def leaderboard(df: pd.DataFrame, *,
                tolerance: tuple[float, float] = (0.99, 1.0)) -> list[dict[str, Any]]:
    """One entry per experiment, ranked by final test accuracy within (model, dataset, budget).

    ``rank`` is None for entries that are not ranked: no (successful) final retrain, or a
    cost outside ``tolerance`` x budget (``matched=False``). Entries come sorted by model,
    dataset, budget, then rank, unranked last.
    """
    lo, hi = tolerance
    if not 0 < lo <= hi:
        raise QSearchError(f"tolerance {tolerance} invalid: need 0 < low <= high, "
                           "e.g. (0.99, 1.0)")
    key = "experiment_dir" if "experiment_dir" in df.columns else "experiment_id"
    entries = [_entry(rows, lo, hi) for _, rows in df.groupby(key, sort=False)]
    ranked: dict[tuple, list[dict]] = defaultdict(list)
    for e in entries:
        e["ci_low"], e["ci_high"] = _interval(e["final_accs"])
        if e["matched"] and e["n_seeds"] >= 2:
            ranked[(e["model"], e["dataset"], e["budget_kind"], e["budget_value"])].append(e)
        elif e["matched"] and e["n_seeds"]:
            e["note"] = ", ".join(filter(None, ["n<2: not ranked", e["note"]]))
    for group in ranked.values():
        _rank(group)
        _vs_uniform(group)
    for e in entries:
        e["fill_rule"] = (lo, hi)
    return sorted(entries, key=lambda e: (
        e["model"], e["dataset"], e["budget_kind"], e["budget_value"],
        e["rank"] is None, e["rank"] or 0, -(e["test_acc_mean"] or 0.0), e["strategy"],
        e["experiment"]))


def _entry(rows: pd.DataFrame, lo: float, hi: float) -> dict[str, Any]:
    first = rows.iloc[0]
    kind, budget_value = str(first["budget_kind"]), float(first["budget_value"])
    search, final = rows[rows["stage"] == "search"], rows[rows["stage"] == "final"]
    # --evaluator supernet: the search also cost the supernet's training and the top-k
    # retrains, and its choice is the best retrained candidate, not a supernet number
    spent = rows[rows["stage"].isin(("supernet", "search", "topk"))]
    top = rows[rows["stage"] == "topk"]
    ok = final[(final["status"] == "ok") & np.isfinite(_num(final["test_acc"]))]
    accs = _num(ok["test_acc"]).to_numpy()
    seeds = _num(ok["seed"]).tolist() if "seed" in ok.columns else []

    best = _best_search(top if len(top) else search)
    found = _final_candidate(ok if len(ok) else final, first.get("experiment_dir"), best)
    c_size, bitops, w_bits, source = found or (None, None, None, None)
    cost = c_size if kind == "size" else bitops
    ratio = cost / budget_value if cost is not None else None
    fixed = _fixed_width(first)
    matched = ratio is not None and (0.0 if fixed else lo) - EPS <= ratio <= hi + EPS
    space = _space_for(first)

    if final.empty:
        note = "no final retrain"
    elif not len(ok):
        note = "final retrain failed"
    elif not matched:
        what = "C_size" if kind == "size" else "BitOPs"
        note = (f"{what} {ratio:.1%} of budget: not ranked" if ratio is not None
                else "final cost unknown: not ranked")
    else:
        note = f"fixed width: C_size {ratio:.1%} of budget" if fixed and ratio < lo else ""
    if len(top) and not (rows["stage"] == "supernet").any():
        note = ", ".join(filter(None, [note, "supernet reused: its training not counted"]))
    wall = _num(spent["wall_seconds"]).fillna(0.0)
    done = _num(spent["finished_at"])
    cpus = _float(first.get("cpus_per_trial")) or 1.0
    return {
        "rank": None, "strategy": first["strategy"], "model": first["model"],
        "dataset": first["dataset"], "budget": first["budget"], "budget_kind": kind,
        "budget_value": budget_value, "c_size": c_size, "bitops": bitops,
        "budget_ratio": ratio, "matched": bool(matched),
        "test_acc_mean": float(accs.mean()) if len(accs) else None,
        "test_acc_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0 if len(accs) else None,
        "n_seeds": len(accs), "final_accs": accs.tolist(),
        # accuracy by retrain seed, for paired tests; None where seeds are missing or repeat
        "final_by_seed": (dict(zip(seeds, accs.tolist())) if len(set(seeds)) == len(accs)
                          and not any(map(math.isnan, seeds)) else None),
        "rank_shared": False, "rank_test": None, "p_vs_best": None, "vs_uniform": None,
        "vs_uniform_low": None, "vs_uniform_high": None, "vs_uniform_test": None,
        "search_val_acc": float(best["val_acc"]) if best is not None else None,
        "trials": len(search), "cpu_hours": float(wall.sum()) * cpus / 3600,
        "wall_seconds": _busy_seconds(done - wall, done),
        "bits": bit_summary(w_bits, space) if w_bits else "-", "note": note,
        "experiment": first["experiment_id"], "dir": first.get("experiment_dir"),
        # for plots: the final candidate's bits, where they came from, the layer names
        "w_bits": w_bits, "candidate_source": source,
        "layers": [l.name for l in space.layers] if space else None,
    }


# ----- statistics over final seeds ----------------------------------------------------------
def _interval(accs: Sequence[float]) -> tuple[float | None, float | None]:
    """Student t interval (1 - ALPHA) of the mean of ``accs``; (None, None) below two seeds."""
    n = len(accs)
    if n < 2:
        return None, None
    from scipy import stats

    mean, sd = float(np.mean(accs)), float(np.std(accs, ddof=1))
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def _compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, Any]:
    """(test name, scipy TtestResult) for a - b: paired on the per-seed differences when both
    ran the same seeds (the shared seed noise cancels), else Welch's unequal-variance test."""
    from scipy import stats

    sa, sb = a["final_by_seed"], b["final_by_seed"]
    with quiet_ttests():
        if sa is not None and sb is not None and set(sa) == set(sb):
            order = sorted(sa)
            return PAIRED, stats.ttest_rel([sa[k] for k in order], [sb[k] for k in order])
        return WELCH, stats.ttest_ind(a["final_accs"], b["final_accs"], equal_var=False)


def _rank(group: list[dict[str, Any]]) -> None:
    """Rank one budget group: entries not distinguishable from the best (p >= ALPHA, or
    identical samples) share rank 1; the others take the next ranks by mean accuracy."""
    group.sort(key=lambda e: (-e["test_acc_mean"], e["strategy"]))
    best, tied, below = group[0], [group[0]], []
    for e in group[1:]:
        e["rank_test"], res = _compare(best, e)
        p = float(res.pvalue)
        e["p_vs_best"] = p if math.isfinite(p) else None
        same = e["test_acc_mean"] == best["test_acc_mean"]
        e["same_as_best"] = same and not math.isfinite(p)  # the same numbers (same candidate)
        (tied if (p >= ALPHA if math.isfinite(p) else same) else below).append(e)
    for e in tied:
        e["rank"], e["rank_shared"] = 1, len(tied) > 1
    for i, e in enumerate(below, len(tied) + 1):
        e["rank"] = i


def _vs_uniform(group: list[dict[str, Any]]) -> None:
    """Difference to the group's ``uniform`` entry (the best one if several), with its
    (1 - ALPHA) interval from the same test the ranking would use."""
    ref = next((e for e in group if e["strategy"] == "uniform"), None)
    for e in (e for e in group if ref is not None and e is not ref):
        e["vs_uniform_ref"] = ref  # the entry it pairs with (see qsearch.across_budgets)
        e["vs_uniform_test"], res = _compare(e, ref)
        ci = res.confidence_interval(1 - ALPHA)
        e["vs_uniform"] = e["test_acc_mean"] - ref["test_acc_mean"]
        e["vs_uniform_low"], e["vs_uniform_high"] = _float(ci.low), _float(ci.high)


def _busy_seconds(starts: pd.Series, ends: pd.Series) -> float | None:
    """Length of the union of the trials' [start, end] intervals: the search's wall time
    with the gaps where no trial ran left out (a search resumed a day later is not a day)."""
    spans = sorted((a, b) for a, b in zip(starts, ends) if pd.notna(a) and pd.notna(b))
    if not spans:
        return None
    total, (lo, hi) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > hi:
            total, lo = total + hi - lo, a
        hi = max(hi, b)
    return float(total + hi - lo)


def _best_search(search: pd.DataFrame) -> pd.Series | None:
    acc = _num(search["val_acc"])
    ok = search[(search["status"] == "ok") & np.isfinite(acc) & search["candidate"].notna()]
    return ok.loc[_num(ok["val_acc"]).idxmax()] if len(ok) else None


def _final_candidate(final: pd.DataFrame, directory: str | None, best: pd.Series | None
                     ) -> tuple[float | None, float | None, list[int], str] | None:
    """(C_size, BitOPs, w_bits, source) of the final candidate.

    From the final rows when there are any; else from ``final.json`` (the search winner
    re-aligned to the target); else the best search trial (whose cost is relative to the
    search budget, so it is never matched unless the search ran at the target).
    """
    with_cand = final[final["candidate"].notna()]
    if len(with_cand):
        r = with_cand.iloc[0]
        return (_float(r["c_size"]), _float(r["bitops"]),
                json.loads(r["candidate"])["w_bits"], "final")
    path = Path(directory) / FINAL_FILE if directory else None
    if path and path.is_file():
        try:
            f = json.loads(path.read_text())
            return (_float(f.get("c_size")), _float(f.get("bitops")),
                    list(f["candidate"]["w_bits"]), FINAL_FILE)
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            pass  # a damaged final.json: fall back to the search's best trial
    if best is not None:
        return (_float(best["c_size"]), _float(best["bitops"]),
                json.loads(best["candidate"])["w_bits"], "search best")
    return None


def _fixed_width(row: pd.Series) -> bool:
    checkpoint = row.get("checkpoint")
    return (":" in str(row["model"]) or row.get("width_mode") == "fixed"
            or (isinstance(checkpoint, str) and bool(checkpoint)))


def _space_for(row: pd.Series) -> Any:
    data = row.get("data")
    root = data.get("root") if isinstance(data, dict) else None
    pin = row.get("pin_bits", 8)
    pin = None if pin is None or (isinstance(pin, float) and math.isnan(pin)) else int(pin)
    return _space(str(row["model"]), str(row["dataset"]), root, pin)


@lru_cache(maxsize=16)
def _space(model: str, dataset: str, root: str | None, pin_bits: int | None) -> Any:
    """The SearchSpace for layer groups and names, or None where it cannot be built here."""
    try:
        from qsearch.space import SearchSpace  # imports torch: only when a leaderboard is built

        return SearchSpace(model, dataset, data_root=root, pin_bits=pin_bits)
    except (QSearchError, OSError, ImportError):  # e.g. an ImageFolder root on another machine
        return None


def _num(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce").astype(float)


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ----- formats --------------------------------------------------------------------------
def display_rows(entries: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Column headers and one row of display strings per entry (table, md and the report)."""
    rows = []
    for e in entries:
        kind = e["budget_kind"]
        acc = (f"{e['test_acc_mean']:.2%} ± {e['test_acc_std']:.2%} ({e['n_seeds']})"
               if e["n_seeds"] else "-")
        rows.append([
            "-" if e["rank"] is None else f"{'=' if e['rank_shared'] else ''}{e['rank']}",
            e["strategy"], f"{e['model']}/{e['dataset']}",
            format_cost(e["budget_value"], kind),
            format_cost(e["c_size"], "size") if e["c_size"] is not None else "-",
            f"{e['budget_ratio']:.2%}" if e["budget_ratio"] is not None else "-",
            format_cost(e["bitops"], "bitops") if e["bitops"] is not None else "-",
            acc, _pct_interval(e["ci_low"], e["ci_high"]), _vs_best(e), _vs_uniform_text(e),
            f"{e['search_val_acc']:.2%}" if e["search_val_acc"] is not None else "-",
            str(e["trials"]), f"{e['cpu_hours']:.2f}", _duration(e["wall_seconds"]),
            e["bits"], e["note"]])
    return list(COLUMNS), rows


def _pct_interval(lo: float | None, hi: float | None, sign: str = "") -> str:
    return "-" if lo is None or hi is None else f"[{lo * 100:{sign}.2f}, {hi * 100:{sign}.2f}]"


def _vs_best(e: dict[str, Any]) -> str:
    if e["rank"] is None:
        return "-"
    if e["rank_test"] is None:
        return "best"
    if e.get("same_as_best"):
        return "same results"
    p = e["p_vs_best"]
    name = "paired" if e["rank_test"] == PAIRED else "Welch"
    return f"{name} p{'=n/a' if p is None else '<0.001' if p < 0.001 else f'={p:.3f}'}"


def _vs_uniform_text(e: dict[str, Any]) -> str:
    if e["vs_uniform"] is None:
        return "ref" if e["strategy"] == "uniform" and e["rank"] is not None else "-"
    ci = _pct_interval(e["vs_uniform_low"], e["vs_uniform_high"], "+")
    return f"{e['vs_uniform'] * 100:+.2f} {'[n/a]' if ci == '-' else ci}"


def footnotes(entries: Sequence[dict[str, Any]]) -> list[str]:
    """Lines under the table that name the tests behind the ranks and intervals."""
    def used(key: str, which: Iterable[dict[str, Any]]) -> str:
        names = sorted({e[key] for e in which if e[key]}, reverse=True)
        return " / ".join(n + (" on shared seeds" if n == PAIRED else "") for n in names)
    lines = []
    if any(e["note"] and "of budget: not ranked" in e["note"] for e in entries):
        lo, hi = entries[0]["fill_rule"]
        lines.append(f"ranked: entries whose final cost is within [{lo:.0%}, {hi:.0%}] of the "
                     "budget (matched size; `--min-fill` sets the lower end)")
    shared = [e for e in entries if e["rank_shared"] and e["rank_test"]]
    if shared:
        lines.append(f"=1: not distinguishable from the best at the same budget "
                     f"({used('rank_test', shared)}, p >= {ALPHA})")
    if any(e["rank_test"] for e in entries):
        lines.append(f"vs best: {used('rank_test', entries)} against the best entry of the "
                     f"budget, alpha {ALPHA}; entries below it take the next ranks")
    if any(e["ci_low"] is not None for e in entries):
        lines.append("95% CI: Student t interval of the mean test accuracy over final seeds (%)")
    if any(e["vs_uniform_test"] for e in entries):
        lines.append("Δ uniform: test accuracy minus the uniform entry of the same budget, in "
                     f"points, with its 95% CI ({used('vs_uniform_test', entries)})")
    noise = retrain_noise([e["final_by_seed"] for e in entries if e["final_by_seed"]])
    return lines + ([noise] if noise else []) + across_budgets(entries)


def format_leaderboard(entries: Sequence[dict[str, Any]], fmt: str = "table") -> str:
    """Render entries as ``table`` (aligned text), ``md``, ``csv`` or ``json``.

    table and md show display strings; csv and json export the raw values of :data:`FIELDS`
    (accuracies as fractions, costs in bits / operations, times in seconds and CPU-hours).
    """
    if fmt not in FORMATS:
        raise QSearchError(f"leaderboard format {fmt!r} unknown: choose one of "
                           f"{', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps([{k: e[k] for k in FIELDS} for e in entries], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(entries)
        return buf.getvalue()
    head, rows = display_rows(entries)
    if fmt == "md":
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
        rule = "|" + "|".join("---" if h in _LEFT else "---:" for h in head) + "|"
        notes = [f"- {n}" for n in footnotes(entries)]
        return "\n".join([line(head), rule, *map(line, rows), *([""] + notes if notes else [])]
                         ) + "\n"
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    def pad(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if h in _LEFT else c.rjust(w)
                         for c, w, h in zip(cells, widths, head)).rstrip()
    return "\n".join([pad(head), pad(["-" * w for w in widths]), *map(pad, rows),
                      *footnotes(entries)]) + "\n"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
