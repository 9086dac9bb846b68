"""The Ray Tune adapter, the only module that knows Ray (imported by :mod:`qsearch.runner`).

- :func:`trial_fn`, the function trainable: :func:`qsearch.trial.run_trial` with Tune's
  reports, checkpoints (at each evaluation, and between evaluations every
  ``checkpoint_every_s`` of the trial config) and stop requests.
- A ``Searcher`` (suggest -> ``Runner.suggest``, on_trial_complete -> ``Runner.complete``)
  and a ``Callback`` (trial starts and pauses, intermediate results, checkpoints, errors)
  around a :class:`~qsearch.runner.Runner`.
- :func:`fit` builds the ``Tuner``; :func:`init_ray` starts embedded local Ray or joins the
  cluster at ``--address``.

Stop requests: when the runner decides a trial should stop (``Runner.on_result``), it posts
the trial id to a small actor on the driver's node (:class:`StopBoard`); the trial reads it
after each report and its task ends at that evaluation with what it has (status ``stopped``
in the store).

A trial of several workers (``workers_per_trial``) runs as a Ray Train ``TorchTrainer``
inside the Tune trial: :mod:`qsearch.ray_train`, the one other module that knows Ray.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qsearch import QSearchError
from qsearch.files import RAY_LOG_FILE
from qsearch.strategy import FINISHED
from qsearch.trial import load_state, run_trial, save_state, scalar_metrics

if TYPE_CHECKING:
    from qsearch.runner import Runner
    from qsearch.spec import Spec

NAMESPACE = "qsearch"


# ----- the trainable --------------------------------------------------------------------
def trial_fn(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: run one trial and report its result (a trial of several
    workers: drive its TorchTrainer, which reports)."""
    import ray
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    if config["spec"].get("workers_per_trial", 1) > 1:
        from qsearch.ray_train import fit_trial

        return fit_trial(config, board=ray.get_actor(config["train_board"], namespace=NAMESPACE),
                         trial_id=trial_id, storage=config["train_storage"])
    board = ray.get_actor(config["stop_board"], namespace=NAMESPACE)
    ckpt = tune.get_checkpoint()
    restored = (load_state(ckpt.to_directory()) if ckpt else None) or load_state(
        config.get("resume_from"))

    def report(metrics: dict, state_fn=None) -> bool:
        # a checkpoint between evaluations has no accuracy; Tune wants its metric in each
        metrics = {"val_acc": float("nan"), **scalar_metrics(metrics), "final": False}
        if state_fn is None:
            tune.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as d:
                save_state(state_fn(), d)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        try:
            return ray.get(board.requested.remote(trial_id), timeout=30)
        except (ray.exceptions.RayError, TimeoutError):  # no board: no stop request
            return False

    final = run_trial(config, report=report, restored=restored,
                      node=ray.util.get_node_ip_address(),
                      checkpoint_every_s=config.get("checkpoint_every_s"))
    tune.report(final)


class StopBoard:
    """Trial ids whose stop the runner requested; a trial reads it after each report. Runs
    as a small actor on the driver's node (data-parallel trials read their own board,
    :class:`qsearch.ray_train.TrainBoard`)."""

    def __init__(self):
        self.ids: set[str] = set()

    def stop(self, trial_id: str) -> None:
        self.ids.add(trial_id)

    def requested(self, trial_id: str) -> bool:
        return trial_id in self.ids


# ----- searcher and callback around a Runner --------------------------------------------
def _searcher(runner: Runner):
    from ray.tune.search import Searcher

    class StrategySearcher(Searcher):
        """suggest -> Runner.suggest, on_trial_complete -> Runner.complete."""

        def __init__(self):
            super().__init__(metric="val_acc", mode="max")

        def suggest(self, trial_id: str):
            config = runner.suggest(trial_id)
            if config is None or config == FINISHED:
                return Searcher.FINISHED if config == FINISHED else None
            return {**config, **names, "train_storage": train_storage}

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
            runner.complete(trial_id, result, error)

        def save(self, checkpoint_path: str) -> None:  # the runner's state is in state.json
            pass

        def restore(self, checkpoint_path: str) -> None:
            pass

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex[:12]
    train_storage = str((runner.out / "train").resolve())  # Ray Train runs (several workers)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    names, boards = {"stop_board": f"stop-{token}"}, [StopBoard]
    if runner.spec.workers_per_trial > 1:
        from qsearch.ray_train import TrainBoard

        names["train_board"], boards = f"train-{token}", [StopBoard, TrainBoard]
    actors = [ray.remote(num_cpus=0)(cls).options(name=name, namespace=NAMESPACE,
                                                  scheduling_strategy=here).remote()
              for cls, name in zip(boards, names.values(), strict=True)]
    return StrategySearcher(), actors


def _callback(runner: Runner, board, train_board=None):
    from ray import tune

    class RunnerCallback(tune.Callback):
        """Trial starts, results, checkpoints and errors, from the driver."""

        def on_trial_start(self, iteration, trials, trial, **info):
            runner.started_trial(trial.trial_id)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("checkpoint_path"):  # a data-parallel trial's (Ray Train's)
                runner.checkpointed(trial.trial_id, result["checkpoint_path"])
            stop = not result.get("final") and runner.on_result(trial.trial_id, result)
            if stop:
                board.stop.remote(trial.trial_id)
            if "report_key" in result:  # a data-parallel trial's rank 0 waits for this
                train_board.saw.remote(trial.trial_id, result["report_key"], bool(stop))

        def on_step_end(self, iteration, trials, **info):
            # Tune has no pause hook: a trial HyperBand paused, or one waiting for a retry,
            # shows as PAUSED or PENDING until it starts again (on_trial_start)
            for trial in trials:
                if trial.status in (trial.PAUSED, trial.PENDING):
                    runner.paused_trial(trial.trial_id)
            runner.tick()

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            runner.checkpointed(trial.trial_id, checkpoint.path)

        def on_trial_error(self, iteration, trials, trial, **info):
            runner.errored(trial.trial_id, _error_text(trial))

        def on_trial_recover(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            saved = trial.checkpoint or last.get("checkpoint_path")
            runner.recovering(trial.trial_id, last.get("node_ip") or "?",
                              last.get("step") if saved else None)

    return RunnerCallback()


def _error_text(trial) -> str:
    """The last line of a failed trial's error file (Ray writes it before telling us)."""
    with contextlib.suppress(OSError, TypeError):
        lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
        if lines:
            return lines[-1][:500]
    return "trial raised (see error.txt in its directory under tune/)"


# ----- running --------------------------------------------------------------------------
def fit(runner: Runner, num_samples: int, run_name: str) -> None:
    """Run up to ``num_samples`` trials of ``runner`` with Ray Tune."""
    import ray
    from ray import tune

    spec = runner.spec
    trainable = tune.with_resources(trial_fn, {"cpu": spec.cpus_per_trial,
                                               "gpu": spec.gpus_per_trial})
    if spec.workers_per_trial > 1:
        from qsearch import ray_train

        # the trial drives a TorchTrainer whose workers hold the CPUs and GPUs; its actor is
        # not reused, as its cleanup ends the Train run (see ray_train)
        trainable = tune.with_resources(ray_train.driver_trainable(trial_fn),
                                        ray_train.DRIVER_RESOURCES)
    concurrency = spec.concurrency or _trials_that_fit(spec, ray.cluster_resources())
    searcher, boards = _searcher(runner)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=num_samples,
                                    scheduler=_scheduler(runner.schedule),
                                    max_concurrent_trials=concurrency,
                                    reuse_actors=spec.workers_per_trial == 1,
                                    time_budget_s=runner.remaining_s()),
        run_config=tune.RunConfig(
            name=run_name, storage_path=str((runner.out / "tune").resolve()), verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[_callback(runner, *boards)]),
    )
    with _interrupt_passed_on():
        try:
            with _ray_output_to(runner.out / RAY_LOG_FILE) as console:
                runner.display.use_stream(console)
                tuner.fit()
        finally:
            runner.display.use_stream(sys.stdout)
            for board in boards:
                ray.kill(board)


@contextlib.contextmanager
def _interrupt_passed_on():
    """Raise KeyboardInterrupt after a run that Ctrl-C ended, so the caller stops too (a
    recipe does not go on to its next experiment). Tune catches the first SIGINT itself,
    ends the run gracefully and returns normally, putting back the handler it found; so
    that handler in place after the run means the run was interrupted. The handler is
    restored either way."""
    watch = threading.current_thread() is threading.main_thread() and \
        os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"
    before = signal.getsignal(signal.SIGINT) if watch else None
    try:
        yield
    finally:
        interrupted = watch and signal.getsignal(signal.SIGINT) is before
        if watch:
            signal.signal(signal.SIGINT, before)
    if interrupted:
        raise KeyboardInterrupt


def _trials_that_fit(spec: Spec, cluster: dict) -> int:
    """Default concurrency: trials the cluster's CPUs (and GPUs, when trials use them)
    hold at once; four per GPU at 0.25 GPU per trial."""
    n, (cpus, gpus) = 1, (spec.cpus_per_trial, spec.gpus_per_trial)
    if spec.workers_per_trial > 1:
        n, (cpus, gpus) = spec.workers_per_trial, spec.worker_resources()
    fit = cluster.get("CPU", 1) // (n * cpus)
    if gpus > 0:
        fit = min(fit, cluster.get("GPU", 0) // (n * gpus))
    return max(1, int(fit))


def _scheduler(schedule: dict | None):
    """Ray Tune's own ``ASHAScheduler`` / ``HyperBandScheduler`` on the rung ladder of
    :func:`qsearch.schedule.scheduler_settings`: time is the reports' ``fidelity``, in units
    of the first rung, so rung k is at ``reduction_factor**k`` units. None: FIFO."""
    if schedule is None:
        return None
    from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler

    common = dict(time_attr="fidelity", metric="val_acc", mode="max",
                  max_t=schedule["max_t"], reduction_factor=schedule["reduction_factor"])
    if schedule["scheduler"] == "asha":
        return ASHAScheduler(grace_period=1, brackets=1, **common)
    return HyperBandScheduler(**common)


@contextlib.contextmanager
def _ray_output_to(path: Path):
    """Ray's own driver-side output (warnings, a lost node's raylet log dump) goes to a log
    file: file descriptors 1 and 2 point there meanwhile. Yields a stream on the console
    for our own progress and messages."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    console = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with open(path, "a") as log:
        for fd in saved:
            os.dup2(log.fileno(), fd)
        try:
            yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            console.close()


def init_ray(address: str | None, out: Path) -> None:
    """Embedded local Ray (session files in the system temp dir) or a cluster at ``address``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Tune's own experiment state (every trial so far, rewritten whole) is not what a resume
    # reads (state.json is): Tune's "auto" period (>= 10 s, <= 5% of the time), not every 1 s
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "auto")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("SB3_LOGDIR", str(out.resolve() / "sb3"))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # Train V2 (the default in Ray 2.60)
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
    """Something answers at ``address`` and speaks gRPC (HTTP/2), as Ray's GCS does: an
    HTTP/2 client preface must be answered by a SETTINGS frame within ``timeout`` seconds.
    Without this check ``ray.init`` retries a non-Ray server for minutes."""
    import socket

    host, _, port = address.rpartition(":")
    fix = "start it with `ray start --head`, or omit --address for local Ray"
    try:
        with socket.create_connection((host or address, int(port or 6379)),
                                      timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            head = sock.recv(9)
    except (OSError, ValueError) as e:
        raise QSearchError(f"Ray cluster at --address {address[:80]!r} is unreachable ({e}): "
                           f"{fix}") from None
    if len(head) < 4 or head[3] != 4:
        raise QSearchError(f"--address {address[:80]!r} answers, but not as a Ray cluster (no "
                           f"gRPC handshake within {timeout:.0f} s): give the head node's GCS "
                           f"address (host:port, port 6379 by default), or {fix}")


def check_resources(spec: Spec) -> None:
    """A trial asking for more than the live nodes have would wait forever: refuse it. A
    trial of N workers needs N worker slots, on one node or spread over several."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes)
    if spec.workers_per_trial == 1:
        cpus, gpus = spec.cpus_per_trial, spec.gpus_per_trial
        if any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
            return
        raise QSearchError(f"a trial asks for {cpus:g} CPU and {gpus:g} GPU but no node of "
                           f"the cluster has that (nodes: {have or 'none'}): lower "
                           "--cpus-per-trial / --gpus-per-trial, or add a node that has them")
    workers, (cpus, gpus) = spec.workers_per_trial, spec.worker_resources()
    slots = sum(int(min(n.get("CPU", 0) // cpus,
                        n.get("GPU", 0) // gpus if gpus else math.inf)) for n in nodes)
    if slots >= workers:
        return
    raise QSearchError(f"a trial of {workers} workers asks for {cpus:g} CPU and {gpus:g} GPU "
                       f"per worker but the cluster holds {slots} such workers (nodes: "
                       f"{have or 'none'}): lower --workers-per-trial / --cpus-per-worker / "
                       "--gpus-per-worker, or add nodes that have them")
