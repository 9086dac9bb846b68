"""Faults: diverging and refused trials, a worker node dying mid-search on a real 2-node
cluster, and the driver dying mid-search for every registered strategy."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from qsearch.budget import parse_budget
from qsearch.space import SearchSpace
from qsearch.strategy import FINISHED, Result, create_strategy, list_strategies
from tests.conftest import pids_using
from tests.test_runner import QS, TINY, qsearch


def rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def checkpoints(out: Path) -> list[Path]:
    return list((out / "tune").glob("*/*/checkpoint_*"))


def test_diverging_trials_are_recorded_with_their_reason(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {steps: 10, batch_size: 32, lr: 1.0e+9}\n")
    out = tmp_path / "div"
    r = qsearch("run", str(recipe), "--strategy", "random", "--budget", "6KB", "--dataset",
                "synthetic", "--trials", "3", "--out", str(out))
    assert r.returncode == 1 and "no trial succeeded" in r.stderr
    df = rows(out)
    assert len(df) == 3 and set(df.status) == {"diverged"}
    assert df.error.str.contains("loss (?:nan|inf) at step", regex=True).all()
    state = json.loads((out / "state.json").read_text())
    assert state["live"] == {}  # the strategy was told about every trial


def test_candidate_too_large_for_memory_is_refused_before_training(tmp_path):
    out = tmp_path / "huge"
    r = qsearch("run", "--strategy", "uniform", "--bit-choices", "8", "--model", "resnet56",
                "--dataset", "synthetic", "--budget", "900MB", "--proxy-budget", "none",
                "--width-max", "64",  # 900MB is past the 8-bit model at the default max 32
                "--trials", "1", "--out", str(out), timeout=300)
    assert r.returncode == 1
    df = rows(out)
    assert list(df.status) == ["failed"]
    assert "refused before training: estimated memory" in df.error[0]
    assert df.train_seconds.isna().all()


# checkpoints at evaluations (every 40 steps), or only on the clock: a 300-step trial that
# evaluates once, at its end, checkpointing every second (slow: the same recovery path, and
# the clock's checkpoints are tested by the supernet's killed-training resume)
@pytest.mark.parametrize("train,every", [
    ("steps: 600, eval_every_steps: 40", "60"),
    pytest.param("steps: 300, eval_every_steps: 1000", "1", marks=pytest.mark.slow)],
    ids=["at-evaluations", "on-the-clock"])
def test_worker_node_dies_mid_trial(ray_cluster, tmp_path, train, every):
    out = tmp_path / "worker-dies"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"train: {{{train}, batch_size: 32}}\n")
    cmd = [*QS, "run", str(recipe), "--strategy", "random", "--budget", "6KB", "--dataset",
           "synthetic", "--trials", "2", "--concurrency", "2", "--address",
           ray_cluster.address, "--out", str(out)]
    proc = subprocess.Popen(cmd, env={**ray_cluster.env, "QSEARCH_CHECKPOINT_EVERY": every},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # both trials (one per node) have written a checkpoint: kill the worker node's raylet
    wait_for(lambda: len({p.parent for p in checkpoints(out)}) >= 2, 240, "checkpoints")
    raylets = [p for p in pids_using(ray_cluster.tmp)
               if b"raylet" in Path(f"/proc/{p}/cmdline").read_bytes()
               and b"127.0.0.3" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert raylets
    for pid in raylets:
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    # one condensed line about the lost node on the console; Ray's dump goes to the log
    assert "failed on node 127.0.0.3" in stdout and "retrying it from" in stdout
    assert "raylet" not in stdout + stderr and "\x1b[" not in stdout + stderr
    df = rows(out)
    assert len(df) == 2 and df.trial_id.is_unique and set(df.status) == {"ok"}
    resumed = [json.loads(m)["resumed_from_step"] for m in df.metrics]
    assert max(resumed) > 0  # the interrupted trial continued from its checkpoint
    assert set(df.node) == {"127.0.0.2"} or "127.0.0.3" not in set(
        df.node[[r > 0 for r in resumed]])


def proposals_in(name: str, n: int) -> int:
    """How many trials a strategy proposes in ``n`` asks (fake results in between)."""
    space = SearchSpace("resnet20", "synthetic")
    s = create_strategy(name, space, parse_budget("6KB"))
    count = 0
    for i in range(n):
        p = s.ask(str(i))
        if p in (None, FINISHED):
            break
        count += 1
        s.tell(str(i), Result("ok", 0.5, p.candidate, {"qe_table": None}))
    return count


@pytest.mark.slow
@pytest.mark.parametrize("name", list_strategies())
def test_driver_dies_then_resume_finishes_every_strategy(name, tmp_path):
    out = tmp_path / name
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {steps: 120, batch_size: 32, eval_every_steps: 20}\n")
    proc = subprocess.Popen([*QS, "run", str(recipe), "--strategy", name, "--budget", "6KB",
                             *TINY[:4], "--trials", "3", "--concurrency", "1", "--out",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    done = out / "results.parquet"
    wait_for(lambda: done.exists() or checkpoints(out), 300, "a result or a checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = rows(out) if done.exists() else pd.DataFrame(columns=["trial_id", "val_acc"])
    state_before = json.loads((out / "state.json").read_text())

    r = qsearch("resume", str(out), timeout=600)
    assert r.returncode == 0, r.stderr
    assert "strategy state restored" in r.stdout
    after = rows(out)
    assert after.trial_id.is_unique and set(after.status) == {"ok"}
    kept = after.set_index("trial_id").loc[list(before.trial_id)]
    assert list(kept.val_acc) == list(before.val_acc)  # completed trials untouched
    assert len(after) >= len(before) and len(after) <= 3
    state_after = json.loads((out / "state.json").read_text())
    assert state_after["next_index"] >= state_before["next_index"]
    assert state_after["live"] == {}


def test_a_raising_trial_is_recorded_with_its_error_and_the_search_goes_on(tmp_path):
    root = tmp_path / "broken"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                (root / split / cls / f"{i}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "raises"
    r = qsearch("run", "--strategy", "random", "--budget", "200KB", "--model", "resnet20",
                "--dataset", "imagefolder", "--data-root", str(root), "--steps", "2",
                "--batch-size", "4",
                "--trials", "2", "--max-failures", "0", "--out", str(out), timeout=300)
    assert r.returncode == 1 and "no trial succeeded" in r.stderr
    df = rows(out)
    assert len(df) == 2 and set(df.status) == {"failed"}  # both trials ran and were told
    assert df.error.str.contains("UnidentifiedImageError|cannot identify image").all()
    assert json.loads((out / "state.json").read_text())["live"] == {}
