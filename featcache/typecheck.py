"""Whether a value parsed from a config file or a ``--set`` flag has a dataclass field's annotated type.

One rule for every config of the house (``featcache train``, ``featcache featsharp train``): an int is
a float too, a bool is not a number, floats are finite, ``list[T]`` and ``tuple[T, ...]`` take a list of
T, ``tuple[A, B]`` a list of exactly an A and a B, ``X | None`` either.
:func:`describe` names a type for an error (``featcache.configfile`` words every one).
"""

from __future__ import annotations

import math
import types
import typing


def fits(value, hint) -> bool:
    """Whether ``value`` (as TOML, JSON or YAML parse it) has the annotated type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(fits(value, a) for a in args)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(fits, value, args))
        return all(fits(v, args[0]) for v in value) if args else True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def describe(hint) -> str:
    """``list[float]`` as "a list of float", ``str | None`` as "a str or none", ``int`` as "an int"."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(describe(a) for a in args)
    if typing.get_origin(hint) in (list, tuple):
        return f"a list of {args[0].__name__}" if args else "a list"
    return "none" if hint is type(None) else f"a{'n' if hint.__name__[0] in 'aeiou' else ''} {hint.__name__}"
