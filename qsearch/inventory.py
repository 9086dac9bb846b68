"""Layer inventory of any ``nn.Module``: one traced forward records every Conv2d and Linear.

The model is built and run on the meta device (no memory, no compute). A model that reads
tensor data while it is built or run (torchvision's RegNet computes its widths with tensors;
its error names the meta device) is built and run once on the CPU instead.

What the inventory counts, for any model (zoo families, torchvision, user factories):

- every Conv2d (groups and depthwise included) and Linear the forward calls, in call order,
  including those inside squeeze-excitation and attention blocks;
- a Linear applied to tokens (input ``(N, ..., D)``) does its MACs once per token: its
  ``out_hw`` is ``(tokens, 1)``;
- a module called more than once is one layer (its weights are stored once) and its MACs are
  those of its first call; a warning names such layers;
- parametric layers qsearch does not quantize (Conv1d, Conv3d, ConvTranspose*, LSTM/GRU/RNN,
  Embedding, MultiheadAttention's bare ``in_proj`` weights, Conv2d/Linear the forward never
  calls, ...) are named once in a warning; they stay float and their parameters count in the
  packed-size estimate's float part, as do norm layers' parameters.

A count's plan key comes from the :class:`~qsearch.spaces.Ch` a zoo builder handed to the
layer, or, for a plan keyed by module name (a width factory's, :mod:`qsearch.models`), is
``"<module>.cin"``, ``".cout"``, ``".groups"`` or (BatchNorm) ``".features"`` when the plan
has that entry.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial

from qsearch import QSearchError
from qsearch.spaces import Ch, Family

MAX_NAMED = 3  # names shown per kind of layer in a warning; the rest are counted
Extra = tuple[str | None, int, int]  # (plan key or None, floats per channel, channels)


@dataclass(frozen=True)
class Layer:
    """One quantizable layer as traced at width 1. ``*_key`` name the plan entries it uses."""

    index: int
    name: str
    role: str  # stem | conv | pointwise | depthwise | fc
    cin: int
    cout: int
    groups: int
    kernel: tuple[int, int]
    stride: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    cin_key: str | None
    cout_key: str | None
    groups_key: str | None
    bias: bool = False  # one bias per output channel (fc; counted in C_size on request)

    @property
    def fan_in(self) -> int:
        """d = Cin/groups x Kh x Kw, the elements per output filter."""
        return self.cin // self.groups * self.kernel[0] * self.kernel[1]

    @property
    def params(self) -> int:
        return self.cout * self.fan_in

    @property
    def macs(self) -> int:
        return self.params * self.out_hw[0] * self.out_hw[1]


def _key(value, plan: dict, name: str, dim: str) -> str | None:
    """The plan entry of a count: the one its ``Ch`` names, else ``<name>.<dim>`` if planned."""
    if isinstance(value, Ch):
        return value.key
    return f"{name}.{dim}" if f"{name}.{dim}" in plan else None


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one bounded line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def trace_layers(family: Family, plan: dict, *, in_channels: int, num_classes: int,
                 image_size: int) -> tuple[list[Layer], list[Extra]]:
    """Build the model, run one forward, record every quantizable layer.

    Also returns the float parameters outside conv/fc weights (BN affine + running stats,
    biases, and every parameter of a layer that is not quantized) as (plan key or None,
    floats per channel, channels at this plan) triples.
    """
    model, calls = _traced_forward(family, plan, in_channels, num_classes, image_size)
    if not calls:
        raise QSearchError(f"model {family.name!r} has no Conv2d or Linear layer that its "
                           "forward calls: qsearch quantizes only those; give a model that "
                           "has them")
    _warn_float_layers(family.name, model, calls)
    layers = [_layer(i, name, *call[:3], plan) for i, (name, call) in enumerate(calls.items())]
    return layers, _float_extras(model, calls, plan)


def _traced_forward(family: Family, plan: dict, in_channels: int, num_classes: int,
                    image_size: int):
    """The model and its Conv2d/Linear calls: name -> [module, in shape, out shape, calls].

    On the meta device first; only an error that names the meta device is retried on the
    CPU. Errors of building the model pass unchanged (a user factory's are already one line,
    a zoo family's are bugs); a failing forward becomes one line.
    """
    import torch

    shape = (1, in_channels, image_size, image_size)
    build = partial(family.build, plan, in_channels=in_channels, num_classes=num_classes)
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = build().eval()
        except Exception as e:  # noqa: BLE001 - retried on the CPU, else raised as it is
            if device == "cpu" or "meta" not in str(e).lower():
                raise
            continue
        try:
            return model, _record(model, torch.zeros(shape, device=device))
        except Exception as e:  # noqa: BLE001 - a model's forward may raise anything
            if device == "cpu" or "meta" not in str(e).lower():
                raise QSearchError(
                    f"model {family.name!r} fails on the dataset's input of shape {shape} "
                    f"({first_line(e)}): choose a dataset whose images it accepts, or make "
                    f"it accept {in_channels}-channel {image_size}x{image_size} images"
                ) from None
    raise AssertionError("the CPU pass returns or raises")


def _record(model, x) -> dict[str, list]:
    import torch
    import torch.nn as nn

    calls: dict[str, list] = {}

    def hook(mod, inp, out, name):
        if name in calls:
            calls[name][3] += 1
        else:
            calls[name] = [mod, tuple(inp[0].shape), tuple(out.shape), 1]

    hooks = [mod.register_forward_hook(partial(hook, name=name))
             for name, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _hw(shape: tuple, conv: bool) -> tuple[int, int]:
    """Spatial size of a conv map, or (tokens, 1) for a Linear's (N, ..., D) tensor."""
    if conv:
        return tuple(shape[-2:])
    return (math.prod(shape[1:-1]), 1)


def _layer(i: int, name: str, m, ishape: tuple, oshape: tuple, plan: dict) -> Layer:
    import torch.nn as nn

    conv = isinstance(m, nn.Conv2d)
    if not conv:
        cin, cout, groups, kernel, stride = m.in_features, m.out_features, 1, (1, 1), 1
        role = "fc"
    else:
        cin, cout, groups = m.in_channels, m.out_channels, m.groups
        kernel, stride = tuple(m.kernel_size), m.stride[0]
        role = ("stem" if i == 0 else "depthwise" if groups > 1 and groups == cin
                else "pointwise" if kernel == (1, 1) else "conv")
    return Layer(i, name, role, int(cin), int(cout), int(groups), kernel, stride,
                 _hw(ishape, conv), _hw(oshape, conv), _key(cin, plan, name, "cin"),
                 _key(cout, plan, name, "cout"),
                 _key(groups, plan, name, "groups") if groups > 1 else None, m.bias is not None)


def _float_extras(model, calls: dict[str, list], plan: dict) -> list[Extra]:
    """BN (affine + running stats) and traced biases per channel, keyed to the plan; every
    other parameter (norm layers, layers left float) as a constant count."""
    import torch.nn as nn

    traced = {id(c[0]) for c in calls.values()}
    extras: list[Extra] = []
    counted: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            n = mod.num_features
            extras.append((_key(n, plan, name, "features"), 4, int(n)))
            counted |= {id(p) for p in mod.parameters(recurse=False)}
        elif id(mod) in traced:
            counted.add(id(mod.weight))
            if mod.bias is not None:
                n = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
                extras.append((_key(n, plan, name, "cout"), 1, int(n)))
                counted.add(id(mod.bias))
    extras += [(None, 1, p.numel()) for p in model.parameters() if id(p) not in counted]
    return extras


def _named(groups: dict[str, list[str]]) -> str:
    """``kind xN (first names)`` per kind: short even for a model with hundreds of layers."""
    parts = []
    for kind, names in groups.items():
        shown = ", ".join(names[:MAX_NAMED]) + (", ..." if len(names) > MAX_NAMED else "")
        parts.append(f"{kind} x{len(names)} ({shown})")
    return "; ".join(parts)


def _left_float(model, traced: set[int]) -> dict[str, list[str]]:
    """Parametric modules left float, by kind: torch layers qsearch does not quantize,
    Conv2d/Linear the forward never calls, and bare parameters of the model's own modules."""
    import torch.nn as nn

    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
             nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    groups: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        own = [n for n, _ in mod.named_parameters(recurse=False)]
        if not own or id(mod) in traced or isinstance(mod, norms):
            continue
        if type(mod).__module__.startswith("torch.nn"):
            unused = " not called by forward" if isinstance(mod, (nn.Conv2d, nn.Linear)) else ""
            groups.setdefault(type(mod).__name__ + unused, []).append(name)
        else:
            groups.setdefault("bare Parameter", []).extend(
                f"{name}.{n}" if name else n for n in own)
    return groups


def _warn_float_layers(model_name: str, model, calls: dict[str, list]) -> None:
    """One warning for the parametric layers left float, one for layers called twice."""
    left = _left_float(model, {id(c[0]) for c in calls.values()})
    if left:
        warnings.warn(f"{model_name}: {sum(map(len, left.values()))} parametric layer(s) or "
                      "parameter(s) are not quantized and stay float (qsearch quantizes the "
                      "Conv2d and Linear layers the forward calls; these count as float in "
                      f"the packed size): {_named(left)}", stacklevel=3)
    again = [f"{name} ({c[3]} calls)" for name, c in calls.items() if c[3] > 1]
    if again:
        warnings.warn(f"{model_name}: layer(s) called more than once count once (weights "
                      f"and the MACs of the first call): {_named({'layer': again})}",
                      stacklevel=3)
