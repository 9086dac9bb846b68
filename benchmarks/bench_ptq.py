"""Post-training trials measured: accuracy and seconds per candidate, with BatchNorm statistics
re-estimated on the calibration batches (the product's choice) against the float model's own.

Candidates: uniform 1/2/4/8-bit models of the checkpoint's space (fixed width) and
``--random`` random mixes lowered to fit ``--budget`` (HAQ's rule, as a fixed-width search
makes them). Each is quantized from the checkpoint, calibrated on ``CALIB_BATCHES`` training
batches and validated on the whole validation split, one thread.

Example (the figures in docs/results/pretrained.md)::

    python benchmarks/bench_ptq.py --checkpoint runs/float/resnet20-fashion-mnist.pt \\
        --budget 100KB
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from qsearch.budget import format_cost, parse_budget
from qsearch.candidate import bit_summary
from qsearch.data import load_dataset
from qsearch.pretrained import load_pretrained
from qsearch.ptq import CALIB_BATCHES, calibrate
from qsearch.qlayers import quantize_model
from qsearch.space import SearchSpace
from qsearch.train import evaluate, set_threads


def ptq_accuracy(space, cand, path, splits, batchnorm: bool) -> tuple[float, float]:
    """(validation accuracy, seconds) of one post-training candidate."""
    start = time.perf_counter()
    model = space.build(cand)
    load_pretrained(model, path, space.model)
    quantize_model(model, space.layer_bits(cand), cand.a_bits)
    order = torch.Generator().manual_seed(0)
    calibrate(model, splits.train.batches(128, shuffle=True, generator=order), CALIB_BATCHES,
              "cpu", batchnorm=batchnorm)
    acc, _ = evaluate(model, splits.val)
    return acc, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--budget", default="100KB")
    ap.add_argument("--random", type=int, default=6)
    args = ap.parse_args(argv)
    set_threads(1)
    space = SearchSpace(args.model, args.dataset, fixed_width=True)
    splits = load_dataset(args.dataset, seed=0)
    budget = parse_budget(args.budget)
    rng = np.random.default_rng(0)
    cands = [space.candidate(b) for b in (1, 2, 4, 8)]
    cands += [space.lower_to_fit(space.candidate(list(rng.choice(space.bit_choices,
                                                                 len(space.free_layers)))),
                                 budget) for _ in range(args.random)]
    model = space.build(1.0)
    load_pretrained(model, args.checkpoint, space.model)
    print(f"float checkpoint: val {evaluate(model, splits.val)[0]:.2%}")
    print(f"{'candidate':<34} {'C_size':>9} {'BN re-estimated':>16} {'float BN':>9} {'s':>5}")
    for cand in cands:
        acc, seconds = ptq_accuracy(space, cand, args.checkpoint, splits, batchnorm=True)
        plain, _ = ptq_accuracy(space, cand, args.checkpoint, splits, batchnorm=False)
        print(f"{bit_summary(cand.w_bits, space):<34} "
              f"{format_cost(space.c_size(cand), 'size'):>9} {acc:>16.2%} {plain:>9.2%} "
              f"{seconds:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
