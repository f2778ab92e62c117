"""Image headers: width and height without decoding a pixel.

Pillow's ``Image.open`` reads only the header, but it also refuses to report the size of a very
large image (its decompression-bomb guard) and would try every installed plugin, some of which
run external programs on load. Indexing needs neither: it walks the registry of the formats
featcache decodes, asks each to parse the header, and reports the size as displayed (after the
EXIF orientation). Decoding, and the guard against bombs, happen at extraction time.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from dataclasses import dataclass, replace

from PIL import Image

from featcache.errors import ImageError

#: Formats featcache decodes; anything else is refused at index time with a reason.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")  # JPEG also opens MPO
#: File extensions a folder scan treats as images.
EXTENSIONS = frozenset(".jpg .jpeg .jpe .png .webp .bmp .tif .tiff .gif .ppm .pgm .pbm .pnm".split())
_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}
_HEADER_BLOCK = 64 * 1024
_MISSING = ("broken symbolic link", "file vanished")  # what the local backend says of a missing file
_PARQUET_ROW = re.compile(r"\.parquet#row=\d+$", re.IGNORECASE)

Image.init()


@dataclass(frozen=True)
class Header:
    """What the index records about one image."""

    width: int  # as displayed, after the EXIF orientation
    height: int
    format: str
    size: int | None = None  # bytes; with mtime or etag, what tells a replaced file from the indexed one
    mtime: float | None = None  # local files: st_mtime in seconds
    etag: str | None = None  # object stores: the ETag the open already fetched


def is_image_name(name: str) -> bool:
    """Whether ``name`` has an image file's extension. For the URI of an image inside a container
    (featcache.sources), whether the member it names is one: a tar member by its own name
    (``tar://dir/abc.jpg::shard.tar``), a Parquet table's row (``table.parquet#row=17``) always."""
    if name.startswith("tar://") and "::" in name:
        name = name[len("tar://"):].split("::", 1)[0]
    elif _PARQUET_ROW.search(name):
        return True
    return os.path.splitext(name)[1].lower() in EXTENSIONS


def read_header(fp, uri: str) -> Header:
    """Parse the header from a seekable binary file object; ``ImageError`` with a reason otherwise."""
    prefix = fp.read(16)
    if not prefix:
        raise ImageError(uri, "empty file (0 bytes)")
    for fmt in FORMATS:
        im = _try_format(fmt, fp, prefix, uri)
        if im is not None:
            width, height = im.size
            if _orientation(im) in _TRANSPOSED:
                width, height = height, width
            return Header(width, height, im.format or fmt)
    raise ImageError(uri, f"not a readable image (header is none of {', '.join(FORMATS)})")


def _try_format(fmt: str, fp, prefix: bytes, uri: str):
    factory, accept = Image.OPEN[fmt]
    if accept is not None and accept(prefix) is not True:
        return None
    fp.seek(0)
    try:
        im = factory(fp, uri)
    except (SyntaxError, IndexError, TypeError, struct.error, EOFError, ValueError, OSError) as e:
        raise ImageError(uri, f"corrupt {fmt} header: {e}") from e
    if min(im.size) < 1:
        raise ImageError(uri, f"{fmt} header gives an empty size {im.size}")
    return im


def _orientation(im) -> int:
    raw = im.info.get("exif")
    try:
        if raw:
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(_ORIENTATION, 1))
        if im.format == "TIFF":
            return int(im.getexif().get(_ORIENTATION, 1))
    except (SyntaxError, ValueError, TypeError, struct.error, OSError):
        return 1  # an unreadable EXIF block does not stop the image from being used as stored
    return 1


def header_of(loc) -> Header:
    """Header of the file at ``loc`` (a :class:`featcache.store.location.Location`), fetching only its
    first blocks; its size and mtime or ETag come from opening it (no request of their own). Special
    files (FIFOs, devices) are refused without being opened."""
    try:
        with loc.backend.open_stamped(loc.path, block_size=_HEADER_BLOCK) as (f, stamp):
            header = read_header(f, loc.uri)
    except FileNotFoundError as e:
        raise ImageError(loc.uri, e.strerror if e.strerror in _MISSING else "file not found") from e
    except OSError as e:
        special = e.errno == errno.EINVAL and e.strerror == "not a regular file"
        raise ImageError(loc.uri, e.strerror if special else f"cannot read: {e.strerror or e}") from e
    return replace(header, size=stamp.size, mtime=stamp.mtime, etag=stamp.etag)
