"""The findings script's depthwise-grid steps: paired by seed, called by seed from two seeds up."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bitwidth_findings.py"


def findings():
    spec = importlib.util.spec_from_file_location("bitwidth_findings", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grid(seeds, gain=0.02):
    """A 2 x 2 grid (dw 1/8 x other 1/8) in which 8-bit depthwise layers add ``gain`` (or
    ``gain[seed]``), plus a small per-seed, per-row wobble that does not cancel in the
    difference."""
    gains = gain if isinstance(gain, dict) else dict.fromkeys(seeds, gain)
    rows = [{"bits": f"dw {dw} / other {other}", "seed": seed,
             "val_acc": 0.8 + gains[seed] * (dw == 8) + 0.002 * ((seed + other + dw) % 3)}
            for seed in seeds for dw in (1, 8) for other in (1, 8)]
    return pd.DataFrame(rows)


def step_line(lines, step="dw 8 - dw 1"):
    (line,) = [line for line in lines if line.startswith(f"| {step} |")]
    return line


def test_a_clear_depthwise_gain_is_called_from_three_seeds_and_not_from_one():
    f = findings()
    three = step_line(f.bit_steps(grid([0, 1, 2])))
    assert three.endswith("| dw 8 better |") and "(6)" in three and "(3)" in three
    one = step_line(f.bit_steps(grid([0])))  # two rows of one seed: an interval, no call
    assert one.endswith("| one seed: not called |") and "(2)" in one


def test_no_gain_is_undecided():
    line = step_line(findings().bit_steps(grid([0, 1, 2], gain=0.0)))
    assert line.endswith("| undecided (interval includes 0) |")


def test_a_gain_that_only_the_pooled_pairs_decide_is_undecided_by_seed():
    # each seed's two rows agree, the seeds do not: 6 pooled pairs decide, 3 seeds do not
    line = step_line(findings().bit_steps(grid([0, 1, 2], gain={0: 0.02, 1: 0.01, 2: 0.001})))
    pooled, by_seed = line.split(" | ")[-3:-1]
    assert pooled.endswith("(6)") and by_seed.endswith("(3)")
    assert line.endswith("| undecided by seed (pooled: dw 8 better) |")


def test_uniform_bits_pooled_over_budgets_are_called_by_seed():
    # 1-bit beats 8-bit by a seed-dependent gain, alike at each of three budgets
    gains = {0: 0.02, 1: 0.01, 2: 0.001}
    df = pd.DataFrame([{"budget_value": b, "seed": s, "bits": bits,
                        "val_acc": 0.8 + gains[s] * (bits == 1) + 0.001 * ((b + s) % 2)}
                       for b in (16, 32, 64) for s in gains for bits in (1, 8)])
    (line,) = [x for x in findings().paired_differences(df, by=("budget_value", "seed"))
               if x.startswith("| 1 - 8 |")]
    assert "(9) |" in line and "(3) |" in line
    assert line.endswith("| undecided by seed (pooled: 1-bit better) |")
