"""A real 2-node Ray cluster on loopback: `qsearch run --address` spreads trials over both."""

import pandas as pd

from tests.test_runner import TINY, qsearch


def test_search_on_two_node_cluster(ray_cluster, tmp_path):
    out = tmp_path / "cluster"
    r = qsearch("run", "--strategy", "random", "--budget", "6KB", *TINY, "--trials", "6",
                "--address", ray_cluster.address, "--out", str(out), env=ray_cluster.env)
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 6 and set(df.status) == {"ok"}
    assert set(df.node) == {"127.0.0.2", "127.0.0.3"}


def test_unreachable_address_is_a_clear_error(tmp_path):
    r = qsearch("run", "--strategy", "random", "--budget", "6KB", *TINY,
                "--address", "127.0.0.9:1", "--out", str(tmp_path / "x"), timeout=60)
    assert r.returncode == 2
    assert "unreachable" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
