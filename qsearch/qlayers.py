"""Drop-in quantized layers, and :func:`quantize_model` that puts them into a float model.

:class:`QuantConv2d` and :class:`QuantLinear` quantize their weights with a scheme of
:mod:`qsearch.quant` and their input with a quantizer of :mod:`qsearch.actquant`.
:func:`quantize_model` turns a float model plus ``{layer name: bits}`` into a quantized one
in place.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from qsearch import QSearchError
from qsearch.actquant import make_act_quant
from qsearch.quant import SCHEMES, check_bits, is_float_bits, quantize_weight, weight_codes


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
