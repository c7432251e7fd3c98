"""Tests for lorakit.training.evaluate: exact match."""
from __future__ import annotations

from lorakit.training.evaluate import exact_match, exact_match_rate


def test_exact_match():
    assert exact_match("  ORDER x\n", "ORDER x")
    assert not exact_match("ORDER  x", "ORDER x")
    assert exact_match_rate(["a", " b ", "c"], ["a", "b", "d"]) == 2 / 3
