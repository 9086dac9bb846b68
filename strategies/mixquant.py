"""MixQuant (Kloberdanz & Le): per-layer weight bits from the quantization error of a float model.

Algorithm 1 of the paper: for every layer, the quantization error QE (the MSE between the
float weights and their dequantized b-bit version, Sec. 4 "Approximating Roundoff Error") is
computed at each bit-width b in B = {2, ..., 8}; the layer gets

    optBit = argmin b in B  subject to  QE(b) <= QE(8) x QEM                      (Eq. 1)

i.e. the smallest bit-width whose error is at most QEM times the int8 error ("if the QE at a
bit-width b is less or equal to int8 QE multiplied by the QEM, b becomes the optimal
bit-width", Sec. 4). Read literally, ``argmin quantErrors`` would always return 8 bits; the
text and Table 2 make clear the minimum is over bit-widths. A larger QEM gives fewer bits.

The vectorised pieces are pure functions: :func:`qe_table` computes the whole
``[layers, 7]`` QE table (on a CPU one compiled, SIMD loop per row and bit-width while the
row sits in L1; on a GPU a few tensor ops per block, all bit-widths at once) and
:func:`mixquant_bits` applies Eq. (1) to it for one QEM (a numpy comparison), so a QEM
sweep costs one table. The quantizer is pluggable: ``"asym"`` is the vanilla asymmetric
min/max quantizer of Listing 1 (:func:`qsearch.quant.asym_quantize`), per output channel or
per tensor; any other weight scheme of :mod:`qsearch.quant`, or a callable, goes through a
plain per-layer loop.

The search needs a trained float model. Without a ``checkpoint``, the first trial (task
``mixquant_float``) trains one at the width where a uniform ``float_bits`` model fills the
budget and reports the QE table in ``Result.metrics`` (layers x 7 floats, so the driver never
sees the weights), saving the weights under ``weights_dir`` when PTQ needs them. Two modes:

- ``"aligned"`` (default): every QEM of a sweep gives a relative bit allocation; its width is
  re-solved to fill the budget and it trains like any candidate (task ``train``).
  QEMs that give the same bits give one candidate.
- ``"ptq"``: post-training quantization at the float model's own width, the paper's
  setting. The QEM is found by bisection as the smallest that makes the model fit the budget;
  task ``mixquant_ptq`` quantizes the float weights with the asymmetric quantizer, calibrates
  the activation ranges on a few batches, optionally fine-tunes a few steps, and evaluates.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qsearch import QSearchError
from qsearch.budget import Budget, format_cost
from qsearch.candidate import Candidate
from qsearch.space import SearchSpace
from qsearch.strategy import (
    FINISHED,
    Proposal,
    Result,
    Strategy,
    record_result,
    register_strategy,
)
from qsearch.tasks import TaskContext, cost_metrics, register_task

if TYPE_CHECKING:
    from torch import Tensor

MIXQUANT_BITS = (2, 3, 4, 5, 6, 7, 8)  # B of Algorithm 1; the int8 column is the baseline
STATE_VERSION = 1
# Why the default sweep is read off the table: for rounding noise s^2/12 with
# s = range/(2^b - 1), QE(b)/QE(8) = ((2^8 - 1)/(2^b - 1))^2 ~ 4^(8 - b) (4.0 at 7 bits ...
# 7225 at 2), and trained weights stay close to that, so layers differ by small factors
# around those ratios. A fixed QEM list mostly gives uniform allocations (all layers cross
# together); QEMs placed among the table's breakpoints give the mixed ones. (With QE as an
# MSE, the paper's 1.1-3.5 of Table 2 would leave nearly every layer at 8 bits.)
DEFAULT_SWEEP = 6
_CHUNK = 1 << 15  # elements of one layer per block: the [bits, block] buffer stays in L2

Quantizer = Callable[["Tensor", int], "Tensor"]  # (weights, bits) -> dequantized weights


# ----- the QE table and Eq. (1) -------------------------------------------------------
def qe_table(weights: Sequence[Tensor], bits: Sequence[int] = MIXQUANT_BITS, *,
             quantizer: str | Quantizer = "asym", per_channel: bool = True) -> np.ndarray:
    """QE (mean squared error of dequantize(quantize(W)) - W) of every layer at every bit-width.

    Returns a float64 array ``[len(weights), len(bits)]``. ``quantizer`` is ``"asym"``
    (vanilla asymmetric min/max, MixQuant Listing 1, per output channel or per tensor: the
    fast path), another weight scheme of :mod:`qsearch.quant` (``"dualprecision"``,
    ``"dorefa"``), or a callable ``(w, bits) -> dequantized w`` (Algorithm 1, line 8: "any
    quantization method can be used").
    """
    import torch

    bits = [int(b) for b in bits]
    if not bits or any(not 1 <= b <= 16 for b in bits):
        raise QSearchError(f"QE bit-widths {bits} not allowed: use integers in 1..16, "
                           f"e.g. {list(MIXQUANT_BITS)}")
    if quantizer != "asym" and not per_channel:
        raise QSearchError("per_channel=False applies to quantizer='asym' only; other "
                           "quantizers use their own granularity")
    fn = _resolve_quantizer(quantizer)
    table = np.empty((len(weights), len(bits)))
    with torch.no_grad():
        levels = torch.tensor([2.0**b - 1 for b in bits])
        for i, w in enumerate(weights):
            w = w.detach()
            if fn is None:
                table[i] = _asym_qe(w.float().reshape(w.shape[0], -1), levels.to(w.device),
                                    per_channel)
            else:
                table[i] = [float((fn(w, b).double() - w.double()).square().mean())
                            for b in bits]
    return table


def _resolve_quantizer(quantizer: str | Quantizer) -> Quantizer | None:
    """None for the vectorised asymmetric path, else a ``(w, bits) -> dequantized`` function."""
    if callable(quantizer):
        return quantizer
    from qsearch.quant import SCHEMES, quantize_weight

    if quantizer not in SCHEMES:
        raise QSearchError(f"mixquant quantizer {quantizer!r} not known: choose one of "
                           f"{', '.join(SCHEMES)} ('asym' is the paper's)")
    if quantizer == "asym":
        return None
    return lambda w, b: quantize_weight(w, b, quantizer)


def _asym_qe(x: Tensor, levels: Tensor, per_channel: bool) -> np.ndarray:
    """QE of :func:`qsearch.quant.asym_quantize` for every level count, rows of ``x`` at once.

    The range [lo, hi] includes 0 and the zero point is an integer, so the dequantized
    values are the multiples of s = (hi - lo) / L (L = 2^b - 1) inside the range and the
    error of an element is s x (t - round(t)) with t = x / s: clamping never binds. So
    QE = sum over rows of s_row^2 x sum_j (t - round(t))^2, divided by the element count.
    On a CPU a compiled loop sums the squared residuals (:mod:`._qe_kernel`); elsewhere
    (CUDA weights) :func:`_asym_qe_torch` does it with tensor ops.
    """
    if x.device.type != "cpu":
        return _asym_qe_torch(x, levels, per_channel)
    from qsearch.strategies._qe_kernel import residual_sq_sums

    x = x.contiguous().numpy()
    if not per_channel:
        x = x.reshape(1, -1)
    span = (np.maximum(x.max(1), 0) - np.minimum(x.min(1), 0)).astype(np.float64)
    inv = 1 / np.maximum(span, 1e-30)  # an all-zero row needs a finite 1/span: t = 0
    lv = levels.double().numpy()
    sums = np.empty((len(x), len(lv)))
    residual_sq_sums(x, inv.astype(np.float32), lv.astype(np.float32), sums)
    return (span**2 @ sums) / (lv**2 * x.size)


def _asym_qe_torch(x: Tensor, levels: Tensor, per_channel: bool) -> np.ndarray:
    """:func:`_asym_qe` with tensor ops, for weights on a GPU.

    With u = x / (hi - lo) + 3/2 and L odd, frac(L u) = t - round(t) + 1/2 exactly (L x 3/2 is
    an integer plus 1/2) and L u > 0, so one multiply and one ``frac`` per element and
    bit-width give the residual; per row, sum (frac - 1/2)^2 = sum frac^2 - sum frac + d/4
    comes from a norm and a sum. All bit-widths are done on one block before the next.
    In float32 the result matches :func:`qsearch.quant.quant_error` to ~1e-5 (relative).
    """
    import torch

    rows, d = x.shape
    tiny = torch.finfo(x.dtype).tiny  # a zero span means an all-zero row: any finite 1/span
    if not per_channel:
        lo, hi = torch.aminmax(x)
        span = (hi.clamp(min=0) - lo.clamp(max=0)).expand(rows)
        inv = span.clamp_min(tiny).reciprocal()
    nb = len(levels)
    step = max(1, _CHUNK // d)
    # Preallocated blocks: fresh ones would be mmap'ed and page-faulted again every block.
    ubuf = torch.empty(min(step, rows) * d, device=x.device)
    tbuf = torch.empty(nb * ubuf.numel(), device=x.device)
    lv = levels.view(nb, 1, 1)
    norms, sums, spans = [], [], []
    for r0 in range(0, rows, step):
        xc = x[r0:r0 + step]  # per channel, its range is read while the block is in cache
        u = ubuf[: xc.numel()].view_as(xc)
        if per_channel:
            s = xc.amax(1).clamp_(min=0).sub_(xc.amin(1).clamp_(max=0))
            torch.mul(xc, s.clamp_min(tiny).reciprocal_()[:, None], out=u)
        else:
            s = span[r0:r0 + step]
            torch.mul(xc, inv[r0:r0 + step, None], out=u)
        t = tbuf[: nb * xc.numel()].view(nb, xc.shape[0], d)
        torch.mul(u.add_(1.5), lv, out=t).frac_()
        norms.append(torch.linalg.vector_norm(t, dim=-1))
        sums.append(t.sum(-1))
        spans.append(s)
    per_row = (torch.cat(norms, 1).double().square_() - torch.cat(sums, 1).double()
               + d / 4)  # sum over the row of (t - round t)^2, one value per bit-width
    span2 = torch.cat(spans).double().square_()
    qe = (per_row @ span2) / (levels.double().to(x.device) ** 2 * x.numel())
    return qe.cpu().numpy()


def mixquant_bits(qe_table: np.ndarray, qem: float, bits: Sequence[int] = MIXQUANT_BITS, *,
                  choices: Sequence[int] | None = None) -> list[int]:
    """Eq. (1) for every layer: the smallest b with QE(b) <= QEM x QE(8).

    ``bits`` labels the table's columns (it must include 8, the baseline); ``choices`` (a
    subset, default all) are the bit-widths a layer may get. A layer where no choice
    satisfies the constraint (only possible when 8 is not a choice) gets the largest choice.
    """
    table = np.asarray(qe_table, dtype=float)
    bits = [int(b) for b in bits]
    choices = sorted({int(b) for b in (bits if choices is None else choices)})
    qem = float(qem)
    if not (math.isfinite(qem) and qem >= 1):
        raise QSearchError(f"QEM {qem} not allowed: use a finite number >= 1 (Eq. (1): "
                           "QE(b) <= QEM x QE(8); QEM = 1 keeps every layer at 8 bits)")
    if 8 not in bits or table.ndim != 2 or table.shape[1] != len(bits):
        raise QSearchError(f"QE table of shape {table.shape} does not match bit-widths {bits} "
                           "(one column per bit-width, 8 included as the baseline)")
    missing = [b for b in choices if b not in bits]
    if missing or not choices:
        raise QSearchError(f"bit choices {choices} must be a non-empty subset of the table's "
                           f"bit-widths {bits}")
    ok = _ratios(table, bits, choices) <= qem  # Eq. (1), as QE(b) / QE(8) <= QEM
    chosen = np.asarray(choices)[ok.argmax(axis=1)]  # first True = smallest bit-width
    chosen[~ok.any(axis=1)] = choices[-1]
    return chosen.tolist()


def _ratios(table: np.ndarray, bits: list[int], choices: Sequence[int]) -> np.ndarray:
    """QE(b) / QE(8) for the ``choices`` columns; 0 where QE(b) = 0, inf where only QE(8) is.

    Eq. (1) and the breakpoints both compare these same numbers, so a breakpoint QEM
    selects exactly the bits it stands for (QE(b) <= QEM x QE(8) can round the other way).
    """
    sub = table[:, [bits.index(b) for b in choices]]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sub == 0, 0.0, sub / table[:, [bits.index(8)]])


def spread_qems(qe_table: np.ndarray, n: int, bits: Sequence[int] = MIXQUANT_BITS, *,
                choices: Sequence[int] | None = None) -> list[float]:
    """``n`` QEMs spread evenly over the distinct allocations Eq. (1) gives for this table.

    Allocation k holds for QEM in [breakpoint k, breakpoint k + 1); the QEMs are the
    breakpoints at ``n`` evenly spaced interior positions, so the two uniform extremes (every
    layer at the largest / smallest choice) are left out and the mixed allocations between
    them are sampled.
    """
    points = qem_breakpoints(qe_table, bits, choices=choices)
    picks = np.linspace(0, len(points) - 1, n + 2)[1:-1].round().astype(int)
    return [float(points[i]) for i in np.unique(picks)]


def qem_breakpoints(qe_table: np.ndarray, bits: Sequence[int] = MIXQUANT_BITS, *,
                    choices: Sequence[int] | None = None) -> np.ndarray:
    """The sorted QEMs >= 1 at which some layer's Eq. (1) choice changes (1 included).

    Bits are non-increasing in the QEM and change only where QEM = QE(b) / QE(8), so the
    smallest QEM that meets any cost is one of these values.
    """
    bits = [int(b) for b in bits]
    ratio = _ratios(np.asarray(qe_table, dtype=float), bits,
                    bits if choices is None else [int(b) for b in choices])
    ratio = ratio[np.isfinite(ratio)]
    return np.unique(np.concatenate([[1.0], np.maximum(ratio, 1.0)]))


# ----- the strategy -------------------------------------------------------------------
@register_strategy("mixquant")
class MixQuant(Strategy):
    """MixQuant bit allocation from the QE table of a float model (Algorithm 1, Eq. (1)).

    Args:
        mode: ``"aligned"`` (QEM sweep, each allocation width-aligned to the budget and
            trained like other candidates) or ``"ptq"`` (the paper's post-training setting:
            the float model's width, QEM bisected so the model fits, PTQ accuracy).
        qems: the QEM sweep of ``"aligned"`` mode; ``"auto"`` (default) reads ``n_qems``
            QEMs off the QE table (:func:`spread_qems`), or give a list.
        n_qems: how many QEMs ``"auto"`` picks.
        bits: bit-widths a free layer may get (default: B = 2..8 within the space's bit
            choices; pass ``--bit-choices 2,3,4,5,6,7,8`` for the paper's full B).
        quantizer: ``"asym"`` (the paper's vanilla asymmetric quantizer) or another weight
            scheme of :mod:`qsearch.quant`. In ``"ptq"`` mode the model is quantized with it.
        per_channel: ``"asym"`` ranges per output channel (default; how :mod:`qsearch.quant`
            quantizes a layer) or per tensor (the paper's per-layer setting).
        checkpoint: a float ``state_dict`` of the space's model (``torch.save``); loaded with
            ``weights_only=True``. Skips the float trial.
        checkpoint_width: the checkpoint's width multiplier (default: inferred from shapes).
        float_bits: the float trial trains at the width where a uniform ``float_bits`` model
            fills the budget (in ``"ptq"`` mode, the average bits MixQuant can spend).
        weights_dir: where the float trial saves its weights for ``"ptq"`` mode; every
            worker must be able to read it (a shared directory on a cluster).
        calib_batches: training batches that calibrate the activation ranges (``"ptq"``).
        finetune_steps: optional quantization-aware fine-tuning steps after PTQ.
        finetune_lr: peak learning rate of that fine-tuning.
    """

    _max_trials: int | None = None

    def __init__(self, space: SearchSpace, budget: Budget, *, seed: int = 0,
                 mode: str = "aligned", qems: Sequence[float] | str = "auto",
                 n_qems: int = DEFAULT_SWEEP,
                 bits: Sequence[int] | None = None, quantizer: str = "asym",
                 per_channel: bool = True, checkpoint: str | None = None,
                 checkpoint_width: float | None = None, float_bits: int = 6,
                 weights_dir: str | None = None, calib_batches: int = 8,
                 finetune_steps: int = 0, finetune_lr: float = 0.005):
        super().__init__(space, budget, seed=seed)
        if mode not in ("aligned", "ptq"):
            raise QSearchError(f"mixquant mode={mode!r} not understood: use 'aligned' (QEM "
                               "sweep, width fills the budget) or 'ptq' (post-training, the "
                               "float model's width)")
        if mode == "ptq" and qems != "auto":
            raise QSearchError("mixquant qems is for mode='aligned': mode='ptq' finds its QEM "
                               "by bisection so the model fits the budget")
        self.mode = mode
        if isinstance(qems, str):
            if qems != "auto":
                raise QSearchError(f"mixquant qems={qems!r} not understood: use 'auto' or a "
                                   "list, e.g. --strategy-arg qems=[8,32,128,512]")
            self.qems: list[float] | None = None
        else:
            self.qems = [float(q) for q in qems]
            if not self.qems or any(not (math.isfinite(q) and q >= 1) for q in self.qems):
                raise QSearchError(f"mixquant qems {list(qems)} not allowed: give finite "
                                   "values >= 1, e.g. --strategy-arg qems=[8,32,128,512]")
        if int(n_qems) != n_qems or n_qems < 1:
            raise QSearchError(f"mixquant n_qems={n_qems!r} must be an integer >= 1")
        self.n_qems = int(n_qems)
        allowed = [b for b in MIXQUANT_BITS if b in space.bit_choices]
        self.bits = sorted({int(b) for b in (allowed if bits is None else bits)})
        if not self.bits or any(b not in allowed for b in self.bits):
            raise QSearchError(
                f"mixquant bits {list(bits) if bits is not None else self.bits} not allowed: "
                f"choose from {allowed} (B = 2..8 within the space's bit choices "
                f"{list(space.bit_choices)}; widen them with --bit-choices 2,3,4,5,6,7,8)")
        _resolve_quantizer(quantizer)  # validates the name
        if quantizer != "asym" and not per_channel:
            raise QSearchError("mixquant per_channel=False applies to quantizer='asym' only")
        self.quantizer, self.per_channel = quantizer, bool(per_channel)
        if not 1 <= int(float_bits) <= 8:
            raise QSearchError(f"mixquant float_bits={float_bits} not allowed: use 1..8")
        for name, value, low in (("calib_batches", calib_batches, 1),
                                 ("finetune_steps", finetune_steps, 0)):
            if int(value) != value or value < low:
                raise QSearchError(f"mixquant {name}={value!r} must be an integer >= {low}")
        if not (math.isfinite(finetune_lr) and finetune_lr >= 0):
            raise QSearchError(f"mixquant finetune_lr={finetune_lr} must be >= 0")
        self.calib_batches, self.finetune_steps = int(calib_batches), int(finetune_steps)
        self.finetune_lr = float(finetune_lr)
        self.weights_dir = weights_dir
        self.checkpoint = checkpoint

        self.table: np.ndarray | None = None
        self.float_info: dict[str, Any] = {}  # width, val_acc, weights_path
        if checkpoint is not None:
            width, weights = _load_checkpoint(space, checkpoint, checkpoint_width)
            self.float_width = width
            self.table = qe_table(weights, MIXQUANT_BITS, quantizer=quantizer,
                                  per_channel=self.per_channel)
            self.float_info = {"width": width, "val_acc": None, "weights_path": checkpoint}
        else:
            if mode == "ptq" and weights_dir is None:
                raise QSearchError("mixquant mode='ptq' needs the float weights where every "
                                   "worker can read them: pass weights_dir=DIR (shared on a "
                                   "cluster) or checkpoint=FILE")
            self.float_width = self.align(int(float_bits)).width
        self.float_trial: str | None = None
        self.float_error: str | None = None
        self.inflight: dict[str, int] = {}
        self.done: dict[int, float] = {}
        self.errors: dict[int, str] = {}
        self._plan()

    # ----- candidates from the table ---------------------------------------------------
    def _plan(self) -> None:
        """Candidates from the QE table: (qems, free-layer bits, candidate) per entry."""
        self.entries: list[dict[str, Any]] = []
        self.sweep: list[float] = self.qems or []  # aligned mode's QEMs, once the table is in
        self.infeasible: list[dict[str, Any]] = []
        self.plan_error: str | None = None
        if self.table is None:
            return
        free = self.table[self.space.free_layers]
        if self.mode == "aligned":
            self.sweep = self.qems or spread_qems(free, self._sweep_size(), choices=self.bits)
            for qem in self.sweep:
                bits = mixquant_bits(free, qem, choices=self.bits)
                same = next((e for e in self.entries if e["bits"] == bits), None)
                if same is not None:
                    same["qems"].append(qem)
                    continue
                try:
                    cand = self.align(bits)
                except QSearchError as e:
                    self.infeasible.append({"qem": qem, "bits": bits, "error": str(e)})
                    continue
                self.entries.append({"qems": [qem], "bits": bits, "candidate": cand})
            if not self.entries:
                self.plan_error = f"no QEM of {self.sweep} gives bits that fit {self.budget}"
            return
        found = self._bisect_qem(free)
        if found is None:
            lowest = mixquant_bits(free, qem_breakpoints(free, choices=self.bits)[-1],
                                   choices=self.bits)
            cost = self.space.cost(self.space.candidate(lowest, width=self.float_width),
                                   self.budget.kind)
            self.plan_error = (
                f"the float model (width {self.float_width:.4g}) does not fit {self.budget} "
                f"even at MixQuant's lowest bits ({format_cost(cost, self.budget.kind)}): "
                "lower float_bits or raise the budget")
            return
        qem, bits = found
        cand = self.space.candidate(bits, width=self.float_width)
        self.entries.append({"qems": [qem], "bits": bits, "candidate": cand})

    def _sweep_size(self) -> int:
        """``n_qems``, or fewer when the trial limit leaves fewer trials after the float one,
        so a short search still spreads its candidates over the whole sweep."""
        if self.max_trials is None:
            return self.n_qems
        return max(1, min(self.n_qems, self.max_trials - (self.checkpoint is None)))

    @property
    def max_trials(self) -> int | None:
        return self._max_trials

    @max_trials.setter
    def max_trials(self, n: int | None) -> None:  # the runner sets it before the first ask
        self._max_trials = n
        self._plan()

    def _bisect_qem(self, free: np.ndarray) -> tuple[float, list[int]] | None:
        """The smallest QEM whose bits fit the budget at the float width, by bisection.

        Cost is non-increasing in the QEM and piecewise constant between the breakpoints
        QE(b)/QE(8), so bisecting over the sorted breakpoints is exact.
        """
        points = qem_breakpoints(free, choices=self.bits)

        def fits(i: int) -> list[int] | None:
            bits = mixquant_bits(free, points[i], choices=self.bits)
            cand = self.space.candidate(bits, width=self.float_width)
            return bits if self.space.cost(cand, self.budget.kind) <= self.budget.value else None

        if fits(len(points) - 1) is None:
            return None
        lo, hi = -1, len(points) - 1  # fits(hi) holds; fits(lo) does not (or lo = -1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid) is None:
                lo = mid
            else:
                hi = mid
        return float(points[hi]), fits(hi)

    # ----- ask / tell ------------------------------------------------------------------
    def _float_proposal(self) -> Proposal:
        params = {"width": self.float_width, "bits": list(MIXQUANT_BITS),
                  "quantizer": self.quantizer, "per_channel": self.per_channel,
                  "weights_dir": self.weights_dir if self.mode == "ptq" else None}
        return Proposal(None, task="mixquant_float", params=params)

    def _proposal(self, i: int) -> Proposal:
        entry = self.entries[i]
        if self.mode == "aligned":
            return Proposal(entry["candidate"], params={"qems": entry["qems"]})
        return Proposal(entry["candidate"], task="mixquant_ptq", params={
            "qem": entry["qems"][0], "weights_path": self.float_info["weights_path"],
            "scheme": self.quantizer, "calib_batches": self.calib_batches,
            "finetune_steps": self.finetune_steps, "finetune_lr": self.finetune_lr})

    def ask(self, trial_id: str) -> Proposal | None | str:
        if self.table is None:
            if self.float_error is not None:
                return FINISHED
            if self.float_trial is not None:
                return None  # the float model is training: ask again later
            self.float_trial = trial_id
            return self._float_proposal()
        busy = set(self.done) | set(self.inflight.values())
        todo = [i for i in range(len(self.entries)) if i not in busy]
        if not todo:
            return FINISHED
        self.inflight[trial_id] = todo[0]
        return self._proposal(todo[0])

    def tell(self, trial_id: str, result: Result) -> None:
        if trial_id == self.float_trial and self.table is None:
            self._tell_float(result)
            return
        if trial_id not in self.inflight:
            warnings.warn(f"mixquant: result for unknown trial {trial_id!r} ignored",
                          stacklevel=2)
            return
        record_result(self.done, self.errors, self.inflight.pop(trial_id), result)

    def _tell_float(self, result: Result) -> None:
        m = result.metrics or {}
        table = np.asarray(m.get("qe_table", []), dtype=float)
        shape = (len(self.space.layers), len(MIXQUANT_BITS))
        if table.shape != shape or not np.isfinite(table).all():
            self.float_error = result.error or (
                f"float trial {result.status}: no finite QE table of shape {shape} "
                f"(got {table.shape})")
            return
        if self.mode == "ptq" and not m.get("weights_path"):
            self.float_error = "float trial saved no weights (weights_path) for mode='ptq'"
            return
        self.table = table
        acc = float(result.val_acc)
        self.float_info = {"width": float(m.get("width", self.float_width)),
                           "val_acc": acc if math.isfinite(acc) else None,
                           "weights_path": m.get("weights_path")}
        self.float_width = self.float_info["width"]
        self._plan()

    # ----- state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON: the QE table (so a resume never retrains the float model), the float
        trial, and which candidates were proposed and told (NaN stored as null)."""
        return {**super().state_dict(), "version": STATE_VERSION, "mode": self.mode,
                "table": None if self.table is None else self.table.tolist(),
                "float_info": self.float_info, "float_width": self.float_width,
                "float_trial": self.float_trial, "float_error": self.float_error,
                "inflight": dict(self.inflight),
                "done": {str(i): (a if math.isfinite(a) else None) for i, a in self.done.items()},
                "errors": {str(i): e for i, e in self.errors.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("mode") != self.mode:
            raise QSearchError(
                f"mixquant state (version {state.get('version')}, mode {state.get('mode')!r}) "
                f"cannot resume this search (version {STATE_VERSION}, mode {self.mode!r}): "
                "resume with the same settings")
        super().load_state_dict(state)
        self.table = None if state["table"] is None else np.asarray(state["table"], dtype=float)
        self.float_info = dict(state["float_info"])
        self.float_width = float(state["float_width"])
        self.float_trial, self.float_error = state["float_trial"], state["float_error"]
        self.inflight = dict(state["inflight"])
        self.done = {int(i): (float("nan") if a is None else float(a))
                     for i, a in state["done"].items()}
        self.errors = {int(i): e for i, e in state["errors"].items()}
        self._plan()

    # ----- results ---------------------------------------------------------------------
    def summary(self) -> dict:
        """The QEM -> bits table (free layers, inventory order) with each row's candidate."""
        rows = []
        for i, e in enumerate(self.entries):
            cand: Candidate = e["candidate"]
            status = ("ok" if math.isfinite(self.done[i]) else "failed") if i in self.done \
                else "running" if i in self.inflight.values() else "pending"
            for qem in e["qems"]:
                rows.append({"qem": qem, "bits": e["bits"], "mean_bits": self._mean_bits(cand),
                             "candidate": i, "width": cand.width,
                             "cost": self.space.cost(cand, self.budget.kind),
                             "status": status, "val_acc": self.done.get(i) if status == "ok"
                             else None, "error": self.errors.get(i)})
        rows += [{**e, "candidate": None, "status": "infeasible"} for e in self.infeasible]
        rows.sort(key=lambda r: r["qem"])
        ok = [i for i, a in self.done.items() if math.isfinite(a)]
        best = None
        if ok:
            i = max(ok, key=lambda j: self.done[j])
            best = {"qems": self.entries[i]["qems"], "val_acc": self.done[i],
                    "candidate": self.entries[i]["candidate"].to_dict()}
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


def _load_checkpoint(space: SearchSpace, path: str,
                     width: float | None) -> tuple[float, list[Tensor]]:
    """Width and per-layer weights (inventory order) of a float state_dict file."""
    import torch

    if not os.path.isfile(path):
        raise QSearchError(f"mixquant checkpoint {path!r} not found: pass a state_dict file "
                           f"of {space.model} saved with torch.save(model.state_dict(), path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise QSearchError(f"mixquant checkpoint {path!r} is not a tensor state_dict "
                           f"readable with weights_only=True ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training state of qsearch.train
    if width is None:
        width = _infer_width(space, state)
    model = space.build(float(width))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise QSearchError(f"mixquant checkpoint {path!r} does not match {space.model} at "
                           f"width {width:.4g} ({first[0].strip()}): pass checkpoint_width=W "
                           "for the width it was trained at") from None
    modules = dict(model.named_modules())
    return float(width), [modules[layer.name].weight.detach() for layer in space.layers]


def _infer_width(space: SearchSpace, state: dict) -> float:
    """The width whose layer shapes hold as many weights as the checkpoint (bisection)."""
    try:
        target = sum(int(state[f"{layer.name}.weight"].numel()) for layer in space.layers)
    except KeyError as e:
        raise QSearchError(f"mixquant checkpoint has no weight {e.args[0]!r} of {space.model}: "
                           "is it a state_dict of this space's model?") from None
    lo, hi = space.width_bounds
    total = lambda w: float(space.params(w).sum())  # noqa: E731
    if not total(lo) <= target <= total(hi):
        raise QSearchError(f"mixquant checkpoint ({target} weights) fits no {space.model} width "
                           f"in {space.width_bounds}: pass checkpoint_width=W")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if total(mid) == target:
            return mid
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
    return hi


# ----- trial tasks --------------------------------------------------------------------
@register_task("mixquant_float")
def float_task(ctx: TaskContext) -> Result:
    """Train the float model for the trial length; report its QE table (and save weights)."""
    import torch

    from qsearch.train import train

    p = ctx.proposal.params
    start = time.perf_counter()
    torch.manual_seed(ctx.seed)
    model = ctx.space.build(float(p["width"])).to(ctx.device)
    res = train(model, ctx.splits(), ctx.train_config(), device=ctx.device,
                callback=lambda m, state_fn: ctx.report(m, state_fn), start_state=ctx.restored)
    if res.status == "diverged":
        return Result("diverged", error=res.reason, metrics={"steps": res.steps})
    modules = dict(model.named_modules())
    weights = [modules[layer.name].weight for layer in ctx.space.layers]
    t0 = time.perf_counter()
    table = qe_table(weights, p["bits"], quantizer=p["quantizer"], per_channel=p["per_channel"])
    qe_seconds = time.perf_counter() - t0
    path = None
    if p.get("weights_dir"):
        path = _save_weights(model, Path(p["weights_dir"]), ctx)
    acc = float("nan") if res.val_acc is None else float(res.val_acc)
    return Result("ok", acc, None, {
        "qe_table": table.tolist(), "qe_bits": list(p["bits"]), "width": float(p["width"]),
        "weights_path": path, "float_val_acc": res.val_acc, "qe_seconds": qe_seconds,
        "train_seconds": res.train_seconds, "steps": res.steps,
        "task_seconds": time.perf_counter() - start})


def _save_weights(model, directory: Path, ctx: TaskContext) -> str:
    """``state_dict`` file under ``directory``, named by what produced it (a retried trial
    overwrites its own file); written atomically."""
    import torch

    key = json.dumps({"space": ctx.space.describe(), "params": ctx.proposal.params,
                      "train": ctx.train, "data": ctx.data, "seed": ctx.seed},
                     sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"mixquant-float-{ctx.space.model}-{ctx.space.dataset}-{digest}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return str(path)


@register_task("mixquant_ptq")
def ptq_task(ctx: TaskContext) -> Result:
    """Post-training quantization of the float weights at the proposal's bits, then eval."""
    import torch

    from qsearch.quant import EMAActQuant, quantize_model
    from qsearch.train import evaluate, train

    cand, p = ctx.proposal.candidate, ctx.proposal.params
    start = time.perf_counter()
    torch.manual_seed(ctx.seed)
    model = ctx.space.build(cand)
    model.load_state_dict(torch.load(p["weights_path"], map_location="cpu", weights_only=True))
    quantize_model(model, ctx.space.layer_bits(cand), cand.a_bits, scheme=p["scheme"])
    model.to(ctx.device)
    splits, config = ctx.splits(), ctx.train_config()
    # Calibrate activation ranges only: BN statistics stay those of the float model.
    model.eval()
    quantizers = [m for m in model.modules() if isinstance(m, EMAActQuant)]
    for m in quantizers:
        m.train()
    gen = torch.Generator().manual_seed(ctx.seed)
    with torch.no_grad():
        for k, (x, _) in enumerate(splits.train.batches(config.batch_size, shuffle=True,
                                                        generator=gen)):
            if k >= p["calib_batches"]:
                break
            model(x.to(ctx.device))
    for m in quantizers:
        m.eval()
    ptq_acc, ptq_loss = evaluate(model, splits.val, batch_size=config.eval_batch_size,
                                 device=ctx.device)
    metrics = {**cost_metrics(ctx.space, cand, ctx.budget), "qem": p["qem"],
               "ptq_val_acc": ptq_acc, "ptq_val_loss": ptq_loss,
               "finetune_steps": p["finetune_steps"]}
    acc, status, error = ptq_acc, "ok", None
    if p["finetune_steps"]:
        ft = ctx.train_config(epochs=None, steps=p["finetune_steps"], lr=p["finetune_lr"])
        res = train(model, splits, ft, device=ctx.device, start_state=ctx.restored,
                    callback=lambda m, state_fn: ctx.report(m, state_fn))
        status = "ok" if res.status in ("ok", "stopped") else res.status
        acc = float("nan") if res.val_acc is None else res.val_acc
        error = res.reason if status != "ok" else None
        metrics.update(train_seconds=res.train_seconds, steps=res.steps)
    metrics["task_seconds"] = time.perf_counter() - start
    return Result(status, acc, cand, metrics, error=error)
