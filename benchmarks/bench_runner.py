"""Runner overhead and concurrency on this machine (real local Ray, Fashion-MNIST).

1. Per-trial overhead: the driver-measured trial wall time (trial start -> result) minus
   the trainer's own training time, median over the trials (target <= 1 s).
2. Speed-up of 2 concurrent 1-CPU trials over 1: the same 8 random-search trials run with
   --concurrency 1 and 2; ratio of the search's wall time (target >= 1.8x on 2 cores).

    python benchmarks/bench_runner.py [--trials 8] [--steps 60]
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def run(concurrency: int, trials: int, steps: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "qsearch.cli", "run", "--strategy", "random", "--budget",
           "16KB", "--trials", str(trials), "--steps", str(steps), "--concurrency",
           str(concurrency), "--cpus-per-trial", "1", "--seed", "1", "--out", str(out)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    total = time.perf_counter() - t
    m = re.search(r"done: \d+ trials .* in (\d+)s", r.stdout)
    print(f"  concurrency {concurrency}: process {total:.1f}s, search {m.group(1)}s")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        walls = {c: run(c, args.trials, args.steps, Path(d) / f"c{c}") for c in (1, 2)}
        frames = {c: pd.read_parquet(Path(d) / f"c{c}" / "results.parquet") for c in (1, 2)}
    df = frames[1]
    spans = {c: f.finished_at.max() - (f.finished_at - f.wall_seconds).min()
             for c, f in frames.items()}
    overhead = (df.wall_seconds - df.train_seconds).median()
    whole = (walls[1] - df.train_seconds.sum()) / len(df)
    print(f"per-trial overhead, concurrency 1: trial start -> result minus training, median "
          f"{overhead:.2f}s; whole search (incl. Ray start, actor start, evaluation) minus "
          f"training, per trial {whole:.2f}s (train median {df.train_seconds.median():.2f}s)")
    print(f"speed-up of 2 concurrent 1-CPU trials over 1: {walls[1] / walls[2]:.2f}x for the "
          f"whole search, {spans[1] / spans[2]:.2f}x from the first trial's start to the last "
          f"result ({spans[1]:.0f}s vs {spans[2]:.0f}s)")


if __name__ == "__main__":
    main()
