"""FracBits (Yang & Jin, AAAI 2021): mixed precision by learning fractional bit-widths.

One trial is the whole search: one quantization-aware :func:`~qsearch.train.train` run in
which every free layer (kernel-wise: every output filter) owns a learnable bit-width lambda,
quantized by interpolating its floor and ceil quantizers (Eq. (1)), so lambda gets the
gradient Q_ceil - Q_floor (Eq. (2)); weights DoReFa, activations PACT (Eq. (3)). The loss
adds kappa x |cost(lambda) - target| (Eq. (7a)/(7b), size in MB or BitOPs in G; the cost
model is in ``_fracbits_cost``). After ``search_fraction`` of the steps (paper: 120 of 150
epochs) the bits are discretised to fit the budget within 1% and the same run fine-tunes.

Choices where the paper or the shared schema leave room: one learnable activation bit-width
for all layers (BitOPs only; a Candidate has one ``a_bits``); a fixed width, by default where
uniform ``ref_bits`` = b_t fills the budget (the search starts at b_t + 0.5, as the paper's);
every integer in the bit range, not the space's ``bit_choices`` (interpolation needs them);
kernel-wise, the candidate is the layer-wise discretisation of the per-layer mean bits and
the per-filter bits go in ``metrics``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn

from qsearch import QSearchError
from qsearch.budget import Budget, format_cost
from qsearch.candidate import Candidate
from qsearch.data import Splits
from qsearch.space import SearchSpace
from qsearch.strategy import GridStrategy, Proposal, Result, register_strategy
from qsearch.tasks import TaskContext, cost_metrics, register_task
from qsearch.train import TrainHooks, TrainResult, evaluate, total_steps

from ._fracbits_run import UNIT, FracBitsRun

__all__ = ["UNIT", "FracBits", "FracBitsConfig", "FracBitsHooks", "FracBitsRun",
           "fracbits_task"]

DEFAULT_KAPPA = {"size": 1.0, "bitops": 0.1}  # paper: 1 for size, 0.1 for BitOPs
STATE_VERSION = 2  # of FracBitsHooks.state_dict; 2: the run is train()'s, these its hooks


@dataclass(frozen=True, kw_only=True)
class FracBitsConfig:
    """The FracBits knobs (see :class:`FracBits`) as plain JSON-able data: they travel in
    ``Proposal.params``. ``None`` is the paper default, resolved by the ``*_for`` methods."""

    kappa: float | None = None
    search_fraction: float = 0.8
    kernel_wise: bool = False
    ref_bits: int = 4
    width: float | None = None
    init_offset: float = 0.5
    bit_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.bit_range is not None:
            object.__setattr__(self, "bit_range", tuple(int(b) for b in self.bit_range))
        lo, hi = self.bit_range if self.bit_range and len(self.bit_range) == 2 else (1, 0)
        checks = {
            "kappa": self.kappa is None or (math.isfinite(self.kappa) and self.kappa >= 0),
            "search_fraction": 0 < self.search_fraction <= 1,
            "ref_bits": isinstance(self.ref_bits, int) and 1 <= self.ref_bits <= 8,
            "width": self.width is None or (math.isfinite(self.width) and self.width > 0),
            "init_offset": math.isfinite(self.init_offset) and self.init_offset >= 0,
            "bit_range": self.bit_range is None or 1 <= lo < hi <= 8,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise QSearchError(
                f"fracbits option {bad[0]}={getattr(self, bad[0])!r} not allowed: kappa >= 0, "
                "search_fraction in (0, 1], ref_bits in 1..8, width > 0, init_offset >= 0, "
                "bit_range (lo, hi) with 1 <= lo < hi <= 8, e.g. bit_range=(2, 8)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bit_range"] = list(self.bit_range) if self.bit_range else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FracBitsConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise QSearchError(f"unknown fracbits options {sorted(unknown)}: valid ones are "
                               f"{', '.join(f.name for f in fields(cls))}")
        return cls(**d)

    def kappa_for(self, kind: str) -> float:
        return DEFAULT_KAPPA[kind] if self.kappa is None else float(self.kappa)

    def range_for(self, kind: str) -> tuple[int, int]:
        if self.bit_range is not None:
            return self.bit_range
        return (2, 8) if kind == "bitops" and not self.kernel_wise else (1, 8)

    def reference(self, space: SearchSpace, budget: Budget) -> Candidate:
        """Uniform ``ref_bits`` (weights, and activations for BitOPs) at the run's width."""
        a_bits = self.ref_bits if budget.kind == "bitops" else None
        cand = space.candidate(self.ref_bits, a_bits=a_bits)
        if space.family.fixed_width:  # its own channels: the bits alone meet the budget
            if self.width not in (None, 1.0):
                raise QSearchError(f"fracbits width={self.width:g} with the fixed-width model "
                                   f"{space.model}: it has no width multiplier; drop width")
            return cand
        if self.width is not None:
            return cand.with_width(self.width)
        return space.align(cand, budget).candidate


@register_strategy("fracbits")
class FracBits(GridStrategy):
    """One-shot differentiable search: one trial (task ``fracbits``) trains and discretises.

    Args (keyword-only; None = the paper's default):
        kappa: weight of |cost - target| (in MB or GBitOPs): 1 for size, 0.1 for BitOPs.
        search_fraction: share of the steps spent searching (paper 0.8); the rest fine-tunes.
        kernel_wise: one bit-width per output filter instead of per layer.
        ref_bits: the uniform bit-width b_t that fills the budget at the run's width.
        width: width multiplier of the run (default: where ``ref_bits`` fills the budget).
        init_offset: bit-widths start at b_t + ``init_offset`` (paper 0.5).
        bit_range: (lo, hi) integer bit-widths a unit may take (paper: 2..8 when activations
            are searched layer-wise, else 1..8); first/last layers keep the space's pinned bits.
    """
    train_trials = False  # one trial of its own task trains and discretises

    def __init__(self, space: SearchSpace, budget: Budget, *, seed: int = 0,
                 kappa: float | None = None, search_fraction: float = 0.8,
                 kernel_wise: bool = False, ref_bits: int = 4, width: float | None = None,
                 init_offset: float = 0.5, bit_range: tuple[int, int] | None = None):
        super().__init__(space, budget, seed=seed)
        self.config = FracBitsConfig(
            kappa=kappa, search_fraction=search_fraction, kernel_wise=kernel_wise,
            ref_bits=ref_bits, width=width, init_offset=init_offset, bit_range=bit_range)
        self.reference = self.config.reference(space, budget)
        lo, _ = self.config.range_for(budget.kind)
        lowest = space.candidate(lo, width=self.reference.width,
                                 a_bits=lo if budget.kind == "bitops" else None)
        smallest = space.cost(lowest, budget.kind)
        if smallest > budget.value:
            raise QSearchError(
                f"budget {budget} is below the smallest fracbits model at width "
                f"{self.reference.width:.4g} ({format_cost(smallest, budget.kind)} with every "
                f"free layer at {lo} bits): lower `width` or raise the budget")
        self.cells = [0]
        self.outcome: dict[str, Any] | None = None

    def propose(self, cell: int) -> Proposal:
        return Proposal(self.reference, task="fracbits", params=self.config.to_dict())

    def tell(self, trial_id: str, result: Result) -> None:
        super().tell(trial_id, result)
        keep = ("c_size", "bitops", "budget_ratio", "width", "search_steps", "steps")
        self.outcome = {
            "status": result.status, "val_acc": result.val_acc, "error": result.error,
            "candidate": result.candidate.to_dict() if result.candidate else None,
            **{k: result.metrics[k] for k in keep if k in result.metrics}}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "outcome": self.outcome}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.outcome = state.get("outcome")

    def summary(self) -> dict:
        return {"reference": self.reference.to_dict(), "config": self.config.to_dict(),
                "result": self.outcome}


class FracBitsHooks(TrainHooks):
    """What FracBits adds to :func:`~qsearch.train.train`: the penalty, the bit-widths' group,
    clamping and discretisation, cost ratio and phase per evaluation, the bits history."""

    data_parallel = False  # discretising replaces the model's bit-width parameters mid-run

    def __init__(self, run: FracBitsRun, *, search_steps: int, signature: dict):
        self.run, self.search_steps, self.signature = run, search_steps, signature
        self.bits_steps, self.bits_history = [0], [run.layer_bits()]
        self.a_history = [run.unit_bits()[1]]

    def param_groups(self, model: nn.Module) -> list[dict]:
        # the config's SGD and schedule, but no weight decay: it would pull the bits to 0
        return [{"params": self.run.bit_params(), "weight_decay": 0.0}]

    def loss(self, model, x, y, criterion, step):
        ce = criterion(model(x), y)
        discrete = self.run.discrete is not None
        return ce, {"penalty": ce.new_zeros(()) if discrete else self.run.penalty().to(ce.dtype)}

    def after_step(self, step: int, model: nn.Module) -> bool:
        if self.run.discrete is None:
            self.run.clamp_()
            if step >= self.search_steps:
                self.run.discretise()
        return False

    def evaluate(self, model: nn.Module, splits: Splits, metrics: dict, *, batch_size: int,
                 device: str) -> dict:
        out = super().evaluate(model, splits, metrics, batch_size=batch_size, device=device)
        w, a = self.run.unit_bits()
        self.bits_steps.append(metrics["step"])
        self.bits_history.append(self.run.layer_bits())
        self.a_history.append(a)
        return {**out, "cost_ratio": float(self.run.cost(w, a)) / self.run.target,
                "phase": "search" if self.run.discrete is None else "finetune"}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "signature": self.signature,
                "discrete": self.run.discrete,
                "bits": [p.detach().cpu().tolist() for p in self.run.bit_params()],
                "bits_steps": self.bits_steps, "bits_history": self.bits_history,
                "a_history": self.a_history}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("signature") != self.signature:
            raise QSearchError(
                "cannot resume this fracbits trial: the saved state belongs to another "
                f"configuration or to version {state.get('version')} (this is {STATE_VERSION})"
                ": start the trial afresh")
        if state["discrete"] is not None:
            self.run.set_discrete(state["discrete"])  # before the model's weights: no lambdas
        with torch.no_grad():
            for p, v in zip(self.run.bit_params(), state["bits"], strict=True):
                p.copy_(torch.as_tensor(v, dtype=p.dtype))
        self.bits_steps, self.bits_history = state["bits_steps"], state["bits_history"]
        self.a_history = state["a_history"]

    def metrics(self, res: TrainResult, task_start: float) -> dict:
        """The task's metrics about the run (``task_start``: its ``time.perf_counter()``)."""
        run = self.run
        m = {"search_steps": self.search_steps, "steps": res.steps, "kappa": run.kappa,
             "b_t": run.b_t, "bit_range": [run.lo, run.hi], "kernel_wise": run.kernel_wise,
             "bits_steps": self.bits_steps, "bits_history": self.bits_history,
             "best_val_acc": res.best_val_acc, "train_seconds": res.train_seconds,
             "task_seconds": time.perf_counter() - task_start, "history": res.history}
        if run.a_param is not None:
            m["a_bits_history"] = self.a_history
        return m


@register_task("fracbits")
def fracbits_task(ctx: TaskContext) -> Result:
    """Search (fractional bits + penalty), discretise, fine-tune: one :func:`train` run that
    reports each evaluation through ``ctx.report`` with a resumable state."""
    start = time.perf_counter()
    cfg = FracBitsConfig.from_dict(ctx.proposal.params)
    config, splits = ctx.train_config(), ctx.splits()
    if len(splits.val) == 0:
        raise QSearchError("fracbits evaluates on the validation split, which is empty: "
                           "use a val_fraction above 0 (e.g. 0.1)")
    run = FracBitsRun(ctx, cfg)
    total = total_steps(config, len(splits.train))
    hooks = FracBitsHooks(
        run, search_steps=min(total, max(1, round(cfg.search_fraction * total))),
        signature={"fracbits": cfg.to_dict(), "target": run.target, "kind": run.kind})
    res = ctx.train_model(run.model, config, hooks=hooks, splits=splits)
    if res.status == "diverged":
        return Result("diverged", float("nan"), None, hooks.metrics(res, start), error=res.reason)
    if run.discrete is None:  # stopped during the search: still return a model that fits
        run.discretise()
        acc, vloss = evaluate(run.model, splits.val, batch_size=config.eval_batch_size,
                              device=ctx.device)
        res.history.append({"step": res.steps, "val_acc": acc, "val_loss": vloss,
                            "phase": "discretised"})
    cand, extra = run.candidate()
    metrics = {**cost_metrics(ctx.space, cand, ctx.budget), **extra, **hooks.metrics(res, start),
               "searched_bits": run.discrete["searched_bits"]}
    if run.a_param is not None:
        metrics["searched_a_bits"] = run.discrete["searched_a"]
    return Result(res.status, res.history[-1]["val_acc"], cand, metrics, fidelity=res.steps)
