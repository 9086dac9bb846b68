"""Train one candidate network: the recipe of One-Bitwidth Sec. 4.1, for any length.

SGD with Nesterov momentum 0.9, lr 0.05 with linear warm-up from 0 then cosine decay, weight
decay 5e-4 on small images (4e-5 and label smoothing 0.1 on ImageNet), batch 128 (256 on
ImageNet). The caller sets the length (epochs, possibly fractional, or steps); a short
proxy trial is the same recipe, shorter, on a fraction of the data (see ``load_dataset``).

The trainer evaluates on the validation split periodically and hands each evaluation to a
callback together with a function returning a checkpointable state; resuming from that
state reproduces the uninterrupted run exactly (fast-path datasets). A non-finite loss ends
the run at once with status ``"diverged"``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn as nn

from qsearch import QSearchError
from qsearch.data import Split, Splits, num_batches

STATE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training hyper-parameters: plain data that round-trips through JSON.

    Set the length with exactly one of ``epochs`` (may be fractional) or ``steps``.
    ``warmup_fraction`` is the share of the run spent warming up: the papers' 5 of 300
    epochs, so a 3-epoch proxy warms up for 3% of its steps, like the full run.
    ``eval_every_steps`` defaults to once per epoch; the last step is always evaluated.
    """

    epochs: float | None = None
    steps: int | None = None
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_fraction: float = 5 / 300
    eval_every_steps: int | None = None
    eval_batch_size: int = 256  # CPU: 2x faster than 1000 (cache); GPU: fast either way
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise QSearchError(
                f"set exactly one of epochs or steps (got epochs={self.epochs}, "
                f"steps={self.steps}): e.g. TrainConfig(epochs=2) or TrainConfig(steps=500)"
            )
        checks = {
            "epochs": self.epochs is None or self.epochs > 0,
            "steps": self.steps is None or self.steps > 0,
            "batch_size": self.batch_size > 0,
            "lr": self.lr >= 0,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "warmup_fraction": 0 <= self.warmup_fraction < 1,
            "eval_every_steps": self.eval_every_steps is None or self.eval_every_steps > 0,
            "eval_batch_size": self.eval_batch_size > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise QSearchError(
                f"bad training setting {bad[0]}={getattr(self, bad[0])!r}: epochs, steps, "
                "batch sizes and eval_every_steps must be positive; lr and weight_decay >= 0; "
                "momentum, label_smoothing and warmup_fraction in [0, 1)"
            )

    @classmethod
    def recipe(cls, dataset: str, **overrides: Any) -> TrainConfig:
        """The paper recipe for a dataset (Sec. 4.1), with ``overrides`` applied."""
        base: dict[str, Any] = {}
        if dataset in ("imagenet", "imagefolder"):
            base = dict(weight_decay=4e-5, label_smoothing=0.1, batch_size=256)
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise QSearchError(
                f"unknown training settings {sorted(unknown)}: valid ones are "
                f"{', '.join(f.name for f in fields(cls))}"
            )
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> TrainConfig:
        return cls.from_dict(json.loads(s))


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
) -> TrainResult:
    """Train ``model`` in place on ``splits.train``; evaluate on ``splits.val``.

    At each evaluation ``callback(metrics, state_fn)`` is called; ``metrics`` holds step,
    epoch, train_loss, val_acc, val_loss, lr, elapsed_s and images_per_s, and ``state_fn()``
    returns a copy of everything needed to resume (model, optimizer, step, RNG states,
    history). A callback returning True stops the run (status ``"stopped"``). Passing that
    state as ``start_state`` (to a model of the same architecture) continues the run exactly
    as if it had not stopped. ``device`` defaults to the training split's device.

    A fresh run seeds torch's global RNG with ``config.seed`` (dropout, stochastic
    quantizers); the data order and augmentation draw from their own per-epoch generator.
    """
    device = device or splits.train.device
    model.to(device)
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    n_train = len(splits.train)
    per_epoch = steps_per_epoch(n_train, config.batch_size)
    total = total_steps(config, n_train)
    eval_every = config.eval_every_steps or per_epoch
    drop_last = n_train >= config.batch_size
    has_val = len(splits.val) > 0

    step, images_seen, prior_s, history = 0, 0, 0.0, []
    best = None
    if start_state is None:
        torch.manual_seed(config.seed)
    else:
        step, images_seen, prior_s, best, history = _restore(
            start_state, model, optimizer, config, total
        )
    t0 = time.perf_counter()
    window_t, window_images, loss_sum, loss_n = t0, 0, 0.0, 0
    last: dict = history[-1] if history else {}

    def state_fn() -> dict:
        return copy.deepcopy({
            "version": STATE_VERSION, "config": config.to_dict(), "total_steps": total,
            "step": step, "images_seen": images_seen,
            "elapsed_s": prior_s + time.perf_counter() - t0, "best_val_acc": best,
            "history": history, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": _rng_state(),
        })

    def result(status: str, reason: str | None = None) -> TrainResult:
        return TrainResult(
            status=status, val_acc=last.get("val_acc"), best_val_acc=best,
            val_loss=last.get("val_loss"), train_seconds=prior_s + time.perf_counter() - t0,
            steps=step, images_seen=images_seen, history=history, reason=reason,
        )

    while step < total:
        epoch = step // per_epoch
        batches = splits.train.batches(
            config.batch_size, shuffle=True, augment=True, drop_last=drop_last,
            generator=_epoch_generator(config.seed, epoch), start=step % per_epoch,
        )
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, config)
            loss = criterion(model(x), y)
            value = float(loss.detach())
            if not math.isfinite(value):
                lr = lr_at(step, total, config)
                return result("diverged", f"loss {value} at step {step} (lr {lr:.3g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            images_seen += len(y)
            window_images += len(y)
            loss_sum += value * len(y)
            loss_n += len(y)
            if step % eval_every and step < total:
                continue
            train_s = time.perf_counter() - window_t
            metrics = {"step": step, "epoch": step / per_epoch, "train_loss": loss_sum / loss_n,
                       "lr": lr_at(step - 1, total, config),
                       "images_per_s": window_images / train_s if train_s > 0 else 0.0}
            if has_val:
                acc, vloss = evaluate(model, splits.val, batch_size=config.eval_batch_size,
                                      device=device)
                best = acc if best is None else max(best, acc)
                metrics.update(val_acc=acc, val_loss=vloss)
            metrics["elapsed_s"] = prior_s + time.perf_counter() - t0
            history.append(metrics)
            last = metrics
            loss_sum, loss_n, window_images = 0.0, 0, 0
            if callback is not None and callback(dict(metrics), state_fn):
                return result("stopped", f"callback asked to stop at step {step}")
            window_t = time.perf_counter()
            if step >= total:
                break
    return result("ok")


def _restore(state: dict, model, optimizer, config: TrainConfig, total: int):
    if state.get("version") != STATE_VERSION:
        raise QSearchError(
            f"training state version {state.get('version')} is not supported "
            f"(this qsearch resumes version {STATE_VERSION})"
        )
    if state["config"] != config.to_dict() or state["total_steps"] != total:
        raise QSearchError(
            "cannot resume: the training state was saved with a different config or "
            f"training set size (saved {state['config']}, total_steps {state['total_steps']}; "
            f"now {config.to_dict()}, total_steps {total})"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    history = copy.deepcopy(state["history"])
    return state["step"], state["images_seen"], state["elapsed_s"], state["best_val_acc"], history
