"""A registry of named implementations: teacher families, codecs, losses (as timm registers models).

Each extension point keeps one :class:`Registry`; a new implementation is one ``add`` (usually
through its decorator), a duplicate name is a programming error, and an unknown name is the user's
mistake: a one-line UsageError that lists the known names.
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from featcache.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named implementations of one kind. ``unknown`` words the error for a name that is not there:
    a format string with ``{name}`` (repr'd) and ``{known}`` (the sorted names, comma separated)."""

    def __init__(self, kind: str, unknown: str = "{kind} {name} is not one of {known}"):
        self.kind, self.unknown, self._items = kind, unknown, {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str, where: str | None = None) -> T:
        """The implementation registered as ``name``; an unknown one is a UsageError (after ``where``)."""
        if name not in self._items:
            known = ", ".join(self.names())
            raise UsageError((f"{where}: " if where else "") +
                             self.unknown.format(kind=self.kind, name=repr(name), known=known))
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def values(self) -> list[T]:
        """The implementations in the order they were registered."""
        return list(self._items.values())

    def copy(self) -> "Registry[T]":
        """A registry holding the same entries (a test registers into a copy, leaving this one as it is)."""
        other = Registry(self.kind, self.unknown)
        other._items = dict(self._items)
        return other

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
