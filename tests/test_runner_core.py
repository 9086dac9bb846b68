"""The Ray-free runner core: planning, the final stage, console output, and the runner driven
inline (same runner calls and trial code as under Ray Tune) and under a real local Ray for
the stop protocol."""

import io
import json
import subprocess
import sys
import textwrap
import time

import pytest

from qsearch import QSearchError
from qsearch.budget import parse_budget
from qsearch.console import Display, Snapshot, status_text
from qsearch.experiment import resume_experiment, run_experiment
from qsearch.final import best_row, seed_summary
from qsearch.planning import budget_text, plan_budgets
from qsearch.runner import Runner, execute
from qsearch.spec import Spec, space_from_spec
from qsearch.store import ResultsStore
from qsearch.trial import run_trial

TINY = dict(model="resnet20", dataset="synthetic", budget="6KB", seed=0,
            train={"steps": 12, "batch_size": 32, "eval_every_steps": 4})


def spec(tmp_path, **over) -> Spec:
    return Spec(**{**TINY, "out": str(tmp_path / "exp"), "strategy": "uniform",
                   "strategy_kwargs": {"bits": [2, 8]}, "trials": 2, **over})


# ----- planning ---------------------------------------------------------------------------
def test_auto_proxy_for_large_targets_and_none_for_small(tmp_path):
    s = spec(tmp_path, budget="1MB")
    b = plan_budgets(s, space_from_spec(s))
    assert b.target == parse_budget("1MB") and b.search.value < b.target.value and b.reason
    small = spec(tmp_path)
    assert plan_budgets(small, space_from_spec(small)).reason is None


def test_explicit_proxy_must_be_smaller_and_of_the_same_kind(tmp_path):
    for proxy, words in (("64KB", "exceeds the target"), ("1GBitOPs", "one kind")):
        s = spec(tmp_path, proxy_budget=proxy)
        with pytest.raises(QSearchError, match=words):
            plan_budgets(s, space_from_spec(s))


def test_budget_text_reads_back_exactly():
    b = parse_budget("12.345KB")
    assert parse_budget(budget_text(b)) == b


# ----- final stage ------------------------------------------------------------------------
def test_best_row_is_the_best_at_the_highest_fidelity_reached():
    rows = [{"status": "ok", "candidate": "c", "val_acc": 0.5, "steps": 90},
            {"status": "stopped", "candidate": "c", "val_acc": 0.9, "steps": 30},
            {"status": "stopped", "candidate": "c", "val_acc": 0.7, "steps": 10},
            {"status": "stopped", "candidate": "c", "val_acc": 0.6, "steps": 30},
            {"status": "ok", "candidate": "c", "val_acc": float("nan"), "steps": 90},
            {"status": "failed", "candidate": None, "val_acc": None, "steps": None}]
    assert best_row(rows) is rows[0]  # a full-length trial beats any stopped one
    assert best_row(rows[1:]) is rows[1]  # else the best of those stopped at the most steps
    assert best_row(rows[4:]) is None


def test_seed_summary_mean_and_sample_std():
    rows = [{"status": "ok", "test_acc": a} for a in (0.5, 0.7)]
    s = seed_summary(rows + [{"status": "failed", "test_acc": None}])
    assert s["n"] == 2 and s["test_acc_mean"] == pytest.approx(0.6)
    assert s["test_acc_std"] == pytest.approx(0.1414, abs=1e-4)
    assert seed_summary([]) is None


# ----- console ----------------------------------------------------------------------------
def snap(done=0, running=1, best=None, elapsed=1.0, eta=None):
    return Snapshot(done, running, 0, best, 46000.0 if best else None, elapsed, eta)


def test_plain_progress_prints_changes_and_heartbeats_never_the_same_line_twice():
    out = io.StringIO()
    d = Display(stream=out, live=False)
    d.progress(snap(elapsed=1.0))
    d.progress(snap(elapsed=1.02))  # same state, a second trial-start event: not repeated
    d.progress(snap(elapsed=1.03), heartbeat=True)  # same text at 0.1 s: not repeated
    d.progress(snap(elapsed=2.5), heartbeat=True)  # a heartbeat, later
    d.progress(snap(done=1, running=0, best=0.5, elapsed=2.6, eta=10.0))
    lines = [ln.split("] ", 1)[1] for ln in out.getvalue().splitlines()]
    assert len(lines) == 3 and len(set(lines)) == 3
    assert "elapsed 0m02.5s" in lines[1]
    assert "best val 50.00%" in lines[2] and "ETA 0m10.0s" in lines[2]


def test_status_text_without_limit_has_no_eta():
    assert "ETA" not in status_text(snap()) and "best val -" in status_text(snap())


def test_status_text_says_where_the_running_trials_are():
    one = Snapshot(0, 1, 0, None, None, 1.0, at_steps=((300, 842),))
    assert "running 1 (at step 300/842), failed 0" in status_text(one)
    many = Snapshot(0, 5, 0, None, None, 1.0, at_steps=tuple((i, 9) for i in range(5)))
    assert "running 5 (at steps 0/9, 1/9, 2/9, 3/9, +1)," in status_text(many)


# ----- the runner, inline -----------------------------------------------------------------
def test_inline_run_stores_rows_writes_final_and_resumes_with_nothing_left(tmp_path):
    out = io.StringIO()
    runner = run_experiment(spec(tmp_path), inline=True, display=Display(stream=out, live=False))
    rows = runner.rows()
    assert len(rows) == 2 and {r["status"] for r in rows} == {"ok"}
    assert sorted(json.loads(r["candidate"])["w_bits"][1] for r in rows) == [2, 8]
    for r in rows:  # the trial's own CPU time (one thread): not the process's since it began
        assert 0 < json.loads(r["metrics"])["cpu_seconds"] <= 2 * r["wall_seconds"] + 1
    final = json.loads((runner.out / "final.json").read_text())
    assert final["budget_ratio"] <= 1.0 and "best:" in out.getvalue()
    again = resume_experiment(runner.out, inline=True, display=Display(stream=io.StringIO()))
    assert len(again.rows()) == 2  # nothing re-run


def test_the_final_line_gives_a_seed_spread_only_for_several_seeds(tmp_path):
    for seeds, words in ((2, " (std, n=2)"), (1, " (1 seed: no spread)")):
        out = io.StringIO()
        run_experiment(spec(tmp_path / str(seeds), trials=1, final_seeds=seeds,
                            final_train={"steps": 4, "batch_size": 32}),
                       inline=True, display=Display(stream=out, live=False))
        (line,) = [ln for ln in out.getvalue().splitlines() if "final: test accuracy" in ln]
        assert line.endswith(words) and ("+-" in line) == (seeds > 1), line


def test_a_final_retrain_another_experiment_of_the_recipe_made_is_reused(tmp_path):
    """Two experiments that differ only in search settings pick the same candidate: the
    second reuses the first's stored seeds and trains only the seed it lacks; a different
    final recipe (or a directory elsewhere) shares nothing."""
    final = {"steps": 4, "batch_size": 32}
    quiet = Display(stream=io.StringIO())
    first = run_experiment(spec(tmp_path, out=str(tmp_path / "r" / "a"), trials=1,
                                strategy_kwargs={"bits": [2]}, final_seeds=2,
                                final_train=final), inline=True, display=quiet)
    out = io.StringIO()
    second = run_experiment(spec(tmp_path, out=str(tmp_path / "r" / "b"), trials=1,
                                 strategy_kwargs={"bits": [2]}, final_seeds=3, final_train=final,
                                 train={"steps": 8, "batch_size": 32}),
                            inline=True, display=Display(stream=out, live=False))
    assert "seed offsets 0, 1 retrained before by a" in out.getvalue()
    assert "retraining the chosen candidate at 6KB with 1 seed (" in out.getvalue()

    def finals(runner) -> dict[int, dict]:
        return {r["seed"]: r for r in ResultsStore(runner.out).rows if r["stage"] == "final"}

    made, got = finals(first), finals(second)
    assert sorted(got) == [0, 1, 2] and {r["status"] for r in got.values()} == {"ok"}
    for seed in (0, 1):
        assert json.loads(got[seed]["metrics"])["reused_from"] == \
            f"a/{made[seed]['trial_id']}"
        assert (got[seed]["test_acc"], got[seed]["val_acc"], got[seed]["candidate"]) == \
            (made[seed]["test_acc"], made[seed]["val_acc"], made[seed]["candidate"])
    assert "reused_from" not in json.loads(got[2]["metrics"])  # trained here
    other = run_experiment(spec(tmp_path, out=str(tmp_path / "r" / "c"), trials=1,
                                strategy_kwargs={"bits": [2]}, final_seeds=1,
                                final_train={"steps": 6, "batch_size": 32}),
                           inline=True, display=quiet)
    assert not any("reused_from" in r["metrics"] for r in finals(other).values())


class StopAtFirstReport:
    """Wraps a strategy: every trial is asked to stop at its first intermediate report."""

    def __init__(self, inner):
        self.inner, self.asked = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def should_stop(self, trial_id, metrics):
        self.asked.append((trial_id, metrics["step"]))
        return True


def test_inline_stop_request_ends_the_trial_at_that_evaluation(tmp_path):
    s = spec(tmp_path, trials=1)
    (tmp_path / "exp").mkdir()
    base = Runner(s, tmp_path / "exp", inline=True, display=Display(stream=io.StringIO()))
    runner = Runner(s, tmp_path / "exp", inline=True, strategy=StopAtFirstReport(base.strategy),
                    display=Display(stream=io.StringIO()))
    execute(runner, 1, "stop")
    (row,) = ResultsStore(tmp_path / "exp").rows
    assert row["status"] == "stopped" and json.loads(row["metrics"])["steps"] == 4
    assert json.loads(row["metrics"])["cpu_seconds"] > 0  # from the last intermediate report
    assert runner.strategy.asked == [(row["trial_id"], 4)]


def test_snapshot_shows_each_running_trials_last_reported_step(tmp_path):
    s, seen = spec(tmp_path, trials=1), []
    (tmp_path / "exp").mkdir()
    base = Runner(s, tmp_path / "exp", inline=True, display=Display(stream=io.StringIO()))

    class Watch(StopAtFirstReport):
        def should_stop(self, trial_id, metrics):
            seen.append(runner.snapshot().at_steps)
            return False

    runner = Runner(s, tmp_path / "exp", inline=True, strategy=Watch(base.strategy),
                    display=Display(stream=io.StringIO()))
    execute(runner, 1, "watch")
    # evaluations every 4 of 12 steps; the last goes out as the final report instead
    assert seen == [((4, 12),), ((8, 12),)]
    assert runner.snapshot().at_steps == ()  # nothing running


def test_eta_counts_this_stages_trials_not_the_time_before_them(tmp_path):
    s, seen = spec(tmp_path), []  # two trials
    (tmp_path / "exp").mkdir()
    base = Runner(s, tmp_path / "exp", inline=True, display=Display(stream=io.StringIO()))

    class Watch(StopAtFirstReport):
        def should_stop(self, trial_id, metrics):
            seen.append(runner.snapshot())
            return False

    runner = Runner(s, tmp_path / "exp", inline=True, strategy=Watch(base.strategy),
                    display=Display(stream=io.StringIO()))
    runner.t0 -= 1000.0  # as if a supernet had trained for 1000 s before these trials
    execute(runner, 2, "eta")
    second = [snap for snap in seen if snap.done == 1]
    assert second and all(snap.elapsed_s > 1000 and snap.eta_s < 100 for snap in second)


def test_eta_counts_steps_when_the_trials_differ_in_length(tmp_path):
    s, seen = spec(tmp_path), []  # two trials of 12 steps, reporting every 4

    class Longer(StopAtFirstReport):  # as if a 96-step trial came after them
        def should_stop(self, trial_id, metrics):
            seen.append(runner.snapshot())
            return False

        def expected_steps(self):
            return 2 * 12 + 96

    (tmp_path / "exp").mkdir()
    base = Runner(s, tmp_path / "exp", inline=True, display=Display(stream=io.StringIO()))
    runner = Runner(s, tmp_path / "exp", inline=True, strategy=Longer(base.strategy),
                    display=Display(stream=io.StringIO()))
    runner.first_start = time.time() - 100.0  # this stage's trials began 100 s ago
    execute(runner, 2, "eta")
    # second trial at step 4: 16 steps done, 104 left -> 6.5x the stage's time (100 s and
    # the seconds these tiny trials took); counting trials would say 1x
    (at4,) = [snap for snap in seen if snap.done == 1 and snap.at_steps == ((4, 12),)]
    assert 650 <= at4.eta_s < 800


def test_a_resumed_trial_counts_the_cpu_time_before_its_restart(tmp_path):
    s = spec(tmp_path, trials=1)
    config = Runner(s, tmp_path, inline=True, display=Display(stream=io.StringIO())).suggest("t")
    states = []
    run_trial(config, report=lambda m, state_fn=None: states.append(state_fn()), restored=None)
    first = states[0]["cpu_seconds"]  # the step-4 checkpoint
    assert first > 0
    final = run_trial(config, report=lambda m, state_fn=None: False,
                      restored={**states[0], "cpu_seconds": first + 100.0})
    assert final["status"] == "ok" and final["cpu_seconds"] > first + 100.0


def test_wall_seconds_count_the_running_spans_not_the_pauses(tmp_path):
    """A trial HyperBand pauses and resumes is charged for the time it ran, not the time it
    sat paused; a scheduler that ends it while paused leaves its last report to stand."""
    (tmp_path / "exp").mkdir()
    runner = Runner(spec(tmp_path, trials=1), tmp_path / "exp", inline=True,
                    display=Display(stream=io.StringIO()))
    now = iter([100.0, 103.0, 500.0, 502.0])  # start, pause, resume, end
    runner.running.clock = lambda: next(now)
    runner.suggest("t")
    runner.started_trial("t")
    runner.on_result("t", {"step": 4, "val_acc": 0.5, "final": False})
    for _ in range(3):  # the executor says so at every step while the trial is paused
        runner.paused_trial("t")
    runner.started_trial("t")
    runner.started_trial("t")  # e.g. an actor reused: the running span goes on
    runner.complete("t", None, error=False)
    (row,) = runner.rows()
    assert row["status"] == "stopped" and row["wall_seconds"] == 5.0


RAY_STOP = textwrap.dedent("""
    import io, json, sys
    from pathlib import Path
    from qsearch.console import Display
    from qsearch.runner import Runner, connect, execute
    from qsearch.spec import Spec
    from qsearch.store import ResultsStore

    class Stopper:
        def __init__(self, inner):
            self.inner = inner
        def __getattr__(self, name):
            return getattr(self.inner, name)
        def should_stop(self, trial_id, metrics):
            return True

    out = Path(sys.argv[1])
    out.mkdir()
    spec = Spec(**json.loads(sys.argv[2]))
    quiet = Display(stream=io.StringIO())
    inner = Runner(spec, out, display=quiet).strategy
    runner = Runner(spec, out, strategy=Stopper(inner), display=quiet)
    connect(runner)
    execute(runner, 1, "stop")
    (row,) = ResultsStore(out).rows
    print(json.dumps({"status": row["status"], "steps": json.loads(row["metrics"])["steps"]}))
""")


def test_stop_request_reaches_a_ray_tune_trial(tmp_path):
    s = spec(tmp_path, trials=1, train={"steps": 40, "batch_size": 32, "eval_every_steps": 4})
    r = subprocess.run([sys.executable, "-c", RAY_STOP, str(tmp_path / "exp"),
                        json.dumps(s.to_dict())], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # the stop is read after the next report at the latest: step 4 or 8 of 40
    assert got["status"] == "stopped" and got["steps"] in (4, 8)


def test_time_budget_ends_the_sitting_between_trials_and_resume_extends_it(tmp_path):
    s = spec(tmp_path, trials=3, time_budget="0.5s", strategy_kwargs={"bits": [1, 2, 8]},
             train={"steps": 60, "batch_size": 32, "eval_every_steps": 30})
    out = io.StringIO()
    runner = run_experiment(s, inline=True, display=Display(stream=out, live=False))
    assert len(runner.rows()) < 3 and "time budget 0.5s reached" in out.getvalue()
    assert "no trial succeeded" not in out.getvalue()
    again = resume_experiment(runner.out, overrides={"time_budget": "10m"}, inline=True,
                              display=Display(stream=io.StringIO()))
    rows = again.rows()
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    assert sorted(json.loads(r["candidate"])["w_bits"][1] for r in rows) == [1, 2, 8]
