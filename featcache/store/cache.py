"""A cache root and its views: the store contract of DESIGN.md §2.

The contract is small: create a view (driver only, all arrays at final shape), write one whole
shard and commit it (workers), list commits, read an image's window. Local directories and fsspec
URLs go through the same code; ``Cache.capabilities`` says what the filesystem offers.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import time
from functools import cached_property
from importlib import metadata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr
from zarr.errors import ContainsArrayError, ContainsGroupError

from featcache.errors import CacheFormatError, MisalignedWriteError, SourceNotFoundError, UsageError
from featcache.store.location import Location, locate
from featcache.log import LOGGER
from featcache.store import attrs as attrs_json
from featcache.store import commits, fingerprint, shardwriter, tables
from featcache.store.spec import FORMAT_VERSION, ViewSpec, check_view_key
from featcache.store.zarrio import (ARRAYS, ChecksumStore, array_layouts, as_dtype, open_root, shard_object_keys,
                                    write_small_array, zarr_store)
from featcache.store.zarrio import consolidate, replace_image_ids, resize_rows, write_image_ids

FEATURES = "features.zarr"
IMAGE_ID = "image_id"  # the manifest column each view stores as its xarray coordinate


def versions() -> dict[str, str]:
    """Versions of the packages that shape what is stored (recorded as ``created_with``)."""
    out = {}
    for name in ("featcache", "torch", "transformers", "zarr"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class Cache:
    """A cache root: manifest, errors, and the teacher views in ``features.zarr``."""

    def __init__(self, root: Location):
        self.root = root
        self.features = root.join(FEATURES)
        self.capabilities = root.backend.capabilities
        self._non_views: list[str] = []
        self._warned_non_views = False

    @classmethod
    def open(cls, uri) -> "Cache":
        """Open the cache at ``uri`` (a directory or fsspec URL holding ``manifest.parquet``)."""
        cache = cls(locate(uri))
        cache.manifest  # noqa: B018 - fail now, with a clear message, if there is no manifest
        return cache

    @cached_property
    def manifest(self) -> pa.Table:
        return tables.read_manifest(self.root)

    @cached_property
    def row_hashes(self) -> np.ndarray:
        """The fingerprint's row hashes of the cache's manifest, computed once per Cache (a second per
        million rows: every view creation and check would otherwise hash the manifest again)."""
        return fingerprint.row_hashes(self.manifest)

    @property
    def num_images(self) -> int:
        return self.manifest.num_rows

    @property
    def errors(self) -> pa.Table:
        """``errors.parquet``, read afresh on each access (jobs rewrite it), empty when it does not exist."""
        return tables.read_errors(self.root)

    def attrs(self) -> dict:
        """``features.zarr`` attrs["featcache"], or {} before the first view exists."""
        loc = self.features.join("zarr.json")
        try:
            meta = json.loads(loc.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise CacheFormatError(f"{loc.uri} is not valid JSON ({e}): the cache's root metadata is damaged") from None
        return attrs_json.read(meta.get("attributes", {}))

    @property
    def shard_size(self) -> int | None:
        return self.attrs().get("shard_size")

    @property
    def views(self) -> dict[str, "View"]:
        """The readable views, in creation order (a damaged one raises; see :meth:`scan_views`). Folders
        that are not views are skipped, with one warning per Cache (see :meth:`non_views`)."""
        views, broken = self.scan_views()
        if broken:
            key, reason = next(iter(broken.items()))
            raise CacheFormatError(f"view {key} cannot be opened: {reason} (run 'featcache verify')")
        if self._non_views and not self._warned_non_views:
            self._warned_non_views = True
            LOGGER.warning(non_view_line(self._non_views))
        return views

    def scan_views(self) -> tuple[dict[str, "View"], dict[str, str]]:
        """(readable views in creation order, {name: why} of the views in features.zarr that are damaged).

        Views are discovered from the groups themselves, never from a shared list that concurrent
        creators would have to read-modify-write (such a list lost views in hostile trials). A folder
        without a group's ``zarr.json`` (a user's scratch folder, a view creation killed before its
        metadata, what an object store lists after a recursive delete) is no view: it is skipped and
        recorded for :meth:`non_views`, and creating that view later finishes it.
        """
        attrs = self.attrs()
        if not attrs:
            return {}, {}
        group = open_root(self.features)
        views, broken, self._non_views = [], {}, []
        for name in self._child_names():
            try:
                node = group[name]
            except KeyError:
                self._non_views.append(name)
                continue
            except (ValueError, TypeError) as e:  # a damaged zarr.json
                broken[name] = _reason(e)
                continue
            if not isinstance(node, zarr.Group):
                self._non_views.append(name)
                continue
            try:
                views.append(View(self, name, node))
            except (KeyError, ValueError, TypeError, CacheFormatError) as e:
                broken[name] = _reason(e)
        legacy = {k: i for i, k in enumerate(attrs.get("views", []))}  # caches written before discovery
        views.sort(key=lambda v: (v.created, legacy.get(v.key, len(legacy)), v.key))
        return {v.key: v for v in views}, broken

    def non_views(self) -> list[str]:
        """Names of the folders in ``features.zarr`` that are not views (skipped by every reader)."""
        self.scan_views()
        return list(self._non_views)

    def _child_names(self) -> list[str]:
        entries = self.features.backend.list(self.features.path, detail=True)
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"]
        return sorted(n for n in names if n != fingerprint.ARRAY)

    def view(self, key: str) -> "View":
        views = self.views
        if key not in views:
            raise SourceNotFoundError(f"no view {key!r} in {self.root.uri}; views: {', '.join(views) or 'none'}")
        return views[key]

    def check_manifest(self) -> None:
        """Refuse the cache's manifest when it is not the one its rows were written for (DESIGN.md §2)."""
        detail = self.manifest_difference()
        if detail:
            raise fingerprint.mismatch_error(self.root.uri, detail)

    def manifest_difference(self, manifest: pa.Table | None = None) -> str | None:
        """How ``manifest`` (the cache's own by default) differs from the rows the cache was written
        for, naming the first row that differs; None when it is the same (or nothing was recorded).
        An extension differs too: only ``extract`` grows a cache (:meth:`grow`)."""
        kind, detail = self.manifest_relation(manifest)
        return detail if kind in ("extends", "differs") else None

    def manifest_relation(self, manifest: pa.Table | None = None) -> tuple[str, str | None]:
        """How ``manifest`` (the cache's own by default) stands to the rows the cache was written for:
        ``same``, ``extends`` or ``differs`` with a line naming the first row that differs
        (:func:`fingerprint.relation`). Before any fingerprint was recorded (no features yet, or a cache
        written before fingerprints) the cache's own manifest stands for those rows; ``new`` when there
        is none either."""
        recorded = self.attrs().get("manifest")
        if recorded is None and not self.root.join(tables.MANIFEST).exists():
            return "new", None
        if recorded is None:
            own = self.row_hashes
            recorded, stored = fingerprint.record(own), lambda: own
        else:
            stored = self._recorded_hashes
        hashes = self.row_hashes if manifest is None else fingerprint.row_hashes(manifest)
        return fingerprint.relation(self.manifest if manifest is None else manifest, hashes, recorded, stored)

    def _recorded_hashes(self) -> np.ndarray:
        """The row hashes the cache recorded (``_manifest``); empty when they are gone, or unreadable (a
        grow killed while rewriting them: the root attrs, written after, still name the old rows)."""
        try:
            return np.asarray(open_root(self.features)[fingerprint.ARRAY][:])
        except (KeyError, FileNotFoundError, ValueError):
            return np.zeros(0, dtype="<u8")

    def uncommit_changed(self, manifest: pa.Table) -> list[int]:
        """Before ``manifest`` (the same rows, re-indexed) replaces the cache's: the rows whose file is not
        the one indexed before (size, mtime, etag, width, height or place in its container differ) have
        their shards uncommitted in every view, so that the next extract recomputes them from the new
        bytes (rows are positions: the features of the old bytes must not stay beside the new pixels).
        Returns those rows. The caller writes the manifest afterwards: a re-index killed in between
        finds the same rows again."""
        rows = changed_rows(self.manifest, manifest)
        if rows and self.attrs():
            for key, view in self.scan_views()[0].items():
                for shard in sorted({r // view.shard_size for r in rows}):
                    commits.remove_commit(self.root, key, shard)
        return rows

    def grow(self, manifest: pa.Table) -> None:
        """Record ``manifest``, an extension of the cache's rows, as the rows the cache is written for
        (driver only): each view's last shard, when partial, is uncommitted (it is recomputed whole),
        then the row hashes are written, then the root attrs (fingerprint and ``num_images``). The caller
        writes ``manifest.parquet`` afterwards, and :meth:`grow_views` brings the arrays to the new length:
        a grow interrupted anywhere is completed by running it again (the source still extends the
        recorded rows, or now equals them)."""
        attrs = self.attrs()
        if not attrs:  # no features yet: nothing records the rows
            return
        for view in self.views.values():  # first: until its arrays grow, no job may read it as committed
            view.uncommit_partial_last(attrs["num_images"])
        self._write_fingerprint(fingerprint.row_hashes(manifest), grow=True)

    def grow_views(self) -> list[str]:
        """Bring every view's arrays to the manifest's length after the cache grew (driver only,
        idempotent); returns the keys of the views it grew."""
        attrs = self.attrs()
        if not attrs:
            return []
        self.check_manifest()
        _check_root_attrs(attrs, self.num_images, None)
        return [key for key, view in self.views.items() if view.grow(self.num_images)]

    def create_view(self, spec: ViewSpec, shard_size: int | None = None) -> "View":
        """Create every array of a view at its final shape (driver only; idempotent for the same spec).

        Safe when several processes create views of one root at once: each view is its own group,
        and the root is created once (first writer wins; the others check they agree with it).
        """
        root = self._init_features(shard_size)
        if spec.key in root:
            view = self._existing_view(root, spec)
            if not _missing_arrays(view.group):
                return view
            group = view.group  # a creation killed before its last array: finish it
        else:
            group = self._create_group(root, spec)
        for name, layout in array_layouts(spec, self.num_images, self.attrs()["shard_size"]).items():
            try:
                group.create_array(name, **layout)
            except ContainsArrayError:
                pass  # created by that other process, or before the kill
        write_image_ids(group, self.image_ids())
        return self._existing_view(root, spec)

    @staticmethod
    def _create_group(root: zarr.Group, spec: ViewSpec) -> zarr.Group:
        attributes = {attrs_json.KEY: attrs_json.encode({"format": FORMAT_VERSION, **spec.to_dict(), "created": time.time()})}
        attributes["coordinates"] = IMAGE_ID  # xarray reads the view's image_id array as its coordinate
        try:
            return root.create_group(spec.key, attributes=attributes)
        except ContainsGroupError:  # another process created it since our check: it must hold the same spec
            return root[spec.key]

    def image_ids(self) -> np.ndarray:
        """The manifest's ``image_id`` column, in row order (what each view's ``image_id`` array holds)."""
        return self.manifest.column(IMAGE_ID).to_numpy(zero_copy_only=False).astype(object)

    def consolidate(self) -> None:
        """Write the consolidated metadata that xarray reads (driver only, at the end of a job that
        changed metadata: ``extract``, ``stats``). featcache's own readers ignore it (:func:`open_root`),
        so a job that writes after it never reads stale metadata; the next job's end refreshes it."""
        if self.attrs():  # no features.zarr before the first view
            self.upgrade_metadata()
            consolidate(self.features)

    def upgrade_metadata(self) -> list[str]:
        """Bring the metadata of views written by earlier featcache versions to today's (driver only;
        metadata, never data): the ``featcache`` attrs as a JSON string, each array's dimension
        names, the ``image_id`` coordinate. Returns what it changed, one entry per object."""
        changed = []
        root = open_root(self.features, mode="a")
        meta = json.loads(self.features.join("zarr.json").read_bytes())
        if not isinstance(meta.get("attributes", {}).get(attrs_json.KEY), str):
            attrs_json.write(root, self.attrs())
            changed.append("features.zarr attrs")
        for key, view in self.scan_views()[0].items():
            group = root[key]
            if not isinstance(group.attrs.get(attrs_json.KEY), str) or "coordinates" not in group.attrs:
                group.attrs.update({attrs_json.KEY: attrs_json.encode(view.attrs), "coordinates": IMAGE_ID})
                changed.append(f"{key} attrs")
            if IMAGE_ID not in group:
                write_image_ids(group, self.image_ids())
                changed.append(f"{key}/{IMAGE_ID}")
            for name, layout in array_layouts(view.spec, self.num_images, view.shard_size).items():
                loc = view.loc.join(name, "zarr.json")
                array_meta = json.loads(loc.read_bytes())
                if array_meta.get("dimension_names") != list(layout["dimension_names"]):
                    array_meta["dimension_names"] = list(layout["dimension_names"])
                    loc.write_bytes_atomic(json.dumps(array_meta, indent=2).encode())
                    changed.append(f"{key}/{name}")
        return changed

    def _init_features(self, shard_size: int | None) -> zarr.Group:
        attrs = self.attrs()
        if not attrs:
            if not shard_size or shard_size < 1:
                raise UsageError("the first view of a cache needs a positive shard_size")
            self._create_root(int(shard_size))
            attrs = self.attrs()
        if "manifest" not in attrs:
            self.record_manifest()
        self.check_manifest()
        _check_root_attrs(attrs, self.num_images, shard_size)
        return open_root(self.features, mode="a")

    def _create_root(self, shard_size: int) -> None:
        """Write ``features.zarr/zarr.json`` unless another process did first, then the row hashes."""
        hashes = self.row_hashes
        attrs = {"format": FORMAT_VERSION, "num_images": self.num_images, "shard_size": shard_size,
                 "manifest": fingerprint.record(hashes),
                 "created_with": versions()}
        meta = {"attributes": {attrs_json.KEY: attrs_json.encode(attrs)}, "zarr_format": 3, "node_type": "group"}
        self.features.join("zarr.json").write_bytes_if_absent(json.dumps(meta, indent=2).encode())
        write_small_array(self.features, fingerprint.ARRAY, hashes, ("image",))

    def record_manifest(self) -> None:
        """Record the fingerprint of the current manifest in a cache created before fingerprints (driver only)."""
        self._write_fingerprint(self.row_hashes)

    def _write_fingerprint(self, hashes: np.ndarray, grow: bool = False) -> None:
        """The row hashes first, then the root attrs that name their digest (with ``num_images`` when the
        cache grows): until the attrs are written the cache is the one it was."""
        write_small_array(self.features, fingerprint.ARRAY, hashes, ("image",))
        root = open_root(self.features, mode="a")
        attrs = attrs_json.read(root.attrs)
        if grow:
            attrs["num_images"] = len(hashes)
        attrs["manifest"] = fingerprint.record(hashes)
        attrs_json.write(root, attrs)

    def _existing_view(self, root: zarr.Group, spec: ViewSpec) -> "View":
        view = View(self, spec.key, root[spec.key])
        if view.spec != spec:
            raise UsageError(f"view {spec.key} already exists with other settings ({_diff(view.spec, spec)}); "
                             "write to a new cache root or view key")
        return view


#: Manifest columns that describe a row's bytes (its identity, index/image_id/uri, is the fingerprint's).
_CONTENT_COLUMNS = ("width", "height", *tables.FILE_COLUMNS, *tables.MEMBER_COLUMNS)


def _partials(loc: Location) -> list[str]:
    """The temporary siblings ``<object>.<hex>.partial`` a staged write killed midway left beside ``loc``."""
    return loc.backend.glob(glob.escape(loc.path) + ".*.partial")[0]


def changed_rows(old: pa.Table, new: pa.Table) -> list[int]:
    """Rows of two manifests of the same images whose recorded content differs (a column missing from
    either, as in manifests written before it, tells nothing)."""
    n = min(old.num_rows, new.num_rows)
    changed = np.zeros(n, dtype=bool)
    for name in _CONTENT_COLUMNS:
        if name in old.column_names and name in new.column_names:
            a, b = old.column(name).slice(0, n), new.column(name).slice(0, n)
            differ = pc.or_(pc.fill_null(pc.not_equal(a, b), False), pc.not_equal(pc.is_null(a), pc.is_null(b)))
            changed |= differ.to_numpy(zero_copy_only=False)
    return np.flatnonzero(changed).tolist()


def _missing_arrays(group: zarr.Group) -> list[str]:
    """The arrays of a view group whose metadata does not exist (damaged metadata counts as present:
    verify reports it, nothing here writes over it)."""
    missing = []
    for name in (*ARRAYS, IMAGE_ID):
        try:
            group[name]
        except KeyError:
            missing.append(name)
        except (ValueError, TypeError):
            pass
    return missing


def non_view_line(names: list[str]) -> str:
    """The line that reports folders of ``features.zarr`` that are not views."""
    return "; ".join(f"features.zarr/{n}: a folder that is not a view (left alone)" for n in names)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _check_root_attrs(attrs: dict, num_images: int, shard_size: int | None) -> None:
    if attrs.get("format") != FORMAT_VERSION:
        raise CacheFormatError(f"cache format {attrs.get('format')} is not {FORMAT_VERSION}")
    if attrs["num_images"] != num_images:
        raise CacheFormatError(f"features.zarr holds {attrs['num_images']} images, the manifest {num_images}")
    if shard_size and attrs["shard_size"] != shard_size:
        raise UsageError(f"this cache uses shard_size {attrs['shard_size']}, not {shard_size}")


def _diff(old: ViewSpec, new: ViewSpec) -> str:
    fields = [f.name for f in dataclasses.fields(ViewSpec) if f.name != "dtype"]  # dtype follows the codec
    return "; ".join(f"{n}: {getattr(old, n)!r} -> {getattr(new, n)!r}"
                     for n in fields if getattr(old, n) != getattr(new, n))


class View:
    """One teacher view of a cache: its spec, shard writes, commits and reads."""

    def __init__(self, cache: Cache, key: str, group: zarr.Group):
        self.cache = cache
        self.key = check_view_key(key)
        self.group = group
        self.loc = cache.features.join(key)
        attrs = self.attrs
        self.spec = ViewSpec.from_dict(attrs)
        self.created = float(attrs.get("created", 0.0))

    @property
    def attrs(self) -> dict:
        """The view's ``featcache`` attribute as this group object holds it (``statsio.view_attrs``
        reads the stored one afresh)."""
        return attrs_json.read(self.group.attrs)

    def __repr__(self) -> str:
        return f"View({self.key!r}, grid={self.spec.grid}, channels={self.spec.channels})"

    @property
    def num_images(self) -> int:
        return self.cache.num_images

    @cached_property
    def shard_size(self) -> int:
        return self._arrays["valid"].chunks[0]

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    @property
    def stats(self) -> dict | None:
        return self.attrs.get("stats")

    def shard_range(self, shard: int) -> tuple[int, int]:
        """The image rows [start, stop) of ``shard``."""
        if not 0 <= shard < self.num_shards:
            raise UsageError(f"shard {shard} is out of range: {self.key} has {self.num_shards} shards")
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images)

    def grow(self, rows: int) -> bool:
        """Grow the view's arrays to ``rows`` after the cache grew (driver only); False when none is shorter.

        A last shard that was partial is uncommitted first, so that it is recomputed whole (its rows
        now continue into new ones); then each array's shape is set, then the image ids rewritten.
        Rerun after an interruption anywhere, it finishes the same way (the shortest array still says
        where the cache ended)."""
        arrays = self._arrays
        old = min(a.shape[0] for a in arrays.values())
        ids = self.image_id_array()  # absent in caches from before image ids: consolidate() writes it
        if old >= rows and (ids is None or ids.shape[0] >= rows):
            return False
        if old < rows:
            self.uncommit_partial_last(old)
        for name, array in arrays.items():
            if array.shape[0] < rows:
                resize_rows(self.loc.join(name), rows)
        if ids is not None:
            replace_image_ids(self.loc, self.cache.image_ids())
        return True

    def uncommit_partial_last(self, rows: int) -> None:
        """Withdraw the last shard of a view of ``rows`` rows when it is partial: once the cache grows,
        its rows continue into new ones, and it is recomputed whole."""
        if rows % self.shard_size:
            commits.remove_commit(self.cache.root, self.key, rows // self.shard_size)

    def committed_shards(self) -> set[int]:
        return commits.committed_shards(self.cache.root, self.key)

    def commit_record(self, shard: int) -> commits.Commit | None:
        return commits.read_commit(self.cache.root, self.key, shard)

    def write_shard(self, start: int, dense, summary, box, errors: dict[int, str] | None = None,
                    info: dict | None = None) -> commits.Commit:
        """Write rows [start, start + len(dense)) — exactly one whole shard — and commit it.

        ``errors`` maps image rows that failed to their reason: their ``valid`` is 0 and their
        features are stored as zeros. Rewriting a shard is idempotent: the old commit is withdrawn
        first, and a writer killed before the marker leaves the shard uncommitted. Each object is
        encoded here and written in one write (:mod:`featcache.store.shardwriter`), the same bytes
        zarr-python would write; an array whose stored layout that module does not know is written
        through zarr.
        """
        shard, stop = self._aligned(start, len(dense))
        errors = {int(k): str(v) for k, v in (errors or {}).items()}
        data = self._shard_arrays(start, stop, dense, summary, box, errors)
        commits.remove_commit(self.cache.root, self.key, shard)
        self._clear(shard)
        checksums = self._store_arrays(shard, start, stop, data)
        commit = commits.Commit(view=self.key, shard=shard, start=start, stop=stop, errors=errors,
                                checksums=checksums, worker=commits.worker_identity(), info=info or {},
                                time=time.time())
        commits.write_commit(self.cache.root, commit)
        return commit

    @cached_property
    def _arrays(self) -> dict[str, zarr.Array]:
        """The view's arrays, opened once: the driver fixes their metadata when it creates them.
        Damaged or missing metadata raises one line naming its file (never a KeyError or a JSON error)."""
        return {name: self.array(name) for name in ARRAYS}

    @property
    def arrays(self) -> dict[str, zarr.Array]:
        """``dense``, ``summary``, ``box`` and ``valid``, opened once (a CacheFormatError when damaged)."""
        return self._arrays

    def array(self, name: str) -> zarr.Array:
        """The view's array ``name`` opened afresh; a CacheFormatError naming its ``zarr.json`` when that
        is missing or damaged."""
        try:
            node = self.group[name]
        except (KeyError, ValueError, TypeError) as e:
            reason = "missing" if isinstance(e, KeyError) else f"unreadable ({_reason(e)})"
            raise CacheFormatError(f"features.zarr/{self.key}/{name}/zarr.json is {reason}: the array's metadata "
                                   "is damaged (run 'featcache verify')") from None
        if not isinstance(node, zarr.Array):
            raise CacheFormatError(f"features.zarr/{self.key}/{name} is not an array (run 'featcache verify')")
        return node

    def image_id_array(self) -> zarr.Array | None:
        """The view's ``image_id`` coordinate; None in caches written before it (``consolidate`` adds it)."""
        if not self.cache.features.join(self.key, IMAGE_ID).exists():
            return None
        return self.array(IMAGE_ID)

    @cached_property
    def _layouts(self) -> dict[str, shardwriter.ArrayLayout | None]:
        """How the shard writer encodes each array; None for a layout it does not know."""
        layouts = {}
        for name, array in self._arrays.items():
            try:
                layouts[name] = shardwriter.ArrayLayout.from_metadata(array.metadata)
            except shardwriter.LayoutNotSupported:
                layouts[name] = None
        return layouts

    def _store_arrays(self, shard: int, start: int, stop: int, data: dict) -> dict[str, int]:
        """Store ``shard``'s object of every array, in ``ARRAYS`` order (``valid`` last, so a row reads
        as valid only once it is whole); {key relative to the view: checksum of what was written}.

        The shard writer encodes the objects and they are written together; an array whose stored
        layout it does not know is written through zarr, in its turn."""
        checksums, batch = {}, []
        for name in ARRAYS:
            layout = self._layouts[name]
            if layout is None:
                checksums.update(self._write_objects(batch))
                checksums.update(self._write_array_through_zarr(name, start, stop, data[name]))
                batch = []
                continue
            batch.append((f"{name}/{layout.key(shard)}", layout.encode_later(shard, data[name])))
        checksums.update(self._write_objects(batch))
        return checksums

    def _write_objects(self, batch: list[tuple[str, shardwriter.Encoded]]) -> dict[str, int]:
        """Write encoded objects (key relative to the view, buffers); {key: checksum}."""
        objects = [(self.loc.join(*key.split("/")), parts) for key, parts in batch]
        return dict(zip([key for key, _ in batch], shardwriter.write_objects(objects)))

    def _write_array_through_zarr(self, name: str, start: int, stop: int, rows: np.ndarray) -> dict[str, int]:
        """The fallback for layouts the shard writer does not know: zarr-python writes, a ChecksumStore
        records what it wrote."""
        store = ChecksumStore(zarr_store(self.cache.features))
        array = zarr.open_array(store, path=f"{self.key}/{name}", mode="r+", zarr_format=3)
        # write_empty_chunks is not stored with the array: without it, zarr skips (or deletes)
        # all-zero chunks, and an all-failed shard would lack the objects its marker records.
        array.with_config({"write_empty_chunks": True})[start:stop] = rows
        prefix = self.key + "/"
        return {k[len(prefix):]: v for k, v in store.written.items() if k.startswith(prefix)}

    def _clear(self, shard: int) -> None:
        """Before writing ``shard``: remove the temporary files (``<object>.<hex>.partial``) a writer
        killed mid-write left on a local disk, and the old objects of arrays written through zarr
        (zarr reads an existing shard object's index before writing over it, and a damaged one, what
        ``--repair`` rewrites, would fail the write). The shard writer replaces its objects whole."""
        for name, key in shard_object_keys(self._arrays, shard).items():  # the arrays stand in for the group
            loc = self.loc.join(*key.split("/"))
            # only a writer that stages temporary siblings leaves them
            paths = _partials(loc) if self.cache.capabilities.atomic_rename else []
            for path in paths + ([loc.path] if self._layouts[name] is None else []):
                loc.backend.delete(path)  # never written: nothing to remove, no error

    def _aligned(self, start: int, length: int) -> tuple[int, int]:
        s, n = self.shard_size, self.num_images
        stop = start + length
        if start % s or not 0 <= start < n or stop != min(start + s, n):
            raise MisalignedWriteError(
                f"{self.key}: rows [{start}, {stop}) are not one whole shard; shards are {s} rows "
                f"aligned at multiples of {s} (the last one ends at {n})")
        return start // s, stop

    def _shard_arrays(self, start, stop, dense, summary, box, errors) -> dict[str, np.ndarray]:
        n, spec = stop - start, self.spec
        bad = [i for i in errors if not start <= i < stop]
        if bad:
            raise UsageError(f"{self.key}: error rows {bad} are outside the shard [{start}, {stop})")
        expected = {"dense": (n, *spec.grid, spec.stored_channels), "summary": (n, spec.summary_channels), "box": (n, 4)}
        data = {}
        for name, x in (("dense", dense), ("summary", summary), ("box", box)):
            x = np.asarray(x)
            if x.shape != expected[name]:
                raise UsageError(f"{self.key}: {name} has shape {x.shape}, expected {expected[name]}")
            data[name] = as_dtype(x, self._arrays[name].dtype)
        failed = np.array(sorted(errors), dtype=np.int64) - start
        valid = np.ones(n, dtype=np.uint8)
        valid[failed] = 0
        for name in ("dense", "summary", "box"):
            if len(failed):
                data[name] = data[name].copy()
                data[name][failed] = 0
        data["valid"] = valid
        return data

    def reader(self, verify_checksums: bool = True, whole_shards: int = 0):
        """A fast random-access reader (see :mod:`featcache.store.reader`); every chunk's crc32c
        is checked unless ``verify_checksums=False``; ``whole_shards``: read announced shards' objects whole,
        holding that many shards (:class:`featcache.store.reader.WholeObjects`)."""
        from featcache.store.reader import ViewReader

        return ViewReader(self, verify_checksums=verify_checksums, whole_shards=whole_shards)
