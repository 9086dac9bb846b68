"""A candidate network: plain, versioned, JSON-exact data (no callables, no pickles)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from qsearch import QSearchError

FLOAT_BITS = 32
WEIGHT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    """Per-layer weight bits (inventory order; 32 = float), activation bits, width multiplier."""

    w_bits: tuple[int, ...]
    a_bits: int
    width: float
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "w_bits", tuple(int(b) for b in self.w_bits))
        bad = sorted({b for b in self.w_bits if b not in WEIGHT_BITS})
        if bad:
            raise QSearchError(
                f"weight bits {bad} not allowed: use 1..8, or 32 for a float layer"
            )
        if self.a_bits not in WEIGHT_BITS:
            raise QSearchError(
                f"activation bits {self.a_bits} not allowed: use 1..8, or 32 for float"
            )
        if not (self.width > 0 and self.width < float("inf")):
            raise QSearchError(f"width multiplier {self.width} must be a positive number")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["w_bits"] = list(self.w_bits)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Candidate:
        if d.get("version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise QSearchError(
                f"candidate schema version {d.get('version')} is not supported "
                f"(this qsearch reads version {SCHEMA_VERSION})"
            )
        return cls(tuple(d["w_bits"]), int(d["a_bits"]), float(d["width"]))

    @classmethod
    def from_json(cls, s: str) -> Candidate:
        return cls.from_dict(json.loads(s))

    def with_width(self, width: float) -> Candidate:
        return Candidate(self.w_bits, self.a_bits, width)
