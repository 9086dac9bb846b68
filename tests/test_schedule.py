"""Multi-fidelity search: the rung ladder, what reports tell a scheduler, and Ray Tune's own
ASHA and HyperBand schedulers running real trials under a real local Ray."""

import io
import json
import math
import os
import signal
import subprocess

import pytest

from qsearch.console import Display
from qsearch.experiment import run_experiment
from qsearch.schedule import fidelity_reports, rung_steps, scheduler_problem
from qsearch.spec import Spec
from qsearch.store import ResultsStore
from qsearch.train import TrainConfig, train
from tests.test_faults import rows, wait_for
from tests.test_runner import QS, qsearch
from tests.test_runner import TINY as TINY_ARGS

TINY = dict(model="resnet20", dataset="synthetic", budget="6KB", seed=0)


def test_the_ladder_is_geometric_and_ends_at_the_trial_length():
    assert rung_steps(100, 900, 3) == [100, 300, 900]
    assert rung_steps(50, 1000, 4) == [50, 200, 800, 1000]
    assert scheduler_problem("hyperband", {"steps": 900}, 100, 3) is None
    assert "power of" in scheduler_problem("hyperband", {"steps": 1000}, 50, 4)
    assert scheduler_problem("asha", {"steps": 1000}, 50, 4) is None
    assert scheduler_problem("asha", {"steps": 900}, None, 3) is None  # default min: 100


def test_trials_evaluate_exactly_at_the_rungs(tiny_splits):
    seen = []
    config = TrainConfig(steps=12, batch_size=16, eval_steps=[2, 6])
    train(_model(), tiny_splits, config, callback=lambda m, s: seen.append(m["step"]))
    assert seen == [2, 6, 12]


def test_reports_carry_the_fidelity_of_their_accuracy_and_skip_the_last():
    sent = []
    send = fidelity_reports(lambda m, s=None: sent.append(m) or False, 4, on_ladder=True)
    send({"step": 2, "checkpoint": True})  # before any evaluation: nothing measured yet
    send({"step": 4, "val_acc": 0.5})
    send({"step": 6, "checkpoint": True})  # between evaluations: the last one repeated
    send({"step": 12, "val_acc": 0.7, "last": True})  # the final report carries this one
    assert [m["fidelity"] for m in sent] == [0.0, 1.0, 1.0]
    assert math.isnan(sent[0]["val_acc"]) and sent[2]["val_acc"] == 0.5
    off = []
    fidelity_reports(lambda m, s=None: off.append(m) or False, 4, on_ladder=False)(
        {"step": 8, "val_acc": 0.9})
    assert off[0]["fidelity"] == 0.0  # off the ladder: no scheduler compares or stops it


def _model():
    from qsearch.space import SearchSpace

    space = SearchSpace("resnet20", "synthetic")
    return space.build(space.candidate(8).with_width(0.25))


@pytest.fixture(scope="module")
def tiny_splits():
    from qsearch.data import load_dataset

    return load_dataset("synthetic", seed=0)


def run(tmp_path, name, **over):
    spec = Spec(**{**TINY, "out": str(tmp_path / name), "trials": 9,
                   "train": {"steps": 36, "batch_size": 32}, "min_steps": 4, **over})
    return run_experiment(spec, display=Display(stream=io.StringIO()))


@pytest.mark.parametrize("scheduler", ["asha", "hyperband"])
def test_a_scheduler_stops_trials_at_rungs_and_the_strategy_hears_it(scheduler, tmp_path):
    runner = run(tmp_path, scheduler, strategy="tpe", scheduler=scheduler)
    rows = ResultsStore(runner.out).rows
    stopped = [r for r in rows if r["status"] == "stopped"]
    full = [r for r in rows if r["status"] == "ok"]
    assert len(rows) == 9 and stopped and full
    assert {r["steps"] for r in stopped} <= {4, 12} and {r["steps"] for r in full} == {36}
    assert all(math.isfinite(r["val_acc"]) for r in stopped)
    summary = json.loads((runner.out / "summary.json").read_text())
    assert summary["n_pruned"] == len(stopped) and summary["n_complete"] == len(full)
    best = runner.best()  # the best at the highest fidelity reached
    assert best["status"] == "ok" and best["val_acc"] == max(r["val_acc"] for r in full)


@pytest.mark.parametrize("scheduler", ["asha", pytest.param("hyperband",
                                                            marks=pytest.mark.slow)])
def test_driver_dies_then_resume_finishes_a_scheduled_search(scheduler, tmp_path):
    out = tmp_path / scheduler
    proc = subprocess.Popen([*QS, "run", "--strategy", "random", "--budget", "6KB", *TINY_ARGS[:4],
                             "--trials", "6", "--concurrency", "1", "--scheduler", scheduler,
                             "--max-steps", "90", "--min-steps", "10", "--batch-size", "32",
                             "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    done = out / "results.parquet"
    wait_for(lambda: done.exists() and len(rows(out)) >= 2, 300, "two stored trials")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = rows(out)

    r = qsearch("resume", str(out), timeout=600)
    assert r.returncode == 0, r.stderr
    after = rows(out)
    assert after.trial_id.is_unique and len(after) == 6
    assert set(after.status) <= {"ok", "stopped"} and "ok" in set(after.status)
    kept = after.set_index("trial_id").loc[list(before.trial_id)]
    assert list(kept.val_acc) == list(before.val_acc) and list(kept.steps) == list(
        before.steps)  # what was stored stays as it was
    assert set(after.steps[after.status == "stopped"]) <= {10, 30}
    assert set(after.steps[after.status == "ok"]) == {90}
