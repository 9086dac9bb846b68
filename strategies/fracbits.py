"""FracBits (Yang & Jin, AAAI 2021): mixed precision by learning fractional bit-widths.

One trial is the whole search: a single quantization-aware training run in which every free
layer (or, kernel-wise, every output filter) owns a learnable bit-width lambda. A layer at
lambda is quantized by interpolating its floor and ceil quantizers (Eq. (1)), so lambda gets
the gradient Q_ceil - Q_floor (Eq. (2)); weights are DoReFa, activations PACT (Eq. (3)), via
:func:`qsearch.quant.quantize_model` with ``scheme="dorefa"``. The loss adds
kappa x |cost(lambda) - target| (Eq. (6a)/(7a): model size in MB, weights only; Eq. (6b)/(7b):
BitOPs in G, bilinear in weight and activation bits). After ``search_fraction`` of the steps
(the paper: 120 of 150 epochs) the bit-widths are discretised with a binary-searched threshold
so the integer model fits the budget within 1%, and the same run fine-tunes the rest of the
steps with nothing re-initialised (one-shot).

Costs follow :class:`qsearch.space.SearchSpace` exactly (C_size = sum of bits x weights per
layer; BitOPs = MACs x weight bits x input-activation bits, the first layer reading the 8-bit
image), so at integer bit-widths the fractional cost equals ``space.c_size`` / ``space.bitops``.

Choices this implementation makes where the paper or the shared schema leave room:

- Activations: one learnable bit-width shared by all layer inputs (BitOPs budgets only), because
  a :class:`~qsearch.candidate.Candidate` and ``quantize_model`` carry a single ``a_bits``;
  the paper learns one per layer. Size budgets keep activations at the space's ``a_bits``.
- The width is fixed for the run: by default the width at which a uniform ``ref_bits`` model
  fills the budget, so b_t = ``ref_bits`` and the search starts at b_t + 0.5, as the paper does.
- The space's ``bit_choices`` are not used: interpolation needs every integer in the range
  (paper: 2..8 for layer-wise weight+activation search, 1..8 otherwise).
- Kernel-wise results cannot be stored in a Candidate (one bit-width per layer): the trial
  returns the layer-wise discretisation of the per-layer mean bits as its candidate (it fits
  the budget too) and the per-filter bits and costs of the model it trained in ``metrics``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from qsearch import QSearchError
from qsearch.budget import Budget, format_cost
from qsearch.candidate import Candidate
from qsearch.space import INPUT_BITS, SearchSpace
from qsearch.strategy import GridStrategy, Proposal, Result, register_strategy
from qsearch.tasks import TaskContext, cost_metrics, register_task

# Penalty units (paper Sec. "Resource constraint as penalty loss"): MB and GBitOPs.
UNIT = {"size": 8e6, "bitops": 1e9}
DEFAULT_KAPPA = {"size": 1.0, "bitops": 0.1}  # paper: 1 for size, 0.1 for BitOPs
STATE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class FracBitsConfig:
    """The FracBits knobs, as plain JSON-able data (they travel in ``Proposal.params``).

    ``None`` means the paper default, resolved against the budget kind by the ``*_for``
    methods: kappa 1 (size, per MB) or 0.1 (BitOPs, per G); bit range 2..8 when activations
    are searched layer-wise, 1..8 otherwise; width where uniform ``ref_bits`` fills the budget.
    """

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
        if self.width is not None:
            return cand.with_width(self.width)
        return space.align(cand, budget).candidate


# ----- cost model -------------------------------------------------------------------------
class FracCost:
    """Eq. (6a)/(6b) of FracBits as a differentiable function of fractional bit-widths.

    Units are the free layers in inventory order, or (kernel-wise) their output filters,
    layer after layer. ``cost(w, a)`` takes the unit bit-widths ``w`` and the shared
    activation bit-width ``a`` (BitOPs only; None = the space's ``a_bits``) and returns bits
    (size) or BitOPs, in float64, with the conventions of ``SearchSpace.c_size``/``bitops``:
    per layer weights = ``space.params(width)``, MACs = weights x output pixels, the first
    layer reads the ``INPUT_BITS`` image, pinned layers keep their bits.
    """

    def __init__(self, space: SearchSpace, width: float, kind: str, *,
                 kernel_wise: bool = False, a_bits: int | None = None):
        self.kind = kind
        self.a_default = space.a_bits if a_bits is None else a_bits
        params = space.params(width)
        _, cout, _ = space.shapes(width)
        hw = np.array([l.out_hw[0] * l.out_hw[1] for l in space.layers], float)
        coef = params if kind == "size" else params * hw
        free = np.asarray(space.free_layers, int)
        per_layer = cout[free].astype(int) if kernel_wise else np.ones(len(free), int)
        self.layer_of_unit = np.repeat(free, per_layer)
        self.units_per_layer = per_layer
        unit_coef = np.repeat(coef[free] / per_layer, per_layer)
        first = self.layer_of_unit == 0
        self._coef = {"first": np.where(first, unit_coef, 0.0),
                      "rest": np.where(first, 0.0, unit_coef)}
        pinned = space.pinned
        self._const = {"first": sum(b * coef[i] for i, b in pinned.items() if i == 0),
                       "rest": sum(b * coef[i] for i, b in pinned.items() if i != 0)}
        self._torch: dict = {}

    @property
    def n_units(self) -> int:
        return len(self.layer_of_unit)

    def _coefs(self, like):
        import torch

        key = like.device
        if key not in self._torch:
            self._torch[key] = {k: torch.as_tensor(v, dtype=torch.float64, device=like.device)
                                for k, v in self._coef.items()}
        return self._torch[key]

    def __call__(self, w, a=None):
        """Cost of unit bits ``w`` (torch tensor or numpy array) and activation bits ``a``."""
        a = self.a_default if a is None else a
        if isinstance(w, np.ndarray):
            c = self._coef
            first, rest = float(w @ c["first"]), float(w @ c["rest"])
        else:
            c = self._coefs(w)
            w = w.double()
            first, rest = w @ c["first"], w @ c["rest"]
        first, rest = first + self._const["first"], rest + self._const["rest"]
        if self.kind == "size":
            return first + rest
        return INPUT_BITS * first + a * rest

    def per_bit(self, a=None) -> np.ndarray:
        """What one more bit on each weight unit costs, at activation bits ``a``."""
        c = self._coef
        if self.kind == "size":
            return c["first"] + c["rest"]
        return INPUT_BITS * c["first"] + (self.a_default if a is None else a) * c["rest"]

    def uniform_bits(self, target: float, lo: float, hi: float) -> float:
        """b_t: the uniform (weight and activation) bit-width whose cost is ``target``."""
        def cost(b: float) -> float:
            return float(self(np.full(self.n_units, b), b if self.kind == "bitops" else None))
        if cost(lo) >= target:
            return lo
        if cost(hi) <= target:
            return hi
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
        return lo


def discretise(cost: FracCost, w: np.ndarray, a: float | None, target: float, lo: int,
               hi: int) -> tuple[np.ndarray, int | None, float]:
    """Integer bits from fractional ones: cost <= ``target``, within 1% of it if possible.

    The paper (Sec. "Finetuning with mixed precision") binary-searches one threshold for the
    weight and activation bit-widths so that the cost is within 1% of the target. Here a
    bit-width lambda becomes ``clip(ceil(lambda - t), lo, hi)`` for a threshold t in [0, 1)
    (a unit is rounded up when its fraction exceeds t); t < 0 / t >= 1 extend the same rule
    when even the all-ceil model is under / the all-floor model is over the target. The cost
    falls monotonically in t, so bisection over the sorted breakpoints t = lambda - m (ties
    broken by unit order) finds the smallest t that fits. When that last step drops the cost
    by more than 1% (a large layer, or the shared activation bit-width), units are raised
    back greedily in order of decreasing breakpoint while the cost still fits, until it is
    within 1%: first the units rounded down to floor, then (only if that is not enough)
    units above their ceil. Returns (bits per weight unit, activation bits or None, cost).
    """
    v = np.clip(np.asarray(w, float), lo, hi)
    if a is not None:
        v = np.append(v, float(np.clip(a, lo, hi)))
    # Unit k drops from m + 1 to m at t = v_k - m, for m = hi - 1 down to lo; sorted, these
    # events walk every unit from hi (t -> -inf) down to lo (t -> +inf).
    n = len(v)
    unit = np.repeat(np.arange(n), hi - lo)
    m = np.tile(np.arange(hi - 1, lo - 1, -1), n)
    order = unit[np.lexsort((unit, v[unit] - m))]
    top = np.full(n, hi)

    def bits(j: int) -> np.ndarray:
        return top - np.bincount(order[:j], minlength=len(v))

    def total(b: np.ndarray) -> float:
        return float(cost(b[:cost.n_units].astype(float),
                          float(b[-1]) if a is not None else None))

    if total(bits(len(order))) > target:
        raise QSearchError(
            f"no integer model fits the budget {format_cost(target, cost.kind)} at this width "
            f"even with every bit-width at {lo}: lower the width or the range minimum")
    j_lo, j_hi = -1, len(order)  # invariant: cost(bits(j_hi)) <= target < cost(bits(j_lo))
    while j_hi - j_lo > 1:
        mid = (j_lo + j_hi) // 2
        j_lo, j_hi = (j_lo, mid) if total(bits(mid)) <= target else (mid, j_hi)
    b = bits(j_hi)
    c = total(b)
    # Top-up, in order of decreasing breakpoint: the units that were rounded down last.
    per_bit = cost.per_bit(float(b[-1]) if a is not None else None)
    for k in order[:max(0, j_hi - 1)][::-1]:
        if c >= 0.99 * target:
            break
        if k >= cost.n_units:  # the activation unit: re-price everything
            b[k] += 1
            c_new = total(b)
            if c_new <= target:
                c, per_bit = c_new, cost.per_bit(float(b[k]))
            else:
                b[k] -= 1
        elif c + per_bit[k] <= target:
            b[k] += 1
            c += per_bit[k]
    return b[:cost.n_units].copy(), (int(b[-1]) if a is not None else None), total(b)


# ----- the strategy -------------------------------------------------------------------------
@register_strategy("fracbits")
class FracBits(GridStrategy):
    """One-shot differentiable search: one trial (task ``fracbits``) trains and discretises.

    Args (keyword-only; None = the paper's default):
        kappa: penalty weight on |cost - target| (cost in MB or GBitOPs): 1 for size, 0.1
            for BitOPs budgets.
        search_fraction: share of the training steps spent searching (paper 0.8); the rest
            fine-tunes the discretised model.
        kernel_wise: one bit-width per output filter instead of per layer.
        ref_bits: the uniform bit-width b_t that fills the budget at the run's width.
        width: width multiplier of the run (default: where uniform ``ref_bits`` fills the
            budget).
        init_offset: bit-widths start at b_t + ``init_offset`` (paper 0.5).
        bit_range: (lo, hi) integer bit-widths a unit may take (paper: 2..8 when activations
            are searched layer-wise, else 1..8); first/last layers keep the space's pinned bits.
    """

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


# ----- the task: one training run -------------------------------------------------------------
class FracBitsRun:
    """The quantized model with its learnable bit-widths, penalty and discretisation."""

    def __init__(self, ctx: TaskContext, cfg: FracBitsConfig):
        import torch
        import torch.nn as nn

        from qsearch.quant import PACTActQuant, quantize_model

        space, budget = ctx.space, ctx.budget
        self.space, self.kind, self.target = space, budget.kind, budget.value
        self.kernel_wise = cfg.kernel_wise
        self.kappa = cfg.kappa_for(budget.kind)
        self.lo, self.hi = cfg.range_for(budget.kind)
        self.reference = cfg.reference(space, budget)
        self.width = self.reference.width
        self.cost = FracCost(space, self.width, budget.kind, kernel_wise=cfg.kernel_wise)
        self.b_t = self.cost.uniform_bits(self.target, self.lo, self.hi)
        init = min(float(self.hi), self.b_t + cfg.init_offset)

        torch.manual_seed(ctx.seed)
        self.model = space.build(self.width)
        modules = dict(self.model.named_modules())
        self.free = [space.layers[i].name for i in space.free_layers]
        self.w_params = [
            nn.Parameter(torch.full((modules[n].weight.shape[0],) if cfg.kernel_wise else (),
                                    init)) for n in self.free]
        bits: dict[str, Any] = {space.layers[i].name: b for i, b in space.pinned.items()}
        bits.update(zip(self.free, self.w_params))
        self.a_param = nn.Parameter(torch.tensor(init)) if self.kind == "bitops" else None
        quantize_model(self.model, bits, self.a_param if self.a_param is not None
                       else space.a_bits, scheme="dorefa")
        self.pact = [m for m in self.model.modules() if isinstance(m, PACTActQuant)]
        self.model.to(ctx.device)  # moves the shared bit-width Parameters in place
        self.discrete: dict | None = None  # {"w": unit bits, "a": activation bits}

    # ----- bits
    def bit_params(self) -> list:
        return self.w_params + ([self.a_param] if self.a_param is not None else [])

    def lam_w(self):
        import torch

        return torch.cat([p.reshape(-1) for p in self.w_params])

    def penalty(self):
        """kappa x |cost - target| in MB or GBitOPs, Eq. (6a)/(6b) and (7a)/(7b)."""
        return self.kappa * (self.cost(self.lam_w(), self.a_param) - self.target).abs() \
            / UNIT[self.kind]

    def clamp_(self) -> None:
        import torch

        with torch.no_grad():
            for p in self.bit_params():
                p.clamp_(self.lo, self.hi)

    def unit_bits(self) -> tuple[np.ndarray, float | None]:
        """Current bit-widths: learned (fractional) or, after discretisation, the integers."""
        if self.discrete is not None:
            return np.asarray(self.discrete["w"], float), self.discrete["a"]
        w = self.lam_w().detach().double().cpu().numpy()
        a = float(self.a_param.detach()) if self.a_param is not None else None
        return w, a

    def layer_bits(self) -> list[float]:
        """Bits of every layer in inventory order (kernel-wise: mean over filters)."""
        w, _ = self.unit_bits()
        out = [float(self.space.pinned.get(i, 0)) for i in range(len(self.space.layers))]
        start = 0
        for li, n in zip(self.space.free_layers, self.cost.units_per_layer):
            out[li] = float(np.mean(w[start:start + n]))
            start += n
        return out

    # ----- discretisation
    def discretise(self) -> None:
        w, a = self.unit_bits()
        w_int, a_int, _ = discretise(self.cost, w, a, self.target, self.lo, self.hi)
        self.set_discrete({"w": [int(b) for b in w_int], "a": a_int,
                           "searched_bits": self.layer_bits(), "searched_a": a})

    def set_discrete(self, discrete: dict) -> None:
        """Swap the learnable bit-widths for integers (modules keep weights and state)."""
        import torch

        self.discrete = discrete
        modules = dict(self.model.named_modules())
        start = 0
        for name, n in zip(self.free, self.cost.units_per_layer):
            m = modules[name]
            chunk = discrete["w"][start:start + n]
            start += n
            del m.w_bits  # a registered Parameter until now
            m.w_bits = (torch.tensor(chunk, dtype=torch.float32, device=m.weight.device)
                        if self.kernel_wise else int(chunk[0]))
        if discrete["a"] is not None:
            for q in self.pact:
                del q.bits
                q.bits = int(discrete["a"])
        for p in self.bit_params():
            p.requires_grad_(False)
            p.grad = None

    def candidate(self) -> tuple[Candidate, dict]:
        """The discretised candidate and, kernel-wise, the per-filter bits and their costs."""
        w = np.asarray(self.discrete["w"], float)
        a = self.discrete["a"]
        a_bits = self.space.a_bits if a is None else a
        if not self.kernel_wise:
            return self.space.candidate([int(b) for b in w], width=self.width,
                                        a_bits=a_bits), {}
        kernel_bits, start = [], 0
        for n in self.cost.units_per_layer:
            kernel_bits.append([int(b) for b in w[start:start + n]])
            start += n
        kernel_cost = float(self.cost(w, a))
        extra = {"kernel_bits": kernel_bits, "kernel_cost": kernel_cost,
                 "kernel_budget_ratio": kernel_cost / self.target}
        # layer-wise projection: discretise the per-layer mean bits, activations kept
        layer_cost = FracCost(self.space, self.width, self.kind, a_bits=a_bits)
        means = np.array([np.mean(k) for k in kernel_bits])
        w_l, _, _ = discretise(layer_cost, means, None, self.target, self.lo, self.hi)
        return self.space.candidate([int(b) for b in w_l], width=self.width,
                                    a_bits=a_bits), extra


def _optimizer(run: FracBitsRun, config):
    import torch

    bit_ids = {id(p) for p in run.bit_params()}
    main = [p for p in run.model.parameters() if id(p) not in bit_ids]
    # bit-widths: same SGD and schedule, no weight decay (it would pull them towards 0)
    return torch.optim.SGD(
        [{"params": main, "weight_decay": config.weight_decay},
         {"params": run.bit_params(), "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


@register_task("fracbits")
def fracbits_task(ctx: TaskContext) -> Result:
    """Search (fractional bits + penalty), discretise, fine-tune: one training run.

    ``train()`` has no hook for an extra loss term, an extra parameter group or a per-step
    callback, so this loop is the trainer's loop with those three additions, built from its
    pieces (``lr_at``, ``total_steps``, ``steps_per_epoch``, ``evaluate`` and the per-epoch
    data generator, so the data order matches ``train()``). It reports each evaluation
    through ``ctx.report`` with a resumable state, like ``train()``.
    """
    import torch
    import torch.nn as nn

    from qsearch.train import _epoch_generator, evaluate, lr_at, steps_per_epoch, total_steps

    start_time = time.perf_counter()
    cfg = FracBitsConfig.from_dict(ctx.proposal.params)
    config = ctx.train_config()
    splits = ctx.splits()
    if len(splits.val) == 0:
        raise QSearchError("fracbits evaluates on the validation split, which is empty: "
                           "use a val_fraction above 0 (e.g. 0.1)")
    run = FracBitsRun(ctx, cfg)
    optimizer = _optimizer(run, config)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    n_train = len(splits.train)
    per_epoch = steps_per_epoch(n_train, config.batch_size)
    total = total_steps(config, n_train)
    search_steps = min(total, max(1, round(cfg.search_fraction * total)))
    eval_every = config.eval_every_steps or per_epoch
    drop_last = n_train >= config.batch_size
    signature = {"config": config.to_dict(), "fracbits": cfg.to_dict(), "total": total,
                 "target": run.target, "kind": run.kind}

    step, prior_s, best, history = 0, 0.0, None, []
    bits_steps, bits_history, a_history = [0], [run.layer_bits()], [run.unit_bits()[1]]
    if ctx.restored is not None:
        s = ctx.restored
        if s.get("version") != STATE_VERSION or s.get("signature") != signature:
            raise QSearchError("cannot resume this fracbits trial: the saved state belongs to "
                               "another configuration (start the trial afresh)")
        if s["discrete"] is not None:
            run.set_discrete(s["discrete"])
        run.model.load_state_dict(s["model"])
        optimizer.load_state_dict(s["optimizer"])
        with torch.no_grad():
            for p, v in zip(run.bit_params(), s["bits"]):
                p.copy_(torch.as_tensor(v, dtype=p.dtype))
        torch.set_rng_state(s["rng"])
        step, prior_s, best = s["step"], s["elapsed_s"], s["best_val_acc"]
        history, bits_steps = list(s["history"]), list(s["bits_steps"])
        bits_history, a_history = list(s["bits_history"]), list(s["a_history"])
    else:
        torch.manual_seed(config.seed)
    t0 = time.perf_counter()

    def state_fn() -> dict:
        import copy

        return copy.deepcopy({
            "version": STATE_VERSION, "signature": signature, "step": step,
            "elapsed_s": prior_s + time.perf_counter() - t0, "best_val_acc": best,
            "history": history, "bits_steps": bits_steps, "bits_history": bits_history,
            "a_history": a_history, "discrete": run.discrete,
            "bits": [p.detach().cpu().tolist() for p in run.bit_params()],
            "model": run.model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state()})

    def metrics_out() -> dict:
        m = {"search_steps": search_steps, "steps": step, "kappa": run.kappa,
             "b_t": run.b_t, "bit_range": [run.lo, run.hi], "kernel_wise": run.kernel_wise,
             "bits_steps": bits_steps, "bits_history": bits_history,
             "best_val_acc": best, "train_seconds": prior_s + time.perf_counter() - t0,
             "task_seconds": time.perf_counter() - start_time, "history": history}
        if run.a_param is not None:
            m["a_bits_history"] = a_history
        return m

    window_t, loss_sum, pen_sum, n_seen, window_images = time.perf_counter(), 0.0, 0.0, 0, 0
    stopped = False
    while step < total and not stopped:
        epoch = step // per_epoch
        batches = splits.train.batches(
            config.batch_size, shuffle=True, augment=True, drop_last=drop_last,
            generator=_epoch_generator(config.seed, epoch), start=step % per_epoch)
        for x, y in batches:
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            lr = lr_at(step, total, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ce = criterion(run.model(x), y)
            pen = run.penalty().to(ce.dtype) if run.discrete is None else ce.new_zeros(())
            loss = ce + pen
            value = float(loss.detach())
            if not math.isfinite(value):
                return Result("diverged", float("nan"), None, metrics_out(),
                              error=f"loss {value} at step {step} (lr {lr:.3g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if run.discrete is None:
                run.clamp_()
                if step >= search_steps:
                    run.discretise()
            loss_sum += float(ce.detach()) * len(y)
            pen_sum += float(pen.detach()) * len(y)
            n_seen += len(y)
            window_images += len(y)
            if step % eval_every and step < total:
                continue
            acc, vloss = evaluate(run.model, splits.val, batch_size=config.eval_batch_size,
                                  device=ctx.device)
            best = acc if best is None else max(best, acc)
            w, a = run.unit_bits()
            train_s = time.perf_counter() - window_t
            m = {"step": step, "epoch": step / per_epoch, "train_loss": loss_sum / n_seen,
                 "penalty": pen_sum / n_seen, "lr": lr, "val_acc": acc, "val_loss": vloss,
                 "cost_ratio": float(run.cost(w, a)) / run.target,
                 "phase": "search" if run.discrete is None else "finetune",
                 "images_per_s": window_images / train_s if train_s > 0 else 0.0,
                 "elapsed_s": prior_s + time.perf_counter() - t0}
            history.append(m)
            bits_steps.append(step)
            bits_history.append(run.layer_bits())
            a_history.append(a)
            loss_sum, pen_sum, n_seen, window_images = 0.0, 0.0, 0, 0
            if ctx.report(dict(m), state_fn) is True:
                stopped = True
                break
            window_t = time.perf_counter()
            if step >= total:
                break

    if run.discrete is None:  # stopped during the search: still return a model that fits
        run.discretise()
        acc, vloss = evaluate(run.model, splits.val, batch_size=config.eval_batch_size,
                              device=ctx.device)
        history.append({"step": step, "val_acc": acc, "val_loss": vloss, "phase": "discretised"})
    cand, extra = run.candidate()
    val_acc = history[-1]["val_acc"] if history else float("nan")
    metrics = {**cost_metrics(ctx.space, cand, ctx.budget), **extra, **metrics_out(),
               "searched_bits": run.discrete["searched_bits"], "stopped": stopped}
    if run.a_param is not None:
        metrics["searched_a_bits"] = run.discrete["searched_a"]
    return Result("ok", val_acc, cand, metrics)
