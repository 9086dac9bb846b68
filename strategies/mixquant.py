"""MixQuant (Kloberdanz & Le): per-layer weight bits from the quantization error of a float model.

Algorithm 1 of the paper: for every layer, the quantization error QE (the MSE between the
float weights and their dequantized b-bit version, Sec. 4 "Approximating Roundoff Error") is
computed at each bit-width b in B = {2, ..., 8}; the layer gets

    optBit = argmin b in B  subject to  QE(b) <= QE(8) x QEM                      (Eq. 1)

i.e. the smallest bit-width whose error is at most QEM times the int8 error ("if the QE at a
bit-width b is less or equal to int8 QE multiplied by the QEM, b becomes the optimal
bit-width", Sec. 4). Read literally, ``argmin quantErrors`` would always return 8 bits; the
text and Table 2 make clear the minimum is over bit-widths. A larger QEM gives fewer bits.
The QE table and Eq. (1) are pure functions in :mod:`._qe`; the quantizer is pluggable:
``"asym"`` is the vanilla asymmetric min/max quantizer of Listing 1
(:func:`qsearch.quant.asym_quantize`), per output channel or per tensor.

The search needs a trained float model. Without a ``checkpoint``, the grid's prelude trial
(task ``mixquant_float``, :mod:`._mixquant_tasks`) trains one at the width where a uniform
``float_bits`` model fills the budget and reports the QE table in ``Result.metrics`` (layers
x 7 floats, so the driver never sees the weights), saving the weights under ``weights_dir``
when PTQ needs them; the candidates are planned from that table. Two modes:

- ``"aligned"`` (default): every QEM of a sweep gives a relative bit allocation; its width is
  re-solved to fill the budget and it trains like any candidate (task ``train``).
  QEMs that give the same bits give one candidate.
- ``"ptq"``: post-training quantization at the float model's own width, the paper's
  setting. The QEM is found by bisection as the smallest that makes the model fit the budget;
  task ``mixquant_ptq`` quantizes the float weights with the asymmetric quantizer, calibrates
  the activation ranges on a few batches, optionally fine-tunes a few steps, and evaluates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from qsearch import QSearchError
from qsearch.budget import Budget, format_cost
from qsearch.candidate import Candidate
from qsearch.space import SearchSpace
from qsearch.strategies._mixquant_tasks import load_checkpoint  # and registers the tasks
from qsearch.strategies._qe import (
    MIXQUANT_BITS,
    mixquant_bits,
    qe_table,
    qem_breakpoints,
    resolve_quantizer,
    spread_qems,
)
from qsearch.strategy import GridStrategy, Proposal, Result, register_strategy

STATE_VERSION = 2  # 2: the float trial and its QE table are GridStrategy's prelude
# Why the default sweep is read off the table: rounding noise s^2/12, s = range/(2^b - 1),
# gives QE(b)/QE(8) ~ 4^(8 - b) (4.0 at 7 bits ... 7225 at 2); trained weights stay close, so
# layers differ by small factors around those ratios and a fixed QEM list mostly gives uniform
# allocations; QEMs among the table's breakpoints give the mixed ones. (With QE as an MSE,
# the paper's 1.1-3.5 of Table 2 would leave nearly every layer at 8 bits.)
DEFAULT_SWEEP = 6


@register_strategy("mixquant")
class MixQuant(GridStrategy):
    """MixQuant bit allocation from the QE table of a float model (Algorithm 1, Eq. (1)).

    A :class:`GridStrategy` whose prelude trains the float model: each cell is one bit
    allocation, ``{"qems": [QEMs that give it], "bits": [free layers' bits]}``.

    Args:
        mode: ``"aligned"`` (QEM sweep, each allocation width-aligned to the budget and
            trained like other candidates; a fixed-width model's QEM is bisected as in
            ``"ptq"``) or ``"ptq"`` (the paper's post-training setting: the float model's
            width, QEM bisected so the model fits, PTQ accuracy).
        qems: the QEM sweep of ``"aligned"`` mode; ``"auto"`` (default) reads ``n_qems``
            QEMs off the QE table (:func:`spread_qems`), or give a list.
        n_qems: how many QEMs ``"auto"`` picks (fewer when the trial limit is lower).
        bits: bit-widths a free layer may get (default: B = 2..8 within the space's bit
            choices; pass ``--bit-choices 2,3,4,5,6,7,8`` for the paper's full B).
        quantizer: ``"asym"`` (the paper's vanilla asymmetric quantizer) or another weight
            scheme of :mod:`qsearch.quant`. In ``"ptq"`` mode the model is quantized with it.
        per_channel: ``"asym"`` ranges per output channel (default; how :mod:`qsearch.quant`
            quantizes a layer) or per tensor (the paper's per-layer setting).
        checkpoint: a float ``state_dict`` of the space's model (``--checkpoint``,
            :mod:`qsearch.pretrained`). Skips the float trial.
        checkpoint_width: the checkpoint's width multiplier (default: inferred from shapes).
        float_bits: the float trial trains at the width where a uniform ``float_bits`` model
            fills the budget (in ``"ptq"`` mode, the average bits MixQuant can spend).
        weights_dir: where the float trial saves its weights for ``"ptq"`` mode; every
            worker must be able to read it (a shared directory on a cluster).
        calib_batches: training batches that calibrate activation ranges and BN (``"ptq"``).
        finetune_steps: optional quantization-aware fine-tuning steps after PTQ.
        finetune_lr: peak learning rate of that fine-tuning.
    """
    train_trials = False  # its trials are a float model and post-training quantization
    checkpoint_kwarg, ptq_kwargs = "checkpoint", {"mode": "ptq"}

    def __init__(self, space: SearchSpace, budget: Budget, *, seed: int = 0,
                 mode: str = "aligned", qems: Sequence[float] | str = "auto",
                 n_qems: int = DEFAULT_SWEEP,
                 bits: Sequence[int] | None = None, quantizer: str = "asym",
                 per_channel: bool = True, checkpoint: str | None = None,
                 checkpoint_width: float | None = None, float_bits: int = 6,
                 weights_dir: str | None = None, calib_batches: int = 8,
                 finetune_steps: int = 0, finetune_lr: float = 0.005):
        super().__init__(space, budget, seed=seed)
        self.mode, self.qems = mode, _check_sweep(mode, qems, n_qems)
        self.n_qems, self.bits = int(n_qems), _check_bits(space, bits)
        resolve_quantizer(quantizer)  # validates the name
        if quantizer != "asym" and not per_channel:
            raise QSearchError("mixquant per_channel=False applies to quantizer='asym' only")
        self.quantizer, self.per_channel = quantizer, bool(per_channel)
        _check_numbers(float_bits, calib_batches, finetune_steps, finetune_lr)
        self.calib_batches, self.finetune_steps = int(calib_batches), int(finetune_steps)
        self.finetune_lr = float(finetune_lr)
        self.weights_dir, self.checkpoint = weights_dir, checkpoint
        # The float model and its QE table: from the checkpoint now, else from the prelude.
        self.table: np.ndarray | None = None
        self.float_info: dict[str, Any] = {}  # width, val_acc, weights_path
        self.float_error: str | None = None
        # What plan() made of the table: a candidate per cell, and what summary() shows.
        self.candidates: list[Candidate] = []
        self.sweep: list[float] = list(self.qems or [])  # aligned mode's QEMs
        self.infeasible: list[dict[str, Any]] = []
        self.plan_error: str | None = None
        if checkpoint is not None:
            width, weights = load_checkpoint(space, checkpoint, checkpoint_width)
            self.float_width = width
            self.table = qe_table(weights, MIXQUANT_BITS, quantizer=quantizer,
                                  per_channel=self.per_channel)
            self.float_info = {"width": width, "val_acc": None, "weights_path": checkpoint}
        else:
            if mode == "ptq" and weights_dir is None:
                raise QSearchError("mixquant mode='ptq' needs the float weights where every "
                                   "worker can read them: pass weights_dir=DIR (shared on a "
                                   "cluster) or checkpoint=FILE")
            self.float_width = 1.0 if space.family.fixed_width else \
                self.align(int(float_bits)).width

    # ----- the grid: prelude, plan, proposals ------------------------------------------
    def prelude(self) -> Proposal | None:
        """The float model's training trial, unless a checkpoint gave the QE table."""
        if self.table is not None:
            return None
        params = {"width": self.float_width, "bits": list(MIXQUANT_BITS),
                  "quantizer": self.quantizer, "per_channel": self.per_channel,
                  "weights_dir": self.weights_dir if self.mode == "ptq" else None}
        return Proposal(None, task="mixquant_float", params=params)

    def plan(self, prelude: Result | None) -> list[dict[str, Any]]:
        """The cells from the QE table (the float trial's, or the checkpoint's)."""
        if prelude is not None and not self._read_float(prelude):
            return []
        self.candidates, self.infeasible, self.plan_error = [], [], None
        free = self.table[self.space.free_layers]
        fixed = self.mode == "ptq" or self.space.family.fixed_width  # bisect the QEM
        return self._plan_ptq(free) if fixed else self._plan_sweep(free)

    def _read_float(self, result: Result) -> bool:
        """Take the float trial's QE table and width; False (and ``float_error``) if unusable."""
        m = result.metrics or {}
        table = np.asarray(m.get("qe_table", []), dtype=float)
        shape = (len(self.space.layers), len(MIXQUANT_BITS))
        if table.shape != shape or not np.isfinite(table).all():
            self.float_error = result.error or (
                f"float trial {result.status}: no finite QE table of shape {shape} "
                f"(got {table.shape})")
            return False
        if self.mode == "ptq" and not m.get("weights_path"):
            self.float_error = "float trial saved no weights (weights_path) for mode='ptq'"
            return False
        acc = float(result.val_acc)
        self.table, self.float_width = table, float(m.get("width", self.float_width))
        self.float_info = {"width": self.float_width,
                           "val_acc": acc if math.isfinite(acc) else None,
                           "weights_path": m.get("weights_path")}
        return True

    def _plan_sweep(self, free: np.ndarray) -> list[dict[str, Any]]:
        """Aligned mode: one cell per distinct allocation of the QEM sweep that fits."""
        self.sweep = self.qems or spread_qems(free, self._sweep_size(), choices=self.bits)
        cells: list[dict[str, Any]] = []
        for qem in self.sweep:
            bits = mixquant_bits(free, qem, choices=self.bits)
            if any(c["bits"] == bits for c in cells):
                next(c for c in cells if c["bits"] == bits)["qems"].append(qem)
                continue
            try:
                cand = self.align(bits)
            except QSearchError as e:
                self.infeasible.append({"qem": qem, "bits": bits, "error": str(e)})
                continue
            cells.append({"qems": [qem], "bits": bits})
            self.candidates.append(cand)
        if not cells:
            self.plan_error = f"no QEM of {self.sweep} gives bits that fit {self.budget}"
        return cells

    def _sweep_size(self) -> int:
        """``n_qems``, or fewer when the trial limit leaves fewer trials after the float one,
        so a short search still spreads its candidates over the whole sweep."""
        if self.max_trials is None:
            return self.n_qems
        return max(1, min(self.n_qems, self.max_trials - (self.checkpoint is None)))

    def _plan_ptq(self, free: np.ndarray) -> list[dict[str, Any]]:
        """PTQ mode: one cell, the smallest QEM whose bits fit at the float model's width.

        Cost is non-increasing in the QEM and piecewise constant between the breakpoints
        QE(b)/QE(8), so bisecting over the sorted breakpoints is exact.
        """
        points = qem_breakpoints(free, choices=self.bits)

        def at(i: int) -> Candidate:
            bits = mixquant_bits(free, points[i], choices=self.bits)
            return self.space.candidate(bits, width=self.float_width)

        def cost(i: int) -> float:
            return self.space.cost(at(i), self.budget.kind)

        if cost(len(points) - 1) > self.budget.value:
            self.plan_error = (
                f"the float model (width {self.float_width:.4g}) does not fit {self.budget} "
                f"even at MixQuant's lowest bits "
                f"({format_cost(cost(len(points) - 1), self.budget.kind)}): "
                "lower float_bits or raise the budget")
            return []
        lo, hi = -1, len(points) - 1  # at(hi) fits; at(lo) does not (or lo = -1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if cost(mid) <= self.budget.value else (mid, hi)
        self.candidates.append(at(hi))
        return [{"qems": [float(points[hi])],
                 "bits": mixquant_bits(free, points[hi], choices=self.bits)}]

    def propose(self, cell: dict[str, Any]) -> Proposal:
        cand = self.candidates[self.cells.index(cell)]
        if self.mode == "aligned":
            return Proposal(cand, params={"qems": list(cell["qems"])})
        return Proposal(cand, task="mixquant_ptq", params={
            "qem": cell["qems"][0], "weights_path": self.float_info["weights_path"],
            "scheme": self.quantizer, "calib_batches": self.calib_batches,
            "finetune_steps": self.finetune_steps, "finetune_lr": self.finetune_lr})

    # ----- state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """GridStrategy's state (the float trial's result with its QE table included, so a
        resume never retrains the float model) with the version and mode it is valid for."""
        return {**super().state_dict(), "version": STATE_VERSION, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("mode") != self.mode:
            raise QSearchError(
                f"mixquant state (version {state.get('version')}, mode {state.get('mode')!r}) "
                f"cannot resume this search (version {STATE_VERSION}, mode {self.mode!r}): "
                "resume with the same settings")
        super().load_state_dict(state)

    # ----- results ---------------------------------------------------------------------
    def summary(self) -> dict:
        """The QEM -> bits table (free layers, inventory order) with each row's candidate."""
        rows = []
        for i, (cell, cand) in enumerate(zip(self.cells or [], self.candidates)):
            status = self.cell_status(i)
            rows += [{"qem": qem, "bits": cell["bits"], "mean_bits": self._mean_bits(cand),
                      "candidate": i, "width": cand.width,
                      "cost": self.space.cost(cand, self.budget.kind), "status": status,
                      "val_acc": self.done[i] if status in ("ok", "stopped") else None,
                      "stopped_at_step": self.stopped_at.get(i),
                      "error": self.errors.get(i)} for qem in cell["qems"]]
        rows += [{**e, "candidate": None, "status": "infeasible"} for e in self.infeasible]
        rows.sort(key=lambda r: r["qem"])
        i = self.best_cell()
        best = None if i is None else {"qems": self.cells[i]["qems"], "val_acc": self.done[i],
                                       "candidate": self.candidates[i].to_dict()}
        return {"mode": self.mode, "budget": str(self.budget),
                "free_layers": [self.space.layers[i].name for i in self.space.free_layers],
                "float": {**self.float_info, "width": self.float_width,
                          "error": self.float_error},
                "qem_table": rows, "best": best, "error": self.plan_error or self.float_error}

    def summary_text(self) -> str:
        """The QEM table: per QEM the free layers' bits, the candidate's width and accuracy."""
        from qsearch.candidate import bit_summary

        s = self.summary()
        if not s["qem_table"]:
            return ""
        acc = s["float"]["val_acc"]
        lines = [f"MixQuant {self.mode}: float model at width {self.float_width:.4g}"
                 + (f", val acc {acc:.2%}" if acc is not None else "")]
        for r in s["qem_table"]:
            bits = bit_summary(r["bits"])  # free layers' bits: a histogram
            width = f"width {r['width']:.4g}" if "width" in r else ""
            result = f"{r['val_acc']:.2%}" if r.get("val_acc") is not None else r["status"]
            lines.append(f"  QEM {r['qem']:<9.5g} {bits:<22} {width:<13} {result}")
        return "\n".join(lines)

    def _mean_bits(self, cand: Candidate) -> float:
        """Weight bits averaged over parameters (C_size / parameter count)."""
        return self.space.c_size(cand) / float(self.space.params(cand.width).sum())


# ----- option checks ------------------------------------------------------------------
def _check_sweep(mode: str, qems: Sequence[float] | str, n_qems: int) -> list[float] | None:
    """The mode is known, and the QEM list (None for "auto") and its size are usable."""
    if mode not in ("aligned", "ptq"):
        raise QSearchError(f"mixquant mode={mode!r} not understood: use 'aligned' (QEM "
                           "sweep, width fills the budget) or 'ptq' (post-training, the "
                           "float model's width)")
    if mode == "ptq" and qems != "auto":
        raise QSearchError("mixquant qems is for mode='aligned': mode='ptq' finds its QEM "
                           "by bisection so the model fits the budget")
    if int(n_qems) != n_qems or n_qems < 1:
        raise QSearchError(f"mixquant n_qems={n_qems!r} must be an integer >= 1")
    if isinstance(qems, str):
        if qems != "auto":
            raise QSearchError(f"mixquant qems={qems!r} not understood: use 'auto' or a "
                               "list, e.g. --strategy-arg qems=[8,32,128,512]")
        return None
    out = [float(q) for q in qems]
    if not out or any(not (math.isfinite(q) and q >= 1) for q in out):
        raise QSearchError(f"mixquant qems {list(qems)} not allowed: give finite "
                           "values >= 1, e.g. --strategy-arg qems=[8,32,128,512]")
    return out


def _check_bits(space: SearchSpace, bits: Sequence[int] | None) -> list[int]:
    """The bit-widths a free layer may get: B = 2..8 within the space's bit choices."""
    allowed = [b for b in MIXQUANT_BITS if b in space.bit_choices]
    out = sorted({int(b) for b in (allowed if bits is None else bits)})
    if not out or any(b not in allowed for b in out):
        raise QSearchError(
            f"mixquant bits {list(bits) if bits is not None else out} not allowed: "
            f"choose from {allowed} (B = 2..8 within the space's bit choices "
            f"{list(space.bit_choices)}; widen them with --bit-choices 2,3,4,5,6,7,8)")
    return out


def _check_numbers(float_bits: int, calib_batches: int, finetune_steps: int,
                   finetune_lr: float) -> None:
    if not 1 <= int(float_bits) <= 8:
        raise QSearchError(f"mixquant float_bits={float_bits} not allowed: use 1..8")
    for name, value, low in (("calib_batches", calib_batches, 1),
                             ("finetune_steps", finetune_steps, 0)):
        if int(value) != value or value < low:
            raise QSearchError(f"mixquant {name}={value!r} must be an integer >= {low}")
    if not (math.isfinite(finetune_lr) and finetune_lr >= 0):
        raise QSearchError(f"mixquant finetune_lr={finetune_lr} must be >= 0")
