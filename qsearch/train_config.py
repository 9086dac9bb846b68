"""Training hyper-parameters (One-Bitwidth Sec. 4.1's recipe and its overrides): plain data
that round-trips through JSON. Torch-free, so settings are checked before torch loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from qsearch import QSearchError


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training hyper-parameters: plain data that round-trips through JSON.

    Set the length with exactly one of ``epochs`` (may be fractional) or ``steps``.
    ``warmup_fraction`` is the share of the run spent warming up: the papers' 5 of 300
    epochs, so a 3-epoch proxy warms up for 3% of its steps, like the full run.
    ``eval_every_steps`` defaults to once per epoch; ``eval_steps`` (the rungs of a rung
    scheduler) evaluates at exactly those steps instead. The last step is always evaluated.
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
    eval_steps: tuple[int, ...] | None = None
    eval_batch_size: int = 256  # CPU: 2x faster than 1000 (cache); GPU: fast either way
    seed: int = 0

    def __post_init__(self) -> None:
        if self.eval_steps is not None:  # JSON gives a list
            object.__setattr__(self, "eval_steps", tuple(self.eval_steps))
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
            "eval_steps": self.eval_steps is None or all(
                isinstance(k, int) and k > 0 for k in self.eval_steps),
            "eval_batch_size": self.eval_batch_size > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise QSearchError(
                f"bad training setting {bad[0]}={getattr(self, bad[0])!r}: epochs, steps, "
                "batch sizes, eval_every_steps and eval_steps must be positive; lr and "
                "weight_decay >= 0; momentum, label_smoothing and warmup_fraction in [0, 1)"
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

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise QSearchError(
                f"unknown training settings {sorted(unknown)}: valid ones are "
                f"{', '.join(f.name for f in fields(cls))}"
            )
        return cls(**d)
