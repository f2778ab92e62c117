"""The end of an extract job, on the driver: ``errors.parquet`` from the commits, and the run record.

The errors table is rebuilt from the commit markers every time (plus the index stage's rows), so it
agrees with what is committed however many times the job was interrupted and resumed.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from featcache.errors import CacheFormatError
from featcache.images import is_image_name
from featcache.store import tables
from featcache.store.cache import Cache, versions


def rebuild_errors(cache: Cache, views: list[str]) -> list[dict]:
    """Rewrite ``errors.parquet``: index-stage rows kept, one row per failed (image, view) of the commits."""
    old = tables.read_errors(cache.root).to_pylist()
    keep = [r for r in old if r["stage"] == "index" or r.get("view") not in views]
    manifest = cache.manifest
    ids, uris = manifest.column("image_id").to_pylist(), manifest.column("uri").to_pylist()
    rows = []
    for key in views:
        view = cache.view(key)
        shards = sorted(view.committed_shards())
        with ThreadPoolExecutor(16) as pool:
            commits = list(pool.map(lambda k: _commit_or_damage(view, k), shards))
        rows += [r for r in commits if isinstance(r, dict)]
        for commit in (c for c in commits if not isinstance(c, dict)):
            for i, reason in sorted((commit.errors if commit else {}).items()):
                stage, sep, detail = reason.partition(": ")
                rows.append({"index": i, "image_id": ids[i], "uri": uris[i], "stage": stage if sep else "extract",
                             "view": key, "reason": detail if sep else reason})
    tables.write_table(cache.root.join(tables.ERRORS), tables.errors_table(keep + rows))  # empty too
    return rows


def _commit_or_damage(view, shard: int):
    """The shard's marker, or an errors-table row saying it is damaged (the job goes on; it exits 1)."""
    try:
        return view.commit_record(shard)
    except CacheFormatError as e:
        return {"index": None, "image_id": None, "uri": None, "stage": "commit", "view": view.key,
                "reason": f"shard {shard}: {e} (run 'featcache extract --repair' to recompute it)"}


def failed_images(cache: Cache, extract_rows: list[dict]) -> tuple[int, list[str]]:
    """Images that failed (distinct), counting image files the index could not read; a few reasons."""
    index_rows = [r for r in tables.read_errors(cache.root).to_pylist()
                  if r["stage"] == "index" and is_image_name(r["uri"] or "")]
    failed = {r["index"] for r in extract_rows}
    reasons = [f"{r['uri']}: {r['stage']}: {r['reason']}" for r in index_rows[:5]]
    seen = set()
    for r in extract_rows:
        if r["index"] not in seen and len(reasons) < 10:
            seen.add(r["index"])
            reasons.append(f"{r['uri']}: {r['stage']}: {r['reason']}")
    return len(failed) + len(index_rows), reasons


def write_run_record(cache: Cache, record: dict) -> str:
    """``runs/<UTC time>-<pid>.json``: config, versions, timings; never credentials. Storage that
    refuses it (full, read-only) raises a StorageError naming the file, and no temporary file is left."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    loc = cache.root.join("runs", f"{stamp}-{os.getpid()}.json")
    body = {"job": "extract", "time": time.time(), "versions": versions(), **record}
    loc.write_bytes_atomic(json.dumps(body, indent=1, sort_keys=True, default=str).encode())
    return loc.uri
