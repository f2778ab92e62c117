"""The manifest fingerprint: which images, in which order, a cache's rows were written for.

Rows are positions (DESIGN.md §2): row ``i`` of every array belongs to row ``i`` of
``manifest.parquet``. A manifest that was reordered or edited after features were written would
silently attach features to other images, so the cache records, when ``features.zarr`` is created,
a 64-bit hash of each manifest row's ``index``, ``image_id`` and ``uri`` (the ``_manifest`` array)
and the sha256 of those hashes (root attrs ``manifest``). Every job compares the manifest it reads
with them before it writes, and names the first row that differs. A manifest that holds those rows
first, unchanged, and more after them *extends* the cache: ``extract`` grows the cache to it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from featcache.errors import CacheFormatError

#: The columns whose values define a row's identity.
COLUMNS = ("index", "image_id", "uri")
ARRAY = "_manifest"


def row_hashes(manifest: pa.Table) -> np.ndarray:
    """A uint64 hash of (index, image_id, uri) for each row (blake2b, little-endian)."""
    columns = [manifest.column(c).to_pylist() for c in COLUMNS]
    out = np.empty(manifest.num_rows, dtype="<u8")
    for i, (index, image_id, uri) in enumerate(zip(*columns)):
        digest = hashlib.blake2b(f"{index}\0{image_id}\0{uri}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


def digest(hashes: np.ndarray) -> str:
    """The manifest's fingerprint: sha256 over its row hashes."""
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(hashes, dtype="<u8").tobytes()).hexdigest()


def first_difference(manifest: pa.Table, recorded: np.ndarray, hashes: np.ndarray) -> str:
    """One line naming how ``manifest`` differs from the rows the cache was written for."""
    n = min(len(recorded), len(hashes))
    differ = np.flatnonzero(recorded[:n] != hashes[:n])
    if len(differ):
        i = int(differ[0])
        row = {c: manifest.column(c)[i].as_py() for c in COLUMNS}
        return (f"row {i} (image_id {row['image_id']!r}, uri {row['uri']!r}) is not the row the cache was "
                f"written for")
    if len(hashes) > len(recorded):
        return _more(len(hashes), len(recorded))
    return (f"it has {len(hashes)} rows, the last {len(recorded) - len(hashes)} of the {len(recorded)} the cache was "
            "written for are gone (if extract was growing the cache, run it again with the same source)")


def _more(rows: int, recorded: int) -> str:
    return f"it has {rows} rows, {rows - recorded} more than the {recorded} the cache was written for"


def record(hashes: np.ndarray) -> dict:
    """What the root attrs keep of a manifest: the digest of its row hashes and its row count."""
    return {"sha256": digest(hashes), "rows": len(hashes)}


def relation(manifest: pa.Table, hashes: np.ndarray, recorded: dict, stored) -> tuple[str, str | None]:
    """How ``manifest`` (row hashes ``hashes``) stands to the rows a cache was written for: ``("same", None)``,
    ``("extends", line)`` (those rows first and unchanged, more after them) or ``("differs", line)``; the
    line says how it differs, naming the first row that does. ``recorded`` is their :func:`record`;
    ``stored()`` returns their row hashes (called only for a manifest that differs; empty when lost)."""
    if digest(hashes) == recorded["sha256"]:
        return "same", None
    n = recorded["rows"]
    if len(hashes) > n and digest(hashes[:n]) == recorded["sha256"]:
        return "extends", _more(len(hashes), n)
    rows = stored()
    if len(rows) == n:
        return "differs", first_difference(manifest, rows, hashes)
    return "differs", f"{manifest.num_rows} rows against {n} when the cache was created"  # only the counts are known


def mismatch_error(root_uri: str, detail: str) -> CacheFormatError:
    return CacheFormatError(f"{root_uri}/manifest.parquet no longer matches the cache: {detail}; rows are "
                            "positions, so nothing is written or read against it (restore the manifest the "
                            "cache was created with, or index into a new root)")
