"""Load: 200 very short trials over a real 2-node cluster, each recorded exactly once.

Slow (several minutes): run with `make test-slow`. Prints trials/minute and the driver's
memory at the start and the end (from the driver's own log line)."""

import re
import time

import pandas as pd
import pytest

from tests.test_runner import qsearch


@pytest.mark.slow
def test_200_short_trials_on_two_nodes(ray_cluster, tmp_path):
    out = tmp_path / "load"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {steps: 2, batch_size: 16, eval_batch_size: 64}\n"
                      "data: {val_fraction: 64}\n")
    start = time.time()
    r = qsearch("run", str(recipe), "--strategy", "random", "--budget", "3KB", "--dataset",
                "synthetic", "--trials", "200", "--address", ray_cluster.address,
                "--out", str(out), timeout=3000, env={**ray_cluster.env,
                                                      "QSEARCH_MEMORY_LOG": "1"})
    wall = (time.time() - start) / 60
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 200 and df.trial_id.is_unique and set(df.status) == {"ok"}
    assert sorted(df.trial_index) == list(range(200))
    assert set(df.node) == {"127.0.0.2", "127.0.0.3"}
    minutes = (df.finished_at.max() - df.finished_at.min()) / 60
    rss = [int(m) for m in re.findall(r"driver rss (\d+) MiB", r.stdout)]
    print(f"\n200 trials: first to last result {minutes:.2f} min ({199 / minutes:.0f} "
          f"trials/min); whole command incl. Ray start {wall:.2f} min ({200 / wall:.0f} "
          f"trials/min); driver RSS {rss[0]} MiB at the first trial, {rss[-1]} MiB at the last")
    assert rss and rss[-1] < 2 * rss[0] + 200  # no unbounded growth
