import math

import pytest

from qsearch import QSearchError
from qsearch.budget import format_cost, parse_budget


@pytest.mark.parametrize("text, kind, value", [
    ("12MB", "size", 12e6 * 8),
    ("512KiB", "size", 512 * 1024 * 8),
    ("96Mbit", "size", 96e6),
    ("3.5e6bits", "size", 3.5e6),
    ("64KB", "size", 64e3 * 8),
    ("1.5GiB", "size", 1.5 * 2**30 * 8),
    ("100B", "size", 800),
    ("20GBitOPs", "bitops", 20e9),
    ("3.3e9bitops", "bitops", 3.3e9),
    (" 7 MB ", "size", 56e6),
])
def test_good_budgets(text, kind, value):
    b = parse_budget(text)
    assert b.kind == kind
    assert math.isclose(b.value, value, rel_tol=1e-12)


@pytest.mark.parametrize("text", ["12XB", "-3MB", "0", "0MB", "1e400MB", "12", "MB", "12Mb",
                                  "nanMB", "12 M B", "", "twelveMB", "3GOPs"])
def test_bad_budgets_name_the_value_and_examples(text):
    with pytest.raises(QSearchError) as e:
        parse_budget(text)
    msg = str(e.value)
    assert repr(text) in msg and "12MB" in msg and "\n" not in msg


def test_format_cost():
    assert format_cost(64e3 * 8, "size") == "64KB"
    assert format_cost(20e9, "bitops") == "20GBitOPs"
    assert str(parse_budget("12MB")) == "12MB"
