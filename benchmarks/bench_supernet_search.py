"""Search efficiency on the supernet evaluator: random, TPE and HAQ at equal evaluations.

With evaluations at seconds each, a strategy can run the hundreds of trials its method
needs. This script drives each strategy in this process (``run_local``, no Ray) against the
trained supernet of a ``qsearch run --evaluator supernet`` search (loaded from the cache),
for several strategy seeds, ``--evaluations`` each, and reports per strategy the best
supernet validation accuracy found after 25%, 50% and 100% of the evaluations (mean and
range over seeds), and the paired difference of each strategy's final best against
random's at the same seed, with a 95% t interval over seeds. The same candidate is
evaluated once (evaluations are deterministic) and shared by every strategy and seed,
through the evaluations kept beside the supernet (``qsearch.evaluator.kept_evaluation``:
those of earlier searches are looked up; only new ones are timed).

These are supernet accuracies: they say how fast a strategy finds what the supernet ranks
high, not which candidate is best stand-alone (see bench_supernet.py for how the two agree).

Example (the figures in docs/results/supernet.md)::

    python benchmarks/bench_supernet_search.py --search runs/supernet-random-32k \\
        --strategies random,tpe,haq --seeds 0,1,2 --evaluations 100
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from bench_supernet import load_supernet
from scipy import stats

from qsearch.data import load_dataset
from qsearch.evaluator import kept_evaluation
from qsearch.strategy import Proposal, Result, create_strategy, get_strategy, run_local
from qsearch.supernet import evaluate_candidate


def best_so_far(history) -> list[float]:
    accs = [r.val_acc if r.ok else 0.0 for _, r in history]
    return list(np.maximum.accumulate(accs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--search", required=True, type=Path)
    p.add_argument("--strategies", default="random,tpe,haq")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--evaluations", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(1)
    spec, sn, model, info = load_supernet(args.search)
    splits = load_dataset(spec.dataset, seed=spec.seed, **spec.data)
    spent = []

    def evaluate(proposal: Proposal) -> Result:
        t = time.perf_counter()
        cand = proposal.candidate
        acc, _, looked_up = kept_evaluation(
            info["directory"], cand, lambda: evaluate_candidate(sn, model, cand, splits))
        if not looked_up:
            spent.append(time.perf_counter() - t)
        return Result("ok", acc, proposal.candidate)

    curves: dict[str, dict[int, list[float]]] = {}
    for name in args.strategies.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            strategy = create_strategy(name, sn.space, sn.budget, seed=seed,
                                       **get_strategy(name).supernet_kwargs)
            curve = best_so_far(run_local(strategy, evaluate, max_trials=args.evaluations))
            curves.setdefault(name, {})[seed] = curve
            print(f"{name} seed {seed}: best {curve[-1]:.2%} after {len(curve)} evaluations "
                  f"({len(spent)} new evaluations so far)", flush=True)
    report(curves, args.evaluations, spent)


def report(curves, n: int, spent: list[float]) -> None:
    marks = [max(1, n // 4), max(1, n // 2), n]
    print(f"\n| strategy | seeds | best after {' | best after '.join(map(str, marks))} "
          "| final best - random's (paired, 95% CI) |")
    print("|---|---|" + "---|" * len(marks) + "---|")
    for name, by_seed in curves.items():
        cells = []
        for m in marks:
            v = [c[min(m, len(c)) - 1] for c in by_seed.values()]
            cells.append(f"{np.mean(v):.2%} [{min(v):.2%}, {max(v):.2%}]")
        diff = "-"
        if name != "random" and "random" in curves:
            d = [by_seed[s][-1] - curves["random"][s][-1] for s in by_seed
                 if s in curves["random"]]
            if len(d) >= 2:
                half = stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d))
                diff = f"{np.mean(d) * 100:+.2f} ± {half * 100:.2f} points (n={len(d)})"
        print(f"| {name} | {len(by_seed)} | {' | '.join(cells)} | {diff} |")
    if spent:
        print(f"\n{len(spent)} new evaluations, {np.median(spent):.2f} s median each "
              "(one thread); the others were looked up")


if __name__ == "__main__":
    main()
