"""MixQuant's numeric core: the QE table (Algorithm 1, lines 4-11) and Eq. (1) on it.

:func:`qe_table` computes the whole ``[layers, bits]`` QE table: for the vanilla asymmetric
quantizer (Listing 1) on a CPU one compiled, SIMD loop per row and bit-width while the row
sits in L1 (:mod:`._qe_kernel`, numba, imported on first use), on a GPU a few tensor ops per
block, all bit-widths at once; any other quantizer goes through a plain per-layer loop.
:func:`mixquant_bits` applies Eq. (1) to the table for one QEM (a numpy comparison), so a
QEM sweep costs one table; :func:`qem_breakpoints` and :func:`spread_qems` read QEMs off it.
Pure functions of tensors and arrays: the strategy lives in :mod:`.mixquant`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from qsearch import QSearchError

if TYPE_CHECKING:
    from torch import Tensor

MIXQUANT_BITS = (2, 3, 4, 5, 6, 7, 8)  # B of Algorithm 1; the int8 column is the baseline
_CHUNK = 1 << 15  # elements of one layer per block: the [bits, block] buffer stays in L2

Quantizer = Callable[["Tensor", int], "Tensor"]  # (weights, bits) -> dequantized weights


# ----- the QE table -------------------------------------------------------------------
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
    fn = resolve_quantizer(quantizer)
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


def resolve_quantizer(quantizer: str | Quantizer) -> Quantizer | None:
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


# ----- Eq. (1) ------------------------------------------------------------------------

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
