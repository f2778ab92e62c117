"""The end of an extract job, on the driver: ``errors.parquet`` from the commits, and the run record.

``errors.parquet`` holds the index stage's rows and one row per failed (image, view) of the committed
shards, so it agrees with what is committed however many times the job was interrupted and resumed.
Reading every marker at the end of every job would cost the whole cache (ImageNet-1k in 4 views at
shard 64 is 80,000 markers), so the table records in its Parquet metadata the version of each marker
its rows came from (:func:`featcache.store.commits.list_commits`) and a digest of its rows. A job's end
reads only the markers whose version changed since: the shards it wrote, those a job stopped before
its end wrote, those ``--repair`` withdrew; the other rows are kept. A table without that record, or
whose rows no longer match their digest (written by an earlier version, by ``index``, or edited), is
rebuilt from every marker. Either way the rows are exactly those a rebuild from every marker gives,
in the same order.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from featcache.errors import CacheFormatError
from featcache.images import is_image_name
from featcache.store import commits, tables
from featcache.store.cache import Cache, versions

if TYPE_CHECKING:  # annotations only: plan imports this module (no cycle at run time)
    from featcache.extract.plan import Plan

def rebuild_errors(cache: Cache, views: list[str]) -> list[dict]:
    """Rewrite ``errors.parquet`` from every marker of ``views``: index-stage rows and the rows of
    other views kept, one row per failed (image, view) of the commits; returns the rows of ``views``."""
    return update_errors(cache, views, full=True)


def update_errors(cache: Cache, views: list[str], committed: dict[str, dict] | None = None,
                  full: bool = False) -> list[dict]:
    """Bring ``errors.parquet`` up to date with the commits of ``views``, reading only the markers
    whose version changed since it was written (every marker when ``full``); written only when it
    changes. ``committed`` is each view's ``{shard: marker version}`` as just listed (listed here
    when None). Returns the rows of ``views``, as :func:`rebuild_errors` does."""
    if committed is None:
        committed = {key: commits.list_commits(cache.root, key) for key in views}
    old = tables.read_errors(cache.root)
    rows = old.to_pylist()
    digest = _rows_digest(rows)
    known = {} if full else _coverage(old, rows, digest, views)
    keep = [r for r in rows if r["stage"] == "index" or r.get("view") not in views]
    coverage = {k: v for k, v in known.items() if k not in views}  # other views' rows are kept as they are
    shard_size = cache.shard_size if views else 1
    blocks = []
    for key in views:
        block, coverage[key] = _view_rows(cache, key, rows, known.get(key), committed[key], shard_size)
        blocks += block
    new = keep + blocks
    metadata = _encode(coverage, digest if new == rows else _rows_digest(new))
    if new != rows or tables.errors_record(old) != metadata:
        tables.write_errors(cache.root, new, metadata)
    return blocks


def replace_index_rows(cache: Cache, rows: list[dict]) -> None:
    """Put the index-stage ``rows`` of a new index of the source (a cache that grows) in place of the
    errors table's, first, as a fresh index leaves them. The record of the markers the other rows came
    from stays valid (only its digest of the rows changes), so the job's end still reads only new markers."""
    old = tables.read_errors(cache.root)
    before = old.to_pylist()
    new = tables.errors_table([r for r in rows if r["stage"] == "index"]).to_pylist() + \
        [r for r in before if r["stage"] != "index"]
    if new == before:
        return
    record, kept = _coverage_record(old), None
    if record is not None and record.get("rows") == _rows_digest(before):  # else the job's end reads every marker
        kept = json.dumps({**record, "rows": _rows_digest(new)}, sort_keys=True).encode()
    tables.write_errors(cache.root, new, kept)


def _coverage_record(table: pa.Table) -> dict | None:
    """The errors table's record of its markers as stored (None when it has none, or not one this code wrote)."""
    raw = tables.errors_record(table)
    try:
        record = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def job_errors(plan: Plan) -> list[dict]:
    """:func:`update_errors` at the end of the job ``plan`` (from every marker when ``--repair`` found
    the table disagreeing with the commits); returns the rows of the job's views."""
    keys = [v.key for v in plan.views]
    return update_errors(plan.cache, keys, commits_now(plan), full=plan.errors_table_wrong)


def commits_now(plan: Plan) -> dict[str, dict[int, str | None]]:
    """Each view's ``{shard: marker version}`` as the job leaves it: listed again for a view the job
    had shards to write to (whether or not it got through them), the plan's listing for the others."""
    touched = {key for keys in plan.todo.values() for key in keys}
    return {v.key: commits.list_commits(plan.cache.root, v.key) if v.key in touched else plan.committed[v.key]
            for v in plan.views}


def consolidate_if_changed(plan: Plan) -> bool:
    """Consolidate the metadata for xarray (and upgrade old metadata: :meth:`Cache.consolidate`) when
    the job had work, which may have created views or written attrs, or when the consolidated copy
    lacks a view; a rerun with nothing to do writes nothing. Returns whether it consolidated."""
    keys = [v.key for v in plan.views]
    if not plan.todo and _consolidated(plan.cache, keys):
        return False
    plan.cache.consolidate()
    return True


def _consolidated(cache: Cache, keys: list[str]) -> bool:
    """Whether ``features.zarr``'s consolidated metadata holds every view of ``keys``."""
    meta = json.loads(cache.features.join("zarr.json").read_bytes())
    held = (meta.get("consolidated_metadata") or {}).get("metadata") or {}
    return all(key in held for key in keys)


def _view_rows(cache: Cache, key: str, rows: list[dict], known: dict | None, now: dict, shard_size: int):
    """The rows of view ``key`` (damaged markers by shard, then failed images by row) and its coverage:
    the old rows of shards whose marker is unchanged, the markers of the others read again."""
    version = {shard: _version_hash(v) for shard, v in now.items()}
    if known is None:
        reread = sorted(now)
    else:
        before, damaged = known["versions"], set(known["damaged"])
        unchanged = lambda s, h: h and s < len(before) and before[s] == h and s not in damaged  # noqa: E731
        reread = sorted(s for s, h in version.items() if not unchanged(s, h))
    stale = set(reread)
    kept = [] if known is None else [r for r in rows if r.get("view") == key and r["stage"] != "index"
                                     and r["index"] is not None and r["index"] // shard_size in version
                                     and r["index"] // shard_size not in stale]
    damage, failed = _read_rows(cache, key, reread)
    hashes = np.zeros(max([-(-cache.num_images // shard_size), *(s + 1 for s in version)]), dtype="<u8")
    hashes[list(version)] = np.fromiter(version.values(), dtype="<u8", count=len(version))
    coverage = {"versions": hashes, "damaged": sorted(r["shard"] for r in damage)}
    return [r["row"] for r in damage] + sorted(kept + failed, key=lambda r: r["index"]), coverage


def _read_rows(cache: Cache, key: str, shards: list[int]) -> tuple[list[dict], list[dict]]:
    """The markers of ``shards`` read (in threads): their damage rows, and a row per failed image."""
    with ThreadPoolExecutor(16) as pool:
        records = list(pool.map(lambda k: _commit_or_damage(cache, key, k), shards))
    damage = [{"shard": k, "row": r} for k, r in zip(shards, records) if isinstance(r, dict)]
    failed = [(i, reason) for c in records if isinstance(c, commits.Commit) for i, reason in sorted(c.errors.items())]
    where = pa.array([i for i, _ in failed], pa.int64())
    ids = cache.manifest.column("image_id").take(where).to_pylist()
    uris = cache.manifest.column("uri").take(where).to_pylist()
    out = []
    for (i, reason), image_id, uri in zip(failed, ids, uris):
        stage, sep, detail = reason.partition(": ")
        out.append({"index": i, "image_id": image_id, "uri": uri, "stage": stage if sep else "extract",
                    "view": key, "reason": detail if sep else reason})
    return damage, out


def _commit_or_damage(cache: Cache, key: str, shard: int):
    """The shard's marker (None if it vanished since the listing), or an errors-table row saying it is
    damaged (the job goes on; it exits 1)."""
    try:
        return commits.read_commit(cache.root, key, shard)
    except CacheFormatError as e:
        return {"index": None, "image_id": None, "uri": None, "stage": "commit", "view": key,
                "reason": f"shard {shard}: {e} (run 'featcache extract --repair' to recompute it)"}


def _version_hash(version: str | None) -> int:
    """A marker version as a nonzero 64-bit number; 0 for an unknown version (always read again)."""
    if version is None:
        return 0
    return int.from_bytes(hashlib.blake2b(version.encode(), digest_size=8).digest(), "little") or 1


def _rows_digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _encode(coverage: dict[str, dict], digest: str) -> bytes:
    """The errors table's record of its markers: per view the version hash of each shard's marker
    (0: not committed) and the damaged shards, and the digest of the rows written with it."""
    views = {key: {"versions": base64.b64encode(zlib.compress(c["versions"].tobytes())).decode(),
                   "damaged": c["damaged"]} for key, c in sorted(coverage.items())}
    return json.dumps({"format": 1, "rows": digest, "views": views}, sort_keys=True).encode()


def _coverage(table: pa.Table, rows: list[dict], digest: str, views: list[str]) -> dict[str, dict]:
    """The markers each view's rows in ``table`` came from; {} when the table does not say, or its
    rows (of digest ``digest``) are not those it was written with, or a row of ``views`` has the index
    stage (a case only a rebuild from every marker reproduces exactly)."""
    raw = tables.errors_record(table)
    if raw is None or any(r["stage"] == "index" and r.get("view") in views for r in rows):
        return {}
    try:
        record = json.loads(raw)
        if record["format"] != 1 or record["rows"] != digest:
            return {}
        return {key: {"versions": np.frombuffer(zlib.decompress(base64.b64decode(c["versions"])), dtype="<u8"),
                      "damaged": list(c["damaged"])} for key, c in record["views"].items()}
    except (ValueError, KeyError, TypeError, zlib.error):  # not a record this code wrote: rebuild
        return {}


def failed_images(cache: Cache, extract_rows: list[dict]) -> tuple[int, list[str]]:
    """Images that failed (distinct), counting image files the index could not read; a few reasons."""
    index_rows = [r for r in tables.error_rows(cache.root, "index") if is_image_name(r["uri"] or "")]
    failed = {r["index"] for r in extract_rows}
    reasons = [f"{r['uri']}: {r['stage']}: {r['reason']}" for r in index_rows[:5]]
    seen = set()
    for r in extract_rows:
        if r["index"] not in seen and len(reasons) < 10:
            seen.add(r["index"])
            reasons.append(f"{r['uri']}: {r['stage']}: {r['reason']}")
    return len(failed) + len(index_rows), reasons


def write_run_record(cache: Cache, record: dict) -> str:
    """``runs/<UTC time>-<pid>.json`` (``-2``, ``-3``... for later jobs of the process in the same
    second): config, versions, timings; never credentials. Storage that refuses it (full, read-only)
    raises a StorageError naming the file, and no temporary file is left."""
    stamp = f'{time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())}-{os.getpid()}'
    loc, n = cache.root.join("runs", f"{stamp}.json"), 1
    while loc.exists():
        n += 1
        loc = cache.root.join("runs", f"{stamp}-{n}.json")
    body = {"job": "extract", "time": time.time(), "versions": versions(), **record}
    loc.write_bytes_atomic(json.dumps(body, indent=1, sort_keys=True, default=str).encode())
    return loc.uri
