"""A candidate network: plain, versioned, JSON-exact data (no callables, no pickles)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from qsearch import QSearchError

FLOAT_BITS = 32
WEIGHT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    """Per-layer weight bits (inventory order; 32 = float), activation bits, width multiplier.

    ``channels`` holds the extra channels per plan key that width alignment added on top of
    the width multiplier to close the rounding gap (see ``SearchSpace.align``).
    """

    w_bits: tuple[int, ...]
    a_bits: int
    width: float
    channels: tuple[tuple[str, int], ...] = ()
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "w_bits", tuple(int(b) for b in self.w_bits))
        channels = dict(self.channels)
        if any(not isinstance(k, str) or int(v) < 0 for k, v in channels.items()):
            raise QSearchError(f"extra channels {channels} must map plan keys to counts >= 0")
        object.__setattr__(self, "channels",
                           tuple(sorted((k, int(v)) for k, v in channels.items() if v)))
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
        d["channels"] = dict(self.channels)
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
        return cls(tuple(d["w_bits"]), int(d["a_bits"]), float(d["width"]),
                   tuple((d.get("channels") or {}).items()))

    @classmethod
    def from_json(cls, s: str) -> Candidate:
        return cls.from_dict(json.loads(s))

    def with_width(self, width: float, channels: tuple[tuple[str, int], ...] = ()) -> Candidate:
        """The same bits at another width (extra channels dropped unless given)."""
        return Candidate(self.w_bits, self.a_bits, width, channels)


def bit_summary(w_bits: Sequence[int], space: Any = None) -> str:
    """Compact bits: per group when uniform within groups ("dw 4 / other 1"), else a
    histogram of the free layers' bits ("1b:3 2b:10 4b:5"); all layers without a space."""
    if space is not None and len(w_bits) == len(space.layers):
        per_group = {g: {w_bits[i] for i in idx} for g, idx in space.groups.items()}
        if per_group and all(len(v) == 1 for v in per_group.values()):
            return " / ".join(f"{'dw' if g == 'depthwise' else g} {next(iter(v))}"
                              for g, v in per_group.items())
        w_bits = [w_bits[i] for i in space.free_layers]
    counts = Counter(int(b) for b in w_bits)
    return " ".join(f"{b}b:{counts[b]}" for b in sorted(counts))
