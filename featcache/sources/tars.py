"""webdataset tar shards: samples grouped by key, the image located by its byte range in the tar.

Follows the webdataset convention (github.com/webdataset/webdataset, ``tariterators``): a member
``dir/abc.seg.png`` belongs to sample ``dir/abc`` as its field ``seg.png`` (the name up to the first dot
of its last part; fields lower-cased); consecutive members with the same key form one sample; members
that are not regular files, or whose last part starts with a dot or has none, are skipped. The sample's
image is its first member whose field is one of the image fields; ``.cls``, ``.txt`` and ``.json``
members become manifest columns (``label`` from ``cls``, else the field with dots as underscores).

Indexing reads headers only: the stdlib ``tarfile`` parses each 512-byte header (ustar, GNU and PAX
names) and seeks over member data, through a reader that fetches the tar a window at a time by ranged
reads. A window holds the next header, the small members after it and the first bytes of the image
(enough for its header, the size); past a large image the next fetch starts after it. The window
doubles while fetches follow each other (small members: a tar of thumbnails costs a few requests)
and falls back to its first size after a skip (large members: about one small request each). The
worker later fetches an image with one ranged read of ``member_length`` bytes at ``member_offset``.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from featcache.errors import ImageError
from featcache.store.location import Location, Stamp
from featcache.images import EXTENSIONS, read_header
from featcache.sources import Found, Member, Scan, tar_uri

#: Fields that are images unless ``--image-ext`` says otherwise (webdataset's names for them).
IMAGE_FIELDS = tuple(sorted(e.lstrip(".") for e in EXTENSIONS))
#: Text fields that become manifest columns, and the column ``cls`` goes to.
TEXT_FIELDS = ("cls", "txt", "json")
LABEL = "label"
#: Text members above this are not copied into the manifest (a column is no place for a document).
MAX_TEXT_BYTES = 1 << 20
#: Bytes fetched by a ranged read while scanning: after a skip, and at most while reading on.
WINDOW = 16 * 1024
MAX_WINDOW = 1 << 20
_INT = re.compile(r"^[+-]?\d+$")


def scan(tars: list[tuple[Location, str]], image_fields, workers: int) -> Scan:
    """The samples of every tar (given with its name relative to the source), in order, with ids made
    unique by the tar's name where a key repeats across tars."""
    fields = frozenset(image_fields)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda t: _scan_one(t[0], fields), tars))
    in_tars = Counter(key for r in results for key in {s.key for s in r.samples})
    found = [_found(s, loc, rel, r.stamp, in_tars[s.key] > 1)
             for (loc, rel), r in zip(tars, results) for s in r.samples]
    _type_labels(found)
    return Scan(found, [x for r in results for x in r.ignored], [x for r in results for x in r.failed],
                sum(r.fetched for r in results))


@dataclass
class _Sample:
    key: str
    first: str  # its first member's name: the sample's name when it has no image
    image: tuple | None = None  # (member name, data offset, size, Header or ImageError)
    texts: dict = field(default_factory=dict)
    fields: list = field(default_factory=list)
    error: str | None = None  # why the sample as a whole cannot be used


@dataclass
class _TarResult:
    samples: list[_Sample] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # samples without an image
    failed: list[tuple[str, str]] = field(default_factory=list)  # the tar itself, unreadable from some byte on
    stamp: Stamp | None = None
    fetched: int = 0


def _scan_one(loc: Location, fields: frozenset) -> _TarResult:
    out, reader = _TarResult(), _Window(loc, WINDOW)
    samples: list[_Sample] = []
    try:
        with tarfile.open(fileobj=reader, mode="r:") as tar:
            for info in tar:
                _add_member(samples, info, reader, fields, loc.uri)
            _check_end(reader, tar.offset)
    except FileNotFoundError:
        out.failed.append((loc.uri, "file not found"))
    except (tarfile.TarError, OSError) as e:
        out.failed.append((loc.uri, _unreadable(reader, e)))
    out.stamp, out.fetched = reader.stamp, reader.fetched
    _sort_samples(samples, out, loc.uri)
    return out


def _unreadable(reader: "_Window", e: Exception) -> str:
    if reader.start == 0 and reader.buf[:2] == b"\x1f\x8b":
        return "a gzip-compressed tar: its members cannot be read by byte range (store the shards uncompressed)"
    return f"unreadable tar: {e} (members after the error are not indexed)"


def _add_member(samples: list[_Sample], info: tarfile.TarInfo, reader: "_Window", fields: frozenset,
                tar: str) -> None:
    split = _key_field(info.name) if info.isreg() and not info.issparse() else None
    if split is None:
        return  # as webdataset: folders, links and names without a field are not parts of samples
    key, name = split
    if not samples or samples[-1].key != key:
        samples.append(_Sample(key, info.name))
    sample = samples[-1]
    if name in sample.fields and sample.error is None:  # which of the two is the sample's? webdataset raises
        sample.error = f"sample {key!r} holds the member {info.name} more than once (webdataset refuses duplicate fields)"
    sample.fields.append(name)
    if name in fields and sample.image is None:
        sample.image = (info.name, info.offset_data, info.size, _image_header(reader, info, tar))
    elif name.rsplit(".", 1)[-1] in TEXT_FIELDS and info.size <= MAX_TEXT_BYTES:
        reader.seek(info.offset_data)
        column = LABEL if name == "cls" else name.replace(".", "_")
        sample.texts[column] = reader.read(info.size).decode("utf-8", errors="replace").strip()


def _key_field(name: str) -> tuple[str, str] | None:
    folder, base = posixpath.split(name)
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def _image_header(reader: "_Window", info: tarfile.TarInfo, tar: str):
    uri = tar_uri(tar, info.name)
    size = reader.size
    if size is not None and info.offset_data + info.size > size:
        return ImageError(uri, f"truncated member: the tar ends {size - info.offset_data} bytes into its "
                               f"{info.size} bytes")
    try:
        return read_header(_Slice(reader, info.offset_data, info.size), uri)
    except ImageError as e:
        return e


def _check_end(reader: "_Window", offset: int) -> None:
    """tarfile ends its listing quietly at a header it cannot parse: say so unless it is the end."""
    size = reader.size or 0
    if offset < size:
        reader.seek(offset)
        if reader.read(tarfile.BLOCKSIZE).strip(b"\0"):
            raise tarfile.ReadError(f"invalid tar header at byte {offset}")


def _sort_samples(samples: list[_Sample], out: _TarResult, tar: str) -> None:
    """Samples with an image are kept (a key that comes back later in the same tar is an error: ids
    must be unique); those without one are listed as ignored, with their fields."""
    seen: set[str] = set()
    for s in samples:
        if s.image is None:
            out.ignored.append((tar_uri(tar, s.first), f"sample {s.key!r} has no image member (its fields: "
                                                       f"{', '.join(s.fields)}; see --image-ext)"))
            continue
        if s.key in seen and s.error is None:
            s.error = f"sample key {s.key!r} comes back later in the same tar (keys must be unique)"
        seen.add(s.key)
        out.samples.append(s)


def _found(s: _Sample, loc: Location, rel: str, stamp: Stamp, repeated: bool) -> Found:
    name, offset, size, header = s.image
    uri = tar_uri(loc.uri, name)
    if s.error is not None:
        header = ImageError(uri, s.error)
    elif not isinstance(header, ImageError):  # what tells a replaced tar from the indexed one
        header = replace(header, size=stamp.size, mtime=stamp.mtime, etag=stamp.etag)
    member = Member(uri, loc.uri, name, offset=offset, length=size)
    return Found(f"{rel}/{s.key}" if repeated else s.key, loc, member, header, dict(s.texts))


def _type_labels(found: list[Found]) -> None:
    """Labels (webdataset's ``.cls``) that are all integers become an integer column."""
    values = [f.extra[LABEL] for f in found if LABEL in f.extra]
    if values and all(_INT.match(v) for v in values):
        for f in found:
            if LABEL in f.extra:
                f.extra[LABEL] = int(f.extra[LABEL])


class _File:
    """What the readers below share of a read-only, seekable file object (``pos``: the position)."""

    pos = 0

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


class _Window(_File):
    """A read-only, seekable file over ``loc`` that fetches a window at a time by ranged reads and
    keeps the last one: ``window`` bytes after a skip, twice the last window (up to ``MAX_WINDOW``) when
    a fetch follows on from it. Every fetch must come from the same version of the file (its stamp).
    Counts the bytes fetched."""

    def __init__(self, loc: Location, window: int):
        self.loc, self.base, self.window = loc, window, window
        self.pos, self.fetched = 0, 0
        self.buf, self.start = b"", 0
        self.stamp: Stamp | None = None

    @property
    def size(self) -> int | None:
        return None if self.stamp is None else self.stamp.size

    def read(self, n: int = -1) -> bytes:
        if self.stamp is None:
            self._fetch(self.pos, max(n or 0, 0))
        if n is None or n < 0:
            n = max(0, (self.size or 0) - self.pos)
        if not self._holds(self.pos, n):
            if self.size is not None and self.pos >= self.size:
                return b""
            self._fetch(self.pos, n)
        out = self.buf[self.pos - self.start:self.pos - self.start + n]
        self.pos += len(out)
        return out

    def _holds(self, pos: int, n: int) -> bool:
        end = self.start + len(self.buf)
        at_eof = self.size is not None and end >= self.size
        return self.start <= pos and (pos + n <= end or (at_eof and pos <= end))

    def _fetch(self, start: int, n: int) -> None:
        follows = self.buf and self.start <= start <= self.start + len(self.buf)
        self.window = min(2 * self.window, MAX_WINDOW) if follows else self.base
        data, stamp = self.loc.read_range(start, max(n, self.window))
        if self.stamp is not None and stamp != self.stamp:
            raise OSError(f"{self.loc.uri} changed while it was being indexed")
        self.stamp, self.buf, self.start = stamp, data, start
        self.fetched += len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size or 0}[whence]
        self.pos = base + pos
        return self.pos


class _Slice(_File):
    """A member's data as a file of its own (what an image header parser reads)."""

    def __init__(self, reader: _Window, offset: int, length: int):
        self.reader, self.offset, self.length, self.pos = reader, offset, length, 0

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.length - self.pos)
        n = left if n is None or n < 0 else min(n, left)
        self.reader.seek(self.offset + self.pos)
        out = self.reader.read(n)
        self.pos += len(out)
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.length}[whence] + pos
        return self.pos
