"""Weight quantizers: the papers' equations as functions on tensors.

Three weight schemes, one per family of papers:

- ``"dualprecision"`` (default): the per-filter quantizer of One-Bitwidth Sec. 3.1 /
  DualPrecision Sec. 3.1: Eq. (1) for b > 2 with the clipping point a_i = mean|W_i| / c(b)
  of Appendix A, ternary Eq. (3) for 2 bits, binary Eq. (4) for 1 bit, straight-through
  backward Eq. (5).
- ``"dorefa"``: DoReFa weights as used by FracBits (Eq. 3), with the fractional bit-widths
  of FracBits Eq. (1)-(2) (:func:`frac_quant`; PACT activations are in
  :mod:`qsearch.actquant`).
- ``"asym"``: MixQuant's vanilla asymmetric min/max quantization and its quantization error
  (:func:`quant_error`; the QE table over many bit-widths at once is MixQuant's
  :func:`qsearch.strategies._qe.qe_table`).

``None`` or 32 bits means float everywhere. Activation quantizers live in
:mod:`qsearch.actquant`, the drop-in layers and :func:`~qsearch.qlayers.quantize_model` in
:mod:`qsearch.qlayers`; their names stay importable from here too.

Every quantizer that has integer codes computes its forward value as ``codes * scale`` (or
``(codes - zero) * scale``) with the same tensors :func:`weight_codes` returns, so an exported
model (:mod:`qsearch.export`) reproduces the training-time weights bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from qsearch import QSearchError

FLOAT_BITS = 32
MAX_BITS = 8  # integer bit-widths a layer accepts: 1..MAX_BITS, or None / FLOAT_BITS for float
SCHEMES = ("dualprecision", "dorefa", "asym")
TERNARY_THRESHOLD = 0.7  # Eq. (3), One-Bitwidth: zero out |W_ij| < 0.7 mean|W_i|
_EPS = 1e-12  # floor for statistics of all-zero filters (keeps scales finite)

# c(b) = mean|W_i| / a_i* for Gaussian weights (Appendix A, One-Bitwidth), from
# simulate_clip_constant(b) with its defaults (n=2e6 samples for each of 3 sigmas, seed 0).
# tests/test_quant.py re-derives them.
CLIP_CONSTANTS: dict[int, float] = {
    3: 0.4084,
    4: 0.3225,
    5: 0.2754,
    6: 0.2444,
    7: 0.2219,
    8: 0.2039,
}


def is_float_bits(bits: int | Tensor | None) -> bool:
    """``None`` and 32 (or more) bits mean "leave it in floating point"."""
    return bits is None or (not isinstance(bits, Tensor) and bits >= FLOAT_BITS)


class _StraightThrough(torch.autograd.Function):
    """Forward ``fn(x, *args)``; backward the identity w.r.t. ``x`` (Eq. (5), One-Bitwidth).

    As fast as ``x + (fn(x) - x).detach()`` (benchmarks/bench_qat_step.py times both) and,
    unlike it, returns ``fn(x)`` bit for bit, which the exporter relies on.
    """

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[..., Tensor], *args) -> Tensor:
        ctx.n_args = len(args)
        return fn(x, *args)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad, None, *([None] * ctx.n_args))


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest with a straight-through gradient."""
    return _StraightThrough.apply(x, torch.round)


def _levels(bits: int | Tensor, ref: Tensor) -> Tensor:
    """``2**bits - 1`` as an exact float tensor (integer arithmetic, then a cast)."""
    if isinstance(bits, Tensor):
        return (2 ** bits.detach().to(torch.int64) - 1).to(ref.dtype)
    return torch.tensor(2**bits - 1, dtype=ref.dtype, device=ref.device)


# --------------------------------------------------------------------------------------
# One-Bitwidth / DualPrecision weights
# --------------------------------------------------------------------------------------


def _symmetric_mse(w: np.ndarray, a: float, bits: int) -> float:
    s = a / (2 ** (bits - 1) - 1)
    return float(np.mean(np.square(np.round(np.clip(w, -a, a) / s) * s - w)))


def _golden_min(f: Callable[[float], float], lo: float, hi: float, iters: int = 25) -> float:
    g = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = f(x1), f(x2)
    for _ in range(iters):
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = f(x2)
    return (lo + hi) / 2


def simulate_clip_constant(
    bits: int,
    *,
    n: int = 2_000_000,
    sigmas: Iterable[float] = (0.01, 0.1, 1.0),
    seed: int = 0,
) -> float:
    """c(b) = mean|W| / a*, a* = argmin_a ||Q_a(W) - W||^2 on W ~ N(0, sigma^2).

    Appendix A of One-Bitwidth (Appendix B of DualPrecision), with Q_a of Eq. (1).

    For each sigma: a coarse grid over a / mean|W| in [1, 8], then a golden-section search
    in the bracket around the best grid point. Returns the mean of c over the sigmas (the
    ratio does not depend on sigma, which the several sigmas confirm). NumPy, float64,
    single-threaded: it runs at the same speed on a busy machine.
    """
    if bits < 3:
        raise QSearchError(f"clip constants exist for b > 2 (Eq. (1)); got bits={bits}")
    rng = np.random.default_rng(seed)
    cs = []
    for sigma in sigmas:
        w = rng.standard_normal(n) * sigma
        m = float(np.mean(np.abs(w)))
        grid = [m * (1 + 0.25 * k) for k in range(29)]
        errs = [_symmetric_mse(w, a, bits) for a in grid]
        i = min(range(len(grid)), key=errs.__getitem__)
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        cs.append(m / _golden_min(lambda a, w=w: _symmetric_mse(w, a, bits), lo, hi))
    return sum(cs) / len(cs)


def _check_dp_bits(bits: int) -> None:
    if bits not in (1, 2) and bits not in CLIP_CONSTANTS:
        raise QSearchError(
            f"dualprecision weights support bits 1..{MAX_BITS}, got {bits}: pick one of "
            f"{[1, 2, *sorted(CLIP_CONSTANTS)]} or None/32 for a float layer"
        )


def _dp_parts(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Signed integer codes (float dtype, [Cout, d]) and scale ([Cout, 1]) of Eq. (1)/(3)/(4)."""
    w2 = w.reshape(w.shape[0], -1)
    m = w2.abs().mean(dim=1, keepdim=True).clamp_min(_EPS)  # Eq. (2): mean|W_i|
    if bits == 1:  # Eq. (4): sign(W_i) * mean|W_i|; sign(0) = +1 so there are 2 levels
        return (w2 >= 0).to(w2.dtype) * 2 - 1, m
    if bits == 2:  # Eq. (3): ternary, threshold 0.7 mean|W_i|, scale mean|W_i|
        return torch.sign(w2) * (w2.abs() >= TERNARY_THRESHOLD * m), m
    a = m / CLIP_CONSTANTS[bits]  # Appendix A: a_i = mean|W_i| / c(b)
    s = a / (2 ** (bits - 1) - 1)
    return torch.round(torch.clamp(w2, -a, a) / s), s  # Eq. (1)


def _dp_dequant(w: Tensor, bits: int) -> Tensor:
    codes, s = _dp_parts(w, bits)
    return (codes * s).view_as(w)


def dp_quantize(w: Tensor, bits: int) -> Tensor:
    """Fake-quantize weights per output filter: Eq. (1)/(3)/(4), backward Eq. (5) (One-Bitwidth)."""
    _check_dp_bits(bits)
    return _StraightThrough.apply(w, _dp_dequant, bits)


# --------------------------------------------------------------------------------------
# FracBits: DoReFa weights, fractional bit-widths
# --------------------------------------------------------------------------------------


def _dorefa_parts(w: Tensor, bits: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Codes u in [0, 2^k - 1], zero n/2 and scale 2/n with Q_W = (u - n/2) * 2/n = 2 q_k - 1."""
    t = torch.tanh(w)
    t = t / (2 * t.abs().max().clamp_min(_EPS)) + 0.5  # DoReFa: tanh, then onto [0, 1]
    n = _levels(bits, w)
    return round_ste(t * n), n / 2, 2 / n  # FracBits Eq. (3): q_k(x) = round(n x) / n


def dorefa_weight(w: Tensor, bits: int | Tensor) -> Tensor:
    """DoReFa weights, FracBits Eq. (3): Q_W = 2 q_k(tanh(W) / (2 max|tanh W|) + 1/2) - 1.

    ``bits`` is an int or an integer-valued tensor broadcastable to ``w`` (e.g. ``[Cout, 1,
    1, 1]`` for kernel-wise bits). Gradients flow through tanh and the normalisation;
    rounding is straight-through.
    """
    u, zero, scale = _dorefa_parts(w, bits)
    return (u - zero) * scale


def frac_quant(x: Tensor, bits: Tensor, quant_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Fractional bit-width quantization, FracBits Eq. (1)-(2).

    ``Q_b(x) = Q_lo(x) + (b - lo) (Q_lo+1(x) - Q_lo(x))`` with ``lo = floor(b)``, so
    ``dQ/db = Q_ceil(b) - Q_floor(b)`` (Eq. (2)). ``bits`` is a 0-d tensor (layer-wise) or,
    when ``x`` has more than one dimension, a ``[Cout]`` tensor (kernel-wise: one bit-width
    per output filter, FracBits "Kernel-wise mixed precision"). ``quant_fn(x, k)`` quantizes
    at integer-valued bits ``k`` broadcastable to ``x``, e.g. :func:`dorefa_weight` or
    ``lambda x, k: pact_quantize(x, alpha, k)`` (:func:`qsearch.actquant.pact_quantize`).

    At an integer b the output equals ``quant_fn(x, b)`` exactly. There the upper neighbour
    is taken as b + 1 (the one-sided slope), where the literal ceil(b) = floor(b) would give
    a zero gradient and freeze a bit-width that lands on an integer.
    """
    if bits.dim() == 1 and x.dim() > 1:
        bits = bits.view(-1, *([1] * (x.dim() - 1)))
    lo = torch.floor(bits.detach())
    if bool((lo < 1).any()):
        raise QSearchError(
            f"fractional bit-widths must be >= 1, got min {float(bits.min()):.3f}: "
            "clamp the learnable bit-widths to [1, 8] after each step"
        )
    q_lo = quant_fn(x, lo)
    return q_lo + (bits - lo) * (quant_fn(x, lo + 1) - q_lo)


# --------------------------------------------------------------------------------------
# MixQuant: vanilla asymmetric min/max quantization and its error
# --------------------------------------------------------------------------------------


def _asym_params(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor, int, int]:
    """Scale and zero point from per-row min/max; the range is widened to include 0."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero, qmin, qmax


def _rows(w: Tensor, per_channel: bool) -> Tensor:
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def _check_asym_bits(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= 16):
        raise QSearchError(f"asymmetric quantization needs integer bits in 1..16, got {bits!r}")


@torch.no_grad()
def asym_quantize(w: Tensor, bits: int, per_channel: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Vanilla asymmetric quantization (MixQuant Listing 1, Jacob et al. 2018).

    ``scale = (max - min) / (qmax - qmin)``, ``zero = qmin - round(min / scale)``,
    ``codes = clamp(round(W / scale) + zero, qmin, qmax)`` with signed codes in
    [-2^(b-1), 2^(b-1) - 1]. The range is widened to include 0, so 0 is exact. Per tensor,
    ``scale`` and ``zero`` are 0-d; per channel (dim 0), they have shape ``[C]``.
    Returns ``(codes int32 like w, scale, zero int32)``.
    """
    _check_asym_bits(bits)
    x = _rows(w, per_channel)
    scale, zero, qmin, qmax = _asym_params(*torch.aminmax(x, dim=1), bits)
    codes = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], qmin, qmax)
    if not per_channel:
        scale, zero = scale[0], zero[0]
    return codes.to(torch.int32).view_as(w), scale, zero.to(torch.int32)


def asym_dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``(codes - zero) * scale``; ``scale``/``zero`` of shape ``[C]`` broadcast over dim 0."""
    if scale.dim() == 1:
        shape = (-1, *([1] * (codes.dim() - 1)))
        scale, zero = scale.view(shape), zero.view(shape)
    return (codes.to(scale.dtype) - zero.to(scale.dtype)) * scale


def quant_error(w: Tensor, bits: int, per_channel: bool = False) -> float:
    """MixQuant's QE (Algorithm 1, lines 8-9): MSE between W and dequantize(quantize(W))."""
    return float((asym_dequantize(*asym_quantize(w, bits, per_channel)) - w).square().mean())


# --------------------------------------------------------------------------------------
# Weight quantization by scheme, and the codes the exporter stores
# --------------------------------------------------------------------------------------


def _asym_weight_dequant(w: Tensor, bits: int) -> Tensor:
    return asym_dequantize(*asym_quantize(w, bits, per_channel=True))


def check_bits(bits: int | Tensor | None, scheme: str, name: str = "layer") -> None:
    """Raise :class:`QSearchError` unless ``bits`` is valid for ``scheme``."""
    if scheme not in SCHEMES:
        raise QSearchError(f"unknown weight scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if isinstance(bits, Tensor):
        if scheme != "dorefa":
            raise QSearchError(
                f"{name}: fractional (tensor) bit-widths need scheme='dorefa', not {scheme!r}"
            )
        return
    if bits is None or bits == FLOAT_BITS:
        return
    if not (isinstance(bits, int) and 1 <= bits <= MAX_BITS):
        raise QSearchError(
            f"{name}: weight bits {bits!r} not allowed: use 1..{MAX_BITS}, or None/32 for float"
        )


def quantize_weight(w: Tensor, bits: int | Tensor | None, scheme: str = "dualprecision") -> Tensor:
    """Fake-quantized weight (straight-through gradient) for a scheme; float bits return ``w``."""
    if isinstance(bits, Tensor):
        return frac_quant(w, bits, dorefa_weight)
    if is_float_bits(bits):
        return w
    if scheme == "dualprecision":
        return dp_quantize(w, bits)
    if scheme == "dorefa":
        return dorefa_weight(w, bits)
    if scheme == "asym":  # per output channel, as a layer's weights are stored
        return _StraightThrough.apply(w, _asym_weight_dequant, bits)
    raise QSearchError(f"unknown weight scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")


@torch.no_grad()
def weight_codes(
    w: Tensor, bits: int, scheme: str = "dualprecision"
) -> tuple[Tensor, Tensor, Tensor]:
    """Offset-binary codes for export: ``(u uint8 [Cout, d], zero [Cout], scale [Cout])``.

    ``u`` lies in [0, 2^bits - 1] and ``((u - zero[:, None]) * scale[:, None]).view_as(w)``
    equals :func:`quantize_weight` bit for bit. Per scheme: dualprecision b >= 2 has
    ``zero = 2^(b-1)``, b = 1 has ``u = (sign + 1) / 2``, ``zero = 1/2``, ``scale = 2 mean|W_i|``;
    dorefa has ``zero = n/2``, ``scale = 2/n``; asym has ``u = codes - qmin``.
    """
    check_bits(bits, scheme)
    if isinstance(bits, Tensor) or is_float_bits(bits):
        raise QSearchError(f"weight_codes needs integer bits 1..{MAX_BITS}, got {bits!r}")
    cout = w.shape[0]
    if scheme == "dualprecision":
        codes, s = _dp_parts(w, bits)
        s = s.view(-1)
        if bits == 1:
            return ((codes + 1) / 2).to(torch.uint8), torch.full_like(s, 0.5), 2 * s
        offset = 2 ** (bits - 1)
        return (codes + offset).to(torch.uint8), torch.full_like(s, offset), s
    if scheme == "dorefa":
        u, zero, scale = _dorefa_parts(w, bits)
        return u.reshape(cout, -1).to(torch.uint8), zero.expand(cout), scale.expand(cout)
    codes, scale, zero = asym_quantize(w, bits, per_channel=True)
    qmin = -(2 ** (bits - 1))
    u = (codes - qmin).reshape(cout, -1).to(torch.uint8)
    return u, (zero - qmin).to(scale.dtype), scale
