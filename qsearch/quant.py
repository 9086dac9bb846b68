"""Weight and activation quantizers, and the drop-in layers that use them.

Three weight schemes, one per family of papers:

- ``"dualprecision"`` (default): the per-filter quantizer of One-Bitwidth Sec. 3.1 /
  DualPrecision Sec. 3.1: Eq. (1) for b > 2 with the clipping point a_i = mean|W_i| / c(b)
  of Appendix A, ternary Eq. (3) for 2 bits, binary Eq. (4) for 1 bit, straight-through
  backward Eq. (5).
- ``"dorefa"``: DoReFa weights as used by FracBits (Eq. 3), with PACT activations and the
  fractional bit-widths of FracBits Eq. (1)-(2) (:func:`frac_quant`).
- ``"asym"``: MixQuant's vanilla asymmetric min/max quantization, and its quantization error
  (QE) for many bit-widths at once (:func:`quant_error_table`).

Activations are quantized at the input of each quantized layer: EMA min/max ranges
(Jacob et al. 2018) by default, PACT for the ``"dorefa"`` scheme. ``None`` or 32 bits means
float everywhere. :func:`quantize_model` turns a float model plus ``{layer name: bits}``
into a quantized one in place.

Every quantizer that has integer codes computes its forward value as ``codes * scale`` (or
``(codes - zero) * scale``) with the same tensors :func:`weight_codes` returns, so an exported
model (:mod:`qsearch.export`) reproduces the training-time weights bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from qsearch import QSearchError

FLOAT_BITS = 32
MAX_BITS = 8  # integer bit-widths a layer accepts: 1..MAX_BITS, or None / FLOAT_BITS for float
SCHEMES = ("dualprecision", "dorefa", "asym")
ACT_SCHEMES = ("ema", "pact")
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


@torch.no_grad()
def dp_codes(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Integer codes (int32, shape of ``w``) and per-filter scale ``[Cout]`` of :func:`dp_quantize`.

    ``codes * scale.view(-1, 1, ...)`` equals the forward value of :func:`dp_quantize`
    exactly. Codes lie in [-(2^(b-1)-1), 2^(b-1)-1] for b > 2, {-1, 0, 1} for 2 bits and
    {-1, 1} for 1 bit.
    """
    _check_dp_bits(bits)
    codes, s = _dp_parts(w, bits)
    return codes.to(torch.int32).view_as(w), s.view(-1)


# --------------------------------------------------------------------------------------
# FracBits: DoReFa weights, PACT activations, fractional bit-widths
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


class _PACT(torch.autograd.Function):
    """PACT forward, and its gradients: dQ/dx = 1 on (0, alpha), dQ/dalpha = 1 where x >= alpha."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, n: Tensor) -> Tensor:
        ctx.save_for_backward(x, alpha)
        y = torch.clamp(x, torch.zeros_like(alpha), alpha)
        scale = alpha / n
        return torch.round(y / scale) * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, alpha = ctx.saved_tensors
        a = float(alpha) if x.device.type == "cpu" else alpha
        below = _pass_inside(grad, x, -math.inf, a)  # grad where x < alpha
        grad_alpha = (grad.sum() - below.sum()).reshape(alpha.shape)
        return _pass_inside(below, x, 0.0, math.inf), grad_alpha, None


def pact_quantize(x: Tensor, alpha: Tensor, bits: int | Tensor) -> Tensor:
    """PACT activations, FracBits Eq. (3): Q_X = alpha q_k(clamp(X, 0, alpha) / alpha)."""
    return _PACT.apply(x, alpha, _levels(bits, x))


def frac_quant(x: Tensor, bits: Tensor, quant_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Fractional bit-width quantization, FracBits Eq. (1)-(2).

    ``Q_b(x) = Q_lo(x) + (b - lo) (Q_lo+1(x) - Q_lo(x))`` with ``lo = floor(b)``, so
    ``dQ/db = Q_ceil(b) - Q_floor(b)`` (Eq. (2)). ``bits`` is a 0-d tensor (layer-wise) or,
    when ``x`` has more than one dimension, a ``[Cout]`` tensor (kernel-wise: one bit-width
    per output filter, FracBits "Kernel-wise mixed precision"). ``quant_fn(x, k)`` quantizes
    at integer-valued bits ``k`` broadcastable to ``x``, e.g. :func:`dorefa_weight` or
    ``lambda x, k: pact_quantize(x, alpha, k)``.

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


def _may_round_past(v: float, s: float, bound: float, upper: bool) -> bool:
    """Whether round(v / s) in float32 could fall beyond ``bound``.

    Decided in float64, which is exact enough unless v / s sits within float32 error of a
    rounding tie; then the answer is "maybe" and the caller clamps.
    """
    r = v / s
    if abs(abs(r - math.floor(r)) - 0.5) < 1e-5 * max(1.0, abs(r)):
        return True
    return round(r) > bound if upper else round(r) < bound


@torch.no_grad()
def quant_error_table(w: Tensor, bits_list: Iterable[int], per_channel: bool = False) -> Tensor:
    """QE of :func:`quant_error` for every bit-width in ``bits_list``, in one pass over ``w``.

    Returns a float64 tensor aligned with ``bits_list``; the values match
    :func:`quant_error` to float32 rounding. Speed (MixQuant searches over whole
    ResNet-152s): the min/max is taken once, and all bit-widths are evaluated on a
    cache-sized block before the next block is read. Per tensor, each bit-width costs four
    passes over a block with Python-float operands (``round(x / s)``, then
    ``s * codes - x`` fused in one ``add``, then a ``dot``), using
    ``clamp(round(x/s) + z, qmin, qmax) - z = clamp(round(x/s), qmin - z, qmax - z)``. The
    clamp is skipped when the extreme elements already round inside the range: rounding
    is monotone, so then no element can fall outside.
    """
    bits_list = list(bits_list)
    for b in bits_list:
        _check_asym_bits(b)
    if per_channel:
        return _quant_error_rows(w.detach().reshape(w.shape[0], -1), bits_list)
    x = w.detach().reshape(-1)
    lo, hi = torch.aminmax(x)
    vmin, vmax = float(lo), float(hi)
    consts = []
    for b in bits_list:
        scale, zero, qmin, qmax = _asym_params(lo.view(1), hi.view(1), b)
        s, z = float(scale), float(zero)
        clamp = _may_round_past(vmin, s, qmin - z, False) or _may_round_past(
            vmax, s, qmax - z, True
        )
        consts.append((s, qmin - z, qmax - z, clamp))
    chunk = (1 << 15) * torch.get_num_threads() if x.device.type == "cpu" else 1 << 24
    total = torch.zeros(len(bits_list), dtype=torch.float64, device=x.device)
    for xc in x.split(chunk):
        neg = xc.neg()
        for i, (s, lo_c, hi_c, clamp) in enumerate(consts):
            t = torch.div(xc, s).round_()
            if clamp:
                t.clamp_(lo_c, hi_c)
            torch.add(neg, t, alpha=s, out=t)  # s * codes - x
            total[i] += torch.dot(t, t)
    return total / x.numel()


def _quant_error_rows(x: Tensor, bits_list: list[int]) -> Tensor:
    """Per-channel :func:`quant_error_table`: row blocks, per-row scales broadcast."""
    lo, hi = torch.aminmax(x, dim=1)
    params = [_asym_params(lo, hi, b) for b in bits_list]
    scale = torch.stack([p[0] for p in params])[:, :, None]  # [B, R, 1]
    lo_c = torch.stack([p[2] - p[1] for p in params])[:, :, None]
    hi_c = torch.stack([p[3] - p[1] for p in params])[:, :, None]
    total = torch.zeros(len(bits_list), dtype=torch.float64, device=x.device)
    rows, d = x.shape
    block = 1 << 15
    step_r, step_c = max(1, block // d), min(d, block)
    for r0 in range(0, rows, step_r):
        r = slice(r0, r0 + step_r)
        s, lo_r, hi_r = scale[:, r], lo_c[:, r], hi_c[:, r]
        for c0 in range(0, d, step_c):
            xc = x[r, c0 : c0 + step_c]
            t = xc / s
            t.round_().clamp_(lo_r, hi_r).mul_(s).sub_(xc)
            total += t.square_().sum(dim=(1, 2), dtype=torch.float64)
    return total / x.numel()


# --------------------------------------------------------------------------------------
# Activation quantizers
# --------------------------------------------------------------------------------------


def _pass_inside(grad: Tensor, x: Tensor, lo: float | Tensor, hi: float | Tensor) -> Tensor:
    """``grad`` where lo < x < hi, else 0: the clipped straight-through gradient."""
    if isinstance(lo, Tensor) or isinstance(hi, Tensor):
        return grad * ((x > lo) & (x < hi))
    # One fused pass (HardTanh's backward); a bool mask costs ~10x more on CPU
    return torch.ops.aten.hardtanh_backward(grad, x, lo, hi)


class _AsymFakeQuant(torch.autograd.Function):
    """``clamp(round(x / s), lo_c, hi_c) * s`` forward, clipped straight-through backward.

    The operands are Python floats on CPU (TensorIterator runs 0-d tensor operands 3-4x
    slower there, and ``torch.fake_quantize_per_tensor_affine`` is ~10x slower than these
    four passes) and 0-d tensors elsewhere (no host sync).
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale, lo_c, hi_c) -> Tensor:
        ctx.save_for_backward(x)
        ctx.bounds = (lo_c * scale, hi_c * scale)
        return (x / scale).round_().clamp_(lo_c, hi_c).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return _pass_inside(grad, x, *ctx.bounds), None, None, None


class EMAActQuant(nn.Module):
    """Asymmetric activation fake-quantization with EMA min/max ranges (Jacob et al. 2018).

    Training: the range is a running min/max (``momentum`` 0.01, as torch.ao's
    MovingAverageMinMaxObserver; the first batch initialises it), updated under no_grad,
    and the batch is quantized with it. Eval: the range is frozen. An uncalibrated
    quantizer (never run in training) falls back to the batch's own range. The range is
    widened to include 0, and ``2^bits`` levels span it (codes 0..2^bits - 1 with a zero
    point). Backward is the clipped straight-through estimator: identity inside the range,
    zero outside, as TensorFlow's fake-quant ops that Jacob et al. train with.
    """

    def __init__(self, bits: int, *, momentum: float = 0.01):
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.register_buffer("running_min", torch.tensor(float("nan")))
        self.register_buffer("running_max", torch.tensor(float("nan")))

    def forward(self, x: Tensor) -> Tensor:
        if is_float_bits(self.bits):
            return x
        with torch.no_grad():
            lo, hi = self.running_min, self.running_max
            if self.training or not self._calibrated:
                b_lo, b_hi = torch.aminmax(x.detach())
                new = torch.isnan(lo)
                lo = torch.where(new, b_lo, torch.lerp(lo, b_lo, self.momentum))
                hi = torch.where(new, b_hi, torch.lerp(hi, b_hi, self.momentum))
                if self.training:
                    self.running_min.copy_(lo)
                    self.running_max.copy_(hi)
            qmax = 2**self.bits - 1
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            scale = ((hi - lo) / qmax).clamp_min(_EPS)
            zero = torch.round(-lo / scale).clamp(0, qmax)
            params = torch.stack([scale, -zero, qmax - zero]).float()
            params = params.tolist() if x.device.type == "cpu" else params.unbind()
        return _AsymFakeQuant.apply(x, *params)

    @property
    def _calibrated(self) -> bool:
        return not bool(torch.isnan(self.running_min))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, momentum={self.momentum}"


class PACTActQuant(nn.Module):
    """PACT activations with a learnable clip ``alpha`` (FracBits Eq. (3); Choi et al. 2018).

    ``bits`` may be an int or a 0-d float tensor (a learnable fractional bit-width, FracBits
    Eq. (1)). Inputs are assumed non-negative (they follow a ReLU); negatives map to 0.
    ``alpha`` starts at 10, PACT's initial value.
    """

    def __init__(self, bits: int | Tensor, *, alpha: float = 10.0):
        super().__init__()
        self.bits = bits
        self.alpha = nn.Parameter(torch.tensor(alpha))

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.bits, Tensor):
            return frac_quant(x, self.bits, lambda v, k: pact_quantize(v, self.alpha, k))
        if is_float_bits(self.bits):
            return x
        return pact_quantize(x, self.alpha, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


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


# --------------------------------------------------------------------------------------
# Drop-in layers
# --------------------------------------------------------------------------------------


class _QuantMixin:
    """Shared state of the quantized layers: weight bits, scheme, input quantizer.

    ``frozen = True`` means ``weight`` already holds dequantized values ``(u - zero) * scale``
    (set by :func:`qsearch.export.load_model`) and ``frozen_codes`` holds ``(u, zero,
    scale)``; the forward then uses ``weight`` as is. Set ``frozen = False`` to resume QAT.
    """

    w_bits: int | Tensor | None
    scheme: str
    act_quant: nn.Module | None
    weight: Tensor

    def __init__(
        self,
        *args,
        w_bits: int | Tensor | None = None,
        scheme: str = "dualprecision",
        act_quant: nn.Module | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)  # the torch layer's own arguments
        check_bits(w_bits, scheme)
        self.w_bits = w_bits
        self.scheme = scheme
        self.act_quant = act_quant
        self.frozen = False
        self.frozen_codes: tuple[Tensor, Tensor, Tensor] | None = None

    def quantized_weight(self) -> Tensor:
        if self.frozen:
            return self.weight
        return quantize_weight(self.weight, self.w_bits, self.scheme)

    def weight_codes(self) -> tuple[Tensor, Tensor, Tensor]:
        """Export codes ``(u, zero, scale)``, see :func:`weight_codes`."""
        if self.frozen and self.frozen_codes is not None:
            return self.frozen_codes
        return weight_codes(self.weight, self.w_bits, self.scheme)

    def _quant_input(self, x: Tensor) -> Tensor:
        return x if self.act_quant is None else self.act_quant(x)

    def extra_repr(self) -> str:
        bits = "float" if is_float_bits(self.w_bits) else self.w_bits
        return f"{super().extra_repr()}, w_bits={bits}, scheme={self.scheme}"  # type: ignore[misc]


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with quantized weights and input; state_dict keys of Conv2d are kept."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **quant) -> QuantConv2d:
        """Wrap ``conv``, sharing its Parameters (an existing optimizer keeps working)."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
            **quant,
        )
        new.weight, new.bias = conv.weight, conv.bias
        return new.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with quantized weights and input; state_dict keys of Linear are kept."""

    @classmethod
    def from_float(cls, linear: nn.Linear, **quant) -> QuantLinear:
        """Wrap ``linear``, sharing its Parameters (an existing optimizer keeps working)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device="meta",
            **quant,
        )
        new.weight, new.bias = linear.weight, linear.bias
        return new.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._quant_input(x), self.quantized_weight(), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def first_layer_name(model: nn.Module) -> str | None:
    """The first ``nn.Conv2d``/``nn.Linear`` in ``named_modules()`` order (it sees the image)."""
    return next(
        (n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None
    )


def make_act_quant(bits: int | Tensor | None, act_scheme: str = "ema") -> nn.Module | None:
    """An input quantizer for ``bits`` (None when float)."""
    if act_scheme not in ACT_SCHEMES:
        raise QSearchError(
            f"unknown activation scheme {act_scheme!r}: choose one of {', '.join(ACT_SCHEMES)}"
        )
    if is_float_bits(bits):
        return None
    if act_scheme == "pact":
        return PACTActQuant(bits)
    if isinstance(bits, Tensor) or not 1 <= bits <= 16:
        raise QSearchError(f"EMA activation quantizer needs integer bits 1..16, got {bits!r}")
    return EMAActQuant(bits)


def quantize_model(
    model: nn.Module,
    layer_bits: dict[str, int | None],
    a_bits: int | None = None,
    *,
    scheme: str = "dualprecision",
    first_layer_input_bits: int | None = 8,
    act_scheme: str | None = None,
) -> nn.Module:
    """Replace each named ``nn.Conv2d``/``nn.Linear`` by its quantized twin, in place.

    ``layer_bits`` maps names from ``model.named_modules()`` to weight bits (None/32 =
    float weights, the layer still quantizes its input at ``a_bits``). Layers not named stay
    plain float modules. Parameters are shared with the old modules, so state_dict keys are
    unchanged; activation quantizers add their own entries (``<layer>.act_quant.*``).

    Activations: every quantized layer quantizes its input at ``a_bits`` (None/32 = float).
    Choice for the first layer (whose input is the image): when activations are quantized,
    its input is quantized at ``first_layer_input_bits`` (8 by default: the papers keep the
    first layer at 8 bits and an image is 8-bit data, so this costs no accuracy) with the
    EMA quantizer, since a normalised image is signed; with ``a_bits`` None everything is
    float. ``act_scheme`` defaults to "pact" for scheme "dorefa" (FracBits) and "ema"
    (Jacob et al., as DualPrecision Sec. 3.1) otherwise.
    """
    if scheme not in SCHEMES:
        raise QSearchError(f"unknown weight scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    act_scheme = act_scheme or ("pact" if scheme == "dorefa" else "ema")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    unknown = [n for n in layer_bits if n not in layers]
    if unknown:
        shown = ", ".join(list(layers)[:8]) + (", ..." if len(layers) > 8 else "")
        raise QSearchError(
            f"layers {unknown} are not nn.Conv2d/nn.Linear modules of this model: "
            f"use names from model.named_modules(), e.g. {shown}"
        )
    first = first_layer_name(model)
    for name, bits in layer_bits.items():
        if name == "":
            raise QSearchError("cannot replace the model itself: wrap it in a container first")
        check_bits(bits, scheme, name)
        if name == first:
            in_bits = None if is_float_bits(a_bits) else first_layer_input_bits
            act = make_act_quant(in_bits, "ema")
        else:
            act = make_act_quant(a_bits, act_scheme)
        old = layers[name]
        cls = QuantConv2d if isinstance(old, nn.Conv2d) else QuantLinear
        new = cls.from_float(old, w_bits=bits, scheme=scheme, act_quant=act)
        if act is not None:
            act.to(old.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model
