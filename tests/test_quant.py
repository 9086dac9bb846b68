"""Quantizers and quantized layers (qsearch.quant, qsearch.actquant, qsearch.qlayers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qsearch import QSearchError
from qsearch.actquant import EMAActQuant, PACTActQuant, pact_quantize
from qsearch.qlayers import QuantConv2d, QuantLinear, quantize_model
from qsearch.quant import (
    CLIP_CONSTANTS,
    TERNARY_THRESHOLD,
    asym_dequantize,
    asym_quantize,
    dorefa_weight,
    dp_quantize,
    frac_quant,
    quant_error,
    simulate_clip_constant,
    weight_codes,
)


def gaussian(*shape: int, seed: int = 0, std: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


# --- DualPrecision / One-Bitwidth weights -------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_dp_levels_per_filter(bits):
    w = gaussian(16, 8, 3, 3)
    q = dp_quantize(w, bits).reshape(16, -1)
    expected_max = {1: 2, 2: 3}.get(bits, 2**bits - 1)
    for row in q:
        n = row.unique().numel()
        assert n <= expected_max
        if bits <= 2:
            assert n == expected_max  # ternary uses all three levels, binary both


def test_dp_clips_at_a_and_uses_per_filter_statistics():
    w = gaussian(4, 64)
    w[:, 0] = 1.0  # a 10-sigma outlier in every filter: it must be clipped to a_i
    w[2] *= 10  # a filter with a 10x larger scale gets a 10x larger clip point
    q = dp_quantize(w, 4)
    for i in range(4):
        a = w[i].abs().mean() / CLIP_CONSTANTS[4]  # Appendix A: a_i = mean|W_i| / c(b)
        assert torch.allclose(q[i, 0], a, rtol=1e-6)
        assert torch.allclose(q[i].abs().max(), a, rtol=1e-6)
    w2 = w.clone()
    w2[2] *= 3  # rescaling one filter leaves the others untouched
    q2 = dp_quantize(w2, 4)
    assert torch.equal(q2[[0, 1, 3]], q[[0, 1, 3]])
    assert torch.allclose(q2[2], 3 * q[2], rtol=1e-5)


def test_dp_ternary_and_binary_follow_eq3_eq4():
    w = gaussian(3, 50)
    m = w.abs().mean(dim=1, keepdim=True)
    expected = torch.sign(w) * (w.abs() >= TERNARY_THRESHOLD * m) * m
    assert torch.equal(dp_quantize(w, 2), expected)
    expected = torch.where(w >= 0, 1.0, -1.0) * m
    assert torch.equal(dp_quantize(w, 1), expected)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dp_ste_gradient_is_upstream_gradient(bits):
    w = gaussian(8, 4, 3, 3).requires_grad_()
    g = gaussian(8, 4, 3, 3, seed=1)
    dp_quantize(w, bits).backward(g)
    assert torch.equal(w.grad, g)


def test_clip_constants_match_simulation():
    for bits, c in CLIP_CONSTANTS.items():
        sim = simulate_clip_constant(bits, n=200_000, sigmas=(0.1, 1.0), seed=1)
        assert sim == pytest.approx(c, rel=0.03), bits
    assert list(CLIP_CONSTANTS.values()) == sorted(CLIP_CONSTANTS.values(), reverse=True)


def test_dp_rejects_unknown_bits():
    with pytest.raises(QSearchError, match="bits"):
        dp_quantize(gaussian(2, 4), 9)


# --- FracBits: DoReFa, PACT, fractional bit-widths -----------------------------------


def test_dorefa_levels_and_range():
    w = gaussian(8, 32)
    for k in (1, 2, 4):
        q = dorefa_weight(w, k)
        assert q.unique().numel() <= 2**k
        assert q.abs().max() <= 1


def test_pact_clips_and_alpha_gradient():
    x = torch.tensor([-1.0, 0.2, 0.7, 1.5, 3.0], requires_grad=True)
    alpha = torch.tensor(1.0, requires_grad=True)
    q = pact_quantize(x, alpha, 2)
    assert torch.allclose(q, torch.tensor([0.0, 1 / 3, 2 / 3, 1.0, 1.0]))
    q.backward(torch.ones(5))
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0]))
    assert alpha.grad.item() == 2.0  # PACT: dQ/dalpha = 1 where x >= alpha


@pytest.mark.parametrize("which", ["weight", "act", "kernelwise"])
def test_frac_quant_exact_at_integer_bits(which):
    w = gaussian(6, 4, 3, 3)
    alpha = torch.tensor(0.2)
    for k in (1, 2, 3, 5, 8):
        if which == "weight":
            got, want = frac_quant(w, torch.tensor(float(k)), dorefa_weight), dorefa_weight(w, k)
        elif which == "act":
            fn = lambda v, b: pact_quantize(v, alpha, b)  # noqa: E731
            got, want = frac_quant(w.relu(), torch.tensor(float(k)), fn), fn(w.relu(), k)
        else:
            got = frac_quant(w, torch.full((6,), float(k)), dorefa_weight)
            want = dorefa_weight(w, k)
        assert torch.equal(got, want), k


def test_frac_quant_bit_gradient_is_q_ceil_minus_q_floor():
    w = gaussian(6, 4, 3, 3)
    bits = torch.tensor(3.3, requires_grad=True)
    out = frac_quant(w, bits, dorefa_weight)
    q3, q4 = dorefa_weight(w, 3), dorefa_weight(w, 4)
    assert torch.allclose(out, 0.7 * q3 + 0.3 * q4, atol=1e-6)  # Eq. (1)
    g = gaussian(6, 4, 3, 3, seed=2)
    out.backward(g)
    assert torch.allclose(bits.grad, ((q4 - q3) * g).sum(), rtol=1e-5)  # Eq. (2)


def test_frac_quant_kernelwise_bits_per_filter():
    w = gaussian(3, 8)
    bits = torch.tensor([2.0, 2.5, 7.25], requires_grad=True)
    out = frac_quant(w, bits, dorefa_weight)
    for i, (lo, t) in enumerate([(2, 0.0), (2, 0.5), (7, 0.25)]):
        want = (1 - t) * dorefa_weight(w, lo)[i] + t * dorefa_weight(w, lo + 1)[i]
        assert torch.allclose(out[i], want, atol=1e-6)
    out.sum().backward()
    want = (dorefa_weight(w, 8) - dorefa_weight(w, 7))[2].sum()
    assert torch.allclose(bits.grad[2], want, atol=1e-5)


def test_frac_quant_rejects_bits_below_one():
    with pytest.raises(QSearchError, match=">= 1"):
        frac_quant(gaussian(2, 4), torch.tensor(0.5), dorefa_weight)


# --- MixQuant: asymmetric quantization and QE ----------------------------------------


def test_quant_error_monotone_in_bits():
    w = gaussian(64, 32, 3, 3)
    for per_channel in (False, True):
        qe = [quant_error(w, b, per_channel) for b in range(2, 9)]
        assert all(a >= b for a, b in zip(qe, qe[1:])), qe


@pytest.mark.parametrize("per_channel", [False, True])
def test_asym_round_trip_error_bounded_by_half_scale(per_channel):
    w = gaussian(16, 3, 3, 3) + 0.05  # off-centre, so the zero point matters
    for bits in (2, 4, 8):
        codes, scale, zero = asym_quantize(w, bits, per_channel)
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
        err = (asym_dequantize(codes, scale, zero) - w).abs()
        bound = scale.view(-1, 1, 1, 1) if per_channel else scale
        assert (err <= bound / 2 + 1e-7).all()


# --- activations -----------------------------------------------------------------------


def test_ema_act_quant_tracks_range_in_training_and_freezes_in_eval():
    q = EMAActQuant(4, momentum=0.5)
    q(torch.tensor([0.0, 2.0]))  # first batch initialises
    assert q.running_max.item() == 2.0
    q(torch.tensor([0.0, 4.0]))
    assert q.running_max.item() == 3.0
    q.eval()
    y = q(torch.tensor([0.0, 1.0, 10.0]))
    assert q.running_max.item() == 3.0
    assert y.max().item() == pytest.approx(3.0)  # clipped at the frozen range
    assert y.unique().numel() <= 16


def test_ema_act_quant_clipped_ste_gradient():
    q = EMAActQuant(2).eval()
    q.running_min.fill_(-1.0)
    q.running_max.fill_(2.0)
    x = torch.tensor([-3.0, -0.5, 0.4, 1.9, 5.0], requires_grad=True)
    y = q(x)
    assert torch.allclose(y, torch.tensor([-1.0, 0.0, 0.0, 2.0, 2.0]))  # levels -1, 0, 1, 2
    y.backward(torch.full((5,), 2.0))
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 2.0, 2.0, 0.0]))
    from qsearch.actquant import _pass_inside

    g, v = gaussian(1000, seed=3), gaussian(1000, seed=4)
    lo, hi = torch.tensor(-0.05), torch.tensor(0.1)
    assert torch.equal(_pass_inside(g, v, lo, hi), _pass_inside(g, v, float(lo), float(hi)))


def test_pact_module_fractional_bits():
    q = PACTActQuant(torch.tensor(3.5, requires_grad=True), alpha=1.0)
    y = q(torch.linspace(0, 1, 50))
    y.sum().backward()
    assert q.bits.grad is not None and q.alpha.grad is not None


# --- layers and quantize_model -------------------------------------------------------


def test_quantize_model_replaces_exactly_named_layers_and_keeps_keys():
    model = small_net()
    keys = set(model.state_dict())
    names = ["0", "3.0", "6"]
    quantize_model(model, {"0": 8, "3.0": 4})
    assert isinstance(model[0], QuantConv2d) and isinstance(model[3][0], QuantConv2d)
    assert type(model[6]) is nn.Linear
    assert set(model.state_dict()) == keys  # a_bits None: no new entries at all
    model = small_net()
    quantize_model(model, dict.fromkeys(names, 2), a_bits=4)
    assert isinstance(model[6], QuantLinear)
    assert keys <= set(model.state_dict())
    assert model[0].act_quant.bits == 8  # first layer input: 8 bits
    assert model[3][0].act_quant.bits == 4
    model(torch.randn(2, 3, 8, 8)).sum().backward()


def test_quantize_model_shares_weights_and_quantizes_forward():
    model = small_net()
    w = model[0].weight
    x = torch.randn(2, 3, 8, 8)
    quantize_model(model, {"0": 3})
    assert model[0].weight is w
    y = model[0](x)
    assert torch.equal(y, torch.nn.functional.conv2d(x, dp_quantize(w, 3), model[0].bias, 1, 1))


def test_quantize_model_float_bits_and_schemes():
    for scheme in ("dualprecision", "dorefa", "asym"):
        model = small_net()
        quantize_model(model, {"0": 8, "3.0": None, "6": 32}, a_bits=4, scheme=scheme)
        assert model[3][0].quantized_weight() is model[3][0].weight
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert isinstance(model[6].act_quant, EMAActQuant)


@pytest.mark.parametrize("scheme", ["dualprecision", "dorefa", "asym"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_weight_codes_reproduce_forward_exactly(scheme, bits):
    w = gaussian(8, 4, 3, 3)
    u, zero, scale = weight_codes(w, bits, scheme)
    assert u.dtype == torch.uint8 and int(u.max()) < 2**bits
    rebuilt = ((u.float() - zero[:, None]) * scale[:, None]).view_as(w)
    from qsearch.quant import quantize_weight

    assert torch.equal(rebuilt, quantize_weight(w, bits, scheme))


def test_quantize_model_bad_input_names_the_fix():
    with pytest.raises(QSearchError, match="named_modules"):
        quantize_model(small_net(), {"nope": 4})
    with pytest.raises(QSearchError, match="1..8"):
        quantize_model(small_net(), {"0": 12})
    with pytest.raises(QSearchError, match="scheme"):
        quantize_model(small_net(), {"0": 4}, scheme="lsq")


def test_quantize_model_with_learnable_fractional_bits():
    model = small_net()
    layer_bits = nn.Parameter(torch.tensor(3.5))
    kernel_bits = nn.Parameter(torch.full((8,), 4.25))  # one per output filter of "3.0"
    act_bits = nn.Parameter(torch.tensor(4.5))
    quantize_model(model, {"0": 8, "3.0": kernel_bits, "6": layer_bits}, act_bits, scheme="dorefa")
    assert isinstance(model[3][0].act_quant, PACTActQuant)
    assert isinstance(model[0].act_quant, EMAActQuant)  # the image input: 8-bit EMA
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    assert layer_bits.grad is not None and act_bits.grad is not None
    assert kernel_bits.grad.shape == (8,)
