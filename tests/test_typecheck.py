"""The one rule both trainers' configs check their values by (featcache.typecheck.fits)."""

from __future__ import annotations

import pytest

from featcache.typecheck import fits


@pytest.mark.parametrize("value, hint, ok", [
    (3, float, True), (3.5, float, True), (True, float, False), (float("nan"), float, False),
    (float("inf"), float, False), (3, int, True), (3.0, int, False), (True, int, False), (True, bool, True),
    ("a", str | None, True), (None, str | None, True), (3, str | None, False),
    ([1, 2.5], list[float], True), ([1, "x"], list[float], False), ("ab", list[str], False),
    ([0.9, 0.99], tuple[float, float], True), ([0.9], tuple[float, float], False),
    ([1, 2, 3], tuple[int, ...], True), ({"a": 1}, dict, True), ([1], dict, False),
])
def test_fits(value, hint, ok):
    assert fits(value, hint) is ok
