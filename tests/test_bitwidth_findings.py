"""The findings script's depthwise-grid steps: paired by seed, called only from two seeds up."""

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
    """A 2 x 2 grid (dw 1/8 x other 1/8) in which 8-bit depthwise layers add ``gain``, plus
    a small per-seed, per-row wobble that does not cancel in the difference."""
    rows = [{"bits": f"dw {dw} / other {other}", "seed": seed,
             "val_acc": 0.8 + gain * (dw == 8) + 0.002 * ((seed + other + dw) % 3)}
            for seed in seeds for dw in (1, 8) for other in (1, 8)]
    return pd.DataFrame(rows)


def step_line(lines, step="dw 8 - dw 1"):
    (line,) = [line for line in lines if line.startswith(f"| {step} |")]
    return line


def test_a_clear_depthwise_gain_is_called_from_three_seeds_and_not_from_one():
    f = findings()
    three = step_line(f.bit_steps(grid([0, 1, 2])))
    assert three.endswith("| dw 8 better |") and "(6)" in three  # 2 rows x 3 seeds, paired
    one = step_line(f.bit_steps(grid([0])))  # two rows of one seed: an interval, no call
    assert one.endswith("| one seed: not called |") and "(2)" in one


def test_no_gain_is_undecided():
    line = step_line(findings().bit_steps(grid([0, 1, 2], gain=0.0)))
    assert line.endswith("| undecided (interval includes 0) |")
