"""Commit markers: ``ROOT/_commits/<view key>/<shard>.json``, one per written shard.

A shard exists for readers only once its marker exists (DESIGN.md §2). The marker is written
last and atomically, and records what a later ``verify`` checks: the image range, which rows
failed and why, the crc32c of every object the shard wrote, and who wrote it.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
from dataclasses import asdict, dataclass, field

from featcache.errors import CacheFormatError
from featcache.store.location import Location

COMMITS_DIR = "_commits"


@dataclass(frozen=True)
class Commit:
    """The record of one committed shard."""

    view: str
    shard: int
    start: int
    stop: int
    errors: dict[int, str] = field(default_factory=dict)
    checksums: dict[str, int] = field(default_factory=dict)
    worker: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    time: float = 0.0
    format: int = 1

    @property
    def num_valid(self) -> int:
        return self.stop - self.start - len(self.errors)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["errors"] = {str(k): v for k, v in sorted(self.errors.items())}
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Commit":
        try:
            d = json.loads(data)
            d["errors"] = {int(k): v for k, v in d.get("errors", {}).items()}
            commit = cls(**d)
        except (ValueError, TypeError) as e:
            raise CacheFormatError(f"unreadable commit marker {where}: {e}") from e
        outside = sorted(i for i in commit.errors if not commit.start <= i < commit.stop)
        if outside:
            raise CacheFormatError(f"commit marker {where} lists failed rows {outside[:10]} outside its rows "
                                   f"[{commit.start}, {commit.stop})")
        return commit


def worker_identity() -> dict:
    """Host and process of the writer; Ray's node id when running inside a Ray worker."""
    ident = {"host": socket.gethostname(), "pid": os.getpid()}
    node = os.environ.get("FEATCACHE_NODE_ID")
    if node:
        ident["node"] = node
    return ident


def commit_dir(root: Location, view: str) -> Location:
    return root.join(COMMITS_DIR, view)


def write_commit(root: Location, commit: Commit) -> None:
    """Write the marker atomically: readers see no shard or the whole shard."""
    commit_dir(root, commit.view).join(f"{commit.shard}.json").write_bytes_atomic(commit.to_json())


def read_commit(root: Location, view: str, shard: int) -> Commit | None:
    """The marker of ``shard``, or None when the shard is not committed."""
    loc = commit_dir(root, view).join(f"{shard}.json")
    try:
        return Commit.from_json(loc.read_bytes(), loc.uri)
    except FileNotFoundError:
        return None


def committed_shards(root: Location, view: str) -> set[int]:
    """Indices of the committed shards of ``view`` (one listing, no marker is read)."""
    return {shard for shard in map(_shard_of, _listing(root, view, detail=False)) if shard is not None}


def list_commits(root: Location, view: str) -> dict[int, str | None]:
    """The committed shards of ``view``, each with the version of its marker (one listing, no marker
    is read). A marker's version changes whenever it is written again: the object's ETag on object
    stores (a hash of its bytes), its inode, mtime and size on a local disk (markers are renamed into
    place, so each write is a new inode); None where the filesystem says nothing that would change."""
    out = {}
    for entry in _listing(root, view, detail=True):
        shard = _shard_of(entry["name"])
        if shard is not None:
            out[shard] = marker_version(entry)
    return out


def marker_version(entry: dict) -> str | None:
    """The version of a marker from its listing entry (see :func:`list_commits`)."""
    if entry.get("ETag"):
        return str(entry["ETag"])
    if entry.get("ino") is not None and entry.get("mtime") is not None:
        return f"{entry['ino']}:{entry['mtime']!r}:{entry.get('size')}"
    return None


def _listing(root: Location, view: str, detail: bool) -> list:
    """The entries of ``_commits/<view>/``, listed afresh (markers appear while a job runs)."""
    loc = commit_dir(root, view)
    try:
        return loc.backend.list(loc.path, detail=detail)
    except FileNotFoundError:
        return []


def _shard_of(name: str) -> int | None:
    """The shard a marker's file name is for; None for anything else in the folder."""
    stem = posixpath.basename(name.rstrip("/"))
    return int(stem[: -len(".json")]) if stem.endswith(".json") and stem[: -len(".json")].isdigit() else None


def remove_commit(root: Location, view: str, shard: int) -> None:
    """Withdraw a shard from readers before it is rewritten."""
    loc = commit_dir(root, view).join(f"{shard}.json")
    if loc.exists():
        loc.delete()
