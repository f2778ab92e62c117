"""Brace patterns, as webdataset users write shard lists: ``shards/{00000..00999}.tar``, ``{train,val}.tar``.

A ``{a..b}`` range of integers counts from a to b inclusive, padded with zeros to the width of ``a``
when ``a`` is written with a leading zero (``{000..010}`` gives ``000``…``010``); ``{x,y}`` gives each
alternative in order. Several groups expand as their product, the leftmost varying slowest, so the
shards come out in the order a user reads them.
"""

from __future__ import annotations

import math
import re

from featcache.errors import UsageError

_GROUP = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
#: More names than any shard list needs: a typo such as {0..99999999} is refused, not expanded.
MAX_NAMES = 1_000_000


def has_braces(pattern: str) -> bool:
    """Whether ``pattern`` holds a group that expands (a range or a list of alternatives)."""
    return any(_RANGE.match(g) or "," in g for g in _GROUP.findall(pattern))


def expand(pattern: str) -> list[str]:
    """Every name ``pattern`` stands for, in order; a UsageError for an empty or oversized expansion."""
    groups = list(_GROUP.finditer(pattern))
    choices = [_choices(g.group(1), pattern) for g in groups]
    if math.prod(len(c) for c in choices) > MAX_NAMES:
        raise UsageError(f"{pattern} expands to more than {MAX_NAMES:,} names")
    names, pos = [""], 0
    for group, options in zip(groups, choices):
        literal = pattern[pos:group.start()]
        names = [n + literal + c for n in names for c in options]
        pos = group.end()
    return [n + pattern[pos:] for n in names]


def _choices(body: str, pattern: str) -> list[str]:
    m = _RANGE.match(body)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi < lo:
            raise UsageError(f"the range {{{body}}} in {pattern} is empty (write the smaller bound first)")
        width = len(m.group(1)) if m.group(1).startswith("0") and len(m.group(1)) > 1 else 0
        return [str(v).zfill(width) for v in range(lo, hi + 1)]
    if "," in body:
        return body.split(",")
    return ["{" + body + "}"]  # not a pattern group: kept as written
