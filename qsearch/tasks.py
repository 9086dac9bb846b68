"""Trial tasks: how a proposal is turned into a result inside one Ray Tune trial.

``train`` (here) quantizes the candidate, trains it for the trial length and reports
validation accuracy. Strategies with another kind of trial register theirs in their own
file with ``@register_task("name")``; the runner looks the task up by the proposal's name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qsearch import QSearchError
from qsearch.budget import Budget
from qsearch.space import SearchSpace
from qsearch.strategy import Proposal, Result, _load_all

TaskFn = Callable[["TaskContext"], Result]
_TASKS: dict[str, TaskFn] = {}


@dataclass
class TaskContext:
    """Everything a task needs. ``report`` sends intermediate metrics (and, through
    ``state_fn``, a checkpointable state) to the runner and returns True when the runner
    asks the trial to stop (``Strategy.should_stop``, or a rung scheduler): the task then
    returns what it has, with status ``"stopped"``. ``restored`` is the last such state
    when a trial is retried or resumed. In a data-parallel trial every worker runs the task
    with its ``shard`` (:class:`qsearch.parallel.Shard`); rank 0's result is the trial's."""

    space: SearchSpace
    proposal: Proposal
    budget: Budget
    train: dict[str, Any]  # TrainConfig fields (qsearch.train.TrainConfig)
    data: dict[str, Any]  # load_dataset keyword arguments (root, val_fraction, train_fraction)
    seed: int
    device: str
    report: Callable[[dict, Callable[[], dict] | None], bool]
    restored: dict | None = None
    trials_per_node: int = 1  # trials that may share this node's memory (or this GPU's)
    checkpoint_every_s: float | None = None  # also checkpoint between evaluations
    shard: Any = None  # qsearch.parallel.Shard: this worker of a data-parallel trial
    execution: Any = None  # qsearch.train.Execution: bf16, channels_last
    pin_memory: bool = False  # ImageFolder batches in page-locked memory (GPU)
    checkpoint: str | None = None  # float state_dict models start from (fine-tuning, ptq)

    @property
    def lead(self) -> bool:
        """This process speaks for the trial (always, unless a non-zero rank)."""
        return self.shard is None or self.shard.lead

    def train_config(self, **overrides):
        from qsearch.pretrained import FINETUNE
        from qsearch.train_config import TrainConfig

        tuned = FINETUNE if self.checkpoint else {}
        return TrainConfig.recipe(self.space.dataset,
                                  **{**tuned, **self.train, "seed": self.seed, **overrides})

    def build(self, at):
        """The float model of a candidate (or at a width), from the checkpoint if any."""
        from qsearch.pretrained import load_pretrained

        model = self.space.build(at)
        if self.checkpoint:
            load_pretrained(model, self.checkpoint, self.space.model)
        return model

    def train_model(self, model, config=None, *, hooks=None, splits=None):
        """:func:`qsearch.train.train` wired to this trial: its device, reports, stop
        requests, checkpoints and restored state. Returns the ``TrainResult``."""
        from qsearch.train import train

        return train(model, splits or self.splits(), config or self.train_config(),
                     device=self.device, callback=self.report, start_state=self.restored,
                     hooks=hooks, checkpoint_every_s=self.checkpoint_every_s,
                     shard=self.shard, execution=self.execution)

    def splits(self):
        """The dataset splits, loaded once per worker process (device-resident when small)."""
        from qsearch.data import load_dataset

        key = (self.space.dataset, self.device, self.seed, self.pin_memory,
               tuple(sorted((k, str(v)) for k, v in self.data.items())))
        if key not in _SPLITS:
            _SPLITS.clear()
            _SPLITS[key] = load_dataset(self.space.dataset, seed=self.seed, device=self.device,
                                        pin_memory=self.pin_memory, **self.data)
        return _SPLITS[key]


_SPLITS: dict = {}


def register_task(name: str) -> Callable[[TaskFn], TaskFn]:
    def deco(fn: TaskFn) -> TaskFn:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        _TASKS[name] = fn
        return fn
    return deco


def get_task(name: str) -> TaskFn:
    if name not in _TASKS:
        _load_all()  # strategies register their own tasks when imported
        import qsearch.evaluator  # noqa: F401  (the supernet evaluator's tasks)
        import qsearch.ptq  # noqa: F401  (post-training trials)
    if name not in _TASKS:
        raise QSearchError(f"unknown trial task {name!r}: known tasks {sorted(_TASKS)}")
    return _TASKS[name]


def train_candidate(ctx: TaskContext, candidate, *, scheme: str = "dualprecision",
                    config=None, hooks=None):
    """Build, quantize and train ``candidate``; returns (model, TrainResult). ``hooks``
    (a :class:`qsearch.train.TrainHooks`) adapt the training loop."""
    import torch

    from qsearch.qlayers import quantize_model

    torch.manual_seed(ctx.seed)
    model = ctx.build(candidate)
    quantize_model(model, ctx.space.layer_bits(candidate), candidate.a_bits, scheme=scheme)
    model.to(ctx.device)
    return model, ctx.train_model(model, config, hooks=hooks)


def available_memory_bytes(device: str, trials_per_node: int = 1) -> float:
    """Memory a trial may use: the GPU's free memory, at most its share of the GPU (a
    quarter with 0.25 GPU per trial), or the node's available memory shared by the trials
    that can run on it at once."""
    import torch

    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        return float(min(free, total / max(1, trials_per_node)))
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return float(info["MemAvailable"].split()[0]) * 1024 / max(1, trials_per_node)


def memory_guard(ctx: TaskContext, candidate) -> Result | None:
    """Refuse, before training, a candidate whose estimated memory exceeds what is free."""
    need = ctx.space.train_memory_bytes(candidate, ctx.train_config().batch_size)
    have = available_memory_bytes(ctx.device, ctx.trials_per_node)
    if need <= have:
        return None
    return Result("failed", candidate=candidate, error=(
        f"refused before training: estimated memory {need / 1e9:.1f} GB exceeds the "
        f"{have / 1e9:.1f} GB available to this trial (lower the budget, width or batch size)"))


def cost_metrics(space: SearchSpace, candidate, budget: Budget) -> dict[str, float]:
    """The costs every result row carries."""
    c_size, bitops = space.c_size(candidate), space.bitops(candidate)
    return {"c_size": c_size, "bitops": bitops, "width": candidate.width,
            "budget_ratio": (c_size if budget.kind == "size" else bitops) / budget.value}


@register_task("train")
def train_task(ctx: TaskContext) -> Result:
    """Quantization-aware training of the proposed candidate for the trial length; with
    ``params["test"]`` (the final retrain) also the accuracy on the test split."""
    from qsearch.train import evaluate

    cand = ctx.proposal.candidate
    refused = memory_guard(ctx, cand)
    if refused:
        return refused
    start = time.perf_counter()
    model, res = train_candidate(ctx, cand)
    metrics = {**cost_metrics(ctx.space, cand, ctx.budget),
               "train_seconds": res.train_seconds, "steps": res.steps,
               "best_val_acc": res.best_val_acc, "task_seconds": time.perf_counter() - start,
               "resumed_from_step": (ctx.restored or {}).get("step", 0)}
    if ctx.proposal.params.get("test") and res.status in ("ok", "stopped") and ctx.lead:
        metrics["test_acc"], metrics["test_loss"] = evaluate(model, ctx.splits().test)
    acc = float("nan") if res.val_acc is None else res.val_acc
    error = getattr(res, "reason", None) if res.status == "diverged" else None
    return Result(res.status, acc, cand, metrics, error=error, fidelity=res.steps)
