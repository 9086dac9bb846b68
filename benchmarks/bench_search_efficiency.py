"""Search efficiency: best validation accuracy vs number of trials, TPE against random.

Every trial is a real one: the script runs ``qsearch run`` once per (strategy, seed), all at
the same budget, trial length, model and dataset, and reads each experiment's
``results.parquet`` (columns ``trial_index``, ``val_acc``). The curve of a run is the best
validation accuracy among its first n trials (failed trials count as trials, not as
accuracy); the table gives the mean and range over seeds at each n.

Trials run one at a time by default (``--concurrency 1``), so every proposal sees every
earlier result: the setting in which a model-based search can show its advantage. An
interrupted benchmark is continued by running the same command again (finished runs are
reused, unfinished ones are resumed with ``qsearch resume``).

Example (the defaults, plus TPE modelling from its 6th trial; each of the six searches took
about 9 min on the 2-core development machine; separate ``--seeds`` runs with the same
``--out`` can go side by side, and a last run with all seeds collects them)::

    python benchmarks/bench_search_efficiency.py --budget 32KB --trials 16 --steps 100 \\
        --seeds 0,1,2 --strategies tpe,random --tpe-arg n_startup_trials=5 \\
        --out runs/bench-search-efficiency
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path


def qsearch_command() -> list[str]:
    exe = shutil.which("qsearch", path=str(Path(sys.executable).parent)) or shutil.which(
        "qsearch")
    return [exe] if exe else [sys.executable, "-m", "qsearch.cli"]


def runner_available(cmd: list[str]) -> bool:
    probe = subprocess.run([*cmd, "run", "--help"], capture_output=True, text=True)
    return probe.returncode == 0 and "--trials" in probe.stdout


def run_one(cmd: list[str], args, strategy: str, seed: int, out: Path) -> Path:
    """One search experiment; reused when complete, resumed when interrupted."""
    results = out / "results.parquet"
    if results.exists() and len(read_curve(out)) >= args.trials:
        print(f"{strategy} seed {seed}: reusing {out}", flush=True)
        return out
    if (out / "spec.json").exists():
        argv = [*cmd, "resume", str(out)]
    else:
        argv = [*cmd, "run", "--strategy", strategy, "--budget", args.budget,
                "--proxy-budget", "none", "--model", args.model, "--dataset", args.dataset,
                "--trials", str(args.trials), "--steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--seed", str(seed),
                "--concurrency", str(args.concurrency),
                "--gpus-per-trial", str(args.gpus_per_trial), "--out", str(out)]
        if args.data_root:
            argv += ["--data-root", args.data_root]
        if strategy == "tpe":
            for kv in args.tpe_arg:
                argv += ["--strategy-arg", kv]
    print(f"{strategy} seed {seed}: {' '.join(argv)}", flush=True)
    env = {"RAY_USAGE_STATS_ENABLED": "0", **os.environ}
    subprocess.run(argv, check=True, env=env)
    return out


def read_curve(out: Path) -> list[float]:
    """Best validation accuracy after 1, 2, ... trials (NaN until a trial succeeds)."""
    import pandas as pd

    df = pd.read_parquet(out / "results.parquet", columns=["trial_index", "val_acc", "stage"])
    df = df[df["stage"] == "search"].sort_values("trial_index")
    best, curve = -math.inf, []
    for acc in df["val_acc"]:
        if acc is not None and math.isfinite(acc):
            best = max(best, float(acc))
        curve.append(best if best > -math.inf else math.nan)
    return curve


def aggregate(curves: dict[str, dict[int, list[float]]], n: int) -> list[dict]:
    rows = []
    for k in range(1, n + 1):
        row: dict = {"trials": k}
        for strategy, by_seed in curves.items():
            vals = [c[k - 1] for c in by_seed.values() if len(c) >= k and math.isfinite(c[k - 1])]
            row[strategy] = ({"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals),
                              "seeds": len(vals)} if vals else None)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="32KB", help="model-size or BitOPs budget")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--trials", type=int, default=16, help="trials per search")
    p.add_argument("--steps", type=int, default=100, help="training steps per trial")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one search each")
    p.add_argument("--strategies", default="tpe,random")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--tpe-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to tpe as --strategy-arg (repeatable)")
    p.add_argument("--out", default="runs/bench-search-efficiency")
    args = p.parse_args(argv)

    cmd = qsearch_command()
    if not runner_available(cmd):
        print("the runner (`qsearch run`) is not available: nothing to benchmark",
              file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    strategies = [s for s in args.strategies.split(",") if s.strip()]
    root = Path(args.out)
    curves: dict[str, dict[int, list[float]]] = {s: {} for s in strategies}
    for seed in seeds:
        for strategy in strategies:
            out = run_one(cmd, args, strategy, seed, root / f"{strategy}-seed{seed}")
            curves[strategy][seed] = read_curve(out)

    rows = aggregate(curves, args.trials)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (root / "search_efficiency.json").write_text(json.dumps(
        {"settings": settings, "seeds": seeds, "table": rows,
         "curves": {s: {seed: [None if math.isnan(v) else v for v in c]
                        for seed, c in by_seed.items()} for s, by_seed in curves.items()}},
        indent=2, allow_nan=False))
    print(f"\nbest val acc after n trials: {args.model}/{args.dataset}, budget {args.budget}, "
          f"{args.steps} steps x batch {args.batch_size} per trial, seeds {seeds}, "
          f"concurrency {args.concurrency} (mean [min, max] over seeds)")
    print(f"{'n':>3}  " + "  ".join(f"{s:>24}" for s in strategies))
    for row in rows:
        cells = []
        for s in strategies:
            r = row[s]
            cells.append(f"{r['mean']:.2%} [{r['min']:.2%}, {r['max']:.2%}]" if r else "-")
        print(f"{row['trials']:>3}  " + "  ".join(f"{c:>24}" for c in cells))
    print(f"\ncurves and settings: {root / 'search_efficiency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
