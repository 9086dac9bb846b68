"""Bit-widths at matched size, with intervals: the papers' uniform and depthwise findings.

Reads the stores of a recipe whose experiments each train a grid of width-aligned cells
under one seed: uniform 1/2/4/8-bit models (``experiments/one-bitwidth-fig1.yaml``, the
One-Bitwidth paper's Fig. 1) or DualPrecision's depthwise x other grid
(``experiments/depthwise.yaml``, Table 7). Per model and budget it prints each cell's
validation accuracy, mean with a 95% Student t interval over seeds, and differences paired
by seed (the cells of one experiment share its seed), each with its 95% t interval:
between every two bit-widths of a uniform grid, against the best cell of a depthwise grid
(which it also lays out as Table 7: other bits down, depthwise bits across). A difference
is called only when its interval excludes zero (a step pooled over rows or budgets: its
by-seed interval, the seeds as the units; see ``bit_steps``). Across budgets, it checks the
DualPrecision proxy rule (choose at a small budget, scale the winner up) seed by seed.
``--plot`` draws accuracy against C_size per bit-width, as the paper's Fig. 1 does, with the
intervals (for a depthwise grid: accuracy against the depthwise bits, one line per
bit-width elsewhere).

    python benchmarks/bitwidth_findings.py runs/one-bitwidth-fig1 --plot fig1.png
    python benchmarks/bitwidth_findings.py runs/depthwise --plot depthwise.png
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats


def load(root: Path) -> pd.DataFrame:
    """One row per finished search trial: model, budget, seed, cell, width, C_size, accuracy.
    ``bits`` names the cell: the bit-width of a uniform model (an int), or, where the space
    has depthwise layers, both of DualPrecision's precisions ("dw 4 / other 1")."""
    frames = [cells(pd.read_parquet(p), p.parent)
              for p in sorted(root.glob("*/results.parquet"))]
    if not frames:
        raise SystemExit(f"no results.parquet below {root}: run the recipe first")
    return pd.concat(frames)


def cells(df: pd.DataFrame, experiment: Path) -> pd.DataFrame:
    """The finished search trials of one experiment, each with its cell (see ``load``)."""
    from qsearch.files import SPEC_FILE
    from qsearch.spec import read_spec, space_from_spec

    spec = read_spec(experiment / SPEC_FILE)
    groups = list(space_from_spec(spec).groups.values())
    df = df[(df.stage == "search") & (df.status == "ok")].copy()
    bits = [[{json.loads(c)["w_bits"][i] for i in g} for g in groups] for c in df.candidate]
    if any(len(b) != 1 for per_group in bits for b in per_group):
        raise SystemExit(f"{experiment}: a candidate mixes bit-widths within a group; this "
                         "script reads uniform or depthwise-grid recipes")
    keys = [[b.pop() for b in per_group] for per_group in bits]
    df["bits"] = ([k[0] for k in keys] if len(groups) == 1 else
                  [f"dw {dw} / other {other}" for dw, other in keys])
    df["model"] = spec.model
    return df


def name(bits) -> str:
    return f"{bits}-bit" if isinstance(bits, (int, np.integer)) else str(bits)


def interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student t interval (nan with one value)."""
    n = len(values)
    if n < 2:
        return float(np.mean(values)), float("nan")
    return float(np.mean(values)), float(stats.t.ppf(0.975, n - 1) * stats.sem(values))


def verdict(mean: float, half: float, better: str, worse: str) -> str:
    """The call on a difference ``better - worse`` from its 95% interval."""
    if not np.isfinite(half):
        return "one seed: not called"
    if mean - half > 0:
        return f"{better} better"
    if mean + half < 0:
        return f"{worse} better"
    return "undecided (interval includes 0)"


def budget_table(df: pd.DataFrame) -> list[str]:
    seeds = sorted(df.seed.unique())
    lines = ["| bits | width | C_size / budget | val acc, mean ± 95% CI (n) | per seed "
             f"({', '.join(map(str, seeds))}) | train min |", "|---:|---:|---:|---:|---|---:|"]
    for bits, g in df.groupby("bits"):
        mean, half = interval(100 * g.val_acc.to_numpy())
        per_seed = g.set_index("seed").val_acc.reindex(seeds) * 100
        lines.append(f"| {bits} | {g.width.mean():.3f} | {g.budget_ratio.mean():.2%} | "
                     f"{mean:.2f} ± {half:.2f} ({len(g)}) | "
                     f"{', '.join(f'{v:.2f}' for v in per_seed)} | "
                     f"{g.train_seconds.mean() / 60:.1f} |")
    return lines


def paired_differences(df: pd.DataFrame, by: tuple[str, ...] = ("seed",)) -> list[str]:
    """Uniform cells: lower minus higher bits, for every pair, on the seeds both ran. ``by``
    budget and seed pools over budgets, each budget's seeds paired on their own, and adds
    the by-seed interval (each seed's mean over the budgets; see ``bit_steps``), whose call
    is the verdict."""
    acc = df.pivot_table(index=list(by), columns="bits", values="val_acc") * 100
    pooled_by = len(by) > 1
    lines = ["| lower - higher bits | paired difference, mean ± 95% CI (n) |"
             + (" by seed, mean ± 95% CI (seeds) |" if pooled_by else "") + " verdict |",
             "|---|---:|" + ("---:|" if pooled_by else "") + "---|"]
    for lo, hi in itertools.combinations(sorted(acc.columns), 2):
        d = (acc[lo] - acc[hi]).dropna()
        if pooled_by:
            lines.append(f"| {lo} - {hi} | {pooled_and_by_seed(d, name(lo), name(hi))} |")
            continue
        mean, half = interval(d.to_numpy())
        lines.append(f"| {lo} - {hi} | {mean:+.2f} ± {half:.2f} ({len(d)}) | "
                     f"{verdict(mean, half, name(lo), name(hi))} |")
    return lines


def versus_best(df: pd.DataFrame) -> list[str]:
    """Grid cells: the best cell (highest mean) minus each other cell, paired by seed."""
    acc = df.pivot_table(index="seed", columns="bits", values="val_acc") * 100
    best = acc.mean().idxmax()
    lines = [f"| best ({best}) minus | paired difference, mean ± 95% CI (n) | verdict |",
             "|---|---:|---|"]
    for cell in acc.mean().sort_values(ascending=False).index.drop(best):
        d = (acc[best] - acc[cell]).dropna().to_numpy()
        mean, half = interval(d)
        call = verdict(mean, half, best, cell).replace(f"{best} better", "below the best")
        lines.append(f"| {cell} | {mean:+.2f} ± {half:.2f} ({len(d)}) | {call} |")
    return lines


def grid_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Grid cells with their two precisions as columns ``dw`` and ``other``."""
    split = df.bits.str.extract(r"dw (\d+) / other (\d+)").astype(int)
    return df.assign(dw=split[0].to_numpy(), other=split[1].to_numpy())


def grid_layout(df: pd.DataFrame) -> list[str]:
    """DualPrecision's Table 7 layout: other convs' bits down, depthwise bits across, 8 first."""
    g = grid_cells(df)
    dws = sorted(g.dw.unique(), reverse=True)
    lines = ["| convs \\ depthwise | " + " | ".join(f"{b} bit" for b in dws) + " |",
             "|---:|" + "---:|" * len(dws)]
    for other in sorted(g.other.unique(), reverse=True):
        row = []
        for dw in dws:
            acc = 100 * g[(g.other == other) & (g.dw == dw)].val_acc.to_numpy()
            row.append("-" if not len(acc) else "{:.2f} ± {:.2f}".format(*interval(acc)))
        lines.append(f"| {other} bit | " + " | ".join(row) + " |")
    return lines


def diagonal(df: pd.DataFrame) -> pd.DataFrame:
    """The grid's uniform cells (depthwise bits = other bits), named by their bit-width."""
    g = grid_cells(df)
    g = g[g.dw == g.other]
    return g.assign(bits=g.dw.to_numpy())


def bit_steps(df: pd.DataFrame, vary: str = "dw") -> list[str]:
    """One group's bits raised at fixed bits in the other group, at matched size: ``vary``
    "dw" raises the depthwise layers' bits (the One-Bitwidth paper's Table 1 quantizes them
    4 -> 1 bit), "other" the other layers' (its Fig. 4d holds depthwise at 4 bits). The
    higher minus the lower bit-width per fixed bit-width of the other group, paired by seed;
    pooled over those rows, every (row, seed) pair counted as one; and by seed, each seed's
    mean step over the rows, with the seeds as the independent units. The cells of one seed
    share its validation split and data order, so its rows' steps may move together and the
    pooled interval may be too narrow: the verdict is the by-seed interval's, and a step the
    pooled interval alone decides says so."""
    fixed = "other" if vary == "dw" else "dw"
    acc = grid_cells(df).pivot_table(index=[fixed, "seed"], columns=vary,
                                     values="val_acc") * 100
    rows = sorted(acc.index.get_level_values(fixed).unique(), reverse=True)
    steps = sorted(acc.columns)
    lines = [f"| {vary} step | " + " | ".join(f"{fixed} {o} bit" for o in rows)
             + " | pooled, mean ± 95% CI (pairs) | by seed, mean ± 95% CI (seeds) | verdict |",
             "|---|" + "---:|" * (len(rows) + 2) + "---|"]
    for lo, hi in dict.fromkeys([*zip(steps, steps[1:]), (steps[0], steps[-1])]):
        diff = (acc[hi] - acc[lo]).dropna()
        cells = ["{:+.2f} ± {:.2f}".format(*interval(diff.loc[o].to_numpy()))
                 if o in diff.index.get_level_values(fixed) else "-" for o in rows]
        lines.append(f"| {vary} {hi} - {vary} {lo} | " + " | ".join(cells) + " | "
                     + pooled_and_by_seed(diff, f"{vary} {hi}", f"{vary} {lo}") + " |")
    return lines


def pooled_and_by_seed(diff: pd.Series, hi: str, lo: str) -> str:
    """The cells "pooled | by seed | verdict" of differences ``hi - lo`` indexed by seed and
    a row or budget: pooled, every difference counted as one; by seed, each seed's mean, the
    seeds as the units. The verdict is the by-seed call; where only the pooled interval
    decides, undecided, with that call."""
    pooled = interval(diff.to_numpy())
    per_seed = diff.groupby(level="seed").mean().to_numpy()
    by_seed = interval(per_seed)
    call, loose = verdict(*by_seed, hi, lo), verdict(*pooled, hi, lo)
    if call.startswith("undecided") and not loose.startswith("undecided"):
        call = f"undecided by seed (pooled: {loose})"
    return (f"{pooled[0]:+.2f} ± {pooled[1]:.2f} ({len(diff)}) | "
            f"{by_seed[0]:+.2f} ± {by_seed[1]:.2f} ({len(per_seed)}) | {call}")


def proxy_budgets(df: pd.DataFrame) -> list[str]:
    """The DualPrecision proxy rule (pick the bit-width at a small budget, scale the winner up)
    checked on every pair of budgets, seed by seed: the small budget's winner, whether it is
    also the large budget's winner, the accuracy it gives up at the large budget against that
    budget's winner (the proxy's regret, mean ± 95% t interval over seeds) and Kendall's tau
    between the two budgets' orderings of the cells (mean over seeds)."""
    acc = df.pivot_table(index=["budget_value", "seed"], columns="bits", values="val_acc") * 100
    names = dict(zip(df.budget_value, df.budget))
    lines = ["| small -> large | seeds | small's winner per seed | holds at large | "
             "regret at large, mean ± 95% CI | Kendall's tau, mean (per seed) |",
             "|---|---:|---|---:|---:|---|"]
    for small, large in itertools.combinations(sorted(df.budget_value.unique()), 2):
        seeds = sorted(set(acc.loc[small].index) & set(acc.loc[large].index))
        if not seeds:
            continue
        winners, regret, taus = [], [], []
        for seed in seeds:
            a, b = acc.loc[(small, seed)].dropna(), acc.loc[(large, seed)].dropna()
            shared = a.index.intersection(b.index)
            if len(shared) < 2:  # a budget still running: nothing to rank yet
                continue
            pick = a[shared].idxmax()
            winners.append(pick)
            regret.append(b[shared].max() - b[pick])
            taus.append(stats.kendalltau(a[shared], b[shared]).statistic)
        if not winners:
            continue
        mean, half = interval(np.array(regret))
        held = sum(r == 0 for r in regret)  # the small budget's pick is the large's best
        lines.append(f"| {names[small]} -> {names[large]} | {len(winners)} | "
                     f"{', '.join(map(name, winners))} | {held}/{len(winners)} | "
                     f"{mean:.2f} ± {half:.2f} | {np.mean(taus):.2f} "
                     f"({', '.join(f'{t:.2f}' for t in taus)}) |")
    return lines


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def interval_lines(ax, df: pd.DataFrame, line: str, x: str, label, tick) -> None:
    """One line per value of ``line``: mean accuracy and its 95% interval against ``x`` (log2
    axis, lines side by side at each x), ticks named by ``tick(x)``, lines by ``label``."""
    for k, (key, g) in enumerate(df.groupby(line)):
        pts = [(v, *interval(100 * c.val_acc.to_numpy())) for v, c in g.groupby(x)]
        xs, y, err = zip(*sorted(pts))
        dodge = 1.03 ** (k - 1.5)
        ax.errorbar([v * dodge for v in xs], y, yerr=err, marker="o", capsize=3,
                    label=label(key))
    ax.set_xscale("log", base=2)
    ticks = sorted(df[x].unique())
    ax.set_xticks(ticks, [tick(v) for v in ticks])
    ax.minorticks_off()
    ax.set_ylabel("validation accuracy (%), 95% CI")


def plot(df: pd.DataFrame, path: Path) -> None:
    """Uniform grids: accuracy against the budget per bit-width (the paper's Fig. 1)."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    names = dict(zip(df.budget_value, df.budget))
    interval_lines(ax, df, "bits", "budget_value", lambda b: f"{name(b)} weights", names.get)
    ax.set_xlabel("budget: C_size (Eq. 6) matched within 97-100%")
    ax.set_title(f"{', '.join(df.model.unique())}: each bit-width width-aligned to the budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_grids(df: pd.DataFrame, path: Path) -> None:
    """Depthwise grids: accuracy against the depthwise layers' bits, one line per bit-width
    of the other layers, one panel per model and budget (every cell at matched size)."""
    panels = list(df.groupby(["model", "budget_value"]))
    fig, axes = pyplot().subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, ((model, _), g) in zip(axes[0], panels):
        interval_lines(ax, grid_cells(g), "other", "dw", lambda o: f"other layers {o}-bit", str)
        ax.set_xlabel("depthwise layers' weight bits")
        ax.set_title(f"{model}, every cell at {g.budget.iloc[0]}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, help="the recipe's out directory")
    p.add_argument("--plot", type=Path, help="write accuracy against C_size here (PNG)")
    args = p.parse_args()
    df = load(args.root)
    for (model, _), g in df.groupby(["model", "budget_value"]):
        grid = not pd.api.types.is_integer_dtype(g.bits)
        n = g.seed.nunique()
        print(f"\n### {model}, {g.budget.iloc[0]} ({n} seed{'s' * (n > 1)})\n")
        print("\n".join(budget_table(g)))
        if grid:
            print("\n" + "\n".join(grid_layout(g)))
            print("\n" + "\n".join(bit_steps(g, "dw")))
            print("\n" + "\n".join(bit_steps(g, "other")))
            print("\nThe grid's diagonal, every layer at one bit-width (One-Bitwidth Fig. 4):\n")
            print("\n".join(paired_differences(diagonal(g))))
        print("\n" + "\n".join(versus_best(g) if grid else paired_differences(g)))
    for model, g in df.groupby("model"):
        if g.budget_value.nunique() > 1 and pd.api.types.is_integer_dtype(g.bits):
            print(f"\n### {model}, all budgets: differences paired by budget and seed\n")
            print("\n".join(paired_differences(g, by=("budget_value", "seed"))))
        if g.budget_value.nunique() > 1:
            print(f"\n### {model}, proxy budgets: does the small budget's winner hold at the "
                  "larger?\n")
            print("\n".join(proxy_budgets(g)))
    if args.plot:
        uniform = pd.api.types.is_integer_dtype(df.bits)
        (plot if uniform else plot_grids)(df, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
