"""Per-trial overhead of the runner for very short trials (the supernet evaluator's).

Runs a real ``qsearch run --evaluator supernet`` search in this process (Ray Tune, or
``--inline``) on the tiny synthetic dataset, with the driver's runner calls timed, and
reports per search trial, in ms:

- interval: the median time between two trials' results (what a search of N trials costs
  per trial), the evaluation itself (``eval_seconds``), and their difference, the overhead;
- where the driver's time goes (sum over the search stage / trials): the strategy's ask and
  tell, the runner's state file, the results store, Tune's experiment checkpoint;
- the worker's share: trial start to result, minus the task's own time (``run_trial``).

The supernet is trained once into ``--cache`` (reused by later runs)::

    OMP_NUM_THREADS=1 python benchmarks/bench_trial_overhead.py --strategy haq --trials 600
    OMP_NUM_THREADS=1 python benchmarks/bench_trial_overhead.py --strategy random --inline
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

SPENT: dict[str, list[float]] = defaultdict(list)
EVENTS: dict[str, dict[str, float]] = defaultdict(dict)


def timed(owner, name: str, label: str | None = None):
    """Record the seconds of every call of ``owner.name`` under ``label``."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[label or name].append(time.perf_counter() - t)
    setattr(owner, name, wrapper)


def instrument() -> None:
    from qsearch import runner, store

    timed(runner.StateFile, "save", "state file: write")
    timed(runner.Runner, "save_state", "state file: state_dict + write")
    timed(store.ResultsStore, "append", "results store: append")
    timed(runner.Runner, "suggest", "runner.suggest (incl. strategy ask, state)")
    timed(runner.Runner, "complete", "runner.complete (incl. tell, store, state)")
    timed(runner.Runner, "progress", "display progress")
    init, start, complete = (runner.Runner.__init__, runner.Runner.started_trial,
                             runner.Runner.complete)

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        timed(self.strategy, "ask", "strategy.ask")
        timed(self.strategy, "tell", "strategy.tell")

    def started_trial(self, trial_id):
        EVENTS[trial_id]["start"] = time.perf_counter()
        start(self, trial_id)

    def complete_(self, trial_id, report, error):
        EVENTS[trial_id]["end"] = time.perf_counter()
        EVENTS[trial_id]["task"] = (report or {}).get("task_wall_seconds", float("nan"))
        complete(self, trial_id, report, error)
    runner.Runner.__init__, runner.Runner.started_trial = __init__, started_trial
    runner.Runner.complete = complete_
    try:
        from ray.tune.execution.tune_controller import TuneController
    except ImportError:
        return
    timed(TuneController, "save_to_dir", "tune: experiment checkpoint")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--strategy", default="random")
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--inline", action="store_true")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "qsearch-bench-sn"))
    args = p.parse_args()
    instrument()
    from qsearch.cli import build_parser, specs_from_args
    from qsearch.experiment import run_experiment

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        argv = ["run", "--strategy", args.strategy, "--dataset", "synthetic", "--budget",
                "6KB", "--steps", "20", "--batch-size", "32", "--trials", str(args.trials),
                "--evaluator", "supernet", "--supernet-epochs", "1", "--supernet-cache",
                args.cache, "--top-k", "1", "--concurrency", "1", "--cpus-per-trial", "1",
                "--out", str(out)]
        (spec,) = specs_from_args(build_parser().parse_args(argv))
        t = time.perf_counter()
        run_experiment(spec, inline=args.inline)
        total = time.perf_counter() - t
        import pandas as pd

        df = pd.read_parquet(out / "results.parquet")
    report(df[df.stage == "search"].sort_values("finished_at"), total)


def report(s, total: float) -> None:
    n = len(s)
    ev = np.array([json.loads(m).get("eval_seconds", np.nan) for m in s.metrics])
    gap = np.diff(s.finished_at.to_numpy())
    over = gap - ev[1:]
    print(f"\n{n} search trials (whole experiment {total:.1f} s)")
    print(f"interval between results: median {1e3 * np.median(gap):.0f} ms, mean "
          f"{1e3 * gap.mean():.0f} ms; evaluation median {1e3 * np.median(ev):.0f} ms; "
          f"overhead (interval - evaluation) median {1e3 * np.median(over):.0f} ms, "
          f"first/last 50 trials {1e3 * np.median(over[:50]):.0f}/"
          f"{1e3 * np.median(over[-50:]):.0f} ms")
    ids = set(s.trial_id)
    spans = [e for k, e in EVENTS.items() if "start" in e and "end" in e
             and any(k.endswith(i) or i.endswith(k) or k == i for i in ids)]
    if spans:
        worker = [e["end"] - e["start"] - e["task"] for e in spans]
        print(f"worker side: trial start -> result minus the task's own time, median "
              f"{1e3 * np.nanmedian(worker):.0f} ms; task minus evaluation median "
              f"{1e3 * (np.nanmedian([e['task'] for e in spans]) - np.median(ev)):.0f} ms")
    print("driver, per search trial (sum of calls / trials; median per call):")
    for label, calls in sorted(SPENT.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {label:48s} {1e3 * sum(calls) / n:7.1f} ms   ({len(calls)} calls, "
              f"median {1e3 * np.median(calls):.1f} ms)")


if __name__ == "__main__":
    main()
