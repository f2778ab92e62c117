"""Shard write throughput: featcache's shard writer vs a raw write of the same bytes vs zarr-python.

    python benchmarks/shard_writer.py            # local disk and the SeaweedFS S3 server, ~2 min
    python benchmarks/shard_writer.py --quick    # run locally in seconds: small shards, 3 rounds
    python benchmarks/shard_writer.py --json     # one JSON object on stdout

For each shape (a DINOv3-like untiled view: 64 images x 16x16x1536 f16 = 50 MB a shard; a SAM3-like
tiled view: 8 images x 72x72x1024 f16 in 24x24 tiles = 85 MB) and each storage (a local directory;
SeaweedFS on loopback, started as the tests start it, skipped with a message where it cannot start),
three ways of storing one whole shard are timed in interleaved rounds, each round in a rotated order
(what the previous round stored is deleted first, untimed, so that every timed write stores new
objects, as extraction does):

- ``writer``: ``View.write_shard`` (encode every object, one write each, commit marker last);
- ``raw``: one write of the same number of bytes, already in memory (local: write + fsync, as the
  writer syncs; S3: one ``pipe_file``);
- ``zarr``: the same shard through zarr-python's write path, as ``write_shard`` did before
  (``write_empty_chunks``, a ChecksumStore recording each object's checksum, the commit marker).

MB/s counts the bytes of the shard's four objects; medians over rounds; ratios writer/raw and
writer/zarr (issue 13 targets: >= 0.8x raw, >= 4x zarr); the median CPU time of this process per
shard (all threads; not the S3 server's). Before timing, the writer's objects are checked to be
byte-identical to zarr-python's. The CRC-32 the commit markers record comes from ISA-L (the ``isal``
dependency), else zlib where it has no wheel: the report says which. The machine may be shared:
the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featcache.store import Cache, commits, shardwriter  # noqa: E402
from featcache.store.local import LocalBackend  # noqa: E402
from featcache.store.zarrio import ARRAYS, ChecksumStore, shard_object_keys, zarr_store  # noqa: E402
from tests.support.caches import spec, write_manifest  # noqa: E402

SHAPES = {  # name: (images per shard, grid, channels, tile)
    "dinov3-like 16x16x1536": (64, (16, 16), 1536, None),
    "sam3-like 72x72x1024 tiled 24x24": (8, (72, 72), 1024, (24, 24)),
}
QUICK = {
    "dinov3-like 16x16x1536": (16, (16, 16), 384, None),
    "sam3-like 72x72x1024 tiled 24x24": (2, (72, 72), 256, (24, 24)),
}


def make_view(root: str, shard: int, grid, channels: int, tile):
    """A cache of two shards with one f16 view; the benchmark writes shard 0 over and over."""
    write_manifest(root, 2 * shard)
    cache = Cache.open(root)
    return cache.create_view(spec(grid=grid, channels=channels, tile=tile), shard_size=shard)


def shard_rows(view) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n, (h, w), c = view.shard_size, view.spec.grid, view.spec.channels
    return {"dense": rng.standard_normal((n, h, w, c), dtype=np.float32).astype(np.float16),
            "summary": rng.standard_normal((n, view.spec.summary_channels), dtype=np.float32).astype(np.float16),
            "box": rng.uniform(0, 500, (n, 4)).astype(np.float32)}


def zarr_write_shard(view, rows: dict) -> None:
    """``View.write_shard`` as it was before the shard writer: every array through zarr-python."""
    n = view.shard_size
    data = {**rows, "valid": np.ones(n, np.uint8)}
    remove_shard(view)  # the commit, then the objects (zarr would read an old shard's index)
    store = ChecksumStore(zarr_store(view.cache.features))
    group = zarr.open_group(store, path=view.key, mode="r+", zarr_format=3)
    for name in ARRAYS:
        group[name].with_config({"write_empty_chunks": True})[0:n] = data[name]
    prefix = view.key + "/"
    checksums = {k[len(prefix):]: v for k, v in store.written.items() if k.startswith(prefix)}
    commits.write_commit(view.cache.root, commits.Commit(view=view.key, shard=0, start=0, stop=n,
                                                         checksums=checksums, time=time.time()))


def remove_shard(view) -> None:
    """Delete shard 0's objects and marker: each timed write then stores new objects, as extraction
    does (rewriting in place would time the freeing of the old ones too)."""
    commits.remove_commit(view.cache.root, view.key, 0)
    for key in shard_object_keys(view.group, 0).values():
        loc = view.loc.join(*key.split("/"))
        loc.delete()


def raw_write(loc, data: bytes) -> None:
    """One write of ``data``: a file written and fsynced (the writer syncs too), or one PUT."""
    if not isinstance(loc.backend, LocalBackend):
        loc.write_bytes_atomic(data)  # one PUT
        return
    with open(loc.path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def shard_objects(view) -> dict[str, bytes]:
    keys = shard_object_keys(view.group, 0).values()
    return {k: view.loc.join(*k.split("/")).read_bytes() for k in keys}


def bench_storage(base: str, shapes: dict, rounds: int) -> dict:
    """Time the three ways on every shape under ``base`` (a directory or an s3:// prefix)."""
    out = {}
    for name, (shard, grid, channels, tile) in shapes.items():
        views = {way: make_view(f"{base}/{way}-{uuid.uuid4().hex[:8]}", shard, grid, channels, tile)
                 for way in ("writer", "zarr")}
        rows = shard_rows(views["writer"])
        views["writer"].write_shard(0, **rows)
        zarr_write_shard(views["zarr"], rows)
        objects = shard_objects(views["writer"])
        identical = objects == shard_objects(views["zarr"])
        nbytes = sum(len(b) for b in objects.values())
        blob, raw_loc = b"".join(objects.values()), views["writer"].cache.root.join("raw-object")
        ways = {"writer": lambda: views["writer"].write_shard(0, **rows),
                "raw": lambda: raw_write(raw_loc, blob),
                "zarr": lambda: zarr_write_shard(views["zarr"], rows)}
        clear = {"writer": lambda: remove_shard(views["writer"]),
                 "raw": lambda: raw_loc.delete(),
                 "zarr": lambda: remove_shard(views["zarr"])}
        times, cpu = {way: [] for way in ways}, {way: [] for way in ways}
        for r in range(rounds):
            order = list(ways)[r % 3:] + list(ways)[:r % 3]
            for way in order:
                clear[way]()  # not timed
                began, began_cpu = time.perf_counter(), time.process_time()
                ways[way]()
                times[way].append(time.perf_counter() - began)
                cpu[way].append(time.process_time() - began_cpu)
        mbs = {way: nbytes / statistics.median(t) / 1e6 for way, t in times.items()}
        out[name] = {"bytes": nbytes, "identical_to_zarr": identical, "rounds": rounds,
                     "mb_per_s": {k: round(v, 1) for k, v in mbs.items()},
                     "cpu_ms": {k: round(statistics.median(v) * 1e3, 1) for k, v in cpu.items()},
                     "writer_vs_raw": round(mbs["writer"] / mbs["raw"], 3),
                     "writer_vs_zarr": round(mbs["writer"] / mbs["zarr"], 2)}
    return out


def s3_base(workdir: Path):
    """(server, s3:// prefix) on a fresh SeaweedFS, or (None, why not)."""
    from tests.support.seaweed import SeaweedError, SeaweedServer

    try:
        server = SeaweedServer(workdir).start()
    except (SeaweedError, OSError) as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    os.environ.update(server.env())
    server.make_bucket("shard-writer-bench")
    return server, "s3://shard-writer-bench/b"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small shards, 3 rounds: a smoke run")
    parser.add_argument("--no-s3", action="store_true", help="local disk only")
    parser.add_argument("--dir", default=None, help="local directory to write under (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    shapes, rounds = (QUICK, 3) if args.quick else (SHAPES, args.rounds)
    result = {"load_before": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
              "object_crc32": shardwriter.object_crc32.__module__, "storage": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        log(f"local: {tmp}")
        result["storage"]["local"] = bench_storage(tmp, shapes, rounds)
        if args.no_s3:
            result["s3_skipped"] = "--no-s3"
        else:
            server, base = s3_base(Path(tmp) / "seaweed")
            if server is None:
                result["s3_skipped"] = base
                log(f"S3 skipped: {base}")
            else:
                try:
                    log(f"s3: {server.endpoint}")
                    result["storage"]["s3"] = bench_storage(base, shapes, rounds)
                finally:
                    server.stop()
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1) if args.json else report(result))
    return 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report(result: dict) -> str:
    lines = [f"load average before {result['load_before']}, after {result['load_after']} ({result['cpus']} CPUs); "
             f"object CRC-32 from {result['object_crc32']}",
             f"{'storage':7} {'shard':34} {'MB':>6} {'writer':>8} {'raw':>8} {'zarr':>8}  {'w/raw':>6} {'w/zarr':>7}  "
             f"same  {'CPU ms writer/raw/zarr':>22}"]
    for storage, shapes in result["storage"].items():
        for name, r in shapes.items():
            m = r["mb_per_s"]
            lines.append(f"{storage:7} {name:34} {r['bytes'] / 1e6:6.1f} {m['writer']:8.0f} {m['raw']:8.0f} "
                         f"{m['zarr']:8.0f}  {r['writer_vs_raw']:6.2f} {r['writer_vs_zarr']:7.2f}  "
                         f"{'yes' if r['identical_to_zarr'] else 'NO ':4}  "
                         f"{r['cpu_ms']['writer']:>8.0f}/{r['cpu_ms']['raw']:.0f}/{r['cpu_ms']['zarr']:.0f}")
    if "s3_skipped" in result:
        lines.append(f"s3 skipped: {result['s3_skipped']}")
    lines.append("MB/s: medians over interleaved rounds; targets writer/raw >= 0.8, writer/zarr >= 4. Local: the writer "
                 "and raw fsync, zarr-python does not. CPU: this process, all threads (not the S3 server)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
