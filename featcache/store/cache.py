"""A cache root and its views: the store contract of DESIGN.md §2.

The contract is small: create a view (driver only, all arrays at final shape), write one whole
shard and commit it (workers), list commits, read an image's window. Local directories and fsspec
URLs go through the same code; ``Cache.capabilities`` says what the filesystem offers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata

import numpy as np
import pyarrow as pa
import zarr

from featcache.errors import CacheFormatError, MisalignedWriteError, SourceNotFoundError, UsageError
from featcache.fsio import Location, locate
from featcache.store import commits, tables
from featcache.store.spec import FORMAT_VERSION, ViewSpec, check_view_key
from featcache.store.zarrio import ARRAYS, ChecksumStore, array_layouts, as_dtype, open_root, zarr_store

FEATURES = "features.zarr"


@dataclass(frozen=True)
class Capabilities:
    """What the cache's filesystem offers (flags instead of isinstance checks)."""

    positional_reads: bool  # os.pread on a local file: no request per read
    atomic_rename: bool  # markers can be written by rename; object stores replace whole objects instead


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
        self.capabilities = Capabilities(positional_reads=root.is_local, atomic_rename=root.is_local)

    @classmethod
    def open(cls, uri) -> "Cache":
        """Open the cache at ``uri`` (a directory or fsspec URL holding ``manifest.parquet``)."""
        cache = cls(locate(uri))
        cache.manifest  # noqa: B018 - fail now, with a clear message, if there is no manifest
        return cache

    @cached_property
    def manifest(self) -> pa.Table:
        return tables.read_manifest(self.root)

    @property
    def num_images(self) -> int:
        return self.manifest.num_rows

    def errors(self) -> pa.Table:
        return tables.read_errors(self.root)

    def attrs(self) -> dict:
        """``features.zarr`` attrs["featcache"], or {} before the first view exists."""
        if not self.features.join("zarr.json").exists():
            return {}
        return dict(open_root(self.features).attrs.get("featcache", {}))

    @property
    def shard_size(self) -> int | None:
        return self.attrs().get("shard_size")

    @property
    def views(self) -> dict[str, "View"]:
        """The views in creation order."""
        attrs = self.attrs()
        group = open_root(self.features) if attrs else None
        return {key: View(self, key, group[key]) for key in attrs.get("views", [])}

    def view(self, key: str) -> "View":
        views = self.views
        if key not in views:
            raise SourceNotFoundError(f"no view {key!r} in {self.root.uri}; views: {', '.join(views) or 'none'}")
        return views[key]

    def create_view(self, spec: ViewSpec, shard_size: int | None = None) -> "View":
        """Create every array of a view at its final shape (driver only; idempotent for the same spec)."""
        root = self._init_features(shard_size)
        if spec.key in root:
            return self._existing_view(root, spec)
        shard = root.attrs["featcache"]["shard_size"]
        group = root.create_group(spec.key, attributes={"featcache": {"format": FORMAT_VERSION, **spec.to_dict()}})
        for name, layout in array_layouts(spec, self.num_images, shard).items():
            group.create_array(name, **layout)
        attrs = dict(root.attrs["featcache"])
        attrs["views"] = [*attrs["views"], spec.key]
        root.attrs["featcache"] = attrs
        return View(self, spec.key, group)

    def _init_features(self, shard_size: int | None) -> zarr.Group:
        root = open_root(self.features, mode="a")
        attrs = root.attrs.get("featcache")
        if attrs is None:
            if not shard_size or shard_size < 1:
                raise UsageError("the first view of a cache needs a positive shard_size")
            attrs = {"format": FORMAT_VERSION, "num_images": self.num_images, "shard_size": int(shard_size),
                     "views": [], "created_with": versions()}
            root.attrs["featcache"] = attrs
        _check_root_attrs(attrs, self.num_images, shard_size)
        return root

    def _existing_view(self, root: zarr.Group, spec: ViewSpec) -> "View":
        view = View(self, spec.key, root[spec.key])
        if view.spec != spec:
            raise UsageError(f"view {spec.key} already exists with other settings ({_diff(view.spec, spec)}); "
                             "write to a new cache root or view key")
        return view


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
        self.spec = ViewSpec.from_dict(dict(group.attrs["featcache"]))

    def __repr__(self) -> str:
        return f"View({self.key!r}, grid={self.spec.grid}, channels={self.spec.channels})"

    @property
    def num_images(self) -> int:
        return self.cache.num_images

    @cached_property
    def shard_size(self) -> int:
        return self.group["valid"].chunks[0]

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    @property
    def stats(self) -> dict | None:
        return self.group.attrs["featcache"].get("stats")

    def shard_range(self, shard: int) -> tuple[int, int]:
        """The image rows [start, stop) of ``shard``."""
        if not 0 <= shard < self.num_shards:
            raise UsageError(f"shard {shard} is out of range: {self.key} has {self.num_shards} shards")
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images)

    def committed_shards(self) -> set[int]:
        return commits.committed_shards(self.cache.root, self.key)

    def commit_record(self, shard: int) -> commits.Commit | None:
        return commits.read_commit(self.cache.root, self.key, shard)

    def write_shard(self, start: int, dense, summary, box, errors: dict[int, str] | None = None,
                    info: dict | None = None) -> commits.Commit:
        """Write rows [start, start + len(dense)) — exactly one whole shard — and commit it.

        ``errors`` maps image rows that failed to their reason: their ``valid`` is 0 and their
        features are stored as zeros. Rewriting a shard is idempotent: the old commit is withdrawn
        first, and a writer killed before the marker leaves the shard uncommitted.
        """
        shard, stop = self._aligned(start, len(dense))
        errors = {int(k): str(v) for k, v in (errors or {}).items()}
        data = self._shard_arrays(start, stop, dense, summary, box, errors)
        commits.remove_commit(self.cache.root, self.key, shard)
        store = ChecksumStore(zarr_store(self.cache.features))
        group = zarr.open_group(store, path=self.key, mode="r+", zarr_format=3)
        for name in ARRAYS:
            # write_empty_chunks is not stored with the array: without it, zarr skips (or deletes)
            # all-zero chunks, and an all-failed shard would lack the objects its marker records.
            group[name].with_config({"write_empty_chunks": True})[start:stop] = data[name]
        prefix = self.key + "/"
        checksums = {k[len(prefix):]: v for k, v in store.written.items() if k.startswith(prefix)}
        commit = commits.Commit(view=self.key, shard=shard, start=start, stop=stop, errors=errors,
                                checksums=checksums, worker=commits.worker_identity(), info=info or {},
                                time=time.time())
        commits.write_commit(self.cache.root, commit)
        return commit

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
        expected = {"dense": (n, *spec.grid, spec.channels), "summary": (n, spec.summary_channels), "box": (n, 4)}
        data = {}
        for name, x in (("dense", dense), ("summary", summary), ("box", box)):
            x = np.asarray(x)
            if x.shape != expected[name]:
                raise UsageError(f"{self.key}: {name} has shape {x.shape}, expected {expected[name]}")
            data[name] = as_dtype(x, self.group[name].dtype)
        failed = np.array(sorted(errors), dtype=np.int64) - start
        valid = np.ones(n, dtype=np.uint8)
        valid[failed] = 0
        for name in ("dense", "summary", "box"):
            if len(failed):
                data[name] = data[name].copy()
                data[name][failed] = 0
        data["valid"] = valid
        return data

    def reader(self, verify_checksums: bool = False):
        """A fast random-access reader (see :mod:`featcache.store.reader`)."""
        from featcache.store.reader import ViewReader

        return ViewReader(self, verify_checksums=verify_checksums)
