"""Train one candidate network: the recipe of One-Bitwidth Sec. 4.1, for any length.

SGD with Nesterov momentum 0.9, lr 0.05 with linear warm-up from 0 then cosine decay, weight
decay 5e-4 on small images (4e-5 and label smoothing 0.1 on ImageNet), batch 128 (256 on
ImageNet). The caller sets the length (epochs, possibly fractional, or steps); a short
proxy trial is the same recipe, shorter, on a fraction of the data (see ``load_dataset``).

The trainer evaluates on the validation split periodically and hands each evaluation to a
callback together with a function returning a checkpointable state; resuming from that
state reproduces the uninterrupted run exactly (fast-path datasets). A non-finite loss ends
the run at once with status ``"diverged"``.

Trainers that need more (FracBits' penalty and learnable bit-widths, a supernet's sandwich
rule) pass :class:`TrainHooks` to this one loop rather than copying it; a data-parallel
trial runs it in each worker with a :class:`qsearch.parallel.Shard` (global batch rule there).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn

from qsearch import QSearchError
from qsearch.data import Split, Splits, num_batches
from qsearch.train_config import TrainConfig

if TYPE_CHECKING:
    from qsearch.parallel import Shard

__all__ = ["STATE_VERSION", "Execution", "TrainConfig", "TrainHooks", "TrainResult", "evaluate",
           "lr_at", "set_threads", "steps_per_epoch", "total_steps", "train"]

STATE_VERSION = 1


@dataclass
class TrainResult:
    """Outcome of one run. ``val_acc`` is the final validation accuracy (what the papers
    report); ``best_val_acc`` the best seen at any evaluation. Both are None without a
    validation split."""

    status: Literal["ok", "diverged", "stopped"]
    val_acc: float | None
    best_val_acc: float | None
    val_loss: float | None
    train_seconds: float
    steps: int
    images_seen: int
    history: list[dict] = field(default_factory=list)
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Execution:
    """Device switches, opt-in until ``benchmarks/bench_gpu.py`` measures a gain: ``bf16``
    autocasts training steps to bfloat16 (evaluation stays float32), ``channels_last`` keeps
    the model and batches in NHWC memory order."""

    bf16: bool = False
    channels_last: bool = False


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads for torch ops in this process (the trial's CPU allocation)."""
    if n < 1:
        raise QSearchError(f"thread count {n} must be at least 1")
    torch.set_num_threads(n)


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based) of ``total_steps``.

    Linear warm-up from 0 over W = round(warmup_fraction * total_steps) steps (update t < W
    uses lr * (t + 1) / W), then cosine decay from lr towards 0 over the remaining steps
    (update t >= W uses lr * (1 + cos(pi * (t - W) / (total_steps - W))) / 2).
    """
    warm = round(config.warmup_fraction * total_steps)
    if step < warm:
        return config.lr * (step + 1) / warm
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total_steps - warm)))


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Training batches per epoch: the last partial batch is dropped (at least one batch)."""
    return max(1, num_batches(n_train, batch_size, drop_last=True))


def total_steps(config: TrainConfig, n_train: int) -> int:
    if config.steps is not None:
        return config.steps
    return max(1, round(config.epochs * steps_per_epoch(n_train, config.batch_size)))


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, *, batch_size: int = 256, device: str | None = None
) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``split`` (no augmentation).

    The model is put in eval mode and returned to its previous mode afterwards.
    """
    device = device or split.device
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in split.batches(batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    if n == 0:
        raise QSearchError("cannot evaluate on an empty split")
    return correct / n, loss_sum / n


class TrainHooks:
    """What a trainer may change in :func:`train`; every method defaults to plain training.

    - ``param_groups(model)``: extra optimiser groups, e.g. ``[{"params": bits,
      "weight_decay": 0.0}]``; their parameters leave the main group, unset options take the
      config's, and the lr schedule sets every group's lr (times the group's ``lr_scale``).
    - ``loss(model, x, y, criterion, step)``: ``(task_loss, terms)``; train() minimises
      ``task_loss + sum(terms)``, logs ``train_loss`` and each term, averaged per evaluation.
    - ``forward_backward(...)``: the same arguments; leaves this step's gradients in the
      parameters and returns the same pair, detached. Override it for several passes per step
      (the sandwich rule: largest, smallest and random sub-networks, each its own backward,
      distilled from the largest); terms returned then are only logged.
    - ``after_step(step, model)``: after update ``step`` (1-based); may change the model
      (FracBits discretises here); True stops the run, evaluated, with status ``"stopped"``.
    - ``evaluate(model, splits, metrics, *, batch_size, device)``: the metrics of one
      evaluation (default val_acc and val_loss); ``val_acc`` is what ``best_val_acc`` tracks.
      A supernet recalibrates BatchNorm here; FracBits adds its cost ratio and phase.
    - ``state_dict()`` / ``load_state_dict(state)``: the hooks' own resumable state, saved
      with the run's state and loaded before the model's (it may change the model's shape).
    - ``data_parallel``: False for hooks that change the model's parameters during the run
      (DDP registers them once): train() then refuses to run them on several workers.

    Rung-based early stopping needs no hook: the callback returns True at a losing rung.
    """

    data_parallel = True

    def param_groups(self, model: nn.Module) -> list[dict]:
        return []

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module,
             step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return criterion(model(x), y), {}

    def forward_backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         criterion: nn.Module, step: int
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        task, terms = self.loss(model, x, y, criterion, step)
        total = task
        for term in terms.values():
            total = total + term
        total.backward()
        return task.detach(), {k: v.detach() for k, v in terms.items()}

    def after_step(self, step: int, model: nn.Module) -> bool:
        return False

    def evaluate(self, model: nn.Module, splits: Splits, metrics: dict, *, batch_size: int,
                 device: str) -> dict:
        if len(splits.val) == 0:
            return {}
        acc, loss = evaluate(model, splits.val, batch_size=batch_size, device=device)
        return {"val_acc": acc, "val_loss": loss}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The data RNG of one epoch: a pure function of (seed, epoch), so a resumed run redraws
    the same order and augmentations without storing generator state."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    model: nn.Module,
    splits: Splits,
    config: TrainConfig,
    *,
    callback: Callable[[dict, Callable[[], dict]], bool | None] | None = None,
    device: str | None = None,
    start_state: dict | None = None,
    hooks: TrainHooks | None = None,
    checkpoint_every_s: float | None = None,
    shard: Shard | None = None,
    execution: Execution | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``splits.train``; evaluate on ``splits.val``.

    At each evaluation ``callback(metrics, state_fn)`` is called; ``metrics`` holds step,
    epoch, train_loss, val_acc, val_loss, lr, elapsed_s and images_per_s, and ``state_fn()``
    returns a copy of everything needed to resume (model, optimizer, step, RNG states,
    history, the hooks' state). A callback returning True stops the run (status
    ``"stopped"``). Passing that state as ``start_state`` (to a model of the same
    architecture, with the same hooks) continues the run exactly as if it had not stopped.
    ``device`` defaults to the training split's device; ``hooks`` (see :class:`TrainHooks`)
    adapt the loss, optimiser groups, per-step actions and evaluation. With
    ``checkpoint_every_s``, the callback is also called between evaluations once that many
    seconds passed since it last was, with ``{"step", "total_steps", "epoch", "elapsed_s",
    "checkpoint": True}``: a long evaluation window still leaves recent states to resume from.
    Evaluations hand their metrics with ``total_steps`` added.

    With a ``shard`` this is one worker of a data-parallel run: it trains its slice of each
    global batch in DDP, calls the callback at the same steps as every worker, evaluates only
    on rank 0, and rank 0's answers (stop, checkpoint now) hold for all. ``execution``: the
    device switches (:class:`Execution`).

    A fresh run seeds torch's global RNG with ``config.seed`` (dropout, stochastic
    quantizers); the data order and augmentation draw from their own per-epoch generator.
    """
    run = _Run(model, splits, config, hooks or TrainHooks(), device or splits.train.device,
               shard, execution or Execution())
    run.checkpoint_every_s = checkpoint_every_s
    if start_state is None:
        torch.manual_seed(config.seed)
    else:
        run.restore(start_state)
    return run.loop(callback)


class _Run:
    """The state of one :func:`train` call; its methods are the steps of the loop."""

    def __init__(self, model: nn.Module, splits: Splits, config: TrainConfig,
                 hooks: TrainHooks, device: str, shard: Shard | None, execution: Execution):
        self.model, self.splits, self.config, self.hooks, self.device = (
            model, splits, config, hooks, device)
        self.shard, self.execution = shard, execution
        model.to(device)
        if execution.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        self.optimizer = _optimizer(model, config, hooks.param_groups(model))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        n_train = len(splits.train)
        # what takes the training steps: the model, or the model in DDP on one of the workers
        self.net = model if shard is None else shard.wrap(
            model, n_train=n_train, batch_size=config.batch_size,
            data_parallel=hooks.data_parallel, what=type(hooks).__name__)
        self.per_epoch = steps_per_epoch(n_train, config.batch_size)
        self.total = total_steps(config, n_train)
        self.eval_every = config.eval_every_steps or self.per_epoch
        self.drop_last = n_train >= config.batch_size
        self.step, self.images_seen, self.prior_s = 0, 0, 0.0
        self.best: float | None = None
        self.history: list[dict] = []
        self.t0 = self.window_t = self.handed_t = time.perf_counter()
        self.checkpoint_every_s: float | None = None
        self._new_window()

    def _new_window(self) -> None:
        self.window_sums: dict[str, float] = {}
        self.window_n = 0

    def loop(self, callback) -> TrainResult:
        self.t0 = self.window_t = time.perf_counter()
        cfg = self.config
        while self.step < self.total:
            batches = self.splits.train.batches(
                cfg.batch_size, shuffle=True, augment=True, drop_last=self.drop_last,
                generator=_epoch_generator(cfg.seed, self.step // self.per_epoch),
                start=self.step % self.per_epoch, shard=self.shard,
            )
            for x, y in batches:
                diverged = self._update(x, y)
                if diverged:
                    return self._result("diverged", diverged)
                stop = self.hooks.after_step(self.step, self.model)
                if not self._eval_due() and not stop:
                    if self._checkpoint_due(callback) and self._hand(callback, self._progress()):
                        return self._result("stopped", f"callback asked to stop at step "
                                            f"{self.step}")
                    continue
                metrics = {**self._evaluate(), "total_steps": self.total}  # history keeps its own
                self.handed_t = time.perf_counter()
                if callback is not None and self._hand(callback, metrics):
                    return self._result("stopped", f"callback asked to stop at step {self.step}")
                if stop:
                    return self._result("stopped", f"hooks asked to stop at step {self.step}")
                self.window_t = time.perf_counter()
                if self.step >= self.total:
                    break
        return self._result("ok")

    def _eval_due(self) -> bool:
        if self.step >= self.total:
            return True
        if self.config.eval_steps is not None:
            return self.step in self.config.eval_steps
        return self.step % self.eval_every == 0

    def _checkpoint_due(self, callback) -> bool:
        if callback is None or self.checkpoint_every_s is None:
            return False
        due = time.perf_counter() - self.handed_t >= self.checkpoint_every_s
        due = due if self.shard is None else self.shard.agree(due)  # rank 0's clock decides
        if due:
            self.handed_t = time.perf_counter()
        return due

    def _hand(self, callback, metrics: dict) -> bool:
        """Hand ``metrics`` and the state to the callback; True: stop (rank 0's answer)."""
        stop = bool(callback(metrics, self.state))
        return stop if self.shard is None else self.shard.agree(stop)

    def _progress(self) -> dict:
        return {"step": self.step, "total_steps": self.total, "epoch": self.step / self.per_epoch,
                "elapsed_s": self._elapsed(), "checkpoint": True}

    def _update(self, x: torch.Tensor, y: torch.Tensor) -> str | None:
        """One optimiser step; the reason when the loss is not finite (no step taken)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.execution.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = lr_at(self.step, self.total, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(self.device).type, torch.bfloat16,
                            enabled=self.execution.bf16):
            task, terms = self.hooks.forward_backward(self.net, x, y, self.criterion, self.step)
        values = {"train_loss": float(task), **{k: float(v) for k, v in terms.items()}}
        n = len(y) * (self.shard.world if self.shard else 1)
        if self.shard is not None:  # the global batch's losses, the same on every worker
            values = dict(zip(values, self.shard.mean(list(values.values()))))
        loss = sum(values.values())
        if not math.isfinite(loss):
            return f"loss {loss} at step {self.step} (lr {lr:.3g})"
        self.optimizer.step()
        self.step += 1
        self.images_seen += n
        self.window_n += n
        for k, v in values.items():
            self.window_sums[k] = self.window_sums.get(k, 0.0) + v * n
        return None

    def _evaluate(self) -> dict:
        """The metrics of the evaluation window ending now, appended to the history."""
        train_s = time.perf_counter() - self.window_t
        n = self.window_n
        metrics = {"step": self.step, "epoch": self.step / self.per_epoch,
                   **{k: s / n for k, s in self.window_sums.items()},
                   "lr": lr_at(self.step - 1, self.total, self.config),
                   "images_per_s": n / train_s if train_s > 0 else 0.0}
        if self.shard is None or self.shard.lead:  # rank 0 evaluates for every worker
            metrics.update(self.hooks.evaluate(self.model, self.splits, dict(metrics),
                                               batch_size=self.config.eval_batch_size,
                                               device=self.device))
        acc = metrics.get("val_acc")
        if acc is not None:
            self.best = acc if self.best is None else max(self.best, acc)
        metrics["elapsed_s"] = self._elapsed()
        metrics["last"] = self.step >= self.total
        self.history.append(metrics)
        self._new_window()
        return metrics

    def _elapsed(self) -> float:
        return self.prior_s + time.perf_counter() - self.t0

    def _result(self, status: str, reason: str | None = None) -> TrainResult:
        last = self.history[-1] if self.history else {}
        return TrainResult(
            status=status, val_acc=last.get("val_acc"), best_val_acc=self.best,
            val_loss=last.get("val_loss"), train_seconds=self._elapsed(), steps=self.step,
            images_seen=self.images_seen, history=self.history, reason=reason,
        )

    def state(self) -> dict:
        """A copy of everything needed to resume: the ``state_fn`` given to the callback."""
        return copy.deepcopy({
            "version": STATE_VERSION, "config": self.config.to_dict(),
            "total_steps": self.total, "step": self.step, "images_seen": self.images_seen,
            "elapsed_s": self._elapsed(), "best_val_acc": self.best, "history": self.history,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "rng": _rng_state(), "hooks": self.hooks.state_dict(),
            "window": {"sums": self.window_sums, "n": self.window_n},
        })

    def restore(self, state: dict) -> None:
        missing = sorted(_STATE_KEYS - state.keys())
        if state.get("version") != STATE_VERSION or missing:
            raise QSearchError(
                f"cannot resume: not a training state this qsearch resumes (version "
                f"{state.get('version')}, expected {STATE_VERSION}; missing {missing}): "
                "start the run afresh"
            )
        if state["config"] != self.config.to_dict() or state["total_steps"] != self.total:
            raise QSearchError(
                "cannot resume: the training state was saved with a different config or "
                f"training set size (saved {state['config']}, total_steps "
                f"{state['total_steps']}; now {self.config.to_dict()}, total_steps {self.total})"
            )
        self.hooks.load_state_dict(copy.deepcopy(state.get("hooks", {})))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.prior_s, self.best = state["elapsed_s"], state["best_val_acc"]
        self.history = copy.deepcopy(state["history"])
        window = state.get("window", {"sums": {}, "n": 0})  # mid-window states (checkpoints)
        self.window_sums, self.window_n = dict(window["sums"]), window["n"]


_STATE_KEYS = {"config", "total_steps", "step", "images_seen", "elapsed_s", "best_val_acc",
               "history", "model", "optimizer", "rng"}


def _optimizer(model: nn.Module, config: TrainConfig, extra: list[dict]) -> torch.optim.SGD:
    """SGD over the model's parameters: the main group, then the hooks' ``extra`` groups."""
    extra = [{**group, "params": list(group["params"])} for group in extra]
    taken = {id(p) for group in extra for p in group["params"]}
    main = [p for p in model.parameters() if id(p) not in taken]
    return torch.optim.SGD(
        [{"params": main}, *extra], lr=config.lr, momentum=config.momentum,
        nesterov=config.nesterov, weight_decay=config.weight_decay,
    )
