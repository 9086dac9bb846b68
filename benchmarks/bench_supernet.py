"""The weight-sharing evaluator measured: rank fidelity, evaluation throughput, training cost.

Inputs are two finished runs at the same budget, model, dataset and seed:

- ``--fidelity DIR``: a ``qsearch fidelity`` run (K candidates trained stand-alone at two or
  more lengths, two or more seeds): the reference ranking is the mean validation accuracy at
  its longest length;
- ``--search DIR``: a ``qsearch run --evaluator supernet`` search, whose supernet (trained
  as a Ray Tune trial into the cache) is loaded from the cache.

The script cuts each of the K candidates out of that supernet (recalibrated BatchNorm,
validation on the product's ``EVAL_IMAGES`` images and on the whole validation split),
then reports Kendall's tau (with a 95% bootstrap interval over candidates) of:

- the supernet accuracy against the stand-alone reference,
- the shortest stand-alone length against the reference (the short-trial proxy),
- one seed of the reference length against another, and the supernet against each seed
  alone: like against like, since the supernet is one training run and the reference a
  mean of several (how well one more stand-alone training would rank the candidates);

and the evaluator's cost: seconds per evaluation in this process (one thread), evaluations
per CPU-hour, the search's own evaluation trials through Ray Tune (``wall_seconds``), and
the supernet's training step against a stand-alone step of its widest candidate (timed
alternately, ``--steps`` each, one thread, on the same batch).

Example (the figures in docs/results/supernet.md)::

    python benchmarks/bench_supernet.py --fidelity runs/supernet-truth-32k \\
        --search runs/supernet-random-32k
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from qsearch.candidate import Candidate
from qsearch.data import load_dataset
from qsearch.evaluator import WEIGHTS_FILE, cached_info, supernet_dir
from qsearch.fidelity import bootstrap_ci, kendall_tau, trial_rows
from qsearch.planning import plan_budgets
from qsearch.qlayers import quantize_model
from qsearch.seed_noise import accuracy_grid
from qsearch.spec import read_spec, space_from_spec
from qsearch.store import ResultsStore
from qsearch.supernet import EVAL_IMAGES, SandwichHooks, Supernet, evaluate_candidate


def load_supernet(search: Path):
    spec = read_spec(search / "spec.json")
    space = space_from_spec(spec)
    budget = plan_budgets(spec, space).search
    directory = supernet_dir(spec, space, budget)
    info = cached_info(directory)
    if info is None:
        raise SystemExit(f"no trained supernet for {search} in {directory}")
    sn = Supernet(space, budget)
    model = sn.build()
    model.load_state_dict(torch.load(directory / WEIGHTS_FILE, weights_only=True))
    return spec, sn, model.eval(), {**info, "directory": str(directory)}


def reference(fidelity: Path) -> tuple[dict, dict, dict]:
    """Per candidate index: its candidate, labels, accuracies by (length, seed offset)."""
    rows = trial_rows(ResultsStore(fidelity).rows)
    cands = {r["metrics"]["candidate_index"]: Candidate.from_json(r["candidate"]) for r in rows}
    labels = {r["metrics"]["candidate_index"]: r["metrics"].get("label", "?") for r in rows}
    return cands, labels, accuracy_grid([r for r in rows if r["status"] == "ok"])


def tau_line(name: str, x: list[float], y: list[float]) -> str:
    lo, hi = bootstrap_ci(x, y)
    return f"| {name} | {len(x)} | {kendall_tau(x, y):+.2f} | [{lo:+.2f}, {hi:+.2f}] |"


def step_ratio(sn: Supernet, steps: int) -> tuple[float, float]:
    """Seconds per training step: the supernet's sandwich step, a stand-alone step of its
    widest candidate (alternating, same batch of 128, one thread)."""
    info = sn.space.info
    x = torch.randn(128, info.in_channels, info.image_size, info.image_size)
    y = torch.randint(0, info.num_classes, (128,))
    crit = nn.CrossEntropyLoss()
    net, hooks = sn.build().train(), SandwichHooks(sn)
    solo = quantize_model(sn.space.build(sn.widest), sn.space.layer_bits(sn.widest),
                          sn.widest.a_bits).train()

    def sandwich():
        net.zero_grad()
        hooks.forward_backward(net, x, y, crit, 0)

    def alone():
        solo.zero_grad()
        crit(solo(x), y).backward()

    times = {sandwich: [], alone: []}
    for _ in range(steps):
        for f in times:
            t = time.perf_counter()
            f()
            times[f].append(time.perf_counter() - t)
    return float(np.median(times[sandwich][1:])), float(np.median(times[alone][1:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fidelity", required=True, type=Path)
    p.add_argument("--search", required=True, type=Path)
    p.add_argument("--steps", type=int, default=6, help="timed steps of each kind")
    args = p.parse_args()
    torch.set_num_threads(1)
    spec, sn, model, info = load_supernet(args.search)
    cands, labels, accs = reference(args.fidelity)
    splits = load_dataset(spec.dataset, seed=spec.seed, **spec.data)
    lengths = sorted(accs)
    ref = {i: float(np.mean(list(s.values()))) for i, s in accs[lengths[-1]].items()}
    idx = sorted(i for i in ref if i in cands)
    super_acc, full_acc, seconds = {}, {}, []
    for i in idx:
        t = time.perf_counter()
        super_acc[i], _ = evaluate_candidate(sn, model, cands[i], splits)
        seconds.append(time.perf_counter() - t)
        full_acc[i], _ = evaluate_candidate(sn, model, cands[i], splits, eval_images=10**9)
        print(f"{labels[i]:>10}  stand-alone {ref[i]:.2%}  supernet {super_acc[i]:.2%} "
              f"(whole val {full_acc[i]:.2%})  {seconds[-1]:.1f}s", flush=True)
    report(args, spec, sn, info, lengths, accs, ref, idx, super_acc, full_acc, seconds)


def seed_lines(idx: list[int], by_seed: dict, length: float, super_acc: dict) -> list[str]:
    """Rows of single seeds at the reference length: the first two seeds against each other,
    and the supernet against each seed alone."""
    seeds = sorted({s for i in idx for s in by_seed[i]})
    lines = []
    for s in seeds:
        has = [i for i in idx if s in by_seed[i]]
        lines.append(tau_line(f"supernet vs seed {s} alone at {length:g}",
                              [super_acc[i] for i in has], [by_seed[i][s] for i in has]))
    if len(seeds) >= 2:
        a, b = seeds[:2]
        pair = [i for i in idx if {a, b} <= set(by_seed[i])]
        lines.append(tau_line(f"seed {a} vs seed {b} at {length:g} (one training vs another)",
                              [by_seed[i][a] for i in pair], [by_seed[i][b] for i in pair]))
    return lines


def report(args, spec, sn, info, lengths, accs, ref, idx, super_acc, full_acc, seconds):
    y = [ref[i] for i in idx]
    short = accs[lengths[0]]
    short_mean = {i: float(np.mean(list(short[i].values()))) for i in idx if i in short}
    seeds = sorted({s for i in idx for s in accs[lengths[-1]][i]})
    print(f"\nRank fidelity at {sn.budget} ({spec.model}, {spec.dataset}; reference: mean "
          f"of {len(seeds)} seeds at {lengths[-1]:g} of the fidelity run's unit)\n")
    print("| ranking | candidates | Kendall tau | 95% bootstrap CI |\n|---|---|---|---|")
    print(tau_line(f"supernet, {EVAL_IMAGES} val images", [super_acc[i] for i in idx], y))
    print(tau_line("supernet, whole val split", [full_acc[i] for i in idx], y))
    both = [i for i in idx if i in short_mean]
    print(tau_line(f"stand-alone at {lengths[0]:g} (short proxy)",
                   [short_mean[i] for i in both], [ref[i] for i in both]))
    for line in seed_lines(idx, accs[lengths[-1]], lengths[-1], super_acc):
        print(line)
    per_eval = float(np.median(seconds))
    search = [r for r in ResultsStore(args.search).rows if r["stage"] == "search"
              and r["status"] == "ok"]  # evaluations made, not kept ones looked up
    walls = [r["wall_seconds"] for r in search if r["wall_seconds"]
             and not json.loads(r["metrics"] or "{}").get("eval_cached")]
    t_sn, t_alone = step_ratio(sn, args.steps)
    ray = (f"{np.median(walls):.2f} s median wall per trial = "
           f"{3600 / np.median(walls):.0f} per CPU-hour" if walls else
           "none to time: every evaluation was a kept one, looked up")
    print(f"\nEvaluation: {per_eval:.2f} s median per candidate in this process (one thread)"
          f" = {3600 / per_eval:.0f} evaluations per CPU-hour; through Ray Tune in the search "
          f"({len(walls)} of {len(search)} trials evaluated, not looked up): {ray}")
    print(f"Supernet training: {info['steps']} steps in {info['train_seconds'] / 60:.1f} min "
          f"({json.dumps(spec.supernet_train)}); step {t_sn:.3f} s against {t_alone:.3f} s "
          f"for the widest candidate alone: {t_sn / t_alone:.2f}x")


if __name__ == "__main__":
    main()
