"""Multi-fidelity search, Ray-free: the rung ladder of a rung scheduler and what each trial
report tells it.

With ``--scheduler asha|hyperband`` Ray Tune's own ``ASHAScheduler`` (Li et al., "A System
for Massively Parallel Hyperparameter Tuning", MLSys 2020) or ``HyperBandScheduler`` (Li
et al., "Hyperband", JMLR 2018) stops or pauses trials at the rungs of a geometric ladder:
``min_steps * rf**k`` training steps, up to the trial length ``max_steps``.
(:mod:`qsearch.ray_tune` builds them from :func:`scheduler_settings`.)

The schedulers count time in *units* of ``min_steps`` (the ``fidelity`` key of every report):
HyperBand sizes its brackets from ``max_t``, and in steps its most aggressive bracket would
train a single step. Trials evaluate exactly at the rungs (``TrainConfig.eval_steps``).

Only proposals of the plain ``train`` task climb the ladder. Other tasks (FracBits' one-shot
search, MixQuant's float model and its post-training cells) report fidelity 0 throughout, so
no scheduler compares them with candidates or stops them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from qsearch import QSearchError

SCHEDULERS = ("none", "asha", "hyperband")
LADDER_TASKS = frozenset({"train"})
ReportFn = Callable[[dict, Callable[[], dict] | None], bool]


def rung_steps(min_steps: int, max_steps: int, rf: int) -> list[int]:
    """The ladder: ``min_steps * rf**k`` below ``max_steps``, then ``max_steps``."""
    rungs, k = [], 0
    while min_steps * rf**k < max_steps:
        rungs.append(min_steps * rf**k)
        k += 1
    return [*rungs, max_steps]


def default_min_steps(max_steps: int, rf: int) -> int:
    """Three rungs by default: ``max_steps / rf**2``."""
    return max(1, round(max_steps / rf**2))


def scheduler_problem(scheduler: str, train: dict[str, Any], min_steps: int | None,
                      rf: int) -> str | None:
    """What is wrong with a scheduler's settings, in one line with the fix, or None."""
    if scheduler not in SCHEDULERS:
        return (f"scheduler {scheduler!r} not known: choose one of {', '.join(SCHEDULERS)}, "
                "e.g. --scheduler asha")
    if scheduler == "none":
        return None if min_steps is None else (
            f"--min-steps {min_steps} needs a rung scheduler: add --scheduler asha (or "
            "hyperband), or drop --min-steps")
    max_steps = train.get("steps")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 2:
        return (f"--scheduler {scheduler} needs the trial length in steps (train is "
                f"{ {k: train.get(k) for k in ('steps', 'epochs') if k in train} }): give "
                "--max-steps N, e.g. --max-steps 900")
    if not isinstance(rf, int) or isinstance(rf, bool) or rf < 2:
        return f"reduction factor {rf!r}: give an integer of 2 or more, e.g. --reduction-factor 3"
    low = default_min_steps(max_steps, rf) if min_steps is None else min_steps
    if not 1 <= low < max_steps:
        return (f"--min-steps {low} with --max-steps {max_steps}: the first rung must be at "
                f"least 1 step and below the trial length, e.g. --min-steps "
                f"{default_min_steps(max_steps, rf)}")
    if scheduler == "hyperband" and rung_steps(low, max_steps, rf)[-2] * rf != max_steps:
        k = max(1, round(math.log(max_steps / low, rf)))
        return (f"hyperband rungs must end at the trial length: --max-steps {max_steps} is "
                f"not --min-steps {low} times a power of --reduction-factor {rf}; e.g. "
                f"--max-steps {low * rf**k}")
    return None


def scheduler_settings(spec) -> dict[str, Any] | None:
    """Units and rungs of ``spec``'s scheduler, or None without one."""
    if spec.scheduler == "none":
        return None
    max_steps, rf = spec.train["steps"], spec.reduction_factor
    low = spec.min_steps or default_min_steps(max_steps, rf)
    return {"scheduler": spec.scheduler, "min_steps": low, "max_steps": max_steps,
            "reduction_factor": rf, "max_t": max_steps / low,
            "rungs": rung_steps(low, max_steps, rf)}


def fidelity_reports(report: ReportFn, min_steps: int | None, on_ladder: bool) -> ReportFn:
    """``report`` with each report's ``fidelity``: the training steps behind its
    ``val_acc``, in units of ``min_steps`` (0 off the ladder). A checkpoint between
    evaluations repeats the last evaluation's accuracy and fidelity, so a scheduler sees
    no progress in it. The run's last evaluation is not sent: the trial's final report,
    right after it, carries the same accuracy with the full result."""
    last = {"val_acc": float("nan"), "fidelity": 0.0}

    def send(metrics: dict, state_fn=None) -> bool:
        if metrics.get("last"):
            return False
        if not metrics.get("checkpoint") and "val_acc" in metrics:
            units = metrics["step"] / min_steps if on_ladder and min_steps else 0.0
            last.update(val_acc=metrics["val_acc"], fidelity=units)
        return report({**metrics, **last}, state_fn)

    return send


def final_fidelity(steps: int | None, min_steps: int | None, on_ladder: bool) -> float:
    """The ``fidelity`` of a trial's final report."""
    if not (on_ladder and min_steps and steps):
        return 0.0
    return steps / min_steps


def schedule_text(schedule: dict[str, Any]) -> str:
    """``asha: rungs at 100, 300, 900 steps (1 in 3 goes on)``."""
    rungs = ", ".join(map(str, schedule["rungs"]))
    return (f"{schedule['scheduler']}: rungs at {rungs} steps (1 in "
            f"{schedule['reduction_factor']} goes on)")


def rung_counts(rows: list[dict], schedule: dict[str, Any]) -> str:
    """Where a scheduled search's trials ended: how many were stopped at each rung."""
    stopped = Counter(r["steps"] for r in rows if r["status"] == "stopped")
    at = ", ".join(f"{n} at {k} steps" for k, n in sorted(stopped.items(),
                                                          key=lambda kv: kv[0] or 0))
    full = sum(r["status"] == "ok" and r["steps"] == schedule["max_steps"] for r in rows)
    return (f"{schedule_text(schedule)}; {sum(stopped.values())} trials stopped early"
            f"{' (' + at + ')' if at else ''}, {full} trained the full {schedule['max_steps']}")


def check_spec(spec) -> None:
    """Refuse bad scheduler settings of a spec (one line, with the fix)."""
    problem = scheduler_problem(spec.scheduler, spec.train, spec.min_steps,
                                spec.reduction_factor)
    if problem:
        raise QSearchError(problem)
