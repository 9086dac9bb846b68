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
from qsearch.evaluator import SupernetTraining, TopK, cached_info
from qsearch.files import FINAL_FILE, LOCK_FILE, RESULTS_FILE, SPEC_FILE, SUMMARY_FILE
from qsearch.final import FinalRetrain, earlier_retrains, final_candidate, reuse_line, seed_summary
from qsearch.planning import check_writable, plan_budgets, validate_run_settings
from qsearch.runner import Runner, StateFile, connect, execute, failed_count
from qsearch.schedule import rung_counts
from qsearch.spec import RUN_SETTINGS, Spec, read_spec, space_from_spec
from qsearch.store import ResultsStore
from qsearch.strategy import create_strategy

RESUME_OVERRIDES = RUN_SETTINGS  # where and how trials run, not what they search


class ExperimentBusy(QSearchError):
    """Another process drives the experiment (holds its lock, or just claimed it)."""


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
            raise ExperimentBusy(f"{out} was just claimed by another qsearch run: choose "
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
    stored, spec = spec, spec.replace(**(overrides or {}))  # Spec.hash excludes these
    with _lock(out):
        state = StateFile(out).load()
        validate_run_settings(spec)
        runner = Runner(spec, out, state=state, inline=inline, display=display)
        now = [f"{k} {_setting(getattr(stored, k))} -> {_setting(getattr(spec, k))}"
               for k in RESUME_OVERRIDES if getattr(stored, k) != getattr(spec, k)]
        if now:
            runner.display.say(f"resume: now with {', '.join(now)}")
        connect(runner)
        return _drive(runner, resumed=True)


def _setting(value) -> str:
    return "default" if value is None else str(value)


def _drive(runner: Runner, *, resumed: bool) -> Runner:
    spec, say = runner.spec, runner.display.say
    for line in start_lines(spec, runner.budgets, runner.out):
        say(line)
    done = len(runner.rows())
    if resumed:
        say(f"resume: {done} trials already stored, {len(runner.replay)} to run again, "
            f"strategy state restored")
    if runner.supernet_dir:
        runner.start_clock()  # the supernet's training counts against this sitting's time
        if not run_supernet(runner):
            return runner
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
    chosen = run_top_k(runner) if runner.supernet_dir and runner.remaining_s() != 0 \
        else runner
    if spec.final_seeds and runner.remaining_s() != 0:
        run_final(chosen)
    return runner


def _stage(search: Runner, stage: str, strategy, what: str, *, state: dict | None = None,
           own_clock: bool = False) -> Runner:
    """Run the stage ``stage`` of the experiment to its end (or this sitting's time; the
    final stage has a time budget of its own: ``own_clock``). ``state``: the stage's saved
    state, when the caller has read it already."""
    state = state if state is not None else StateFile(search.out, stage).load()
    runner = Runner(search.spec, search.out, stage=stage, strategy=strategy, state=state,
                    inline=search.inline, display=search.display)
    if not own_clock:
        runner.deadline = search.deadline  # one time budget for the sitting's stages
    runner.save_state()
    runner.display.say(what)
    left = (runner.strategy.expected_trials() or 0) - len(runner.rows())
    try:
        if left > 0:
            execute(runner, left, f"{stage}-{_runs_so_far(search.out)}")
    finally:
        runner.display.close()
    return runner


def run_supernet(search: Runner) -> bool:
    """Train the search's supernet, unless the cache has it; False if it is not ready. Only
    one process trains a supernet: another that needs it meanwhile gets ``ExperimentBusy``
    (a recipe skips that experiment; a resume later reuses the supernet)."""
    directory = search.supernet_dir
    say = search.display.say
    info = cached_info(directory)
    if info is None:
        with _lock(directory, busy=f"another qsearch process is training the supernet "
                   f"{directory}: when it is done, `qsearch resume {search.out}` reuses it"):
            info = cached_info(directory) or _train_supernet(search, directory)
        if info is None:
            return False
    else:
        say(f"supernet: reusing {directory}")
    uniform = ", ".join(f"{k[8:]} {v:.2%}" for k, v in info.items() if k.startswith("val_acc_"))
    say(f"supernet: trained {info['steps']} steps in {info['train_seconds'] / 60:.1f} min; "
        f"uniform candidates cut out of it: {uniform} val acc")
    return True


def _train_supernet(search: Runner, directory: Path) -> dict | None:
    """The supernet stage; the cache record, or None (said why) if there is none yet."""
    spec, say = search.spec, search.display.say
    strategy = SupernetTraining(search.space, search.budgets.search,
                                directory=str(directory), seed=spec.seed)
    stage = _stage(search, "supernet", strategy, f"supernet: training the weight-sharing "
                   f"network at {search.budgets.search} ({json.dumps(spec.supernet_train)}) "
                   f"into {directory}")
    search.store = ResultsStore(search.out)  # with the stage's row: the search appends
    info = cached_info(directory)
    if info is None and stage.unfinished():
        search.blocked = "supernet"
        say(f"supernet: training did not finish: `qsearch resume {search.out}` continues")
    elif info is None:
        errors = "; ".join(str(r["error"]) for r in stage.rows())
        say(f"supernet: training failed ({errors[:300]}): nothing to search with")
    return info


def run_top_k(search: Runner) -> Runner:
    """Retrain the candidates the supernet ranked first, stand-alone; summarise them."""
    spec = search.spec
    strategy = TopK(search.space, search.budgets.search, rows=search.rows(), k=spec.top_k,
                    seed=spec.seed)
    runner = _stage(search, "topk", strategy, f"top-k: retraining the {len(strategy.cells)} "
                    "best candidates by supernet accuracy stand-alone "
                    f"({json.dumps(spec.train)})")
    summarize(runner)
    spent = {stage: [r["wall_seconds"] or 0.0 for r in runner.store.rows if r["stage"] == stage]
             for stage in ("supernet", "search", "topk")}
    trained = f"{sum(spent['supernet']) / 60:.1f} min" if spent["supernet"] else \
        "reused from the cache (0 min here)"
    kept = sum(json.loads(r["metrics"] or "{}").get("eval_cached", False)
               for r in runner.store.rows if r["stage"] == "search")
    runner.display.say(f"search cost (trial wall time): supernet {trained}, "
                       f"{len(spent['search'])} evaluations ({kept} of them repeats looked up) "
                       f"{sum(spent['search']) / 60:.1f} min, "
                       f"{len(spent['topk'])} retrains {sum(spent['topk']) / 60:.1f} min")
    return runner


def _runs_so_far(out: Path) -> int:
    return len(list((out / "tune").glob("*"))) if (out / "tune").exists() else 0


def summarize(runner: Runner) -> None:
    """Write ``summary.json`` and ``final.json``; print the end-of-run summary."""
    say, b, out = runner.display.say, runner.budgets, runner.out
    if runner.stage == "search":
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
    reuse = earlier_retrains(out, spec, cand, spec.final_seeds)
    strategy = FinalRetrain(search.space, search.budgets.target, candidate=cand,
                            seeds=spec.final_seeds, seed=spec.seed, reuse=reuse)
    if reuse:
        search.display.say(reuse_line(reuse))
    n = spec.final_seeds - len(reuse)
    final = _stage(search, "final", strategy, f"final: retraining the chosen candidate at "
                   f"{search.budgets.target} with {n} seed{'s' * (n != 1)} "
                   f"({json.dumps(spec.final_train)})", state=state, own_clock=True)
    say = final.display.say
    stats = seed_summary(final.rows())
    if stats:
        spread = f" +- {stats['test_acc_std']:.2%} (std, n={stats['n']})" if stats["n"] > 1 \
            else " (1 seed: no spread)"
        say(f"final: test accuracy {stats['test_acc_mean']:.2%}{spread}")
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
def _lock(out: Path, busy: str | None = None):
    """Hold ``out``'s lock file, or raise ``ExperimentBusy`` (with ``busy`` as its message)."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ExperimentBusy(busy or f"another qsearch process is running in {out}: wait for "
                             "it, or use another --out") from None
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
