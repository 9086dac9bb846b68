"""Uniform bit-widths at matched size, with intervals: the One-Bitwidth paper's Fig. 1 test.

Reads the stores of a recipe whose experiments each train uniform 1/2/4/8-bit candidates,
width-aligned to one budget, under one seed (``experiments/one-bitwidth-fig1.yaml``), and
prints per budget: each bit-width's validation accuracy, mean with a 95% Student t interval
over seeds, and the differences between bit-widths paired by seed (the cells of one
experiment share its seed), each with its 95% t interval. A difference is called only when
its interval excludes zero. Across budgets, it checks the DualPrecision proxy rule (choose
at a small budget, scale the winner up) seed by seed. ``--plot`` draws accuracy against
C_size per bit-width, as the paper's Fig. 1 does, with the intervals as error bars.

    python benchmarks/bitwidth_findings.py runs/one-bitwidth-fig1 --plot fig1.png
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
    """One row per finished search trial: budget, seed, bits, width, C_size, accuracy."""
    frames = [pd.read_parquet(p) for p in sorted(root.glob("*/results.parquet"))]
    if not frames:
        raise SystemExit(f"no results.parquet below {root}: run the recipe first")
    df = pd.concat(frames)
    df = df[(df.stage == "search") & (df.status == "ok")].copy()
    df["bits"] = [json.loads(c)["w_bits"][1] for c in df.candidate]
    return df


def interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student t interval (nan with one value)."""
    n = len(values)
    if n < 2:
        return float(np.mean(values)), float("nan")
    return float(np.mean(values)), float(stats.t.ppf(0.975, n - 1) * stats.sem(values))


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


def paired_differences(df: pd.DataFrame) -> list[str]:
    """Lower minus higher bits, per pair of bit-widths, paired on the seeds both ran."""
    acc = df.pivot_table(index="seed", columns="bits", values="val_acc") * 100
    lines = ["| lower - higher bits | paired difference, mean ± 95% CI (n) | verdict |",
             "|---|---:|---|"]
    for lo, hi in itertools.combinations(sorted(acc.columns), 2):
        d = (acc[lo] - acc[hi]).dropna().to_numpy()
        mean, half = interval(d)
        if not np.isfinite(half):
            verdict = "one seed: not called"
        elif mean - half > 0:
            verdict = f"{lo}-bit better"
        elif mean + half < 0:
            verdict = f"{hi}-bit better"
        else:
            verdict = "undecided (interval includes 0)"
        lines.append(f"| {lo} - {hi} | {mean:+.2f} ± {half:.2f} ({len(d)}) | {verdict} |")
    return lines


def proxy_budgets(df: pd.DataFrame) -> list[str]:
    """The DualPrecision proxy rule (pick the bit-width at a small budget, scale the winner up)
    checked on every pair of budgets, seed by seed: the small budget's winner, whether it is
    also the large budget's winner, the accuracy it gives up at the large budget against that
    budget's winner (the proxy's regret, mean ± 95% t interval over seeds) and Kendall's tau
    between the two budgets' orderings of the bit-widths (mean over seeds)."""
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
            pick = a[shared].idxmax()
            winners.append(pick)
            regret.append(b[shared].max() - b[pick])
            taus.append(stats.kendalltau(a[shared], b[shared]).statistic)
        mean, half = interval(np.array(regret))
        held = sum(b == acc.loc[(large, s)].idxmax() for b, s in zip(winners, seeds))
        lines.append(f"| {names[small]} -> {names[large]} | {len(seeds)} | "
                     f"{', '.join(f'{w}-bit' for w in winners)} | {held}/{len(seeds)} | "
                     f"{mean:.2f} ± {half:.2f} | {np.mean(taus):.2f} "
                     f"({', '.join(f'{t:.2f}' for t in taus)}) |")
    return lines


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = sorted(df.budget_value.unique())
    for k, (bits, g) in enumerate(df.groupby("bits")):
        rows = [(b, *interval(100 * c.val_acc.to_numpy())) for b, c in g.groupby("budget_value")]
        x, y, err = zip(*sorted(rows))
        dodge = 1.03 ** (k - 1.5)  # side by side at each budget (log axis)
        ax.errorbar([v * dodge for v in x], y, yerr=err, marker="o", capsize=3,
                    label=f"{bits}-bit weights")
    ax.set_xscale("log", base=2)
    names = dict(zip(df.budget_value, df.budget))
    ax.set_xticks(budgets, [names[b] for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("budget: C_size (Eq. 6) matched within 97-100%")
    ax.set_ylabel("validation accuracy (%), 95% CI")
    ax.set_title("ResNet-20, uniform bits, width-aligned")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, help="the recipe's out directory")
    p.add_argument("--plot", type=Path, help="write accuracy against C_size here (PNG)")
    args = p.parse_args()
    df = load(args.root)
    for budget, g in sorted(df.groupby("budget"), key=lambda bg: bg[1].budget_value.iloc[0]):
        print(f"\n### {budget} ({g.seed.nunique()} seeds)\n")
        print("\n".join(budget_table(g)))
        print()
        print("\n".join(paired_differences(g)))
    if df.budget_value.nunique() > 1:
        print("\n### Proxy budgets: does the small budget's winner hold at the larger?\n")
        print("\n".join(proxy_budgets(df)))
    if args.plot:
        plot(df, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
