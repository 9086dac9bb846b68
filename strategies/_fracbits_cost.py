"""FracBits' cost model and discretisation: pure numerics, no training.

:class:`FracCost` is Eq. (6a)/(6b) of FracBits (Yang & Jin, AAAI 2021) as a differentiable
function of fractional bit-widths; :func:`discretise` turns learned bit-widths into integers
that fit the budget (Sec. "Finetuning with mixed precision").
"""

from __future__ import annotations

import numpy as np
import torch

from qsearch import QSearchError
from qsearch.budget import format_cost
from qsearch.space import INPUT_BITS, SearchSpace


class FracCost:
    """Eq. (6a)/(6b) of FracBits as a differentiable function of fractional bit-widths.

    Units are the free layers in inventory order, or (kernel-wise) their output filters,
    layer after layer. ``cost(w, a)`` takes the unit bit-widths ``w`` and the shared
    activation bit-width ``a`` (BitOPs only; None = the space's ``a_bits``) and returns bits
    (size) or BitOPs, in float64, with the conventions of ``SearchSpace.c_size``/``bitops``:
    per layer weights = ``space.params(width)``, MACs = weights x output pixels, the first
    layer reads the ``INPUT_BITS`` image, pinned layers keep their bits.
    """

    def __init__(self, space: SearchSpace, width: float, kind: str, *,
                 kernel_wise: bool = False, a_bits: int | None = None):
        self.kind = kind
        self.a_default = space.a_bits if a_bits is None else a_bits
        params = space.params(width)
        _, cout, _ = space.shapes(width)
        hw = np.array([l.out_hw[0] * l.out_hw[1] for l in space.layers], float)
        coef = params if kind == "size" else params * hw
        free = np.asarray(space.free_layers, int)
        per_layer = cout[free].astype(int) if kernel_wise else np.ones(len(free), int)
        self.layer_of_unit = np.repeat(free, per_layer)
        self.units_per_layer = per_layer
        unit_coef = np.repeat(coef[free] / per_layer, per_layer)
        first = self.layer_of_unit == 0
        self._coef = {"first": np.where(first, unit_coef, 0.0),
                      "rest": np.where(first, 0.0, unit_coef)}
        pinned = space.pinned
        self._const = {"first": sum(b * coef[i] for i, b in pinned.items() if i == 0),
                       "rest": sum(b * coef[i] for i, b in pinned.items() if i != 0)}
        self._torch: dict = {}

    @property
    def n_units(self) -> int:
        return len(self.layer_of_unit)

    def per_layer(self, units) -> list[np.ndarray]:
        """Per-unit values (bits) split into one array per free layer."""
        return np.split(np.asarray(units), np.cumsum(self.units_per_layer)[:-1])

    def _coefs(self, like):
        key = like.device
        if key not in self._torch:
            self._torch[key] = {k: torch.as_tensor(v, dtype=torch.float64, device=like.device)
                                for k, v in self._coef.items()}
        return self._torch[key]

    def __call__(self, w, a=None):
        """Cost of unit bits ``w`` (torch tensor or numpy array) and activation bits ``a``."""
        a = self.a_default if a is None else a
        if isinstance(w, np.ndarray):
            c = self._coef
            first, rest = float(w @ c["first"]), float(w @ c["rest"])
        else:
            c = self._coefs(w)
            w = w.double()
            first, rest = w @ c["first"], w @ c["rest"]
        first, rest = first + self._const["first"], rest + self._const["rest"]
        if self.kind == "size":
            return first + rest
        return INPUT_BITS * first + a * rest

    def per_bit(self, a=None) -> np.ndarray:
        """What one more bit on each weight unit costs, at activation bits ``a``."""
        c = self._coef
        if self.kind == "size":
            return c["first"] + c["rest"]
        return INPUT_BITS * c["first"] + (self.a_default if a is None else a) * c["rest"]

    def uniform_bits(self, target: float, lo: float, hi: float) -> float:
        """b_t: the uniform (weight and activation) bit-width whose cost is ``target``."""
        def cost(b: float) -> float:
            return float(self(np.full(self.n_units, b), b if self.kind == "bitops" else None))
        if cost(lo) >= target:
            return lo
        if cost(hi) <= target:
            return hi
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
        return lo


def discretise(cost: FracCost, w: np.ndarray, a: float | None, target: float, lo: int,
               hi: int) -> tuple[np.ndarray, int | None, float]:
    """Integer bits from fractional ones: cost <= ``target``, within 1% of it if possible.

    The paper (Sec. "Finetuning with mixed precision") binary-searches one threshold for the
    weight and activation bit-widths so that the cost is within 1% of the target. Here a
    bit-width lambda becomes ``clip(ceil(lambda - t), lo, hi)`` for a threshold t in [0, 1)
    (a unit is rounded up when its fraction exceeds t); t < 0 / t >= 1 extend the same rule
    when even the all-ceil model is under / the all-floor model is over the target. The cost
    falls monotonically in t, so bisection over the sorted breakpoints t = lambda - m (ties
    broken by unit order) finds the smallest t that fits. When that last step drops the cost
    by more than 1% (a large layer, or the shared activation bit-width), units are raised
    back greedily in order of decreasing breakpoint while the cost still fits, until it is
    within 1%: first the units rounded down to floor, then (only if that is not enough)
    units above their ceil. Returns (bits per weight unit, activation bits or None, cost).
    """
    v = np.clip(np.asarray(w, float), lo, hi)
    if a is not None:
        v = np.append(v, float(np.clip(a, lo, hi)))
    # Unit k drops from m + 1 to m at t = v_k - m, for m = hi - 1 down to lo; sorted, these
    # events walk every unit from hi (t -> -inf) down to lo (t -> +inf).
    n = len(v)
    unit = np.repeat(np.arange(n), hi - lo)
    m = np.tile(np.arange(hi - 1, lo - 1, -1), n)
    order = unit[np.lexsort((unit, v[unit] - m))]
    top = np.full(n, hi)

    def bits(j: int) -> np.ndarray:
        return top - np.bincount(order[:j], minlength=len(v))

    def total(b: np.ndarray) -> float:
        return float(cost(b[:cost.n_units].astype(float),
                          float(b[-1]) if a is not None else None))

    if total(bits(len(order))) > target:
        raise QSearchError(
            f"no integer model fits the budget {format_cost(target, cost.kind)} at this width "
            f"even with every bit-width at {lo}: lower the width or the range minimum")
    j_lo, j_hi = -1, len(order)  # invariant: cost(bits(j_hi)) <= target < cost(bits(j_lo))
    while j_hi - j_lo > 1:
        mid = (j_lo + j_hi) // 2
        j_lo, j_hi = (j_lo, mid) if total(bits(mid)) <= target else (mid, j_hi)
    b = bits(j_hi)
    c = total(b)
    # Top-up, in order of decreasing breakpoint: the units that were rounded down last.
    per_bit = cost.per_bit(float(b[-1]) if a is not None else None)
    for k in order[:max(0, j_hi - 1)][::-1]:
        if c >= 0.99 * target:
            break
        if k >= cost.n_units:  # the activation unit: re-price everything
            b[k] += 1
            c_new = total(b)
            if c_new <= target:
                c, per_bit = c_new, cost.per_bit(float(b[k]))
            else:
                b[k] -= 1
        elif c + per_bit[k] <= target:
            b[k] += 1
            c += per_bit[k]
    return b[:cost.n_units].copy(), (int(b[-1]) if a is not None else None), total(b)
