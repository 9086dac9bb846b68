"""Activation quantizers, applied at the input of each quantized layer.

EMA min/max ranges (Jacob et al. 2018) by default, PACT (Choi et al. 2018; FracBits Eq. (3))
for the ``"dorefa"`` weight scheme. ``None`` or 32 bits means float. Weight quantizers are in
:mod:`qsearch.quant`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from qsearch import QSearchError
from qsearch.quant import _EPS, _levels, frac_quant, is_float_bits

ACT_SCHEMES = ("ema", "pact")


def _pass_inside(grad: Tensor, x: Tensor, lo: float | Tensor, hi: float | Tensor) -> Tensor:
    """``grad`` where lo < x < hi, else 0: the clipped straight-through gradient."""
    if isinstance(lo, Tensor) or isinstance(hi, Tensor):
        return grad * ((x > lo) & (x < hi))
    # One fused pass (HardTanh's backward); a bool mask costs ~10x more on CPU
    return torch.ops.aten.hardtanh_backward(grad, x, lo, hi)


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
                # the range stays float32 under a bfloat16 autocast (--bf16)
                b_lo, b_hi = (v.to(lo.dtype) for v in torch.aminmax(x.detach()))
                new = torch.isnan(lo)
                lo = torch.where(new, b_lo, torch.lerp(lo, b_lo, self.momentum))
                hi = torch.where(new, b_hi, torch.lerp(hi, b_hi, self.momentum))
                if self.training:
                    self.running_min.copy_(lo)
                    self.running_max.copy_(hi)
            scale, zero = self.qparams(lo, hi)
            params = torch.stack([scale, -zero, 2**self.bits - 1 - zero]).float()
            params = params.tolist() if x.device.type == "cpu" else params.unbind()
        return _AsymFakeQuant.apply(x, *params)

    def qparams(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point (codes 0..2^bits - 1) of the range [lo, hi] widened to include
        0; the ONNX exporter (:mod:`qsearch.onnx_export`) reads the same numbers."""
        qmax = 2**self.bits - 1
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = ((hi - lo) / qmax).clamp_min(_EPS)
        return scale, torch.round(-lo / scale).clamp(0, qmax)

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
