"""A self-contained HTML report of experiments: one file, images inline as base64 PNG.

Sections: the leaderboard; per (model, dataset) a Pareto plot (accuracy vs C_size), the final
candidates' per-layer bits as a heatmap, and the search's best-so-far validation accuracy vs
trials and vs CPU-hours; last, DualPrecision's grid tables from ``summary.json``. Matplotlib
draws through ``Figure`` objects (the Agg canvas), never pyplot, so no GUI backend or global
state is touched.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qsearch.budget import format_cost
from qsearch.files import SUMMARY_FILE
from qsearch.leaderboard import display_rows, footnotes, leaderboard, load_experiments
from qsearch.planning import check_writable

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; }
td.l, th.l { text-align: left; }
td.note { white-space: normal; min-width: 16em; }
.wide { overflow-x: auto; }
tr.flag td { color: #888; font-style: italic; }
td.best { font-weight: bold; background: #e6f4e6; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.cap { color: #555; font-size: 13px; margin-bottom: 1.5em; }
"""


def build_report(dirs: Iterable[str | Path], out_path: str | Path, *,
                 tolerance: tuple[float, float] = (0.99, 1.0)) -> Path:
    """Write the HTML report of the experiments in ``dirs`` to ``out_path``; return its path.
    Entries are ranked when their final cost is within ``tolerance`` x budget."""
    check_writable(out_path, directory=False, what="report file", flag="-o",
                   example="report.html")
    dirs = [Path(d) for d in dirs]
    df = load_experiments(dirs)
    entries = leaderboard(df, tolerance=tolerance)
    colors = _colors(sorted({e["strategy"] for e in entries}))
    parts = ["<h1>qsearch report</h1>",
             f"<p class=cap>{len(dirs)} experiment(s), generated "
             f"{datetime.datetime.now():%Y-%m-%d %H:%M}. Ranked: final retrains whose cost "
             f"is within {tolerance[0]:.0%}&ndash;{tolerance[1]:.0%} of the budget; grey rows are "
             "flagged and not ranked.</p>",
             "<h2>Leaderboard</h2>", _leaderboard_html(entries)]
    for model, dataset in sorted({(e["model"], e["dataset"]) for e in entries}):
        group = [e for e in entries if (e["model"], e["dataset"]) == (model, dataset)]
        rows = df[(df["model"] == model) & (df["dataset"] == dataset)]
        parts.append(f"<h2>{_esc(model)} on {_esc(dataset)}</h2>")
        for figure in (_pareto(group, colors), _heatmap(group), _progress(rows, colors)):
            if figure is not None:
                parts.append(_img(*figure))
    rewards = _rewards(df)
    if rewards is not None:
        parts += ["<h2>HAQ's reward curves</h2>", _img(*rewards)]
    grids = _grid_sections(df)
    if grids:
        parts += ["<h2>DualPrecision grids</h2>", *grids]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("<!DOCTYPE html>\n<html><head><meta charset=utf-8><title>qsearch report"
                   f"</title><style>{_STYLE}</style></head><body>\n" + "\n".join(parts)
                   + "\n</body></html>\n", encoding="utf-8")
    return out


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _colors(strategies: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(strategies)}


def _img(fig: Any, caption: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" alt="{_esc(caption)}">'
            f"<div class=cap>{_esc(caption)}</div>")


def _leaderboard_html(entries: Sequence[dict[str, Any]]) -> str:
    head, rows = display_rows(entries)
    kind = {h: "l" for h in ("strategy", "model", "bits")} | {"note": "l note"}
    def cell(tag: str, h: str, text: str) -> str:
        cls = f' class="{kind[h]}"' if h in kind else ""
        return f"<{tag}{cls}>{_esc(text)}</{tag}>"
    out = ["<div class=wide><table><tr>" + "".join(cell("th", h, h) for h in head) + "</tr>"]
    for e, row in zip(entries, rows):
        cells = "".join(cell("td", h, c) for h, c in zip(head, row))
        out.append(f"<tr{' class=flag' if e['rank'] is None else ''}>{cells}</tr>")
    notes = "".join(f"<div class=cap>{_esc(n)}</div>" for n in footnotes(entries))
    return "\n".join(out) + "</table></div>" + notes


# ----- figures: each returns (Figure, caption) or None -------------------------------------
def _pareto(entries: Sequence[dict[str, Any]], colors: dict) -> tuple[Any, str] | None:
    """Accuracy vs C_size, one series per strategy across budgets."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    final = [e for e in entries if e["n_seeds"] and e["c_size"]]
    if final:
        points, key = final, "test_acc_mean"
        label = "test accuracy (final retrain, mean and 95% CI over seeds)"
    else:
        points = [e for e in entries if e["search_val_acc"] is not None and e["c_size"]]
        key, label = "search_val_acc", "search validation accuracy (no final retrain)"
    if not points:
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for strategy in sorted({e["strategy"] for e in points}):
        series = sorted((e for e in points if e["strategy"] == strategy),
                        key=lambda e: e["c_size"])
        x = np.array([e["c_size"] for e in series])
        y = np.array([e[key] for e in series])
        c = colors[strategy]
        ax.plot(x, y, "-", color=c, label=strategy, alpha=0.7)
        if final:  # Student t 95% intervals; entries with one seed have none
            yerr = np.array([[e[key] - e["ci_low"], e["ci_high"] - e[key]]
                             if e["ci_low"] is not None else [np.nan, np.nan] for e in series])
            ax.errorbar(x, y, yerr=yerr.T, fmt="none", ecolor=c, capsize=3)
        matched = np.array([e["matched"] for e in series], bool)
        ax.scatter(x[matched], y[matched], color=c, zorder=3)
        ax.scatter(x[~matched], y[~matched], facecolors="white", edgecolors=c, zorder=3)
    ax.set_xlabel("C_size of the final candidate")
    ax.set_ylabel(label)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_cost(v, "size")))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    left_out = len(entries) - len(points)
    caption = (f"Pareto plot: {label} vs C_size. Hollow markers: cost outside 99-100% of the "
               "budget (not ranked).")
    if final and left_out:
        caption += f" {left_out} entr{'y' if left_out == 1 else 'ies'} without a final " \
                   "retrain not shown."
    return fig, caption


def _heatmap(entries: Sequence[dict[str, Any]]) -> tuple[Any, str] | None:
    """Per-layer weight bits of each entry's final candidate: rows (strategy, budget)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    rows = sorted((e for e in entries if e["w_bits"]),
                  key=lambda e: (e["strategy"], e["budget_kind"], e["budget_value"]))
    if not rows:
        return None
    n = max(len(e["w_bits"]) for e in rows)
    levels = sorted({b for e in rows for b in e["w_bits"]})
    grid = np.full((len(rows), n), np.nan)
    for i, e in enumerate(rows):
        grid[i, :len(e["w_bits"])] = [levels.index(b) for b in e["w_bits"]]
    names = next((e["layers"] for e in rows if e["layers"] and len(e["layers"]) == n),
                 [str(i) for i in range(n)])

    from matplotlib import colormaps

    cmap = ListedColormap(colormaps["viridis"](np.linspace(0.1, 0.9, len(levels))))
    fig = Figure(figsize=(max(6.0, 0.32 * n + 3), 0.45 * len(rows) + 2.2))
    ax = fig.add_subplot()
    im = ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(levels) - 0.5, aspect="auto")
    for i, e in enumerate(rows):
        for j, b in enumerate(e["w_bits"]):
            ax.text(j, i, str(b), ha="center", va="center", fontsize=7,
                    color="white" if levels.index(b) < len(levels) / 2 else "black")
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), [
        f"{e['strategy']} @ {format_cost(e['budget_value'], e['budget_kind'])}"
        + ("" if e["candidate_source"] == "final" else f" ({e['candidate_source']})")
        for e in rows], fontsize=8)
    ax.set_xlabel("layer")
    bar = fig.colorbar(im, ax=ax, ticks=range(len(levels)), pad=0.01)
    bar.ax.set_yticklabels([str(b) for b in levels])
    bar.set_label("weight bits")
    return fig, ("Per-layer weight bits of each final candidate (rows: strategy @ budget; "
                 "in brackets where the candidate is not a final retrain's).")


def _progress(rows: pd.DataFrame, colors: dict) -> tuple[Any, str] | None:
    """Best-so-far validation accuracy vs trials and vs CPU-hours, one line per experiment."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    search = rows[rows["stage"] == "search"]
    if search.empty:
        return None
    fig = Figure(figsize=(14, 4), layout="constrained")
    by_trials, by_cpu = fig.subplots(1, 2)
    budgets = sorted(search["budget_value"].unique())
    styles = ["-", "--", ":", "-."]
    for _, trials in search.groupby("experiment_dir", sort=True):
        trials = trials.sort_values(["finished_at", "trial_index"])
        first = trials.iloc[0]
        acc = pd.to_numeric(trials["val_acc"], errors="coerce").to_numpy(float)
        ok = (trials["status"] == "ok").to_numpy() & np.isfinite(acc)
        best = np.maximum.accumulate(np.where(ok, acc, -np.inf))
        best[~np.isfinite(best)] = np.nan
        cpus = float(first.get("cpus_per_trial", 1.0) or 1.0)
        wall = pd.to_numeric(trials["wall_seconds"], errors="coerce").fillna(0).to_numpy()
        cpu_hours = np.cumsum(wall) * cpus / 3600
        style = dict(color=colors[first["strategy"]], where="post",
                     linestyle=styles[budgets.index(first["budget_value"]) % len(styles)],
                     label=f"{first['strategy']} @ "
                           f"{format_cost(first['budget_value'], first['budget_kind'])}")
        marker = "o" if len(best) == 1 else None  # a one-trial search is a point, not a line
        by_trials.step(np.arange(1, len(best) + 1), best, marker=marker, **style)
        by_cpu.step(cpu_hours, best, marker=marker, **style)
    for ax, xlabel in ((by_trials, "search trials"), (by_cpu, "CPU-hours")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("best validation accuracy so far")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
    fig.legend(*by_trials.get_legend_handles_labels(), fontsize=8, loc="outside right upper")
    return fig, ("Search progress: best-so-far validation accuracy vs completed trials and vs "
                 "CPU-hours (trial wall time x CPUs per trial); line style marks the budget.")


def _rewards(df: pd.DataFrame) -> tuple[Any, str] | None:
    """Mean reward per block of episodes of each search whose summary.json has one (HAQ's
    ``mean_reward_per_block``), one line per experiment."""
    from matplotlib.figure import Figure

    curves = []
    for d in sorted(df["experiment_dir"].unique()):
        summary = _read_json(Path(d) / SUMMARY_FILE)
        if isinstance(summary, dict) and summary.get("mean_reward_per_block"):
            curves.append((d, summary["block"], summary["mean_reward_per_block"]))
    if not curves:
        return None
    fig = Figure(figsize=(8, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for d, block, means in curves:
        ax.plot(block * (np.arange(len(means)) + 1), means, label=Path(d).name)
    ax.set_xlabel("episodes")
    ax.set_ylabel(f"mean reward per {curves[0][1]} episodes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, ("HAQ's learning: the mean reward (0.1 x (accuracy - the first episode's), "
                 "accuracy in %) of each block of episodes, warm-up included.")


# ----- DualPrecision grids -------------------------------------------------------------
def _grid_sections(df: pd.DataFrame) -> list[str]:
    """One table per DualPrecision experiment, read from its summary.json."""
    out = []
    experiments = df.drop_duplicates("experiment_dir").sort_values(["strategy", "budget_value"])
    for _, r in experiments.iterrows():
        summary = _read_json(Path(r["experiment_dir"]) / SUMMARY_FILE)
        if r["strategy"] != "dualprecision" or not isinstance(summary, dict) \
                or not isinstance(summary.get("table"), list):
            continue
        out.append(f"<h3>{_esc(r['strategy'])} @ "
                   f"{_esc(format_cost(r['budget_value'], r['budget_kind']))} "
                   f"({_esc(r['model'])}/{_esc(r['dataset'])}, {_esc(r['experiment_dir'])})</h3>")
        out.append(_grid_html(summary))
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _grid_html(grid: dict) -> str:
    """DualPrecision's grid (``strategies/dualprecision.py`` summary) as an HTML table:
    ``table[i][j]`` is the search validation accuracy with ``row_bits[i]`` depthwise bits and
    ``col_bits[j]`` other bits (None where the model has no such group); the best cell is
    highlighted."""
    table = [r if isinstance(r, list) else [r] for r in grid["table"]]
    rows_name, cols_name = grid.get("rows", "rows"), grid.get("cols", "cols")
    row_bits = grid.get("row_bits") or list(range(len(table)))
    col_bits = grid.get("col_bits") or list(range(max(map(len, table), default=0)))
    best = grid.get("best") if isinstance(grid.get("best"), dict) else {}

    def is_best(i: int, j: int) -> bool:
        return bool(best) and best.get(rows_name) == _at(row_bits, i) \
            and best.get(cols_name) == _at(col_bits, j)
    return _matrix(table, [_bits_label(b) for b in row_bits],
                   [_bits_label(b) for b in col_bits],
                   f"{rows_name} \\ {cols_name} bits", is_best)


def _at(seq: Sequence, i: int) -> Any:
    return seq[i] if i < len(seq) else None


def _bits_label(b: Any) -> str:
    return "n/a" if b is None else str(b)


def _matrix(table: Sequence[Sequence[Any]], row_labels: Sequence[Any],
            col_labels: Sequence[Any], corner: str, is_best: Any) -> str:
    out = ["<table>", "<tr>" + f"<th>{_esc(corner)}</th>"
           + "".join(f"<th>{_esc(c)}</th>" for c in col_labels) + "</tr>"]
    for i, row in enumerate(table):
        cells = "".join(f"<td{' class=best' if is_best(i, j) else ''}>{_esc(_cell(v))}</td>"
                        for j, v in enumerate(row))
        out.append(f"<tr><th>{_esc(row_labels[i])}</th>{cells}</tr>")
    return "\n".join(out) + "</table>"


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.2%}" if isinstance(v, float) else str(v)
