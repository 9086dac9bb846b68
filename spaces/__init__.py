"""Model families with a width multiplier.

A family is two pure functions registered under one name:

- ``plan(width, *, fixed_first, fixed_last) -> dict[str, Ch]``: every channel count of
  the network at that width, computed with the family's rounding rule.
- ``build(plan, *, in_channels, num_classes) -> nn.Module``: the network for a plan.

Every channel count a builder hands to ``nn.Conv2d``/``nn.Linear`` comes from the plan as a
:class:`Ch`, an ``int`` that remembers its plan key. Torch stores the value as given, so one
trace of the built model tells which plan entry feeds each layer's Cin, Cout and groups.
The cost model then evaluates any width from ``plan(width)`` alone, in microseconds,
without building a model (see :mod:`qsearch.space`). For that, a builder decides structure
(an identity shortcut or a 1x1 projection, an expansion conv or none) from plan keys, never
from counts that may coincide at one width only: the model has the same layers at every
width and after every per-key top-up. A plan gives two entries one ``Ch`` where the
architecture needs them equal (a ResNet stem and the first stage it adds to).

A *fixed-width* family (``Family.fixed_width``) has no width multiplier: ``plan`` returns
``{}``, the builder makes the model's own channels and budgets are met through the bits. Models
given as ``torchvision:NAME`` or ``path/to/file.py:fn`` are such families
(:mod:`qsearch.models`); they are resolved by name, not registered. A factory that takes a
``width`` is a width family (``Family.user_width``): its plan keys every layer's counts by
module name (``"<module>.cin"``), read from the factory's model at that width.

Channel rounding rule, stated once: CIFAR-style families use ``round_channels``
(nearest integer, at least 1); MobileNets use ``make_divisible`` (multiples of 8, never
more than 10% below the exact value), as torchvision does.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from qsearch import QSearchError


class Ch(int):
    """A channel count that remembers which plan entry it came from."""

    key: str

    def __new__(cls, value: int, key: str) -> Ch:
        obj = super().__new__(cls, value)
        obj.key = key
        return obj

    def __reduce__(self):
        return (Ch, (int(self), self.key))


def round_channels(value: float) -> int:
    """CIFAR families: nearest integer, at least one channel."""
    return max(1, int(round(value)))


def make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNet rule (torchvision ``_make_divisible``): a multiple of ``divisor``."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def scaled_plan(
    base: dict[str, int],
    width: float,
    rule: Callable[[float], int],
    fixed: set[str] = frozenset(),
) -> dict[str, Ch]:
    """Scale every base channel count by ``width`` except the ``fixed`` keys."""
    return {k: Ch(v if k in fixed else rule(v * width), k) for k, v in base.items()}


@dataclass(frozen=True)
class Family:
    name: str
    plan: Callable[..., dict[str, Ch]]
    build: Callable[..., nn.Module]
    description: str
    image_size: int  # input resolution the family is designed for (informational)
    granularity: int = 1  # channel step of the rounding rule (8 for MobileNets)
    # True: the model's own channels, no width multiplier (``plan`` returns {}; budgets are
    # met through the bits). torchvision and user-factory models (qsearch.models).
    fixed_width: bool = False
    # True: the width goes to a user factory (``fn(..., width)``, qsearch.models) whose
    # channel rule qsearch does not know. Its plan is traced from the factory's model, so
    # alignment cannot add channels to one plan entry (no top-up: the factory takes only a
    # width) and the cost is checked to grow with the width before bisection relies on it.
    user_width: bool = False
    # A family whose plan needs the data's shapes (a width factory traces its model):
    # ``for_data(in_channels=, num_classes=)`` gives the family whose plan works.
    for_data: Callable[..., Family] | None = None


def at_own_width(family: Family) -> Family:
    """``family`` at its 1x channels as a fixed-width model (``--width fixed``, a checkpoint
    search): every width gives the 1x plan, so budgets are met through the bits."""
    return dataclasses.replace(family, plan=functools.partial(_plan_at_1x, family.plan),
                               fixed_width=True)


def _plan_at_1x(plan: Callable[..., dict[str, Ch]], width: float, **kwargs) -> dict[str, Ch]:
    return plan(1.0, **kwargs)


_FAMILIES: dict[str, Family] = {}
_MODULES = ("qsearch.spaces.cifar", "qsearch.spaces.imagenet")


def register_family(
    name: str, *, plan: Callable, build: Callable, description: str, image_size: int = 32,
    granularity: int = 1,
) -> None:
    if name in _FAMILIES:
        raise ValueError(f"model family {name!r} is registered twice")
    _FAMILIES[name] = Family(name, plan, build, description, image_size, granularity)


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(mod)


def list_families() -> list[str]:
    _load_all()
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    """A registered family, or a model named ``torchvision:NAME`` / ``path/to/file.py:fn`` /
    ``package.module:fn`` (fixed width; see :mod:`qsearch.models`)."""
    if ":" in name:
        from qsearch.models import resolve_model  # imports torch: only for such names

        return resolve_model(name)
    _load_all()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise QSearchError(
            f"unknown model {name!r}: choose one of {', '.join(sorted(_FAMILIES))}, or any "
            "torchvision classifier as torchvision:NAME (e.g. torchvision:resnet18), or your "
            "own factory as path/to/file.py:function"
        ) from None
