"""Driving an experiment directory: start, resume, the final stage, the dry run.

Everything is checked before anything is written; one process at a time drives a
directory (a lock file). Trials run through :func:`qsearch.runner.execute`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from qsearch import QSearchError
from qsearch.console import Display, plan_lines, start_lines, summary_lines
from qsearch.files import FINAL_FILE, LOCK_FILE, RESULTS_FILE, SPEC_FILE, SUMMARY_FILE
from qsearch.final import FinalRetrain, final_candidate, seed_summary
from qsearch.planning import check_writable, plan_budgets, validate_run_settings
from qsearch.runner import Runner, StateFile, connect, execute, failed_count
from qsearch.schedule import rung_counts
from qsearch.spec import RUN_SETTINGS, Spec, read_spec, space_from_spec
from qsearch.strategy import create_strategy

RESUME_OVERRIDES = RUN_SETTINGS  # where and how trials run, not what they search


def run_experiment(spec: Spec, *, inline: bool = False,
                   display: Display | None = None) -> Runner:
    """Start a new experiment in ``spec.out`` (default ``runs/<strategy>-<time>``)."""
    out = _out_dir(spec)
    if (out / SPEC_FILE).exists():
        raise QSearchError(f"{out} already holds an experiment: `qsearch resume {out}` to "
                           "continue it, or choose another --out")
    validate_run_settings(spec)
    runner = Runner(spec, out, inline=inline, display=display)
    connect(runner)
    with _lock(out):
        if (out / SPEC_FILE).exists():
            raise QSearchError(f"{out} was just claimed by another qsearch run: choose "
                               "another --out")
        (out / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
        runner.save_state()
        return _drive(runner, resumed=False)


def resume_experiment(out: Path, *, overrides: dict | None = None, inline: bool = False,
                      display: Display | None = None) -> Runner:
    """Continue the experiment in ``out`` after its driver stopped. ``overrides`` may change
    where and how it runs (address, resources, workers, retries: ``RUN_SETTINGS``), not
    what it searches."""
    out = Path(out)
    spec_path = out / SPEC_FILE
    if not spec_path.exists():
        raise QSearchError(f"{str(out)!r} is not a qsearch experiment (no {SPEC_FILE}): give "
                           "the --out directory of a `qsearch run`")
    spec = read_spec(spec_path)
    changed = sorted(set(overrides or {}) - set(RESUME_OVERRIDES))
    if changed:
        raise QSearchError(f"a resumed experiment cannot change {changed}: only "
                           f"{', '.join(RESUME_OVERRIDES)} (start a new experiment instead)")
    spec = spec.replace(**(overrides or {}))  # Spec.hash excludes these: results unchanged
    with _lock(out):
        state = StateFile(out).load()
        validate_run_settings(spec)
        runner = Runner(spec, out, state=state, inline=inline, display=display)
        connect(runner)
        return _drive(runner, resumed=True)


def _drive(runner: Runner, *, resumed: bool) -> Runner:
    spec, say = runner.spec, runner.display.say
    for line in start_lines(spec, runner.budgets, runner.out):
        say(line)
    done = len(runner.rows())
    if resumed:
        say(f"resume: {done} trials already stored, {len(runner.replay)} to run again, "
            f"strategy state restored")
    try:
        if spec.trials - done > 0:
            execute(runner, spec.trials - done, f"{runner.stage}-{_runs_so_far(runner.out)}")
    finally:
        runner.display.close()
    if runner.remaining_s() == 0:
        left = runner.unfinished()
        say(f"time budget {spec.time_budget} reached: {left} trials cut short (kept with "
            f"their last checkpoint, if any) and up to "
            f"{max(0, spec.trials - len(runner.rows()) - left)} not started: "
            f"`qsearch resume {runner.out} --time-budget 30m` continues")
    summarize(runner)
    if spec.final_seeds and runner.remaining_s() != 0:
        run_final(runner)
    return runner


def _runs_so_far(out: Path) -> int:
    return len(list((out / "tune").glob("*"))) if (out / "tune").exists() else 0


def summarize(runner: Runner) -> None:
    """Write ``summary.json`` and ``final.json``; print the end-of-run summary."""
    say, b, out = runner.display.say, runner.budgets, runner.out
    (out / SUMMARY_FILE).write_text(json.dumps(runner.strategy.summary(), indent=2,
                                               default=float))
    rows = runner.rows()
    failed = failed_count(rows)
    say(f"done: {len(rows)} trials ({failed} failed) in "
        f"{time.time() - runner.t0:.0f}s; results in {out / RESULTS_FILE}")
    if runner.schedule:
        say(rung_counts(rows, runner.schedule))
    if text := runner.strategy.summary_text():
        say(text)
    found = final_candidate(rows, runner.space, b.target)
    if found is None:
        say(f"no trial finished yet: `qsearch resume {out}` continues" if runner.unfinished()
            else f"no trial succeeded: see the errors with `qsearch results {out}`")
        return
    best, cand, cost = found
    for line in summary_lines(best, cand, cost, runner.space, b):
        say(line)
    space = runner.space
    (out / FINAL_FILE).write_text(json.dumps({
        "candidate": cand.to_dict(), "c_size": space.c_size(cand),
        "bitops": space.bitops(cand), "target": str(b.target), "search_budget": str(b.search),
        "budget_ratio": cost / b.target.value, "search_val_acc": best["val_acc"],
        "trial_id": best["trial_id"]}, indent=2))


def run_final(search: Runner) -> Runner | None:
    """Retrain the chosen candidate at the target budget with ``final_seeds`` seeds."""
    spec, out = search.spec, search.out
    state = StateFile(out, "final").load()
    if state:
        cand = FinalRetrain.candidate_from_state(state["strategy"])
    else:
        found = final_candidate(search.rows(), search.space, search.budgets.target)
        if found is None:
            return None
        cand = found[1]
    strategy = FinalRetrain(search.space, search.budgets.target, candidate=cand,
                            seeds=spec.final_seeds, seed=spec.seed)
    final = Runner(spec, out, stage="final", strategy=strategy, state=state,
                   inline=search.inline, display=search.display)
    final.save_state()
    say = final.display.say
    say(f"final: retraining the chosen candidate at {final.budgets.target} with "
        f"{spec.final_seeds} seeds ({json.dumps(spec.final_train)})")
    remaining = spec.final_seeds - len(final.rows())
    try:
        if remaining > 0:
            execute(final, remaining, f"final-{_runs_so_far(out)}")
    finally:
        final.display.close()
    stats = seed_summary(final.rows())
    if stats:
        say(f"final: test accuracy {stats['test_acc_mean']:.2%} +- {stats['test_acc_std']:.2%}"
            f" (n={stats['n']})")
        path = out / FINAL_FILE
        record = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**record, **stats}, indent=2))
    return final


def dry_run(spec: Spec) -> None:
    """Print the planned trials, budgets and the cost of each planned candidate; no Ray,
    no training, nothing written. It runs every check a real run does before it writes,
    except those that need the dataset's files or the Ray cluster."""
    validate_run_settings(spec, load_data=False)
    _out_dir(spec)
    space = space_from_spec(spec)
    b = plan_budgets(spec, space)
    strategy = create_strategy(spec.strategy, space, b.search, seed=spec.seed,
                               **spec.strategy_kwargs)
    print("\n".join(plan_lines(spec, space, b, strategy)))


@contextlib.contextmanager
def _lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise QSearchError(f"another qsearch process is running in {out}: wait for it, or "
                           "use another --out") from None
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _out_dir(spec: Spec) -> Path:
    """The experiment directory (default ``runs/<strategy>-<time>``), checked writable."""
    out = Path(spec.out or f"runs/{spec.strategy}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_writable(out, directory=True, what="output directory", flag="--out",
                   example="runs/exp1")
    return out
