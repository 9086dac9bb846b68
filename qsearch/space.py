"""The search space shared by every strategy: layer inventory, cost model, width alignment.

One shape trace of a model family at width 1 records, for every quantizable layer
(Conv2d/Linear), which plan entry feeds its Cin, Cout and groups. Any width is then
evaluated from ``family.plan(width)`` alone, so costs and width alignment need no model.
The trace is :func:`qsearch.inventory.trace_layers`. A fixed-width model (``torchvision:NAME``
or a user factory without ``width``, :mod:`qsearch.models`) has no plan keys: its layers keep
their traced shapes, and ``align`` only checks that a candidate fits.

Costs (all vectorised over layers):

- ``C_size`` (Eq. 6, DualPrecision / One-Bitwidth): sum over filters of b x Cin/groups x Kw x Kh;
  conv and fc weights only (no BN; biases only with ``count_bias``, at the layer's bits, as
  FracBits Sec. 3.2 counts "weights (and bias)").
- BitOPs (FracBits Sec. 3.3, Eq. 6b): per layer MACs x weight bits x input-activation bits;
  a depthwise layer's MACs count Cin/groups = 1 channel per filter; the first layer reads the
  8-bit image; every other layer (fc included) reads activations at ``a_bits``; a float (32-bit)
  pinned layer counts 32 weight bits. With the default 8-bit pins this reproduces FracBits'
  ResNet-18 figures (Table 3: 22.83 G at 3 bit, 34.70 G at 4 bit; see docs/cost-model.md).
- Inference memory footprint (DualPrecision Appendix F): largest input feature map + largest
  output feature map + all weights, for a batch of one.
- Packed size estimate: weight codes bit-packed per layer + one float32 scale per quantized
  filter + remaining float parameters (BN affine and running stats, biases) at 32 bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from qsearch import QSearchError
from qsearch.budget import Budget, format_cost
from qsearch.candidate import FLOAT_BITS, Candidate
from qsearch.data import dataset_info
from qsearch.factory_width import check_monotone
from qsearch.inventory import trace_layers
from qsearch.pins import PIN_CHOICES, match_pins
from qsearch.spaces import Ch, at_own_width, get_family

INPUT_BITS = 8  # the image enters the first layer as 8-bit data
DEFAULT_BIT_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Aligned:
    """A candidate whose width was solved to fill a budget."""

    candidate: Candidate
    cost: float
    budget: Budget

    @property
    def ratio(self) -> float:
        return self.cost / self.budget.value


class SearchSpace:
    """A CNN family on a dataset: layer inventory, candidates, costs and width alignment.

    Args:
        model: a registered family name (``qsearch.spaces.list_families()``), or a
            ``torchvision:NAME`` or a factory ``path/to/file.py:fn`` (:mod:`qsearch.models`):
            fixed width (its own channels), or a width family if the factory takes ``width``.
        dataset: dataset name; sets input channels, classes and resolution.
        a_bits: activation bits of candidates (4 matches the papers' CIFAR setting and is
            iso-accurate with float on Fashion-MNIST in our runs; 32 = float).
        bit_choices: weight bit-widths strategies may assign to free layers.
        pin_bits: bits of the first and last layer (8, as in the papers; 32 = float); None
            frees them.
        fixed_first / fixed_last: keep the stem / final feature channels at their 1x value
            (default: True for ImageNet-resolution families, as the papers do).
        width_bounds: the range width alignment may search.
        count_bias: also count conv/fc biases in C_size, at their layer's weight bits
            (FracBits' model size; off by default, as DualPrecision / One-Bitwidth count).
        fixed_width: search a width family at its own 1x channels, bits only (``--width
            fixed``; a ``--checkpoint`` search): it then behaves as a fixed-width model.
        pins: layer-name pattern (``fnmatch``, e.g. ``layer3.*``) -> bits for layers the user
            leaves alone (``--pin``; ``--keep-float`` pins at 32, float); each pattern must
            match a layer. They come on top of the first/last layer's ``pin_bits``.
    """

    def __init__(self, model: str = "resnet20", dataset: str = "fashion-mnist", *,
                 data_root: str | None = None, a_bits: int = 4,
                 bit_choices: Sequence[int] = DEFAULT_BIT_CHOICES, pin_bits: int | None = 8,
                 fixed_first: bool | None = None, fixed_last: bool | None = None,
                 width_bounds: tuple[float, float] = (0.05, 32.0), count_bias: bool = False,
                 fixed_width: bool = False, pins: Mapping[str, int] | None = None):
        self.model, self.dataset = model, dataset
        self.info = dataset_info(dataset, data_root)
        self.family = get_family(model)
        if self.family.for_data:  # a width factory: its plan traces its model on this data
            self.family = self.family.for_data(in_channels=self.info.in_channels,
                                               num_classes=self.info.num_classes)
        # a width family searched at its own 1x channels (bits only), e.g. from a checkpoint
        self.own_width = bool(fixed_width and not self.family.fixed_width)
        if self.own_width:
            self.family = at_own_width(self.family)
        bad = [b for b in bit_choices if b not in (*range(1, 9), FLOAT_BITS)]
        if bad or not bit_choices:
            raise QSearchError(f"bit choices {list(bit_choices)} not allowed: use values "
                               "from 1..8 (32 = float), e.g. --bit-choices 1,2,4,8")
        if pin_bits is not None and pin_bits not in PIN_CHOICES:
            raise QSearchError(f"pin bits {pin_bits!r} not allowed: use 1..8, 32 (float first "
                               "and last layer) or None (free them), e.g. --pin-bits 8")
        lo, hi = width_bounds
        if not 0 < lo < hi:
            raise QSearchError(f"width bounds ({lo}, {hi}) invalid: need 0 < min < max, "
                               "e.g. --width-min 0.1 --width-max 8")
        self.a_bits = a_bits
        self.bit_choices = tuple(sorted(set(bit_choices)))
        self.pin_bits = pin_bits
        self.count_bias = bool(count_bias)
        self.width_bounds = (float(lo), float(hi))
        imagenet = self.info.image_size >= 128
        self.fixed_first = imagenet if fixed_first is None else fixed_first
        self.fixed_last = imagenet if fixed_last is None else fixed_last
        self.layers, self._extras = trace_layers(
            self.family, self.plan(1.0), in_channels=self.info.in_channels,
            num_classes=self.info.num_classes, image_size=self.info.image_size)
        self._kernel = np.array([l.kernel[0] * l.kernel[1] for l in self.layers], float)
        self._hw_out = np.array([l.out_hw[0] * l.out_hw[1] for l in self.layers], float)
        self._hw_in = np.array([l.in_hw[0] * l.in_hw[1] for l in self.layers], float)
        self._bias = np.array([l.bias and self.count_bias for l in self.layers], float)
        self.pins = dict(pins or {})
        self._width_checked: set[str] = set()  # cost kinds checked to grow with the width
        self._pattern_pins = match_pins(self.pins, [l.name for l in self.layers])

    # ----- structure -------------------------------------------------------------------
    def describe(self) -> dict:
        """Everything that defines the space, as plain data (for specs and hashes)."""
        out = {"model": self.model, "dataset": self.dataset, "a_bits": self.a_bits,
               "bit_choices": list(self.bit_choices), "pin_bits": self.pin_bits,
               "fixed_first": self.fixed_first, "fixed_last": self.fixed_last,
               "width_bounds": list(self.width_bounds)}
        # only when set, so existing spaces keep their descriptions (and hashes)
        if self.count_bias:
            out["count_bias"] = True
        if self.own_width:
            out["fixed_width"] = True
        if self.pins:
            out["pins"] = dict(self.pins)
        return out

    @cached_property
    def pinned(self) -> dict[int, int]:
        """Layer index -> bits of the layers no strategy assigns: the first and last layer
        (unless pin_bits is None) and those the ``pins`` patterns match."""
        ends = {} if self.pin_bits is None else {0: self.pin_bits,
                                                 len(self.layers) - 1: self.pin_bits}
        return {**ends, **self._pattern_pins}

    @cached_property
    def free_layers(self) -> list[int]:
        return [l.index for l in self.layers if l.index not in self.pinned]

    @cached_property
    def groups(self) -> dict[str, list[int]]:
        """Free layers by group: ``depthwise`` and ``other`` (DualPrecision's two precisions)."""
        dw = [i for i in self.free_layers if self.layers[i].role == "depthwise"]
        other = [i for i in self.free_layers if self.layers[i].role != "depthwise"]
        return {k: v for k, v in (("depthwise", dw), ("other", other)) if v}

    def plan(self, at: Candidate | float) -> dict:
        """Channel counts at a width, or at a candidate's width plus its extra channels."""
        width, extra = (at.width, dict(at.channels)) if isinstance(at, Candidate) else (at, {})
        p = self.family.plan(width, fixed_first=self.fixed_first, fixed_last=self.fixed_last)
        if extra:
            p = {name: Ch(int(ch) + extra.get(ch.key, 0), ch.key) for name, ch in p.items()}
        return p

    def build(self, candidate: Candidate | float):
        """The float model (torch nn.Module) of a candidate (or at a width)."""
        return self.family.build(self.plan(candidate), in_channels=self.info.in_channels,
                                 num_classes=self.info.num_classes)

    def layer_bits(self, candidate: Candidate) -> dict[str, int]:
        """Module name -> weight bits, as ``quantize_model`` takes it."""
        return {l.name: b for l, b in zip(self.layers, candidate.w_bits)}

    def candidate(self, bits: int | Sequence[int] | Mapping[str, int], *,
                  width: float = 1.0, a_bits: int | None = None) -> Candidate:
        """A candidate from uniform bits, bits per free layer, bits per layer, or per group.

        Pinned layers always get ``pin_bits``.
        """
        n = len(self.layers)
        if isinstance(bits, Mapping):
            unknown = set(bits) - set(self.groups)
            if unknown:
                raise QSearchError(f"unknown layer groups {sorted(unknown)}: this space has "
                                   f"{sorted(self.groups)}")
            w = [8] * n
            for g, idx in self.groups.items():
                for i in idx:
                    w[i] = bits[g]
        elif isinstance(bits, (int, np.integer)):
            w = [int(bits)] * n
        else:
            bits = [int(b) for b in bits]
            if len(bits) == len(self.free_layers):
                w = [8] * n
                for i, b in zip(self.free_layers, bits):
                    w[i] = b
            elif len(bits) == n:
                w = list(bits)
            else:
                raise QSearchError(f"{len(bits)} bit values given: {self.model} has {n} "
                                   f"layers, {len(self.free_layers)} of them free")
        for i, b in self.pinned.items():
            w[i] = b
        if self.family.fixed_width and width != 1.0:
            raise QSearchError(f"width {width:g} not possible: {self.model} is a fixed-width "
                               "model (its own channels); leave the width at 1 (--width 1)")
        return Candidate(tuple(w), self.a_bits if a_bits is None else a_bits, float(width))

    # ----- shapes and costs ------------------------------------------------------------
    def shapes(self, at: Candidate | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Cin, Cout, groups) of every layer of a candidate (or at a width)."""
        p = self.plan(at)
        def pick(key, const):
            return p[key] if key is not None else const
        cin = np.array([pick(l.cin_key, l.cin) for l in self.layers], float)
        cout = np.array([pick(l.cout_key, l.cout) for l in self.layers], float)
        groups = np.array([pick(l.groups_key, l.groups) for l in self.layers], float)
        return cin, cout, groups

    def params(self, at: Candidate | float) -> np.ndarray:
        """Weights per layer: Cout x Cin/groups x Kh x Kw."""
        cin, cout, groups = self.shapes(at)
        return cout * (cin / groups) * self._kernel

    def _size_bits(self, cand: Candidate) -> np.ndarray:
        """C_size per layer: bits x weights (+ bits x biases with ``count_bias``)."""
        counted = self.params(cand)
        if self.count_bias:
            counted = counted + self._bias * self.shapes(cand)[1]
        return np.asarray(cand.w_bits, float) * counted

    def c_size(self, cand: Candidate) -> float:
        """Eq. (6): sum over filters of b(i) x Cin(i)/groups x Kw(i) x Kh(i), in bits."""
        return float(np.sum(self._size_bits(cand)))

    def _act_bits(self, a_bits: int) -> np.ndarray:
        a = np.full(len(self.layers), float(a_bits))
        a[0] = INPUT_BITS
        return a

    def bitops(self, cand: Candidate) -> float:
        """FracBits Eq. (6b) at integer bits: sum of MACs x w_bits x input a_bits."""
        macs = self.params(cand) * self._hw_out
        return float(np.sum(macs * np.asarray(cand.w_bits, float) * self._act_bits(cand.a_bits)))

    def cost(self, cand: Candidate, kind: str) -> float:
        return self.c_size(cand) if kind == "size" else self.bitops(cand)

    def memory_footprint(self, cand: Candidate) -> float:
        """DualPrecision Appendix F, in bits: largest input + largest output map + weights."""
        cin, cout, _ = self.shapes(cand)
        act = self._act_bits(cand.a_bits)
        largest_in = np.max(cin * self._hw_in * act)
        largest_out = np.max(cout * self._hw_out * cand.a_bits)
        return float(largest_in + largest_out + self.c_size(cand))

    def packed_bytes(self, cand: Candidate) -> dict[str, int]:
        """Estimate of the exported file's payload: codes, per-filter scales, float params."""
        p = self.plan(cand)
        _, cout, _ = self.shapes(cand)
        params = self.params(cand)
        bits = np.asarray(cand.w_bits, float)
        quantized = bits < FLOAT_BITS
        codes = int(sum(math.ceil(n * b / 8) for n, b in zip(params[quantized], bits[quantized])))
        scales = int(4 * cout[quantized].sum())
        floats = int(params[~quantized].sum())
        floats += sum(mult * (p[key] if key else n) for key, mult, n in self._extras)
        return {"code_bytes": codes, "scale_bytes": scales, "float_bytes": 4 * floats,
                "total_bytes": codes + scales + 4 * floats}

    def train_memory_bytes(self, cand: Candidate, batch_size: int) -> float:
        """Rough upper estimate of training memory: float32 weights with their gradient,
        momentum and quantized copy, plus ~4 saved float32 tensors per layer output (conv,
        BN, activation, quantized input) for a batch."""
        _, cout, _ = self.shapes(cand)
        weights = 4 * 4 * float(self.params(cand).sum())
        activations = 4 * 4 * batch_size * float((cout * self._hw_out).sum())
        return weights + activations

    # ----- width alignment -------------------------------------------------------------
    def min_cost(self, bits: Candidate, kind: str) -> float:
        """Cost of these bits at the smallest width the bounds allow."""
        return self.cost(bits.with_width(self.width_bounds[0]), kind)

    def align(self, cand: Candidate, budget: Budget, *, tol: float = 1e-7,
              top_up: bool = True) -> Aligned:
        """Solve the width multiplier so the model fills the budget (cost <= budget).

        Channel counts are integers, so cost is a non-decreasing step function of width;
        bisection finds the largest width whose cost fits. At small widths one rounding step
        can be several percent of the budget, so ``top_up`` then adds channels to single
        stages (each at most ~25% above its width-multiplied count, in the family's channel
        steps), largest fitting increase first, until nothing more fits: the result is
        usually within [99%, 100%] of the budget. ``Aligned.ratio`` reports what was reached.
        A fixed-width model's width cannot change: the candidate fits as it is, or it is an
        error. A width factory gets no top-up and its cost is checked to grow with the width.
        """
        if self.family.fixed_width:
            return self._fits_as_is(cand, budget)
        if self.family.user_width and budget.kind not in self._width_checked:
            check_monotone(self, budget.kind)  # once per cost kind, at the first alignment
            self._width_checked.add(budget.kind)
        lo, hi = self.width_bounds
        cand = cand.with_width(lo)
        def cost(w: float) -> float:
            return self.cost(cand.with_width(w), budget.kind)
        if cost(lo) > budget.value:
            raise QSearchError(
                f"budget {budget} is below the smallest {self.model} model with these bits "
                f"({format_cost(cost(lo), budget.kind)} at width {lo}): raise the budget or "
                "use fewer bits")
        if cost(hi) <= budget.value:
            return Aligned(cand.with_width(hi), cost(hi), budget)
        while hi - lo > tol * hi:
            mid = 0.5 * (lo + hi)
            if cost(mid) <= budget.value:
                lo = mid
            else:
                hi = mid
        width = round(lo, 6)
        if cost(width) > budget.value:
            width = lo
        best = cand.with_width(width)
        if top_up:
            best = self._top_up(best, budget)
        return Aligned(best, self.cost(best, budget.kind), budget)

    def _fits_as_is(self, cand: Candidate, budget: Budget) -> Aligned:
        cand = cand.with_width(1.0)
        cost = self.cost(cand, budget.kind)
        if cost > budget.value:
            raise QSearchError(
                f"{self.model} with these bits costs {format_cost(cost, budget.kind)}, above "
                f"the budget {budget}: a fixed-width model meets a budget through its bits, "
                "not its width; use lower bits or raise the budget")
        return Aligned(cand, cost, budget)

    def fit(self, cand: Candidate, budget: Budget) -> Candidate:
        """``cand`` made to fill the budget: width-aligned, or on a fixed-width model (no
        width to solve) its bits lowered until it fits (:meth:`lower_to_fit`)."""
        if self.family.fixed_width:
            return self.lower_to_fit(cand, budget)
        return self.align(cand, budget).candidate

    def lower_to_fit(self, cand: Candidate, budget: Budget,
                     levels: Sequence[int] | None = None) -> Candidate:
        """``cand`` at its width with free layers lowered until it fits: HAQ's budget wall
        (``_final_action_wall`` of its code), the rule a fixed-width model meets a budget by.

        Walks the free layers from the last to the first, taking each one ``levels`` step
        down (default: the space's bit choices) and stopping as soon as the model fits;
        repeats the walk while it is over budget. A candidate that fits is returned as is.
        """
        levels = sorted(levels or self.bit_choices)
        down = {b: levels[i - 1] for i, b in enumerate(levels) if i > 0}
        bits = list(cand.w_bits)
        def fits() -> bool:
            return self.cost(Candidate(tuple(bits), cand.a_bits, cand.width, cand.channels),
                             budget.kind) <= budget.value
        while not fits():
            lowered = False
            for j in reversed(self.free_layers):
                if bits[j] in down:
                    bits[j], lowered = down[bits[j]], True
                    if fits():
                        break
            if not lowered:
                raise QSearchError(
                    f"budget {budget} is below {self.model} at width {cand.width:g} with every "
                    f"free layer at {levels[0]} bits: raise the budget")
        return Candidate(tuple(bits), cand.a_bits, cand.width, cand.channels)

    def raise_to_fill(self, cand: Candidate, budget: Budget,
                      levels: Sequence[int] | None = None) -> Candidate:
        """``cand`` (which fits) with free layers kept or raised to larger ``levels`` (default:
        the space's bit choices), at the closest cost below the budget that allows
        (:func:`qsearch.fill.raise_to_fill`): what bits alone fill on a fixed-width model."""
        from qsearch.fill import raise_to_fill

        free, kind, w = self.free_layers, budget.kind, cand.w_bits
        def with_bits(bits: Sequence[int]) -> Candidate:
            return Candidate(tuple(bits), cand.a_bits, cand.width, cand.channels)
        def unit(j: int) -> int:  # the cost of one more bit on layer j (cost is linear)
            one, two = (self.cost(with_bits([*w[:j], b, *w[j + 1:]]), kind) for b in (1, 2))
            return round(two - one)
        room = int(budget.value - self.cost(cand, kind))
        raised = dict(zip(free, raise_to_fill([unit(j) for j in free], [w[j] for j in free],
                                              sorted(levels or self.bit_choices), room)))
        return with_bits([raised.get(j, b) for j, b in enumerate(w)])

    @cached_property
    def _scalable_keys(self) -> list[str]:
        """Plan keys whose channel count follows the width multiplier (top-up grows them)."""
        if self.family.user_width:  # a factory builds from its width alone: nothing to grow
            return []
        small, large = self.plan(1.0), self.plan(4.0)
        return sorted({ch.key for n, ch in small.items() if int(large[n]) != int(ch)})

    def top_up_limits(self, width: float) -> dict[str, int]:
        """The most channels width alignment may add to each scalable plan key at ``width``:
        ~25% of its width-multiplied count, in the family's channel steps."""
        step = self.family.granularity
        base = {ch.key: int(ch) for ch in self.plan(width).values()}
        return {k: max(step, int(0.25 * base[k]) // step * step) for k in self._scalable_keys}

    def _top_up(self, cand: Candidate, budget: Budget) -> Candidate:
        step = self.family.granularity
        limit = self.top_up_limits(cand.width)
        extra = dict.fromkeys(limit, 0)
        while True:
            fits = []
            for k in limit:
                if extra[k] + step <= limit[k]:
                    trial = cand.with_width(cand.width, tuple({**extra, k: extra[k] + step}
                                                              .items()))
                    c = self.cost(trial, budget.kind)
                    if c <= budget.value:
                        fits.append((c, k))
            if not fits:
                return cand.with_width(cand.width, tuple(extra.items()))
            extra[max(fits)[1]] += step

    # ----- display ---------------------------------------------------------------------
    def table(self, cand: Candidate) -> list[dict]:
        """One row per layer: role, shape, bits, share of C_size, BitOPs."""
        cin, cout, groups = self.shapes(cand)
        params = self.params(cand)
        bits = np.asarray(cand.w_bits, float)
        size = self._size_bits(cand)
        bitops = params * self._hw_out * bits * self._act_bits(cand.a_bits)
        rows = []
        for l, ci, co, g, s, bo, b in zip(self.layers, cin, cout, groups, size, bitops,
                                          cand.w_bits):
            k = f"{l.kernel[0]}x{l.kernel[1]}"
            rows.append({"layer": l.name, "role": l.role, "cin": int(ci), "cout": int(co),
                         "groups": int(g), "kernel": k, "stride": l.stride,
                         "out": f"{l.out_hw[0]}x{l.out_hw[1]}", "bits": b,
                         "c_size_bits": s, "share": s / size.sum(), "bitops": bo})
        return rows
