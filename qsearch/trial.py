"""One trial, Ray-free: run a proposal's task in this process and describe its outcome as a
*report*, the plain dict the runner stores. The Ray adapter (:mod:`qsearch.ray_tune`) wraps
:func:`run_trial` in a Tune function trainable; :func:`qsearch.runner.execute_inline` calls it
directly.

Reports: every evaluation sends an intermediate report (``final: False``, scalar metrics,
optionally a checkpointable state); the task's result is one last report with ``final: True``.
A trial whose process ended before that (a scheduler stopped it) is known by its last
intermediate report only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

from qsearch.budget import parse_budget
from qsearch.schedule import LADDER_TASKS, fidelity_reports, final_fidelity
from qsearch.spec import Spec, space_from_spec
from qsearch.strategy import Proposal, Result

# report(metrics, state_fn) -> True when the trial should stop (see TaskContext.report)
ReportFn = Callable[[dict, Callable[[], dict] | None], bool]
STATE_FILE = "state.pt"  # in a checkpoint directory


def run_trial(config: dict[str, Any], *, report: ReportFn, restored: dict | None,
              node: str = "local", checkpoint_every_s: float | None = None,
              shard=None, device: str | None = None) -> dict:
    """Run the task of ``config["proposal"]`` (a runner trial config) and return the final
    report. ``restored`` is the last checkpointed state of this trial, if any; with
    ``checkpoint_every_s`` training also reports a state between evaluations. A worker of a
    data-parallel trial passes its ``shard`` (:class:`qsearch.parallel.Shard`) and
    ``device``; it then uses the spec's per-worker resources."""
    import torch

    from qsearch.tasks import TaskContext, get_task
    from qsearch.train import Execution, set_threads

    before = restored.get("cpu_seconds", 0.0) if isinstance(restored, dict) else 0.0
    start, cpu_start = time.perf_counter(), time.process_time() - before
    report = _with_cpu_seconds(report, cpu_start) if shard is None else report
    spec = Spec.from_dict(config["spec"])
    cpus, gpus = spec.worker_resources() if shard is not None else (
        spec.cpus_per_trial, spec.gpus_per_trial)
    set_threads(max(1, int(cpus)))
    proposal = Proposal.from_dict(config["proposal"])
    min_steps = config.get("min_steps")
    on_ladder = proposal.task in LADDER_TASKS
    reused = proposal.params.get("reuse")  # the same retrain, stored by another experiment
    if reused:
        result = Result.from_dict(reused)
    else:
        use_gpu = gpus > 0 and torch.cuda.is_available()
        device = device or ("cuda" if use_gpu else "cpu")
        # trials (or workers) sharing this node's memory, or this GPU's: 4 at 0.25 GPU each
        sharing = 1 / gpus if device.startswith("cuda") else (os.cpu_count() or 1) / cpus
        ctx = TaskContext(
            space=space_from_spec(spec), proposal=proposal,
            budget=parse_budget(config["budget"]),
            train=dict(config.get("train") or spec.train), data=dict(spec.data),
            seed=spec.seed + int(config.get("seed_offset", 0)), device=device,
            restored=restored, report=fidelity_reports(report, min_steps, on_ladder),
            trials_per_node=max(1, int(sharing)), checkpoint_every_s=checkpoint_every_s,
            shard=shard, execution=Execution(bf16=spec.bf16, channels_last=spec.channels_last),
            pin_memory=spec.pin_memory, checkpoint=spec.checkpoint)
        result = get_task(proposal.task)(ctx)
    final = final_report(result, node=node, seconds=time.perf_counter() - start)
    if shard is None:
        final["cpu_seconds"] = time.process_time() - cpu_start
    return {**final, "fidelity": final_fidelity(result.fidelity, min_steps, on_ladder)}


def _with_cpu_seconds(report: ReportFn, cpu_start: float) -> ReportFn:
    """``report`` adding ``cpu_seconds``: the CPU time this trial's process has used since
    ``cpu_start`` (its threads; not data-loader worker processes). Unlike wall time it does
    not grow when other jobs share the cores, so benchmarks compare searches by it. A
    checkpointed state carries it too: a trial resumed from the state goes on counting."""

    def spent() -> float:
        return time.process_time() - cpu_start

    def send(metrics: dict, state_fn=None) -> bool:
        with_cpu = None if state_fn is None else (lambda: {**state_fn(), "cpu_seconds": spent()})
        return report({**metrics, "cpu_seconds": spent()}, with_cpu)

    return send


def save_state(state: dict, directory: str) -> None:
    """A trial's checkpoint: its training state as ``state.pt`` in ``directory``."""
    import torch

    torch.save(state, os.path.join(directory, STATE_FILE))


def load_state(directory: str | None) -> dict | None:
    """The training state of a checkpoint directory (None: no directory, or no state)."""
    import torch

    path = os.path.join(directory, STATE_FILE) if directory else None
    if not path or not os.path.exists(path):
        return None
    return torch.load(path, weights_only=True)


def scalar_metrics(metrics: dict) -> dict:
    """The metrics an intermediate report carries: scalars and strings only."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def final_report(result: Result, *, node: str, seconds: float) -> dict:
    """The last report: the whole ``Result`` as JSON, and the scalars Tune shows."""
    return {
        "final": True, "status": result.status,
        "val_acc": float("nan") if result.val_acc is None else float(result.val_acc),
        "result_json": json.dumps(result.to_dict(), default=float),
        "node": node, "task_wall_seconds": seconds, "step": result.fidelity or 0,
    }


def result_from_report(report: dict | None, error: bool,
                       proposal: Proposal | None = None) -> Result:
    """The :class:`Result` a trial's last report describes.

    A final report gives the task's result (a non-finite accuracy with status ok counts as
    diverged). An intermediate one means the trial was ended from outside after that
    evaluation (a rung scheduler: Tune marks such a result ``done`` like a finished one,
    and only the missing final report tells them apart): status ``stopped``, its accuracy
    and steps so far (the fidelity), the proposed candidate.
    """
    if error or not report:
        return Result("failed", error="trial raised")
    if not report.get("final"):
        metrics = {k: v for k, v in report.items() if k in ("step", "epoch", "val_loss")}
        acc = report.get("val_acc")
        step = report.get("step")
        return Result("stopped", float("nan") if acc is None else float(acc),
                      proposal.candidate if proposal else None, metrics,
                      fidelity=int(step) if step is not None else None)
    result = Result.from_dict(json.loads(report["result_json"]))
    if result.status == "ok" and not math.isfinite(result.val_acc):
        return dataclasses.replace(result, status="diverged")
    return result
