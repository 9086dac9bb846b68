"""Bits the user fixes: the first and last layer's ``--pin-bits``, and ``--pin PATTERN=BITS``
/ ``--keep-float PATTERN`` for any layer by name (``fnmatch`` patterns over module names)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from qsearch import QSearchError
from qsearch.candidate import FLOAT_BITS

PIN_CHOICES = (*range(1, 9), FLOAT_BITS)  # bits a pinned layer may have


def parse_pin_bits(text: str) -> int | None:
    """``--pin-bits``: ``8`` (the papers), ``32`` (float first and last layer), any of 1..8,
    or ``none`` (first and last layer free like the others)."""
    if text.strip().lower() in ("none", "free"):
        return None
    try:
        bits = int(text)
    except ValueError:
        bits = -1
    if bits not in PIN_CHOICES:
        raise QSearchError(f"pin bits {text!r} not understood: use 8 (the papers), 32 (float "
                           "first and last layer), 1..7, or none (free them)")
    return bits


def match_pins(pins: Mapping[str, int], names: Sequence[str]) -> dict[int, int]:
    """Layer index -> bits for ``--pin``/``--keep-float`` patterns; a later pattern wins. A
    pattern that matches no layer, or bits outside 1..8/32, is an error."""
    out: dict[int, int] = {}
    for pattern, bits in pins.items():
        if bits not in PIN_CHOICES:
            raise QSearchError(f"--pin {pattern}={bits}: bits must be 1..8 or 32 (float), "
                               f"e.g. --pin '{pattern}=8'")
        hits = [i for i, name in enumerate(names) if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            middle = names[len(names) // 2]
            example = f"{middle.rsplit('.', 1)[0]}.*" if "." in middle else middle
            raise QSearchError(f"layer pattern {pattern!r} matches no quantizable layer (they "
                               f"are {', '.join(names[:5])}, ...; `qsearch space show` lists "
                               f"all): fix the pattern, e.g. '{example}'")
        out.update(dict.fromkeys(hits, int(bits)))
    return out


def parse_pins(pins: Sequence[str] = (), keep_float: Sequence[str] = ()) -> dict[str, int]:
    """``--pin PATTERN=BITS`` (repeatable) and ``--keep-float PATTERN`` as pattern -> bits."""
    out: dict[str, int] = {}
    for text in pins:
        pattern, sep, bits = text.rpartition("=")
        if not sep or not pattern or not bits.strip().isdigit():
            raise QSearchError(f"--pin {text!r} not understood: use PATTERN=BITS, e.g. "
                               "--pin 'layer3.*=8' (bits 1..8, or 32 for float)")
        out[pattern] = int(bits)
    out.update(dict.fromkeys(keep_float, FLOAT_BITS))
    return out
