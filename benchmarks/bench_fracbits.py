"""Wall time of a FracBits search (one training run) vs plain QAT of the same model.

FracBits' claim is a one-shot search: its single run should cost about one quantization-aware
training of the same network and length (target: <= 1.5x). Both sides train ResNet-20 on
Fashion-MNIST at the width where uniform 4-bit (weights and activations) fills the budget,
with the same quantizers (DoReFa weights, PACT activations, first/last layer 8-bit), the same
recipe, data order and step count, and one evaluation at the end:

- ``qat``: ``train()`` of the uniform 4-bit reference candidate (``scheme="dorefa"``).
- ``fracbits-size``: learnable weight bits, model-size penalty (Eq. 6a).
- ``fracbits-bitops``: learnable weight and activation bits, BitOPs penalty (Eq. 6b).
- ``fracbits-bitops-kw``: the same with one weight bit-width per output filter.

Variants run interleaved, round by round, so machine load hits all alike; medians are shown.

    python benchmarks/bench_fracbits.py [--steps 60] [--rounds 2] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qsearch.budget import Budget
from qsearch.space import SearchSpace
from qsearch.strategies.fracbits import FracBits, fracbits_task
from qsearch.tasks import TaskContext, train_candidate


def context(space, budget, proposal, args) -> TaskContext:
    train = {"steps": args.steps, "batch_size": args.batch_size,
             "eval_every_steps": args.steps}
    return TaskContext(space=space, proposal=proposal, budget=budget, train=train,
                       data={"val_fraction": 1000, "root": args.data_root}, seed=0,
                       device=args.device,
                       report=lambda m, s: False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: Debian's)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    space = SearchSpace("resnet20", "fashion-mnist")
    ref = space.candidate(4, a_bits=4)
    budgets = {k: Budget(k, space.cost(ref, k)) for k in ("size", "bitops")}
    proposals = {
        "fracbits-size": (budgets["size"], FracBits(space, budgets["size"]).ask("0")),
        "fracbits-bitops": (budgets["bitops"], FracBits(space, budgets["bitops"]).ask("0")),
        "fracbits-bitops-kw": (budgets["bitops"],
                               FracBits(space, budgets["bitops"], kernel_wise=True).ask("0")),
    }
    reference = proposals["fracbits-bitops"][1].candidate  # w4a4 at the aligned width

    def qat() -> tuple[float, float]:
        ctx = context(space, budgets["bitops"], proposals["fracbits-bitops"][1], args)
        t0 = time.perf_counter()
        _, res = train_candidate(ctx, reference, scheme="dorefa")
        return time.perf_counter() - t0, res.val_acc

    def fracbits(name: str):
        def run() -> tuple[float, float]:
            budget, proposal = proposals[name]
            t0 = time.perf_counter()
            result = fracbits_task(context(space, budget, proposal, args))
            return time.perf_counter() - t0, result.val_acc
        return run

    variants = {"qat": qat, **{name: fracbits(name) for name in proposals}}
    context(space, budgets["size"], None, args).splits()  # load the data outside the timings
    times: dict[str, list[float]] = {name: [] for name in variants}
    accs: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            seconds, accs[name] = fn()
            times[name].append(seconds)

    base = statistics.median(times["qat"])
    print(f"ResNet-20 / Fashion-MNIST, width {reference.width:.4g}, {args.steps} steps x batch "
          f"{args.batch_size}, {args.threads} thread(s), {args.device}, median of "
          f"{args.rounds} round(s)")
    print(f"{'variant':<20} {'seconds':>8} {'ms/step':>8} {'vs qat':>7} {'val_acc':>8}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<20} {t:8.2f} {1000 * t / args.steps:8.1f} {t / base:6.2f}x "
              f"{accs[name]:8.3f}")


if __name__ == "__main__":
    main()
