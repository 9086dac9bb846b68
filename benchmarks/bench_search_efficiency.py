"""Search efficiency: best full-length validation accuracy against CPU time, for random, TPE
and HAQ, each with and without Ray Tune's ASHA scheduler, at equal CPU time.

Every trial is a real one: the script runs ``qsearch run`` once per (strategy, scheduler,
seed), all at the same budget, model, dataset and trial length (``--max-steps``), one trial
at a time on one CPU (``--concurrency 1 --cpus-per-trial 1``), each for the same wall
``--time-budget``; ``--parallel 2`` runs two searches at once (one per core). It then reads
each experiment's ``results.parquet``.

Time is CPU time: each trial's process CPU seconds (``metrics.cpu_seconds``; wall seconds
for stores written before it was recorded), which, unlike wall time, does not grow when
other jobs share the cores. The curve of a search is, against the CPU seconds its trials had
used when each finished (summed in finishing order), the best validation accuracy among
trials that trained the full ``--max-steps`` (a trial ASHA stopped early has an accuracy at
fewer steps: not comparable, not counted). All searches are compared up to the same amount,
the least CPU time any of them used (``B``). The report gives, per configuration, the mean
and range over seeds at a quarter, half and all of ``B``, and the two targets of the
multi-fidelity work:

- ASHA: CPU time random+ASHA needs to reach the best that random without a scheduler found
  within ``B`` (same seed), as a fraction of ``B`` (target <= 0.5);
- model-based search: CPU time TPE or HAQ needs to reach random's best, as a fraction of
  ``B`` (target <= 0.5), each with and without ASHA.

A search that never reaches the reference within ``B`` is reported as ">1". Finished
searches are reused when the same command runs again; an interrupted one is run again from
the start (its time budget must be whole to be comparable).

Size it so every search gets about 10 full-length trials (fewer cannot show TPE or HAQ
against random: TPE's first 5 are random). Example (18 searches of 10 min, two at a time:
1h40m here; the figures in docs/results/multi-fidelity.md)::

    python benchmarks/bench_search_efficiency.py --budget 32KB --max-steps 162 \\
        --min-steps 54 --reduction-factor 3 --time-budget 10m --seeds 0,1,2 --parallel 2 \\
        --out runs/bench-search-efficiency-162
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STRATEGY_ARGS = {"tpe": ["n_startup_trials=5"], "haq": ["warmup=3"]}


def qsearch_command() -> list[str]:
    exe = shutil.which("qsearch", path=str(Path(sys.executable).parent)) or shutil.which(
        "qsearch")
    return [exe] if exe else [sys.executable, "-m", "qsearch.cli"]


def run_one(cmd: list[str], args, strategy: str, scheduler: str, seed: int, out: Path) -> Path:
    """One search for the whole time budget; reused when it finished before."""
    if (out / "final.json").exists():
        print(f"{out.name}: reusing {out}", flush=True)
        return out
    if out.exists():
        print(f"{out.name}: incomplete, run again from the start", flush=True)
        shutil.rmtree(out)
    argv = [*cmd, "run", "--strategy", strategy, "--budget", args.budget,
            "--proxy-budget", "none", "--model", args.model, "--dataset", args.dataset,
            "--trials", "1000", "--max-steps", str(args.max_steps),
            "--batch-size", str(args.batch_size), "--seed", str(seed),
            "--concurrency", "1", "--cpus-per-trial", "1", "--time-budget", args.time_budget,
            "--out", str(out)]
    if scheduler != "none":
        argv += ["--scheduler", scheduler, "--min-steps", str(args.min_steps),
                 "--reduction-factor", str(args.reduction_factor)]
    for kv in STRATEGY_ARGS.get(strategy, []):
        argv += ["--strategy-arg", kv]
    if args.data_root:
        argv += ["--data-root", args.data_root]
    print(" ".join(argv), flush=True)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL,
                   env={"RAY_USAGE_STATS_ENABLED": "0", **os.environ})
    return out


def read_curve(out: Path, max_steps: int) -> list[tuple[float, float]]:
    """(CPU seconds used, best full-length val acc so far) after each finished trial."""
    import pandas as pd

    df = pd.read_parquet(out / "results.parquet")
    df = df[df["stage"] == "search"].sort_values("finished_at")
    used, best, curve = 0.0, math.nan, []
    for _, r in df.iterrows():
        cpu = json.loads(r["metrics"] or "{}").get("cpu_seconds")
        used += float(r["wall_seconds"] or 0.0) if cpu is None else float(cpu)
        full = r["status"] == "ok" and r["steps"] == max_steps
        if full and math.isfinite(r["val_acc"]):
            best = r["val_acc"] if math.isnan(best) else max(best, r["val_acc"])
        curve.append((used, best))
    return curve


def best_by(curve: list[tuple[float, float]], seconds: float) -> float:
    done = [b for t, b in curve if t <= seconds and math.isfinite(b)]
    return max(done) if done else math.nan


def time_to(curve: list[tuple[float, float]], target: float) -> float:
    """CPU seconds until the curve reaches ``target`` (inf: never)."""
    return next((t for t, b in curve if math.isfinite(b) and b >= target - 1e-12), math.inf)


def fmt_range(values: list[float], pct: bool = True) -> str:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return "-"
    f = (lambda v: f"{v:.2%}") if pct else (lambda v: f"{v:.2f}")
    return f"{f(sum(vals) / len(vals))} [{f(min(vals))}, {f(max(vals))}]"


def report(curves: dict, budget_s: float, seeds: list[int]) -> list[str]:
    lines = ["| strategy | scheduler | trials (mean) | best full-length val at B/4 | "
             "at B/2 | at B |", "|---|---|---:|---:|---:|---:|"]
    for (strategy, scheduler), by_seed in curves.items():
        cells = [fmt_range([best_by(c, budget_s * q) for c in by_seed.values()])
                 for q in (0.25, 0.5, 1.0)]
        n = sum(len(c) for c in by_seed.values()) / max(1, len(by_seed))
        lines.append(f"| {strategy} | {scheduler} | {n:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "CPU time to reach the reference's best within B, as a fraction of B "
              "(per seed; >1: not reached):", ""]
    pairs = [(("random", "asha"), ("random", "none"))]
    pairs += [((s, k), ("random", k)) for s in ("tpe", "haq") for k in ("none", "asha")]
    for mine, ref in pairs:
        if mine not in curves or ref not in curves:
            continue
        fr = []
        for seed in seeds:
            target = best_by(curves[ref][seed], budget_s)
            t = time_to(curves[mine][seed], target) if math.isfinite(target) else math.inf
            fr.append("n/a" if not math.isfinite(target) else
                      (">1" if math.isinf(t) else f"{t / budget_s:.2f}"))
        lines.append(f"- {'+'.join(mine)} to reach {'+'.join(ref)}'s best: {', '.join(fr)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="32KB", help="model-size or BitOPs budget")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--max-steps", type=int, default=162, help="full trial length")
    p.add_argument("--min-steps", type=int, default=54, help="ASHA's first rung")
    p.add_argument("--reduction-factor", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--time-budget", default="10m", help="wall time of each search")
    p.add_argument("--parallel", type=int, default=1, help="searches run at once")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategies", default="random,tpe,haq")
    p.add_argument("--schedulers", default="none,asha")
    p.add_argument("--out", default="runs/bench-search-efficiency")
    args = p.parse_args(argv)

    cmd, root = qsearch_command(), Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    configs = [(s, k) for s in args.strategies.split(",") for k in args.schedulers.split(",")]
    runs = [(seed, c) for seed in seeds for c in configs]  # seed by seed: whole seeds first
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        outs = list(pool.map(lambda sc: run_one(
            cmd, args, *sc[1], sc[0], root / f"{sc[1][0]}-{sc[1][1]}-seed{sc[0]}"), runs))
    curves: dict = {c: {} for c in configs}
    for (seed, config), out in zip(runs, outs):
        curves[config][seed] = read_curve(out, args.max_steps)
    common = min((c[-1][0] for by_seed in curves.values() for c in by_seed.values() if c),
                 default=0.0)  # B: the least CPU time any search used
    lines = [f"{args.model}/{args.dataset} at {args.budget}: full trial {args.max_steps} steps "
             f"x batch {args.batch_size}; ASHA rungs from {args.min_steps} steps, factor "
             f"{args.reduction_factor}; {args.time_budget} of wall time per search, "
             f"{args.parallel} at a time; compared at B = {common:.0f} CPU seconds (the least "
             f"any search used); seeds {seeds}; mean [min, max] over seeds", "",
             *report(curves, common, seeds)]
    print("\n".join(lines))
    root.mkdir(parents=True, exist_ok=True)
    (root / "search_efficiency.md").write_text("\n".join(lines) + "\n")
    (root / "search_efficiency.json").write_text(json.dumps(
        {"settings": vars(args), "curves": {f"{s}+{k}": {str(seed): c for seed, c in v.items()}
                                            for (s, k), v in curves.items()}},
        indent=1, default=lambda v: None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
