"""The Ray Tune runner: every trial of every strategy is a Ray Tune trial.

- :class:`StrategySearcher` adapts any :class:`~qsearch.strategy.Strategy` into a Tune
  ``Searcher`` (suggest -> ask, on_trial_complete -> tell) and persists the strategy's
  state as JSON in ``<out>/state.json`` after every ask and tell.
- :func:`trial_fn` is the function trainable: it runs the proposal's task and reports
  validation accuracy, costs and timings; intermediate reports carry trial checkpoints.
- :func:`run_experiment` / :func:`resume_experiment` drive a search: embedded local Ray by
  default, an existing cluster with ``address``. Results go to the Parquet store as each
  trial completes.

Resume never unpickles anything: the spec, the strategy state and the store are plain
files. Trials in flight when the driver died are run again under their original ids,
from their last trial checkpoint when one was written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsearch import QSearchError
from qsearch.budget import Budget, format_cost, parse_budget
from qsearch.candidate import Candidate
from qsearch.candidate import bit_summary
from qsearch.space import SearchSpace
from qsearch.spec import Spec, space_from_spec
from qsearch.store import ResultsStore
from qsearch.strategy import (
    FINISHED,
    GridStrategy,
    Proposal,
    Result,
    Strategy,
    create_strategy,
)

PROXY_REFERENCE = (8, 0.5)  # auto proxy: the size of the 8-bit model at width 0.5
# the progress line repeats at least this often (seconds) while trials run
HEARTBEAT_S = float(os.environ.get("QSEARCH_PROGRESS_EVERY", "60"))
STATE_FILE, SPEC_FILE, LOCK_FILE = "state.json", "spec.json", ".lock"


# ----- spec -> space, budgets -----------------------------------------------------------
@dataclass(frozen=True)
class Budgets:
    target: Budget
    search: Budget
    reason: str | None  # why a proxy is used (None: the search runs at the target)


def plan_budgets(spec: Spec, space: SearchSpace) -> Budgets:
    """The search budget: the target, or a proxy when the target is too large to train.

    Auto rule: search trials train at most the size of the family's 8-bit model at width
    0.5 (DualPrecision ran its grid at the 0.25x 8-bit size; 0.5x keeps short CPU trials
    meaningful). A larger target is searched at that proxy and the winner is re-aligned.
    """
    target = parse_budget(spec.budget)
    space.align(space.candidate(min(space.bit_choices)), target)  # errors if below minimum
    if spec.proxy_budget in (None, "none", "off"):
        return Budgets(target, target, None)
    if spec.proxy_budget == "auto":
        bits, width = PROXY_REFERENCE
        ref = space.cost(space.candidate(bits, width=width), target.kind)
        if target.value <= ref:
            return Budgets(target, target, None)
        return Budgets(target, Budget(target.kind, ref),
                       f"target {target} is larger than the auto proxy limit (the {bits}-bit "
                       f"{space.model} at width {width}); set --proxy-budget to change it")
    proxy = parse_budget(spec.proxy_budget)
    if proxy.kind != target.kind:
        raise QSearchError(f"proxy budget {spec.proxy_budget!r} is a {proxy.kind} budget but "
                           f"the target {spec.budget!r} is a {target.kind} budget: use one kind")
    if proxy.value > target.value:
        raise QSearchError(f"proxy budget {spec.proxy_budget} exceeds the target "
                           f"{spec.budget}: a proxy must be smaller")
    space.align(space.candidate(min(space.bit_choices)), proxy)
    return Budgets(target, proxy, "set by --proxy-budget")


DATA_KEYS = ("root", "val_fraction", "train_fraction")


def validate_run_settings(spec: Spec, *, load_data: bool = True) -> None:
    """Training and data settings are checked on the driver, before anything is written."""
    from qsearch.train import TrainConfig

    TrainConfig.from_dict({**spec.train, "seed": spec.seed})
    TrainConfig.from_dict({**spec.final_train, "seed": spec.seed})
    unknown = sorted(set(spec.data) - set(DATA_KEYS))
    if unknown:
        raise QSearchError(f"unknown data settings {unknown}: valid ones are "
                           f"{', '.join(DATA_KEYS)}")
    if load_data and spec.dataset in ("fashion-mnist", "cifar10", "cifar100", "synthetic"):
        from qsearch.data import load_dataset

        load_dataset(spec.dataset, **spec.data)


# ----- the trainable --------------------------------------------------------------------
def _save_state(state: dict, directory: str) -> None:
    import torch

    torch.save(state, os.path.join(directory, "state.pt"))


def _load_state(directory: str | None) -> dict | None:
    import torch

    path = os.path.join(directory, "state.pt") if directory else None
    if not path or not os.path.exists(path):
        return None
    return torch.load(path, weights_only=True)


def trial_fn(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: run one proposal's task and report its result."""
    import ray
    import torch
    from ray import tune

    from qsearch.tasks import TaskContext, get_task
    from qsearch.train import set_threads

    start = time.perf_counter()
    spec = Spec.from_dict(config["spec"])
    set_threads(max(1, int(spec.cpus_per_trial)))
    space = space_from_spec(spec)
    proposal = Proposal.from_dict(config["proposal"])
    use_gpu = spec.gpus_per_trial > 0 and torch.cuda.is_available()
    ckpt = tune.get_checkpoint()
    restored = (_load_state(ckpt.to_directory()) if ckpt else None) or _load_state(
        config.get("resume_from"))

    def report(metrics: dict, state_fn=None) -> bool:
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        if state_fn is None:
            tune.report({**metrics, "final": False})
            return False
        with tempfile.TemporaryDirectory() as d:
            _save_state(state_fn(), d)
            tune.report({**metrics, "final": False},
                        checkpoint=tune.Checkpoint.from_directory(d))
        return False

    ctx = TaskContext(space=space, proposal=proposal, budget=parse_budget(config["budget"]),
                      train=dict(config.get("train") or spec.train), data=dict(spec.data),
                      seed=spec.seed + int(config.get("seed_offset", 0)),
                      device="cuda" if use_gpu else "cpu", report=report, restored=restored,
                      trials_per_node=int((os.cpu_count() or 1) // spec.cpus_per_trial))
    result = get_task(proposal.task)(ctx)
    tune.report({
        "final": True, "status": result.status, "val_acc": _float(result.val_acc),
        "candidate": result.candidate.to_json() if result.candidate else "",
        "metrics_json": json.dumps(result.metrics, default=float),
        "error": result.error or "", "node": ray.util.get_node_ip_address(),
        "task_wall_seconds": time.perf_counter() - start,
    })


def _float(x) -> float:
    return float("nan") if x is None else float(x)


def result_from_report(report: dict | None, error: bool) -> Result:
    if error or not report or not report.get("final"):
        return Result("failed", error="trial raised")
    cand = Candidate.from_json(report["candidate"]) if report.get("candidate") else None
    acc = float(report["val_acc"])
    status = report["status"] if math.isfinite(acc) or report["status"] != "ok" else "diverged"
    return Result(status, acc, cand, json.loads(report["metrics_json"]),
                  report.get("error") or None)


# ----- the searcher adapter -------------------------------------------------------------
class StateFile:
    """``<out>/state.json``: strategy state, trials in flight, counters. Written atomically."""

    def __init__(self, out: Path, stage: str = "search"):
        self.path = out / (STATE_FILE if stage == "search" else f"state-{stage}.json")

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


def _searcher_class():
    from ray.tune.search import Searcher

    class StrategySearcher(Searcher):
        """suggest -> Strategy.ask, on_trial_complete -> Strategy.tell; state in JSON."""

        def __init__(self, runner: Runner):
            super().__init__(metric="val_acc", mode="max")
            self.runner = runner

        def suggest(self, trial_id: str):
            return self.runner.suggest(trial_id)

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
            self.runner.complete(trial_id, result, error)

        def save(self, checkpoint_path: str) -> None:  # our state lives in state.json
            pass

        def restore(self, checkpoint_path: str) -> None:
            pass

    return StrategySearcher


def _callback_class():
    from ray import tune

    class Progress(tune.Callback):
        """Store rows and a live progress line, from the driver."""

        def __init__(self, runner: Runner):
            self.runner = runner

        def on_trial_start(self, iteration, trials, trial, **info):
            self.runner.started[trial.trial_id] = time.time()
            self.runner.progress()

        def on_step_end(self, iteration, trials, **info):
            if time.time() - self.runner.last_progress >= HEARTBEAT_S:
                self.runner.progress()

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            self.runner.checkpoints[trial.trial_id] = checkpoint.path

        def on_trial_error(self, iteration, trials, trial, **info):
            self.runner.errored(trial.trial_id, _error_text(trial))

    return Progress


def _error_text(trial) -> str:
    """The last line of a failed trial's error file (Ray writes it before telling us)."""
    with contextlib.suppress(OSError, TypeError):
        lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
        if lines:
            return lines[-1][:500]
    return "trial raised (see error.txt in its directory under tune/)"


class FinalRetrain(GridStrategy):
    """The final stage: the chosen candidate at the target budget, retrained once per seed
    with the shared final recipe and evaluated on the test split."""

    name = "final"

    def __init__(self, space: SearchSpace, budget: Budget, *, candidate: Candidate,
                 seeds: int, seed: int = 0):
        super().__init__(space, budget, seed=seed)
        self.candidate, self.cells = candidate, list(range(seeds))

    def propose(self, offset: int) -> Proposal:
        return Proposal(self.candidate, params={"seed_offset": offset, "test": True})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "candidate": self.candidate.to_dict()}


class Runner:
    """Drives one stage of an experiment directory: strategy, searcher, store, progress.

    The search stage runs the spec's strategy at the search budget; the final stage runs
    :class:`FinalRetrain` at the target budget with ``spec.final_train``.
    """

    def __init__(self, spec: Spec, out: Path, *, stage: str = "search",
                 strategy: Strategy | None = None, state: dict | None = None,
                 quiet: bool = False):
        self.spec, self.out, self.stage, self.quiet = spec, out, stage, quiet
        self.space = space_from_spec(spec)
        self.budgets = plan_budgets(spec, self.space)
        if stage == "final":
            self.budgets = Budgets(self.budgets.target, self.budgets.target, None)
        self.train = spec.final_train if stage == "final" else spec.train
        self.strategy = strategy or create_strategy(
            spec.strategy, self.space, self.budgets.search, seed=spec.seed,
            **spec.strategy_kwargs)
        self.strategy.max_trials = spec.trials
        self.store = ResultsStore(out)
        self.state_file = StateFile(out, stage)
        self.live: dict[str, dict] = {}  # trial id -> {"index", "proposal", "origin"}
        self.replay: list[tuple[str, dict]] = []  # trials to run again after a resume
        self.checkpoints: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.awaiting_error: dict[str, tuple[dict, float]] = {}
        self.next_index = 0
        self.t0 = self.last_progress = time.time()
        self.experiment_id = spec.name or out.name
        if state:
            self.strategy.load_state_dict(state["strategy"])
            self.next_index = state["next_index"]
            self.replay = sorted(state["live"].items(), key=lambda kv: kv[1]["index"])
            self.checkpoints = state.get("checkpoints", {})

    # Searcher side
    def suggest(self, trial_id: str):
        if self.replay:
            origin, entry = self.replay.pop(0)
            self.live[trial_id] = {**entry, "origin": origin}
            return self._config(entry, resume_from=self.checkpoints.get(origin))
        proposal = self.strategy.ask(trial_id)
        if proposal is None:
            return None
        if proposal == FINISHED:
            from ray.tune.search import Searcher

            return Searcher.FINISHED
        entry = {"index": self.next_index, "proposal": proposal.to_dict(), "origin": trial_id}
        self.next_index += 1
        self.live[trial_id] = entry
        self.save_state()
        return self._config(entry)

    def _config(self, entry: dict, resume_from: str | None = None) -> dict:
        return {"spec": self.spec.to_dict(), "proposal": entry["proposal"],
                "train": self.train, "budget": _budget_text(self.budgets.search),
                "resume_from": resume_from,
                "seed_offset": entry["proposal"]["params"].get("seed_offset", 0)}

    def complete(self, trial_id: str, report: dict | None, error: bool) -> None:
        """A trial ended (searcher side): tell the strategy, store the row. A trial that
        raised is stored by ``errored``, which Ray calls next with its error text."""
        entry = self.live.pop(trial_id)
        result = result_from_report(report, error)
        self.strategy.tell(entry["origin"], result)
        wall = time.time() - self.started.get(trial_id, time.time())
        if error:
            self.awaiting_error[trial_id] = (entry, wall)
        else:
            self.store.append(self._row(entry, result, report or {}, wall))
        self.save_state()
        self.progress()

    def errored(self, trial_id: str, message: str) -> None:
        entry, wall = self.awaiting_error.pop(trial_id)
        self.store.append(self._row(entry, Result("failed", error=message), {}, wall))
        self.progress()

    def _row(self, entry: dict, result: Result, report: dict, wall: float) -> dict:
        cand, m = result.candidate, result.metrics
        return {
            "experiment_id": self.experiment_id, "trial_id": entry["origin"],
            "trial_index": entry["index"], "stage": self.stage,
            "strategy": self.spec.strategy, "task": entry["proposal"]["task"],
            "model": self.spec.model, "dataset": self.spec.dataset,
            "budget": self.spec.budget, "budget_kind": self.budgets.target.kind,
            "budget_value": self.budgets.target.value,
            "proxy_budget": _budget_text(self.budgets.search),
            "candidate": cand.to_json() if cand else None,
            "width": cand.width if cand else None,
            "c_size": self.space.c_size(cand) if cand else None,
            "bitops": self.space.bitops(cand) if cand else None,
            "budget_ratio": (self.space.cost(cand, self.budgets.search.kind)
                             / self.budgets.search.value) if cand else None,
            "val_acc": result.val_acc, "test_acc": m.get("test_acc"),
            "train_seconds": m.get("train_seconds"), "wall_seconds": wall,
            "node": report.get("node"), "status": result.status, "error": result.error,
            "seed": self.spec.seed + int(entry["proposal"]["params"].get("seed_offset", 0)),
            "spec_hash": self.spec.hash(), "metrics": m,
            "finished_at": time.time(),
        }

    def save_state(self) -> None:
        self.state_file.save({
            "strategy": self.strategy.state_dict(), "next_index": self.next_index,
            "live": {e["origin"]: {"index": e["index"], "proposal": e["proposal"]}
                     for e in list(self.live.values())}
            | {origin: e for origin, e in self.replay},
            "checkpoints": self.checkpoints})

    # display
    def rows(self) -> list[dict]:
        return [r for r in self.store.rows if r["stage"] == self.stage]

    def best(self) -> dict | None:
        ok = [r for r in self.rows() if r["status"] == "ok" and r["candidate"]
              and r["val_acc"] is not None and math.isfinite(r["val_acc"])]
        return max(ok, key=lambda r: r["val_acc"]) if ok else None

    def progress(self) -> None:
        if self.quiet:
            return
        rows = self.rows()
        failed = sum(r["status"] != "ok" for r in rows)
        best = self.best()
        best_txt = (f"best val {best['val_acc']:.2%} at {format_cost(best['c_size'], 'size')}"
                    if best else "best val -")
        self.last_progress = time.time()
        elapsed = self.last_progress - self.t0
        mem = f" | driver rss {_rss_mib()} MiB" if os.environ.get("QSEARCH_MEMORY_LOG") else ""
        print(f"[{time.strftime('%H:%M:%S')}] trials done {len(rows) - failed}, running "
              f"{len(self.live)}, failed {failed} | {best_txt} | elapsed "
              f"{int(elapsed // 60)}m{int(elapsed % 60):02d}s{mem}", flush=True)


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) // 1024 for ln in f if ln.startswith("VmRSS"))


def _budget_text(b: Budget) -> str:
    return f"{b.value!r}{'bits' if b.kind == 'size' else 'bitops'}"


# ----- driving an experiment ------------------------------------------------------------
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


def _check_out(out: Path) -> None:
    """The output directory can be created and written (checked without creating it)."""
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise QSearchError(f"output directory {str(out)!r} is not writable ({parent} is "
                           "not a writable directory): choose another --out")


def init_ray(address: str | None, out: Path) -> None:
    """Embedded local Ray (session files in the system temp dir) or a cluster at ``address``."""
    import logging

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("SB3_LOGDIR", str(out.resolve() / "sb3"))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(logging_level=logging.ERROR, log_to_driver=False,
                  include_dashboard=False, configure_logging=True)
    if address:
        _check_reachable(address)
        ray.init(address=address, **kwargs)
    else:
        tmp = Path(tempfile.gettempdir()) / f"qsearch-ray-{os.getuid()}"
        ray.init(_temp_dir=str(tmp), **kwargs)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or address, int(port or 6379)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise QSearchError(f"Ray cluster at --address {address!r} is unreachable ({e}): start "
                           "it with `ray start --head`, or omit --address for local Ray") from None


def _fit(runner: Runner, num_samples: int, run_name: str) -> None:
    from ray import tune

    spec = runner.spec
    resources = {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial}
    concurrency = spec.concurrency or _default_concurrency(spec)
    tuner = tune.Tuner(
        tune.with_resources(trial_fn, resources),
        tune_config=tune.TuneConfig(
            search_alg=_searcher_class()(runner), num_samples=num_samples,
            max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(
            name=run_name, storage_path=str((runner.out / "tune").resolve()), verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[_callback_class()(runner)]),
    )
    with _quiet_stderr(runner.out / "ray-driver.log"):
        tuner.fit()


def _default_concurrency(spec: Spec) -> int:
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, int(cpus // spec.cpus_per_trial))


@contextlib.contextmanager
def _quiet_stderr(path: Path):
    """Send Ray's own driver-side noise to a log file; our progress goes to stdout."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_experiment(spec: Spec) -> Runner:
    out = Path(spec.out or f"runs/{spec.strategy}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_out(out)
    if (out / SPEC_FILE).exists():
        raise QSearchError(f"{out} already holds an experiment: `qsearch resume {out}` to "
                           "continue it, or choose another --out")
    validate_run_settings(spec)  # everything is checked before anything is written
    runner = Runner(spec, out)
    init_ray(spec.address, out)
    with _lock(out):
        if (out / SPEC_FILE).exists():
            raise QSearchError(f"{out} was just claimed by another qsearch run: choose "
                               "another --out")
        (out / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
        runner.save_state()
        return _drive(runner, resumed=False)


def resume_experiment(out: Path) -> Runner:
    out = Path(out)
    spec_path = out / SPEC_FILE
    if not spec_path.exists():
        raise QSearchError(f"{str(out)!r} is not a qsearch experiment (no {SPEC_FILE}): give "
                           "the --out directory of a `qsearch run`")
    try:
        spec = Spec.from_dict(json.loads(spec_path.read_text()), source=str(spec_path))
    except json.JSONDecodeError:
        raise QSearchError(f"{spec_path} is corrupted: the experiment cannot resume") from None
    with _lock(out):
        state = StateFile(out).load()
        validate_run_settings(spec)
        runner = Runner(spec, out, state=state)
        init_ray(spec.address, out)
        return _drive(runner, resumed=True)


def _drive(runner: Runner, *, resumed: bool) -> Runner:
    spec, b = runner.spec, runner.budgets
    say = print
    say(f"qsearch: {spec.strategy} on {spec.model}/{spec.dataset}, budget {b.target}"
        f" ({spec.trials} trials max, output {runner.out})")
    if b.reason:
        say(f"proxy: searching at {b.search} because {b.reason}; the winner is re-aligned "
            f"to {b.target}")
    done = len(runner.rows())
    remaining = spec.trials - done
    if resumed:
        say(f"resume: {done} trials already stored, {len(runner.replay)} to run again, "
            f"strategy state restored")
    if remaining > 0:
        _fit(runner, remaining, f"{runner.stage}-{_runs_so_far(runner.out)}")
    summarize(runner)
    if spec.final_seeds:
        run_final(runner)
    return runner


def _runs_so_far(out: Path) -> int:
    return len(list((out / "tune").glob("*"))) if (out / "tune").exists() else 0


def run_final(search: Runner) -> Runner | None:
    """Retrain the chosen candidate at the target budget with ``final_seeds`` seeds."""
    spec, out = search.spec, search.out
    state = StateFile(out, "final").load()
    if state:
        cand = Candidate.from_dict(state["strategy"]["candidate"])
    else:
        found = final_candidate(search)
        if found is None:
            return None
        cand = found[1]
    strategy = FinalRetrain(search.space, search.budgets.target, candidate=cand,
                            seeds=spec.final_seeds, seed=spec.seed)
    final = Runner(spec, out, stage="final", strategy=strategy, state=state)
    final.save_state()
    print(f"final: retraining the chosen candidate at {final.budgets.target} with "
          f"{spec.final_seeds} seeds ({json.dumps(spec.final_train)})")
    remaining = spec.final_seeds - len(final.rows())
    if remaining > 0:
        _fit(final, remaining, f"final-{_runs_so_far(out)}")
    accs = [r["test_acc"] for r in final.rows() if r["status"] == "ok" and r["test_acc"]]
    if accs:
        import numpy as np

        std = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        print(f"final: test accuracy {np.mean(accs):.2%} +- {std:.2%} (n={len(accs)})")
        path = out / "final.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        record.update(test_acc_mean=float(np.mean(accs)), test_acc_std=std, n=len(accs))
        path.write_text(json.dumps(record, indent=2))
    return final


def dry_run(spec: Spec) -> None:
    """Print the planned trials, budgets and the cost of each planned candidate; no Ray,
    no training, nothing written. Adaptive strategies show their first proposals (made
    before any result is known)."""
    space = space_from_spec(spec)
    validate_run_settings(spec, load_data=False)
    b = plan_budgets(spec, space)
    strategy = create_strategy(spec.strategy, space, b.search, seed=spec.seed,
                               **spec.strategy_kwargs)
    print(f"plan: {spec.strategy} on {spec.model}/{spec.dataset}, target {b.target}, search "
          f"at {b.search}{' (proxy: ' + b.reason + ')' if b.reason else ''}, up to "
          f"{spec.trials} trials of {json.dumps(spec.train)}")
    for i in range(spec.trials):
        p = strategy.ask(f"dry-{i}")
        if p is None or p == FINISHED:
            more = "then waits for results" if p is None else "then finished"
            print(f"  ... {more}")
            break
        if p.candidate is None:
            print(f"  {i:>3} task {p.task}: {json.dumps(p.params)[:80]}")
            continue
        c = p.candidate
        print(f"  {i:>3} task {p.task}: bits {bit_summary(c.w_bits, space)}, width {c.width:.4g}, "
              f"C_size {format_cost(space.c_size(c), 'size')}, BitOPs "
              f"{format_cost(space.bitops(c), 'bitops')}, "
              f"{space.cost(c, b.search.kind) / b.search.value:.2%} of {b.search}")
    if spec.final_seeds:
        print(f"  final: best candidate re-aligned to {b.target}, retrained with "
              f"{spec.final_seeds} seeds ({json.dumps(spec.final_train)}), test accuracy")


def final_candidate(runner: Runner) -> tuple[dict, Candidate, float] | None:
    """The best trial, and its bits re-aligned to the target budget."""
    best = runner.best()
    if best is None:
        return None
    cand = Candidate.from_json(best["candidate"])
    aligned = runner.space.align(cand, runner.budgets.target)
    return best, aligned.candidate, aligned.cost


def summarize(runner: Runner) -> None:
    b = runner.budgets
    summary = runner.strategy.summary()
    (runner.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    found = final_candidate(runner)
    rows = runner.rows()
    print(f"done: {len(rows)} trials ({sum(r['status'] != 'ok' for r in rows)} failed) in "
          f"{time.time() - runner.t0:.0f}s; results in {runner.out / 'results.parquet'}")
    if text := runner.strategy.summary_text():
        print(text)
    if found is None:
        print("no trial succeeded: see the errors with `qsearch results "
              f"{runner.out}`")
        return
    best, cand, cost = found
    space = runner.space
    print(f"best: {best['strategy']} trial {best['trial_index']} val acc "
          f"{best['val_acc']:.2%} at {format_cost(best['c_size'], 'size')} "
          f"(width {best['width']:.4g}, search budget {b.search})")
    where = f"re-aligned to the target {b.target}" if b.reason else f"at the budget {b.target}"
    print(f"final candidate {where}: width {cand.width:.4g}, C_size "
          f"{format_cost(space.c_size(cand), 'size')} ({space.c_size(cand):.6g} bits, "
          f"{cost / b.target.value:.2%} of the budget), BitOPs "
          f"{format_cost(space.bitops(cand), 'bitops')}")
    print(f"bits per layer: {bit_summary(cand.w_bits, space)}")
    (runner.out / "final.json").write_text(json.dumps({
        "candidate": cand.to_dict(), "c_size": space.c_size(cand),
        "bitops": space.bitops(cand), "target": str(b.target), "search_budget": str(b.search),
        "budget_ratio": cost / b.target.value, "search_val_acc": best["val_acc"],
        "trial_id": best["trial_id"]}, indent=2))
