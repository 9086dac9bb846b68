"""Width mode for a user factory ``fn(*, num_classes, in_channels, width)``.

The factory's channel rule is its own, so its plan is read from its model: ``plan(width)``
builds the model at that width on the meta device (cached per width) and keys every
Conv2d/Linear/BatchNorm count by module name (``"<module>.cin"``, ``".cout"``, ``".groups"``,
``".features"``); :mod:`qsearch.inventory` keys the width-1 trace to the same entries, so the
cost model evaluates any width from the plan, as for the zoo. ``build(plan)`` calls the
factory with the plan's width (:class:`WidthPlan`). ``fixed_first``/``fixed_last`` do not
apply: the factory decides every channel count itself.

What differs from the zoo (``Family.user_width``): width alignment is bisection only (a
factory takes only a width, so no channels can be added to one stage), and bisection needs
the cost to grow with the width, which :func:`check_monotone` verifies once per space and
cost kind.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import numpy as np

from qsearch import QSearchError
from qsearch.budget import format_cost
from qsearch.spaces import Ch, Family

if TYPE_CHECKING:
    from qsearch.space import SearchSpace

CHECK_WIDTHS = 8  # log-spaced widths across the bounds at which the cost must not decrease
KIND_NAMES = {"size": "C_size", "bitops": "BitOPs"}
MAX_CACHED = 1024  # traced plans kept per space (an alignment bisects ~30 widths)


class WidthPlan(dict):
    """A width factory's plan: counts keyed ``<module>.<dim>``, and the width that made them
    (what ``build`` passes to the factory)."""

    def __init__(self, width: float):
        super().__init__()
        self.width = width


def plan_width(name: str, plan: dict) -> float:
    """The width a width factory is called with: the plan's."""
    if not isinstance(plan, WidthPlan):
        raise QSearchError(f"factory {name!r} builds from its width alone: a candidate with "
                           "extra channels per plan entry (channel top-up) does not apply to "
                           "it; give the candidate without channels")
    return plan.width


def unbound_plan(width: float, **_) -> dict:
    raise RuntimeError("a width factory's plan traces its model on the data's shapes: use "
                       "family.for_data(in_channels=..., num_classes=...) (SearchSpace does)")


def for_data(family: Family, *, in_channels: int, num_classes: int) -> Family:
    """``family`` (a width factory) with the plan that traces it on this data's shapes."""
    return dataclasses.replace(family, plan=TracedPlan(family, in_channels, num_classes),
                               for_data=None)


class TracedPlan:
    """``plan(width, **_)`` of a width factory: its model's counts at that width, cached per
    width (a plain object, not an ``lru_cache`` closure, so a space pickles for Ray)."""

    def __init__(self, family: Family, in_channels: int, num_classes: int):
        self.family, self.in_channels, self.num_classes = family, in_channels, num_classes
        self._cache: dict[float, WidthPlan] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}

    def __call__(self, width: float, **_) -> WidthPlan:
        p, reference = self._traced(float(width)), self._traced(1.0)
        if p.keys() != reference.keys():
            missing = sorted({k.rpartition(".")[0] for k in reference.keys() - p.keys()})
            new = sorted({k.rpartition(".")[0] for k in p.keys() - reference.keys()})
            raise QSearchError(
                f"factory {self.family.name!r} builds other layers at width {width:.6g} than "
                f"at width 1 (missing: {', '.join(missing) or '-'}; new: "
                f"{', '.join(new) or '-'}): keep the same Conv2d, Linear and BatchNorm layers "
                "at every width")
        return p

    def _traced(self, width: float) -> WidthPlan:
        if width not in self._cache:
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[width] = _counts(self.family, width, self.in_channels,
                                         self.num_classes)
        return self._cache[width]


def _counts(family: Family, width: float, in_channels: int, num_classes: int) -> WidthPlan:
    """The factory's model at ``width`` (built on the meta device, or on the CPU when it
    reads tensor data while it is built), its layers' counts keyed by module name."""
    import torch
    import torch.nn as nn

    build = functools.partial(family.build, WidthPlan(width), in_channels=in_channels,
                              num_classes=num_classes)
    try:
        with torch.device("meta"):
            model = build()
    except Exception as e:  # noqa: BLE001 - retried on the CPU, else raised as it is
        if "meta" not in str(e).lower():
            raise
        model = build()
    plan = WidthPlan(width)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            dims = {"cin": m.in_channels, "cout": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            dims = {"cin": m.in_features, "cout": m.out_features}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            dims = {"features": m.num_features}
        else:
            continue
        plan.update({f"{name}.{d}": Ch(int(v), f"{name}.{d}") for d, v in dims.items()})
    return plan


def check_monotone(space: SearchSpace, kind: str) -> None:
    """Refuse width alignment when the cost decreases somewhere as the width grows.

    Bisection finds the widest model that fits only if cost never decreases with width: the
    zoo's rounding rules guarantee it, a factory's own rule may not. Checked at
    ``CHECK_WIDTHS`` log-spaced widths across the space's bounds with every free layer at
    the lowest bit choice (pinned layers at their bits), in the budget's cost ``kind``.
    :meth:`SearchSpace.align` calls it at its first alignment of each kind, not when the space
    is built: trial processes and ``qsearch space show`` build spaces that never solve a
    width, and the check traces the factory at ``CHECK_WIDTHS`` widths.
    """
    lo, hi = space.width_bounds
    cand = space.candidate(min(space.bit_choices))
    widths = [float(w) for w in np.geomspace(lo, hi, CHECK_WIDTHS)]
    costs = [space.cost(cand.with_width(w), kind) for w in widths]
    drops = [i for i in range(1, len(widths)) if costs[i] < costs[i - 1]]
    if drops:
        i = drops[0]
        raise QSearchError(
            f"factory {space.model!r}: its {KIND_NAMES[kind]} decreases as the width grows "
            f"({format_cost(costs[i - 1], kind)} at width {widths[i - 1]:.3g}, "
            f"{format_cost(costs[i], kind)} at width {widths[i]:.3g}), so width alignment "
            "cannot solve it: make the factory's channel counts non-decreasing in width, or "
            "drop its width argument to search its bits at fixed width")
