"""What an extract job will do, decided on the driver before any worker starts.

``prepare`` makes sure the output root has a manifest (indexing the source, reusing the output's
own manifest, or copying an existing cache's; a source that lists the cache's images and more after
them grows the cache to its length), describes every teacher from its config alone
(meta device: no weights loaded on the driver), creates every view at its final shape, and lists
the work: per shard, the views not yet committed. Each view's commits are listed once, with the
version of each marker (what the job's end compares to read only the markers that changed); no
marker is read. A view that already exists with other data settings (model, weights, resolution,
codec, view policy, mosaic) is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field

import pyarrow as pa

from featcache.errors import SourceNotFoundError, UsageError
from featcache.extract import limits
from featcache.extract.config import DEFAULT_SHARD_SIZE, ExtractConfig, TeacherConfig
from featcache.extract.viewkinds import Mosaic, Plain, Upsampled, ViewKind
from featcache.store.location import Location, check_reachable, locate
from featcache.sources.patterns import has_braces
from featcache.store import commits, tables
from featcache.store.cache import FEATURES, Cache
from featcache.store.spec import ViewSpec
from featcache.store.verify import verify
from featcache.teachers import TeacherSpec, describe_teacher

#: TeacherSpec fields that say where the weights came from, not what they are: a view written from
#: one location may be resumed from another when the weights hash is the same.
_PROVENANCE = ("source", "revision")


@dataclass(frozen=True)
class ViewTask:
    """One view a worker computes: which teacher (by position in the config), at which size."""

    key: str
    teacher: int
    size: tuple[int, int]
    mosaic: int = 1
    upsampler: str | None = None  # checkpoint folder: the view is the upsampler's map of a canvas of ``size``
    factor: int = 1  # the upsampler's: its canvas is factor x the teacher's size

    @property
    def kind(self) -> ViewKind:
        """Plain, mosaic or upsampled: what knows this view's forwards and runs its teacher."""
        if self.upsampler:
            return Upsampled(self.factor)
        return Mosaic(self.mosaic) if self.mosaic > 1 else Plain(tuple(self.size))

    def to_dict(self) -> dict:
        return {"key": self.key, "teacher": self.teacher, "size": list(self.size), "mosaic": self.mosaic,
                "upsampler": self.upsampler, "factor": self.factor}

    @classmethod
    def from_dict(cls, d: dict) -> "ViewTask":
        return cls(d["key"], d["teacher"], tuple(d["size"]), d["mosaic"], d.get("upsampler"), d.get("factor", 1))


@dataclass
class Plan:
    config: ExtractConfig
    cache: Cache
    teachers: list[TeacherSpec]
    views: list[ViewTask]
    num_shards: int
    shard_size: int
    todo: dict[int, list[str]] = field(default_factory=dict)  # shard -> view keys not yet committed
    manifest_note: str = ""
    repaired: list[str] = field(default_factory=list)  # what --repair found and did, one line each
    committed: dict[str, dict[int, str | None]] = field(default_factory=dict)  # view -> {shard: marker version}
    errors_table_wrong: bool = False  # --repair found errors.parquet disagreeing with the commits
    notes: list[str] = field(default_factory=list)  # what growing the cache did, one line each

    @property
    def done_shards(self) -> int:
        return self.num_shards - len(self.todo)


def prepare(config: ExtractConfig) -> Plan:
    """Manifest, teacher specs, views and the list of work for ``config`` (driver side)."""
    config = config.checked()
    check_inputs(config)  # before the teachers: describing them may fetch configs from the HF hub
    specs = [describe_teacher(t.family, t.source, t.revision, name=t.name) for t in config.teachers]
    pairs = [pair for i, (t, spec) in enumerate(zip(config.teachers, specs)) for pair in view_specs(i, t, spec, config)]
    limits.check_sizes(config.shard_size or DEFAULT_SHARD_SIZE, config.batch_size, specs, pairs)  # before any folder
    note = ensure_manifest(config)  # after the teachers: a bad teacher fails before any indexing
    cache = Cache.open(config.output)
    grown = cache.grow_views()  # after a grow (or one interrupted): every view's arrays at the new length
    shard_size = config.shard_size or cache.shard_size or DEFAULT_SHARD_SIZE
    views: list[ViewTask] = []
    for task, view_spec in pairs:
        create_or_check(cache, view_spec, shard_size)
        views.append(task)
    keys = [v.key for v in views]
    if len(set(keys)) != len(keys):
        raise UsageError(f"two teachers produce the view {next(k for k in keys if keys.count(k) > 1)}: "
                         "give one of them another 'name'")
    repaired, errors_wrong = repair(cache, keys) if config.repair else ([], False)
    num_shards = -(-cache.num_images // shard_size)
    committed = {k: commits.list_commits(cache.root, k) for k in keys}  # one listing per view, no marker read
    return Plan(config, cache, specs, views, num_shards, shard_size, todo_of(committed, keys, num_shards), note,
                repaired, committed, errors_wrong, _growth_notes(grown, keys, cache.num_images))


def _growth_notes(grown: list[str], keys: list[str], rows: int) -> list[str]:
    """What growing the views' arrays means for this job and for the views it does not write."""
    if not grown:
        return []
    lines = [f"grew the arrays of {', '.join(grown)} to {rows} rows: the new rows are extracted, and a last "
             "shard that was partial is recomputed whole"]
    others = [k for k in grown if k not in keys]
    if others:
        lines.append("not in this job, so their new rows stay uncommitted until their teachers run: "
                     + ", ".join(others))
    return lines


def todo_of(committed: dict[str, dict], keys: list[str], num_shards: int) -> dict[int, list[str]]:
    """Per shard, the views of ``keys`` (in order) that ``committed`` lacks; shards with none are left out."""
    todo = {}
    for shard in range(num_shards):
        missing = [k for k in keys if shard not in committed[k]]
        if missing:
            todo[shard] = missing
    return todo


def repair(cache: Cache, keys: list[str]) -> tuple[list[str], bool]:
    """Verify the views ``keys``; uncommit every shard with a problem so that this job recomputes it.

    Returns one line per problem saying what happens to it, and whether ``errors.parquet`` disagrees
    with the commits (the job's end then rebuilds it from every marker). Problems of a whole view (its
    statistics, metadata or codec) are not mended by recomputing shards: those lines say what to do
    instead.
    """
    lines, errors_wrong = [], False
    for problem in verify(cache, keys).problems:
        errors_wrong |= problem.kind == "errors-table"
        if problem.shard is not None:
            commits.remove_commit(cache.root, problem.view, problem.shard)
            lines.append(f"repair: {problem}: uncommitted, recomputed by this job")
        elif problem.kind == "errors-table":
            lines.append(f"repair: {problem}: rebuilt at the end of this job")
        else:
            lines.append(f"repair: {problem}: not mended by recomputing shards (write to a new root or view)")
    return lines, errors_wrong


def view_specs(index: int, t: TeacherConfig, spec: TeacherSpec, config: ExtractConfig):
    """(ViewTask, ViewSpec) for each view teacher ``t`` produces."""
    if t.upsampler is not None:
        yield upsampled_view(index, t, spec, config)
        return
    if t.mosaic > 1:
        sizes = [spec.mosaic_tile(t.mosaic)]
    else:
        sizes = [spec.check_size((r, r)) for r in t.resolutions] or [spec.input_size]
    for size in sizes:
        key = spec.view_key(size, t.mosaic)
        grid = (size[0] // spec.patch_size, size[1] // spec.patch_size)
        summary = dataclasses.replace(spec, summary_kind="mean") if t.mosaic > 1 else spec
        yield (ViewTask(key, index, size, t.mosaic),
               ViewSpec(key=key, grid=grid, channels=spec.channels, summary_channels=spec.summary_channels,
                        input_size=size, codec=t.codec,
                        view_policy=config.view_policy, teacher=summary.to_dict(), mosaic=t.mosaic))


def create_or_check(cache: Cache, spec: ViewSpec, shard_size: int) -> None:
    """Create the view, or check an existing one holds the same data settings."""
    existing = cache.views.get(spec.key)
    if existing is not None and existing.spec.upsampler and spec.upsampler and \
            existing.spec.upsampler.get("sha256") != spec.upsampler.get("sha256"):
        old, new = existing.spec.upsampler, spec.upsampler
        raise UsageError(f"{spec.key} was written with the upsampler {old.get('path')} ({old.get('sha256', '')[:19]}), "
                         f"not {new['path']} ({new['sha256'][:19]}): resume with that checkpoint, or write "
                         "another root or teacher name")
    if existing is not None and _same_data(existing.spec, spec):
        spec = existing.spec
    cache.create_view(spec, shard_size)


def _same_data(old: ViewSpec, new: ViewSpec) -> bool:
    """Equal up to where the weights (and an upsampler's checkpoint) were read from, when their hashes
    say they are the same."""
    if old.teacher.get("weights_hash") is None or old.teacher.get("weights_hash") != new.teacher.get("weights_hash"):
        return False
    return _strip(old) == _strip(new)


def _strip(s: ViewSpec) -> ViewSpec:
    teacher = {k: v for k, v in s.teacher.items() if k not in _PROVENANCE}
    upsampler = None if s.upsampler is None else {k: v for k, v in s.upsampler.items() if k != "path"}
    return dataclasses.replace(s, teacher=teacher, upsampler=upsampler)


def check_inputs(config: ExtractConfig) -> None:
    """Refuse an unusable output or source with one line before any teacher is described or image read:
    an object store that cannot be reached or written, no manifest and no source, a missing source."""
    check_reachable(config.output, write=True)
    if not config.source:
        if not locate(config.output).join(tables.MANIFEST).exists():
            raise UsageError(_no_source(config.output))
        return
    check_reachable(config.source)
    pattern = any(c in config.source for c in "*?[") or has_braces(config.source)  # index says what it matches
    if not pattern and not locate(config.source).exists():
        raise SourceNotFoundError(f"no such source: {config.source}")


def _no_source(output: str) -> str:
    return f"{locate(output).uri} has no manifest and no source was given: give 'source' or --source"


def ensure_manifest(config: ExtractConfig) -> str:
    """Give the output root a manifest; returns a line saying where it came from.

    When the output already holds one, a source is listed (no header read) and indexed again only when
    it lists other images: a manifest that extends the cache's (its rows first and unchanged) grows the
    cache (:func:`adopt`); any other is refused, naming the first row that differs."""
    out = locate(config.output)
    held = out.join(tables.MANIFEST).exists()
    if config.source:
        src = locate(config.source)
        if src.join(tables.MANIFEST).exists() and not _is_manifest_file(config.source):
            if src.uri.rstrip("/") == out.uri.rstrip("/"):
                return f"using the manifest of {out.uri}"
            return adopt(out, tables.read_manifest(src), f"the cache {src.uri}")
        if held and not _lists_other_images(config.source, out):
            return f"using the existing manifest of {out.uri} ({config.source} lists the same images)"
        if held or out.join(FEATURES).exists():
            manifest, index_rows = _index_elsewhere(config.source)
            return adopt(out, manifest, config.source, index_rows)
    if held:
        return f"using the existing manifest of {out.uri}"
    if not config.source:
        raise UsageError(_no_source(config.output))
    from featcache.manifest import index

    result = index(config.source, config.output)
    return (f"indexed {result.images} images from {config.source}"
            + (f" ({len(result.failed)} files could not be read: errors.parquet)" if result.failed else ""))


def adopt(out: Location, manifest: pa.Table, source: str, index_rows: list[dict] | None = None) -> str:
    """Make ``manifest`` (what ``source`` yields; ``index_rows``: its index's error rows) the output's:
    kept when the same, restored when the output lost it, grown into when it extends the cache's rows,
    refused otherwise (before any features were written it simply replaces the output's).

    A grow records the new rows' fingerprint first (:meth:`Cache.grow`), then the index's error rows,
    then the manifest; ``prepare`` then grows the arrays. A rerun repeats each step, finding the source
    extending the recorded rows or equal to them, so an interrupted grow completes."""
    from featcache.extract.finalize import replace_index_rows

    cache = Cache(out)
    written = cache.attrs().get("num_images")
    kind, detail = cache.manifest_relation(manifest)
    if written is None and kind != "same":
        kind = "new"  # no features yet: nothing was written against the output's manifest
    if kind == "differs":
        raise UsageError(f"{out.uri} holds features of other images than {source} lists: {detail}; a cache "
                         "grows only by rows after its own (index into a new root for another list)")
    keep = kind == "same" and out.join(tables.MANIFEST).exists() and cache.manifest_difference() is None
    if kind == "extends":
        manifest = _rows_as_indexed(out, manifest)
        cache.grow(manifest)
    if index_rows is not None:
        replace_index_rows(cache, index_rows)
    if not keep:
        tables.write_table(out.join(tables.MANIFEST), manifest)  # last: the commit point of a grow
    n = manifest.num_rows
    if keep:
        return f"using the manifest of {out.uri} (same images as {source})"
    if kind == "extends":
        return f"grew {out.uri} from {written} to {n} images ({source} lists {n - written} more)"
    if kind == "same":
        return f"restored the manifest of {out.uri} from {source} (the images its features were written for)"
    return f"{'copied the manifest of' if index_rows is None else 'indexed'} {source} ({n} images)"


def _rows_as_indexed(out: Location, manifest: pa.Table) -> pa.Table:
    """A grown manifest whose rows already in the cache are the cache's own, as first indexed (their
    size and mtime or ETag: a file changed in place since is still refused when its shard is
    recomputed), the new rows after them; as given when the two tables' columns differ."""
    if not out.join(tables.MANIFEST).exists():
        return manifest
    old = tables.read_manifest(out)
    if old.schema != manifest.schema:
        return manifest
    return pa.concat_tables([old, manifest.slice(old.num_rows)]).combine_chunks()


def _lists_other_images(source: str, out: Location) -> bool:
    """Whether listing ``source`` (names only: a rerun of a large cache reads no header) finds other
    images, or another order, than the output's manifest holds (files the index refused left out).
    For tars and Parquet tables: whether they are other files, or changed since indexed (one stat
    each). True for a source that cannot be listed: indexing reports what is wrong with it."""
    from featcache.manifest import list_source

    try:
        same = _same_containers(source, out)
        if same is not None:
            return not same
        entries, _ = list_source(source)
    except (UsageError, SourceNotFoundError):
        return True
    refused = {r["uri"] for r in tables.error_rows(out, "index")}
    manifest = tables.read_manifest(out)
    held = list(zip(manifest.column("image_id").to_pylist(), manifest.column("uri").to_pylist()))
    return [(e.image_id, e.loc.uri) for e in entries if e.loc.uri not in refused] != held


def _same_containers(source: str, out: Location) -> bool | None:
    """None unless ``source`` names tars or Parquet tables; else whether they are, in order, the
    containers the output's manifest holds images of, each the version it recorded (size, mtime or ETag)."""
    from featcache.sources.listing import containers

    found = containers(source, None)
    if found is None:
        return None
    manifest = tables.read_manifest(out)
    if "container" not in manifest.column_names:
        return False
    recorded: dict[str, tuple] = {}
    for uri, *stamp in zip(*(tables.file_column(manifest, c) for c in ("container", "size", "mtime", "etag"))):
        recorded.setdefault(uri, tuple(stamp))
    files = [loc for loc, _ in found[1]]
    if [f.uri for f in files] != list(recorded):
        return False
    for f in files:
        now = f.stamp()
        if any(a is not None and b is not None and a != b for a, b in zip(recorded[f.uri], (now.size, now.mtime, now.etag))):
            return False
    return True


def _index_elsewhere(source: str) -> tuple[pa.Table, list[dict]]:
    """Index ``source`` into a temporary folder: its manifest and its index-stage error rows (``index``
    itself refuses to replace a cache's manifest with any other, an extension too)."""
    from featcache.manifest import index

    with tempfile.TemporaryDirectory(prefix="featcache-index-") as folder:
        index(source, folder)
        root = locate(folder)
        return tables.read_manifest(root), tables.error_rows(root)


def _is_manifest_file(uri: str) -> bool:
    return uri.endswith((".parquet", ".csv"))


def upsampled_view(index: int, t: TeacherConfig, spec: TeacherSpec, config: ExtractConfig) -> tuple[ViewTask, ViewSpec]:
    """The view of an upsampler checkpoint for teacher ``t``: ``<name>-featsharp<f>x@<canvas>``, its grid
    f x the teacher's, the global view's summary; refused when the checkpoint was made for other weights."""
    from featcache.upsample.checkpoint import describe_upsampler

    folder = os.path.abspath(t.upsampler) if "://" not in t.upsampler else t.upsampler
    d = describe_upsampler(folder)
    made_for = d.teacher
    if made_for.weights_hash and spec.weights_hash and made_for.weights_hash != spec.weights_hash:
        raise UsageError(f"the upsampler {folder} was trained for other weights of {spec.name} "
                         f"({made_for.source}, {made_for.weights_hash[:19]}) than {spec.source} ({spec.weights_hash[:19]})")
    if (made_for.channels, tuple(made_for.input_size), made_for.patch_size) != (spec.channels, spec.input_size, spec.patch_size):
        raise UsageError(f"the upsampler {folder} was trained for a teacher of {made_for.channels} channels at "
                         f"{made_for.input_size[0]} px, not {spec.name}'s {spec.channels} at {spec.input_size[0]} px")
    c = d.config
    size, grid = c.canvas, c.out_grid
    key = f"{spec.name}-featsharp{c.factor}x@" + (f"{size[0]}" if size[0] == size[1] else f"{size[0]}x{size[1]}")
    upsampler = {"name": "featsharp", "path": folder, "sha256": d.sha256, "step": d.step, "config": c.to_dict()}
    return (ViewTask(key, index, size, 1, folder, c.factor),
            ViewSpec(key=key, grid=grid, channels=spec.channels, summary_channels=spec.summary_channels, input_size=size,
                     codec=t.codec, view_policy=config.view_policy, teacher=spec.to_dict(), upsampler=upsampler))
