"""MixQuant search time on one CPU thread against the paper's Table 3.

One QEM over bit-widths 2..8 = the QE table (every conv/fc weight at every bit-width, the
int8 baseline included) plus Eq. (1). Ten QEMs reuse the table, so they add ten bit
selections. torchvision ResNets/ResNeXts with random weights (``weights=None``; the time does
not depend on the values), ``torch.set_num_threads(1)``, median of ``--repeats`` runs after one
warm-up (the warm-up also pays numba's one-time compilation of the QE loop, ~1 s, cached
on disk afterwards). The paper's figures (Table 3a/3b, "search" columns) are copied below; the paper
quantizes per layer (per tensor), which is our ``--per-tensor`` column.

    python benchmarks/bench_mixquant.py [--repeats 5] [--models resnet18,resnet50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qsearch.strategies._qe import MIXQUANT_BITS, mixquant_bits, qe_table

# Table 3 of the paper: search time in seconds for (a) 1 QEM and (b) 10 QEMs.
PAPER = {
    "resnet18": (0.1, 0.9),
    "resnet34": (0.2, 1.5),
    "resnet50": (0.2, 2.0),
    "resnet101": (0.4, 3.6),
    "resnet152": (0.5, 5.2),
    "resnext50_32x4d": (0.2, 2.0),
    "resnext101_32x8d": (0.5, 5.5),
}
QEMS_10 = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def layer_weights(name: str) -> list[torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    return [m.weight.detach() for m in model.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def search(weights: list[torch.Tensor], qems, per_channel: bool) -> list[list[int]]:
    table = qe_table(weights, MIXQUANT_BITS, per_channel=per_channel)
    return [mixquant_bits(table, q, MIXQUANT_BITS) for q in qems]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, first-touch pages)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default=",".join(PAPER))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"median of {args.repeats}")
    head = (f"{'model':18s} {'layers':>6s} {'params':>7s} | {'paper 1 QEM':>11s} "
            f"{'ours/tensor':>11s} {'x':>5s} {'ours/chan':>9s} {'x':>5s} | "
            f"{'paper 10':>8s} {'ours 10':>8s} {'x':>5s}")
    print(head)
    print("-" * len(head))
    for name in args.models.split(","):
        ws = layer_weights(name)
        n = sum(w.numel() for w in ws)
        per_tensor = median_seconds(lambda: search(ws, QEMS_10[:1], False), args.repeats)  # noqa: B023
        per_chan = median_seconds(lambda: search(ws, QEMS_10[:1], True), args.repeats)  # noqa: B023
        ten = median_seconds(lambda: search(ws, QEMS_10, False), args.repeats)  # noqa: B023
        p1, p10 = PAPER[name]
        print(f"{name:18s} {len(ws):6d} {n / 1e6:6.1f}M | {p1:10.1f}s {per_tensor:10.3f}s "
              f"{p1 / per_tensor:5.1f} {per_chan:8.3f}s {p1 / per_chan:5.1f} | "
              f"{p10:7.1f}s {ten:7.3f}s {p10 / ten:5.1f}", flush=True)


if __name__ == "__main__":
    main()
