"""Weight sharing against short trials, end to end at equal CPU-hours.

Reads the experiments of ``experiments/supernet-vs-trials.yaml``: each strategy searched two
ways under the same seeds (``--evaluator supernet`` and stand-alone short trials), each
winner retrained and tested. Prints, per strategy and way, the final test accuracy (mean
with a 95% Student t interval over seeds) and the search's CPU-hours, then the difference
supernet minus trials paired by seed (the two ways of one seed share the retrain seed), with
its 95% t interval. A search's CPU-hours are its trials' process CPU time, so other jobs on
the machine do not inflate them; a supernet's training counts in full for every search that
uses it, also where the search found it in the cache (see ``supernet_trainings``), and so
does an evaluation an earlier search had computed and kept (charged at the median cost of
the evaluations computed here).

    python benchmarks/supernet_vs_trials.py runs/supernet-vs-trials
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from bitwidth_findings import interval as t_interval
from bitwidth_findings import verdict

from qsearch.budget import parse_budget
from qsearch.evaluator import supernet_dir
from qsearch.files import SPEC_FILE
from qsearch.leaderboard import leaderboard, load_experiments
from qsearch.spec import read_spec, space_from_spec


def searches(root: Path) -> pd.DataFrame:
    """One row per finished experiment: strategy, way, seed, test accuracy, CPU-hours."""
    dirs = sorted(d for d in root.iterdir() if (d / SPEC_FILE).is_file())
    if not dirs:
        raise SystemExit(f"no experiments below {root}: run the recipe first")
    df, rows = load_experiments(dirs), []
    trained, median_training = supernet_trainings(df)
    looked_up = evaluation_cost(df)
    for e in leaderboard(df):
        if e["test_acc_mean"] is None:
            continue
        spec = read_spec(Path(e["dir"]) / SPEC_FILE)
        cpu_s = search_cpu_seconds(df[df.experiment_dir == e["dir"]], looked_up)
        if spec.evaluator == "supernet":
            cpu_s += trained.get(_supernet_of(spec), median_training)
        rows.append({"strategy": spec.strategy, "way": spec.evaluator, "seed": spec.seed,
                     "test_acc": 100 * e["test_acc_mean"], "cpu_h": cpu_s / 3600,
                     "evaluations": e["trials"]})
    out = pd.DataFrame(rows)
    out.attrs["note"] = (f"supernet training: {len(trained)} measured in one go here, median "
                         f"{median_training:.0f} CPU-s, charged to the searches whose own "
                         "training is not measured in full")
    return out


def _supernet_of(spec) -> Path:
    return supernet_dir(spec, space_from_spec(spec), parse_budget(spec.budget))


def supernet_trainings(df: pd.DataFrame) -> tuple[dict[Path, float], float]:
    """CPU seconds of each supernet trained here in one go (by its cache directory), and
    their median. A search charges its supernet's training in full, also where it found
    the supernet in the cache; a training whose CPU time is not known in full (trained
    elsewhere, or resumed after a restart: its training time then exceeds the trial's wall
    time, and older runs did not carry CPU time across the restart) is charged the median:
    every supernet of this recipe is the same network trained for the same steps."""
    trained = {}
    for d, text, wall in zip(*(df.loc[df.stage == "supernet", c] for c in (
            "experiment_dir", "metrics", "wall_seconds")), strict=True):
        m = json.loads(text or "{}")
        if m.get("cpu_seconds") is not None and m.get("train_seconds", 0) <= wall:
            trained[_supernet_of(read_spec(Path(d) / SPEC_FILE))] = m["cpu_seconds"]
    return trained, float(np.median(list(trained.values()))) if trained else np.nan


def search_cpu_seconds(rows: pd.DataFrame, looked_up: float) -> float:
    """What a search cost besides its supernet's training: its evaluations or trials and
    top-k retrains, each trial by its process CPU time (``metrics.cpu_seconds``, which load
    on the machine does not inflate), or, where a row lacks it, wall time x CPUs per trial.
    An evaluation found in the supernet's store of kept evaluations (an earlier search
    computed it) is charged ``looked_up`` seconds, what computing one costs."""
    spent = rows[rows.stage.isin(("search", "topk"))]
    total = 0.0
    for text, wall, cpus in zip(spent.metrics, spent.wall_seconds, spent.cpus_per_trial):
        m = json.loads(text or "{}")
        if m.get("eval_cached"):
            total += looked_up
        elif m.get("cpu_seconds") is not None:
            total += m["cpu_seconds"]
        elif pd.notna(wall):
            total += wall * (cpus if pd.notna(cpus) else 1.0)
    return total


def evaluation_cost(df: pd.DataFrame) -> float:
    """Median CPU seconds of the supernet evaluations that were computed, not looked up."""
    m = [json.loads(x or "{}") for x in df.loc[df.task == "supernet-eval", "metrics"]]
    cost = [x["cpu_seconds"] for x in m if not x.get("eval_cached") and "cpu_seconds" in x]
    return float(np.median(cost)) if cost else np.nan


def interval(values: np.ndarray, sign: str = "") -> str:
    """Mean ± half-width of the 95% Student t interval, and n (``sign="+"``: signed mean)."""
    mean, half = t_interval(values)
    n = len(values)
    return f"{mean:{sign}.2f} (1)" if n < 2 else f"{mean:{sign}.2f} ± {half:.2f} ({n})"


def tables(df: pd.DataFrame) -> list[str]:
    lines = ["| strategy | evaluator | seeds | evaluations | search CPU-h | final test acc, mean "
             "± 95% CI (n) |", "|---|---|---:|---:|---:|---:|"]
    for (strategy, way), g in df.groupby(["strategy", "way"]):
        lines.append(f"| {strategy} | {way} | {', '.join(map(str, sorted(g.seed)))} | "
                     f"{g.evaluations.mean():.0f} | {g.cpu_h.mean():.2f} | "
                     f"{interval(g.test_acc.to_numpy())} |")
    lines += ["", "| strategy | supernet - trials, paired by seed | CPU-h ratio | verdict |",
              "|---|---:|---:|---|"]
    for strategy, g in df.groupby("strategy"):
        acc = g.pivot_table(index="seed", columns="way", values="test_acc")
        cpu = g.groupby("way").cpu_h.mean()
        if not {"supernet", "train"} <= set(acc.columns):
            continue
        d = (acc["supernet"] - acc["train"]).dropna().to_numpy()
        call = verdict(*t_interval(d), "supernet", "trials")
        lines.append(f"| {strategy} | {interval(d, '+')} | "
                     f"{cpu['supernet'] / cpu['train']:.2f} | {call} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, help="the recipe's out directory")
    df = searches(p.parse_args().root)
    print("\n".join([*tables(df), "", df.attrs["note"]]))


if __name__ == "__main__":
    main()
