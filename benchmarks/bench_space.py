"""Cost-model speed on ImageNet ResNet-50: C_size + BitOPs of a candidate after the one-time
trace (target <= 5 ms) and width alignment to a budget (target <= 50 ms).

    python benchmarks/bench_space.py
"""

import statistics
import time

from qsearch.budget import parse_budget
from qsearch.space import SearchSpace


def median_ms(fn, repeat: int = 200) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    t = time.perf_counter()
    space = SearchSpace("resnet50", "imagenet")
    trace_s = time.perf_counter() - t
    cand = space.candidate([1, 2, 4, 8] * (len(space.free_layers) // 4)
                           + [4] * (len(space.free_layers) % 4), width=1.3)
    budget_size, budget_ops = parse_budget("12MB"), parse_budget("20GBitOPs")
    print(f"resnet50/imagenet: {len(space.layers)} layers, trace {trace_s * 1e3:.0f} ms "
          "(once per space, includes importing torch)")
    print(f"C_size + BitOPs:      {median_ms(lambda: (space.c_size(cand), space.bitops(cand))):.3f}"
          " ms (target <= 5)")
    print(f"align to 12MB:        {median_ms(lambda: space.align(cand, budget_size)):.3f} ms "
          "(target <= 50)")
    print(f"align to 20GBitOPs:   {median_ms(lambda: space.align(cand, budget_ops)):.3f} ms "
          "(target <= 50)")


if __name__ == "__main__":
    main()
