"""``featcache verify``: check every committed shard of every view.

For each committed shard: the marker is readable and covers the right rows; every object the
shard wrote exists and has the checksum the writer recorded; the data decodes through zarr (which
checks each chunk's crc32c); ``valid`` is 1 exactly for the rows the commit did not list as
failed; no valid row holds NaN or Inf (for int4-pca: no token's stored scale). Per view: array
shapes and dtypes match the attrs (the codec's bytes per token), and ``errors.parquet`` agrees with
the commits; a calibrated codec's (int8-phis, int4-pca) statistics still have the hash its codes
were written with. Shards without a marker are invisible to readers and
are reported as notes, not problems.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from featcache.errors import CacheFormatError, UsageError
from featcache.store.cache import Cache, View, non_view_line
from featcache.store.commits import Commit
from featcache.store.statsio import read_stats
from featcache.store.zarrio import array_layouts, object_checksum, shard_object_keys

_ROWS_PER_READ = 32


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a cache."""

    view: str
    shard: int | None
    kind: str  # metadata, shape, codec, stats, commit, missing, checksum, decode, nonfinite, valid, errors-table
    message: str

    def __str__(self) -> str:
        where = self.view if self.shard is None else f"{self.view} shard {self.shard}"
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class Report:
    """What ``verify`` found."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        """The JSON-ready verdict of ``verify --json`` (DESIGN.md §7): ok, problems, notes, shards checked."""
        problems = [{"view": p.view, "shard": p.shard, "kind": p.kind, "detail": p.message} for p in self.problems]
        return {"ok": self.ok, "problems": problems, "notes": list(self.notes), "shards_checked": self.shards_checked}


def verify(cache: Cache, views: list[str] | None = None, workers: int = 4) -> Report:
    """Check ``cache`` (all views, or the named ones) and return every problem found."""
    cache.check_manifest()  # rows are positions: against another manifest every check would mislead
    report = Report()
    report.problems += _check_root(cache)
    found, broken = cache.scan_views()
    for name, reason in broken.items():
        report.problems.append(Problem(name, None, "metadata", f"the view's zarr.json cannot be read: {reason}"))
    report.notes += [non_view_line([name]) for name in cache.non_views()]
    for key in views or list(found):
        if key in broken:
            continue
        if key not in found:
            cache.view(key)  # raises naming the views there are
        try:
            found[key].arrays  # noqa: B018 - every check below reads them
        except CacheFormatError as e:
            report.problems.append(Problem(key, None, "metadata", str(e)))
            continue
        _check_view(found[key], report, workers)
    return report


def _check_root(cache: Cache) -> list[Problem]:
    attrs = cache.attrs()
    if attrs and attrs.get("num_images") != cache.num_images:
        return [Problem("features.zarr", None, "metadata", f"the root attrs say {attrs.get('num_images')} images, "
                                                           f"the manifest has {cache.num_images}")]
    return []


def _check_view(view: View, report: Report, workers: int) -> None:
    report.problems += _check_shapes(view) + _check_image_ids(view)
    committed = sorted(view.committed_shards())
    stats_hash = None
    if committed and view.spec.codec_type.needs_calibration:
        problems, stats_hash = _check_codec(view)
        report.problems += problems
    elif view.stats:
        report.problems += _check_stats(view)
    commits = {}
    with ThreadPoolExecutor(workers) as pool:
        for shard, (found, commit) in zip(committed, pool.map(lambda k: _check_shard(view, k, stats_hash), committed)):
            report.problems += found
            commits[shard] = commit
    report.shards_checked += len(committed)
    report.problems += _check_errors_table(view, commits)
    report.notes += _partial_shards(view, set(committed))


def _check_shapes(view: View) -> list[Problem]:
    layouts = array_layouts(view.spec, view.num_images, view.cache.shard_size)
    found = []
    for name, layout in layouts.items():
        arr = view.arrays[name]
        if tuple(arr.shape) != tuple(layout["shape"]) or str(arr.dtype) != str(np.dtype(layout["dtype"])):
            found.append(Problem(view.key, None, "shape", f"{name} is {arr.shape} {arr.dtype}, the attrs say "
                                                         f"{layout['shape']} {layout['dtype']}"))
    return found


def _check_image_ids(view: View) -> list[Problem]:
    """The ``image_id`` coordinate (what xarray users join on) is readable and holds the manifest's ids."""
    try:
        ids = view.image_id_array()
        if ids is None:  # a cache from before image ids: the next extract or stats writes them
            return []
        stored = np.asarray(ids[:], dtype=object)
    except CacheFormatError as e:
        return [Problem(view.key, None, "metadata", str(e))]
    except (ValueError, RuntimeError, OSError) as e:  # a damaged chunk
        return [Problem(view.key, None, "metadata", f"{view.key}/image_id cannot be read: {type(e).__name__}: {e}")]
    expected = view.cache.image_ids()
    if stored.shape != expected.shape or not (stored == expected).all():
        rows = np.flatnonzero(stored != expected).tolist() if stored.shape == expected.shape else []
        return [Problem(view.key, None, "metadata", f"{view.key}/image_id differs from the manifest's image_id "
                                                    f"column (rows {rows[:10] or 'count'})")]
    return []


def _check_codec(view: View) -> tuple[list[Problem], str | None]:
    """Calibrated codes (int8-phis) decode only with the statistics they were written with (matched by hash)."""
    try:
        return [], view.spec.codec_type.open(view).commit_info().get("stats_hash")
    except (CacheFormatError, UsageError) as e:
        return [Problem(view.key, None, "codec", str(e))], None


def _check_stats(view: View) -> list[Problem]:
    """The statistics the attrs name exist and have the recorded hash (published arrays-first)."""
    try:
        read_stats(view)
        return []
    except (CacheFormatError, UsageError) as e:
        return [Problem(view.key, None, "stats", str(e))]


def _check_shard(view: View, shard: int, stats_hash: str | None = None) -> tuple[list[Problem], Commit | None]:
    """Problems of one committed shard, and its marker (None when unreadable or withdrawn)."""
    try:
        commit = view.commit_record(shard)
    except CacheFormatError as e:
        return [Problem(view.key, shard, "commit", str(e))], None
    if commit is None:  # withdrawn while we were listing: a job is rewriting it
        return [], None
    start, stop = view.shard_range(shard)
    if (commit.start, commit.stop) != (start, stop):
        return [Problem(view.key, shard, "commit", f"marker covers [{commit.start}, {commit.stop}), "
                                                   f"the shard is [{start}, {stop})")], None
    written_with = commit.info.get("stats_hash")
    if stats_hash is not None and written_with != stats_hash:
        return [Problem(view.key, shard, "codec", f"codes written with statistics {written_with}, the view's "
                                                  f"are {stats_hash}: they cannot be decoded")], commit
    found = _check_objects(view, shard, commit.checksums)
    if not found:
        found = _check_values(view, start, stop, commit.errors, shard)
    return found, commit


def _check_objects(view: View, shard: int, recorded: dict[str, int]) -> list[Problem]:
    found = []
    for name, key in shard_object_keys(view.group, shard).items():
        loc = view.loc.join(*key.split("/"))
        try:
            data = loc.read_bytes()
        except FileNotFoundError:
            found.append(Problem(view.key, shard, "missing", f"{key} is committed but not stored"))
            continue
        if key not in recorded:
            found.append(Problem(view.key, shard, "commit", f"the marker records no checksum for {key}"))
        elif object_checksum(data) != recorded[key]:
            found.append(Problem(view.key, shard, "checksum", f"{key} differs from what was written "
                                                              f"({len(data)} bytes stored)"))
    return found


def _check_values(view: View, start: int, stop: int, errors: dict[int, str], shard: int) -> list[Problem]:
    try:
        valid = np.asarray(view.arrays["valid"][start:stop])
        expected = np.ones(stop - start, dtype=np.uint8)
        expected[[i - start for i in errors]] = 0
        found = []
        if not np.array_equal(valid, expected):
            rows = (np.flatnonzero(valid != expected) + start).tolist()
            found.append(Problem(view.key, shard, "valid", f"valid disagrees with the commit's errors at rows {rows[:10]}"))
        bad = _nonfinite_rows(view, start, stop, expected.astype(bool))
        if bad:
            found.append(Problem(view.key, shard, "nonfinite", f"NaN or Inf in valid rows {bad[:10]}"))
        return found
    except (ValueError, RuntimeError, OSError) as e:  # zarr raises these for a bad chunk crc / shard index
        return [Problem(view.key, shard, "decode", f"{type(e).__name__}: {e}")]


def _nonfinite_rows(view: View, start: int, stop: int, valid: np.ndarray) -> list[int]:
    bad = []
    for name in ("summary", "box"):
        x = np.asarray(view.arrays[name][start:stop], dtype=np.float32)
        bad += (np.flatnonzero(~np.isfinite(x).all(axis=1) & valid) + start).tolist()
    dense, codec = view.arrays["dense"], view.spec.codec_type
    for r in range(start, stop, _ROWS_PER_READ):
        e = min(r + _ROWS_PER_READ, stop)
        finite = ~codec.nonfinite_tokens(np.asarray(dense[r:e])).reshape(e - r, -1).any(axis=1)
        bad += (np.flatnonzero(~finite & valid[r - start:e - start]) + r).tolist()
    return sorted(set(bad))


def _check_errors_table(view: View, commits: dict[int, Commit | None]) -> list[Problem]:
    """``errors.parquet`` lists exactly the failed rows the commits record (rebuilt by each extract)."""
    listed = {r["index"] for r in view.cache.errors.to_pylist() if r.get("view") == view.key
              and r.get("index") is not None}
    found = []
    for i in sorted(listed):
        commit = commits.get(i // view.shard_size)
        if commit is not None and i not in commit.errors:
            found.append(Problem(view.key, i // view.shard_size, "errors-table",
                                 f"errors.parquet lists row {i} as failed, its commit does not"))
    missing = sorted(i for c in commits.values() if c is not None for i in c.errors if i not in listed)
    if missing:
        found.append(Problem(view.key, None, "errors-table", f"rows {missing[:10]} failed (their commits say why) but "
                             "errors.parquet does not list them: rerun 'featcache extract' to rebuild it"))
    return found


def _partial_shards(view: View, committed: set[int]) -> list[str]:
    """Shards with stored objects but no marker: an interrupted write that a rerun replaces."""
    notes = []
    dense_dir = view.loc.join("dense", "c")
    try:
        present = {int(p.rstrip("/").split("/")[-1]) for p in dense_dir.backend.list(dense_dir.path)}
    except FileNotFoundError:
        return notes
    for shard in sorted(present - committed):
        notes.append(f"{view.key} shard {shard}: data without a commit marker (an interrupted write; "
                     "invisible to readers, rewritten by the next run)")
    return notes

