"""Budget strings: a model size (C_size, Eq. 6 of DualPrecision) or a BitOPs count (FracBits).

Decimal prefixes follow FracBits' convention (1 MB = 1e6 bytes); binary ones are spelt KiB,
MiB, GiB. Sizes are stored in bits, BitOPs as a plain count.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from qsearch import QSearchError

_PREFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30}
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_PATTERN = re.compile(rf"^\s*({_NUMBER})\s*([a-zA-Z]*)\s*$")

EXAMPLES = "use a size like 12MB, 512KiB, 96Mbit, 3.5e6bits or a BitOPs budget like 20GBitOPs"


@dataclass(frozen=True)
class Budget:
    kind: Literal["size", "bitops"]
    value: float  # bits for "size", operations for "bitops"

    @property
    def unit(self) -> str:
        return "bits" if self.kind == "size" else "BitOPs"

    def __str__(self) -> str:
        return format_cost(self.value, self.kind)


def _unit_factor(unit: str) -> tuple[str, float] | None:
    u = unit.lower()
    if u.endswith("bitops"):
        p = u[: -len("bitops")]
        return ("bitops", _PREFIX[p]) if p in _PREFIX else None
    for suffix, mult in (("bits", 1), ("bit", 1), ("b", 8)):
        if u.endswith(suffix):
            p = u[: -len(suffix)]
            if suffix == "b" and unit[-1] == "b" and p:  # "Mb" is ambiguous: ask for Mbit
                return None
            if p in _BINARY and suffix == "b":
                return "size", _BINARY[p] * mult
            if p in _PREFIX:
                return "size", _PREFIX[p] * mult
            return None
    return None


def parse_budget(text: str) -> Budget:
    """Parse ``12MB``, ``512KiB``, ``96Mbit``, ``3.5e6bits``, ``20GBitOPs``, ``3.3e9bitops``."""
    m = _PATTERN.match(str(text))
    parsed = _unit_factor(m.group(2)) if m and m.group(2) else None
    if not m or parsed is None:
        raise QSearchError(f"budget {text!r} not understood: {EXAMPLES}")
    kind, factor = parsed
    value = float(m.group(1)) * factor
    if not math.isfinite(value) or value <= 0:
        raise QSearchError(f"budget {text!r} must be a positive, finite amount: {EXAMPLES}")
    return Budget(kind, value)


def format_cost(value: float, kind: str) -> str:
    """Human form of a cost: bytes with decimal prefixes for size, G/M BitOPs otherwise."""
    if kind == "bitops":
        for p, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if value >= f:
                return f"{value / f:.4g}{p}BitOPs"
        return f"{value:.4g}BitOPs"
    nbytes = value / 8
    for p, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= f:
            return f"{nbytes / f:.4g}{p}"
    return f"{nbytes:.4g}B"
