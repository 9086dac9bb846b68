"""Data-parallel trials: a Ray Train ``TorchTrainer`` inside a Tune trial, the pattern Ray
documents for Train V2 with Tune. Imported only by :mod:`qsearch.ray_tune`.

A trial of ``workers_per_trial`` N > 1 workers: the Tune function trainable is the Train
driver; it starts a ``TorchTrainer`` of N workers (gloo on CPU, NCCL on GPU, each with the
spec's per-worker CPUs and GPUs) and waits for it. Every worker runs the trial's task
(:func:`qsearch.trial.run_trial`) with its :class:`~qsearch.parallel.Shard`, through the one
training loop; rank 0 evaluates and reports, with a checkpoint of the training state at each
report. Ray Train's ``TuneReportCallback`` hands rank 0's reports to Tune with the path of
their checkpoint, which the runner records as the trial's checkpoint.

Faults: a lost worker (or its node) makes Ray Train restart the worker group from the run's
last checkpoint (``FailureConfig(max_failures)``, waiting for resources when the cluster
shrank); a lost driver makes Tune retry the trial, whose new ``TorchTrainer`` (same run
name and storage) resumes from the same checkpoint; a resumed experiment replays the trial
from the checkpoint path the runner recorded.

Stop requests: Tune hands a Train report over asynchronously, so rank 0 waits until the
runner has seen its report (the callback in :mod:`qsearch.ray_tune` marks each report key,
with the runner's answer to it, on the :class:`TrainBoard`) before going on;
:func:`qsearch.train.train` then gives rank 0's answer to every worker.

Trials Tune ends from outside (a rung scheduler, the time budget): Tune stops the trial's
actor, which owns the Train run. Killed with it, the run would leave its placement group
holding the workers' CPUs and GPUs until the search ends, so the actor's cleanup first ends
the run: it marks the trial ended on the :class:`TrainBoard`, rank 0 stops at its next
report, and the workers shut down as for a finished run (:func:`driver_trainable`).
"""

from __future__ import annotations

import itertools
import logging
import math
import tempfile
import threading
import time
import uuid
from typing import Any

# The driver only waits on its Train run: it holds no CPU (a CPU share would keep the last
# worker slot of a node empty), and runs on the head node (Ray's name for its resource), the
# node least likely to go, so a lost worker node never takes a Train run's driver with it.
DRIVER_RESOURCES = {"node:__internal_head__": 0.001}
ANSWER_TIMEOUT_S = 120.0  # rank 0 goes on (no stop) if the runner has not seen a report
END_TIMEOUT_S = 300.0  # how long a stopped trial's actor waits for its Train run to end
_RUNS: dict[str, tuple[Any, threading.Event]] = {}  # trial id -> (train board, run ended)


class TrainBoard:
    """What data-parallel trials need beside a stop request, kept by a small actor on the
    driver's node: the report keys the runner has seen, with its answer (stop or not), and
    the trials Tune ended (their Train runs end at their next report)."""

    def __init__(self):
        self.seen: set[tuple[str, str]] = set()
        self.stopped: set[str] = set()  # a stop request holds for the trial's later reports
        self.gone: set[str] = set()

    def saw(self, trial_id: str, key: str, stop: bool) -> None:
        self.seen.add((trial_id, key))
        if stop:
            self.stopped.add(trial_id)

    def answer(self, trial_id: str, key: str) -> bool | None:
        """None until report ``key`` was seen, then whether the trial should stop."""
        if trial_id in self.gone:
            return True
        return trial_id in self.stopped if (trial_id, key) in self.seen else None

    def end(self, trial_id: str) -> None:
        self.gone.add(trial_id)

    def ended(self, trial_id: str) -> bool:
        return trial_id in self.gone


def driver_trainable(trial_fn):
    """The Tune trainable of data-parallel trials: ``trial_fn`` whose cleanup, when Tune
    stops the trial, first ends its Train run (see the module notes)."""
    from ray.tune.trainable import wrap_function

    class TrainDriver(wrap_function(trial_fn)):
        def cleanup(self):
            # this class travels to the actor by value, end_run by reference: the registry
            # it reads is the one of the actor's process
            end_run(self.trial_id)
            super().cleanup()

    return TrainDriver


def end_run(trial_id: str) -> None:
    """End the Train run of ``trial_id`` if it runs in this process: mark the trial ended
    on the board (rank 0 stops at its next report) and wait for the workers to shut down."""
    board, ended = _RUNS.get(trial_id, (None, None))
    if ended is None or ended.is_set():
        return
    board.end.remote(trial_id)
    if not ended.wait(END_TIMEOUT_S):
        logging.getLogger(__name__).warning("the Train run of trial %s did not end within "
                                            "%.0f s", trial_id, END_TIMEOUT_S)


def fit_trial(config: dict[str, Any], *, board, trial_id: str, storage: str) -> None:
    """Run the trial of ``config`` as a TorchTrainer to its end (the Tune trial's body).
    ``board`` is the :class:`TrainBoard` actor's handle; the Train run is
    ``storage/trial_id``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from qsearch.spec import Spec

    spec = Spec.from_dict(config["spec"])
    cpus, gpus = spec.worker_resources()
    per_worker = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    ended = threading.Event()
    _RUNS[trial_id] = (board, ended)
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={**config, "board": board, "trial_id": trial_id},
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=spec.workers_per_trial,
                                               use_gpu=gpus > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()]),
    )
    try:
        trainer.fit()
    finally:
        _RUNS.pop(trial_id, None)
        ended.set()


def worker_fn(config: dict[str, Any]) -> None:
    """Ray Train's loop per worker: this rank's share of the trial's task."""
    import ray
    import ray.train
    import torch

    from qsearch.parallel import Shard
    from qsearch.trial import load_state, run_trial

    context = ray.train.get_context()
    device = "cpu"
    if ray.get_gpu_ids():
        from ray.train.torch import get_device

        device = str(get_device())
        torch.cuda.set_device(device)
    shard = Shard(context.get_world_rank(), context.get_world_size(), device)
    checkpoint = ray.train.get_checkpoint()  # this run's last (after a restart or a retry)
    restored = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restored = load_state(directory)
    # the trial's node: where its workers ran, e.g. "10.0.0.5,10.0.0.6"
    nodes = ",".join(sorted(set(shard.gather(ray.util.get_node_ip_address()))))
    final = run_trial(config, report=_reporter(config, shard),
                      restored=restored or load_state(config.get("resume_from")), node=nodes,
                      checkpoint_every_s=config.get("checkpoint_every_s"),
                      shard=shard, device=device)
    # a trial Tune ended reads no more reports: one more would block the Train run's end
    if not shard.agree(shard.lead and _ended(config)):
        ray.train.report(final if shard.lead else {})


def _ended(config: dict[str, Any]) -> bool:
    import ray

    try:
        return ray.get(config["board"].ended.remote(config["trial_id"]), timeout=30)
    except (ray.exceptions.RayError, TimeoutError):
        return False


def _reporter(config: dict[str, Any], shard):
    """The ``report`` of this worker's task: rank 0 reports to Tune through Ray Train, with
    a checkpoint when given a state, and returns the runner's answer; the other workers
    only keep step (Ray Train wants every worker to report as often as the others)."""
    import ray.train

    from qsearch.trial import save_state, scalar_metrics

    if not shard.lead:
        def follow(metrics: dict, state_fn=None) -> bool:
            ray.train.report({})
            return False

        return follow

    token, count = uuid.uuid4().hex[:12], itertools.count(1)

    def report(metrics: dict, state_fn=None) -> bool:
        key = f"{token}:{next(count)}"
        metrics = {"val_acc": math.nan, **scalar_metrics(metrics), "final": False,
                   "report_key": key}
        if state_fn is None:
            ray.train.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as d:
                save_state(state_fn(), d)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        return _answer(config["board"], config["trial_id"], key)

    return report


def _answer(board, trial_id: str, key: str) -> bool:
    """True when the runner asked the trial to stop, once it has seen report ``key``."""
    import ray

    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            answer = ray.get(board.answer.remote(trial_id, key), timeout=30)
        except (ray.exceptions.RayError, TimeoutError):  # no board: no stop request
            return False
        if answer is not None:
            return answer
        time.sleep(0.05)
    return False
