"""The runner core, Ray-free: one stage of an experiment directory (strategy, store, state,
progress) and the trial configs it hands out.

Any executor drives a :class:`Runner` through four calls: ``suggest(trial_id)`` for a
trial config (or None: ask later, or ``FINISHED``), ``on_result(trial_id, metrics)`` for
each intermediate report (returns True when the trial should stop), ``complete(trial_id,
report, error)`` when it ends and ``errored(trial_id, message)`` for the error text of a
trial that raised. :func:`execute` runs trials with Ray Tune (:mod:`qsearch.ray_tune`, the
only module that knows Ray) or, with ``inline=True``, one after the other in this process.

State lives in plain files (:mod:`qsearch.files`), never pickles, written when a trial ends
or checkpoints, and ``STATE_EVERY_S`` after a trial began. Trials in flight when the driver
died are run again under their original ids, from their last checkpoint if any; one begun
later than the last write is proposed again by the strategy's state from before its ask.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from qsearch import QSearchError
from qsearch.console import Display, Snapshot
from qsearch.evaluator import supernet_dir
from qsearch.files import RAY_LOG_FILE, state_file
from qsearch.final import best_row
from qsearch.planning import Budgets, budget_text, plan_budgets
from qsearch.schedule import scheduler_settings
from qsearch.spec import Spec, duration_seconds, space_from_spec
from qsearch.store import ResultsStore
from qsearch.strategy import FINISHED, Proposal, Result, Strategy, create_strategy
from qsearch.trial import result_from_report

# a running trial also saves a checkpoint this often between evaluations (seconds)
CHECKPOINT_EVERY_S = float(os.environ.get("QSEARCH_CHECKPOINT_EVERY", "60"))
# a trial that began is written to the state file when it ends, or after this many seconds
# if it runs longer: not at once, which for the strategy state of HAQ (its networks, ~6 MB of
# JSON) cost as much as a short trial's evaluation
STATE_EVERY_S = 5.0


class RunningTime:
    """The seconds each trial has run: the sum of its running spans. A trial a scheduler
    pauses and resumes later (HyperBand) is not charged for the time it sat paused, nor a
    retried trial for the time it waited for resources to come back."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.since: dict[str, float] = {}  # trial id -> start of its running span
        self.spent: dict[str, float] = {}  # trial id -> seconds of its ended spans

    def start(self, trial_id: str) -> None:
        """The trial runs (again) from now; nothing changes if it already runs."""
        if trial_id not in self.since:
            self.since[trial_id] = self.clock()

    def pause(self, trial_id: str) -> None:
        """The trial stopped running for now; nothing changes if it was not running."""
        if trial_id in self.since:
            span = self.clock() - self.since.pop(trial_id)
            self.spent[trial_id] = self.spent.get(trial_id, 0.0) + span

    def end(self, trial_id: str) -> float:
        """The trial ended: the seconds it ran, all spans together (0 if it never ran)."""
        self.pause(trial_id)
        return self.spent.pop(trial_id, 0.0)


class StateFile:
    """``<out>/state.json`` (``state-<stage>.json``): strategy state, trials in flight,
    counters. Written atomically."""

    def __init__(self, out: Path, stage: str = "search"):
        self.path = out / state_file(stage)

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError:
            raise QSearchError(f"{self.path} is corrupted; the experiment cannot resume "
                               "(start a new one with another --out)") from None

    def save(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)


class Runner:
    """Drives one stage of an experiment directory: strategy, store, state, progress.

    The search stage runs the spec's strategy at the search budget; the final stage runs
    :class:`~qsearch.final.FinalRetrain` at the target budget with ``spec.final_train``.
    """

    def __init__(self, spec: Spec, out: Path, *, stage: str = "search",
                 strategy: Strategy | None = None, state: dict | None = None,
                 display: Display | None = None, inline: bool = False):
        self.spec, self.out, self.stage, self.inline = spec, out, stage, inline
        self.display = display or Display()
        self.space = space_from_spec(spec)
        self.budgets = plan_budgets(spec, self.space)
        if stage == "final":
            self.budgets = Budgets(self.budgets.target, self.budgets.target, None)
        self.train = {"final": spec.final_train, "supernet": spec.supernet_train}.get(
            stage, spec.train)
        self.schedule = scheduler_settings(spec) if stage == "search" else None
        if self.schedule:  # evaluate (and checkpoint) exactly at the rungs
            self.train = {**self.train, "eval_steps": self.schedule["rungs"]}
        self.strategy = strategy or create_strategy(
            spec.strategy, self.space, self.budgets.search, seed=spec.seed,
            **spec.strategy_kwargs)
        self.strategy.max_trials = {"search": spec.trials, "final": spec.final_seeds}.get(stage)
        # --evaluator supernet: the search's `train` trials are evaluations of this supernet
        self.supernet_dir = supernet_dir(spec, self.space, self.budgets.search) if (
            stage == "search" and spec.evaluator == "supernet") else None
        self.store = ResultsStore(out)
        self.state_file = StateFile(out, stage)
        self.live: dict[str, dict] = {}  # trial id -> {"index", "proposal", "origin"}
        self.replay: list[tuple[str, dict]] = []  # trials to run again after a resume
        self.checkpoints: dict[str, str] = {}  # original trial id -> last checkpoint
        self.cut: dict[str, dict] = {}  # trials the time budget ended: run again on resume
        self.deadline: float | None = None
        self.blocked: str | None = None  # an earlier stage that did not finish in this sitting
        self.running = RunningTime()  # the wall_seconds of each trial
        self.awaiting_error: dict[str, tuple[dict, float]] = {}
        self.unsaved_since: float | None = None  # a trial began after the last state write
        self.next_index = 0
        self.t0 = time.time()
        self.first_start: float | None = None  # of this stage's trials in this sitting (ETA)
        self.finished_before = len(self.rows())
        self.experiment_id = spec.name or out.name
        if state:
            self.strategy.load_state_dict(state["strategy"])
            self.next_index = state["next_index"]
            self.replay = sorted(state["live"].items(), key=lambda kv: kv[1]["index"])
            self.checkpoints = state.get("checkpoints", {})

    # ----- the executor's side
    def suggest(self, trial_id: str) -> dict | None | str:
        """A trial config, None (ask again later) or ``FINISHED``."""
        if self.replay:
            origin, entry = self.replay.pop(0)
            self.live[trial_id] = {**entry, "origin": origin}
            return self._config(entry, resume_from=self.checkpoints.get(origin))
        proposal = self.strategy.ask(trial_id)
        if proposal is None or proposal == FINISHED:
            return proposal
        if self.supernet_dir and proposal.task == "train":
            proposal = dataclasses.replace(proposal, task="supernet-eval", params={
                **proposal.params, "supernet": str(self.supernet_dir)})
        elif self.stage == "search" and self.spec.trial_mode == "ptq" and \
                proposal.task == "train":  # --trial-mode ptq: quantize the checkpoint
            proposal = dataclasses.replace(proposal, task="ptq")
        entry = {"index": self.next_index, "proposal": proposal.to_dict(), "origin": trial_id}
        self.next_index += 1
        self.live[trial_id] = entry
        self.unsaved_since = self.unsaved_since or time.time()
        return self._config(entry)

    def _config(self, entry: dict, resume_from: str | None = None) -> dict:
        return {"spec": self.spec.to_dict(), "proposal": entry["proposal"],
                "train": self.train, "budget": budget_text(self.budgets.search),
                "resume_from": resume_from, "checkpoint_every_s": CHECKPOINT_EVERY_S,
                "min_steps": self.schedule["min_steps"] if self.schedule else None,
                "seed_offset": entry["proposal"]["params"].get("seed_offset", 0)}

    def started_trial(self, trial_id: str) -> None:
        """A trial started, or resumed after a pause or a failure."""
        self.running.start(trial_id)
        self.first_start = self.first_start or time.time()
        self.progress()

    def paused_trial(self, trial_id: str) -> None:
        """A trial stopped running for now (paused by a scheduler, or waiting to retry):
        the time until it starts again is not part of its ``wall_seconds``."""
        self.running.pause(trial_id)

    def on_result(self, trial_id: str, metrics: dict) -> bool:
        """An intermediate report; True when the strategy wants the trial stopped. Reports
        that only carry a checkpoint (no evaluation) are not shown to the strategy."""
        entry = self.live.get(trial_id)
        if entry:
            entry["last_report"] = metrics
        if not entry or metrics.get("checkpoint"):
            return False
        return bool(self.strategy.should_stop(entry["origin"], metrics))

    def checkpointed(self, trial_id: str, path: str) -> None:
        """A trial saved a checkpoint: a resume after a driver death starts it from there."""
        if trial_id in self.live:
            self.checkpoints[self.live[trial_id]["origin"]] = path
            self.save_state()

    def start_clock(self) -> None:
        """The time budget of this sitting starts now (``spec.time_budget``), unless an
        earlier stage of this sitting started it."""
        if self.spec.time_budget and self.deadline is None:
            self.deadline = time.time() + duration_seconds(self.spec.time_budget)

    def unfinished(self) -> int:
        """Trials begun but neither told nor stored (cut short by the time budget, or still
        in flight when the executor returned), or the whole stage when an earlier one
        (``blocked``) did not finish: a resume runs them again."""
        return len(self.live) + len(self.cut) + (self.blocked is not None)

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.time())

    def complete(self, trial_id: str, report: dict | None, error: bool) -> None:
        """A trial ended: tell the strategy, store the row. A trial that raised is stored
        by ``errored``, which the executor calls next with its error text. A trial the time
        budget cut short is neither told nor stored: a resume runs it again. A trial a
        scheduler ended while paused (HyperBand) comes without a report: its last
        intermediate one stands for it."""
        entry = self.live.pop(trial_id)
        if report is None and not error:
            report = entry.get("last_report")
        if not error and not (report or {}).get("final") and self.remaining_s() == 0:
            self.cut[trial_id] = entry
            self.save_state()
            return
        wall = self.running.end(trial_id)  # not counting the strategy's tell
        result = result_from_report(report, error, Proposal.from_dict(entry["proposal"]))
        self.strategy.tell(entry["origin"], result)
        if error:
            self.awaiting_error[trial_id] = (entry, wall)
        else:
            self.store.append(self._row(entry, result, report or {}, wall))
        self.save_state()
        self.progress()

    def recovering(self, trial_id: str, node: str, step: int | None) -> None:
        """A running trial failed (e.g. its node was lost) and will be retried."""
        entry = self.live.get(trial_id)
        where = f"from its checkpoint at step {step}" if step else "from the start"
        self.display.say(f"trial {entry['index'] if entry else trial_id} failed on node "
                         f"{node} (lost node or crashed process): retrying it {where}; "
                         f"details in {self.out / RAY_LOG_FILE}")

    def errored(self, trial_id: str, message: str) -> None:
        entry, wall = self.awaiting_error.pop(trial_id)
        self.store.append(self._row(entry, Result("failed", error=message), {}, wall))
        self.progress()

    def _row(self, entry: dict, result: Result, report: dict, wall: float) -> dict:
        cand, m = result.candidate, result.metrics
        if report.get("cpu_seconds") is not None:  # the trial process's CPU time, last report
            m = {**m, "cpu_seconds": report["cpu_seconds"]}
        search = self.budgets.search
        return {
            "experiment_id": self.experiment_id, "trial_id": entry["origin"],
            "trial_index": entry["index"], "stage": self.stage,
            "strategy": self.spec.strategy, "task": entry["proposal"]["task"],
            "model": self.spec.model, "dataset": self.spec.dataset,
            "budget": self.spec.budget, "budget_kind": self.budgets.target.kind,
            "budget_value": self.budgets.target.value, "proxy_budget": budget_text(search),
            "candidate": cand.to_json() if cand else None,
            "width": cand.width if cand else None,
            "c_size": self.space.c_size(cand) if cand else None,
            "bitops": self.space.bitops(cand) if cand else None,
            "budget_ratio": (self.space.cost(cand, search.kind) / search.value
                             if cand else None),
            "val_acc": result.val_acc, "test_acc": m.get("test_acc"),
            "train_seconds": m.get("train_seconds"), "wall_seconds": wall,
            "node": report.get("node") or report.get("node_ip"), "status": result.status,
            "error": result.error,
            "steps": result.fidelity,
            "seed": self.spec.seed + int(entry["proposal"]["params"].get("seed_offset", 0)),
            "spec_hash": self.spec.hash(), "metrics": m, "finished_at": time.time(),
        }

    def save_state(self) -> None:
        self.unsaved_since = None
        self.state_file.save({
            "strategy": self.strategy.state_dict(), "next_index": self.next_index,
            "live": {e["origin"]: {"index": e["index"], "proposal": e["proposal"]}
                     for e in [*self.live.values(), *self.cut.values()]}
            | {origin: e for origin, e in self.replay},
            "checkpoints": self.checkpoints})

    def save_unsaved(self, after_s: float = 0.0) -> None:
        """Write the state file if a trial began ``after_s`` seconds ago or more and has
        not been written since."""
        if self.unsaved_since is not None and time.time() - self.unsaved_since >= after_s:
            self.save_state()

    # ----- what the stage has produced
    def rows(self) -> list[dict]:
        return [r for r in self.store.rows if r["stage"] == self.stage]

    def best(self) -> dict | None:
        return best_row(self.rows())

    def snapshot(self) -> Snapshot:
        rows = self.rows()
        failed = failed_count(rows)
        best = self.best()
        elapsed = time.time() - self.t0
        reports = [e.get("last_report") or {} for e in self.live.values()]
        at = tuple(sorted((int(r["step"]), int(r["total_steps"])) for r in reports
                          if "step" in r and "total_steps" in r))
        return Snapshot(len(rows) - failed, len(self.live), failed,
                        best["val_acc"] if best else None, best["c_size"] if best else None,
                        elapsed, self._eta(rows, at), at)

    def _eta(self, rows: list[dict], at: tuple) -> float | None:
        """Seconds left at this sitting's pace, from this stage's own time (not an earlier
        stage's): by training steps when the strategy knows its trials' differing lengths
        (the running trials' steps so far included), else by trials."""
        own = time.time() - (self.first_start or self.t0)
        total = self.strategy.expected_steps()
        if total:
            running = sum(step for step, _ in at)
            here = sum(r.get("steps") or 0 for r in rows[self.finished_before:]) + running
            left = total - sum(r.get("steps") or 0 for r in rows) - running
        else:
            here = len(rows) - self.finished_before
            left = (self.strategy.expected_trials() or 0) - len(rows)
        return own / here * left if here > 0 and left > 0 else None

    def progress(self) -> None:
        self.display.progress(self.snapshot())

    def tick(self) -> None:
        """Called often while trials run: repeat the progress update when one is due, and
        write the state file when a trial that began ``STATE_EVERY_S`` ago is not in it."""
        self.save_unsaved(STATE_EVERY_S)
        if self.display.due():
            self.display.progress(self.snapshot(), heartbeat=True)


def failed_count(rows: list[dict]) -> int:
    """Rows of trials that failed or diverged (a stopped trial did not fail)."""
    return sum(r["status"] not in ("ok", "stopped") for r in rows)


def execute(runner: Runner, num_samples: int, run_name: str) -> None:
    """Run up to ``num_samples`` trials of ``runner``: Ray Tune, or inline."""
    runner.start_clock()
    try:
        if runner.inline:
            return execute_inline(runner, num_samples)
        from qsearch import ray_tune

        ray_tune.fit(runner, num_samples, run_name)
    finally:
        runner.save_unsaved()


def connect(runner: Runner) -> None:
    """Start or join Ray for ``runner`` (nothing to do inline)."""
    if not runner.inline:
        from qsearch import ray_tune

        ray_tune.init_ray(runner.spec.address, runner.out)
        ray_tune.check_resources(runner.spec)


def execute_inline(runner: Runner, num_samples: int) -> None:
    """Trials one after the other in this process, without Ray (debugging, tests): the
    same runner calls and trial code as under Ray Tune, no checkpoints, no retries."""
    from qsearch.trial import run_trial, scalar_metrics

    if runner.spec.workers_per_trial > 1:
        raise QSearchError(f"--workers-per-trial {runner.spec.workers_per_trial} runs each "
                           "trial as a Ray Train job: run it with Ray, not inline")
    for i in range(num_samples):
        if runner.remaining_s() == 0:  # the time budget ends the sitting between trials
            return
        trial_id = f"inline_{runner.next_index:05d}_{i}"
        config = runner.suggest(trial_id)
        if config is None or config == FINISHED:
            return
        runner.started_trial(trial_id)

        def report(metrics: dict, state_fn=None, trial_id=trial_id) -> bool:
            runner.tick()
            return runner.on_result(trial_id, {**scalar_metrics(metrics), "final": False})

        try:
            final = run_trial(config, report=report, restored=None)
        except Exception as e:  # noqa: BLE001 - stored as the trial's error, like Ray does
            runner.complete(trial_id, None, error=True)
            runner.errored(trial_id, f"{type(e).__name__}: {e}"[:500])
            continue
        runner.complete(trial_id, final, error=False)
