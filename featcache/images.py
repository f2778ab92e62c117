"""Image headers: width and height without decoding a pixel.

Pillow's ``Image.open`` reads only the header, but it also refuses to report the size of a very
large image (its decompression-bomb guard) and would try every installed plugin, some of which
run external programs on load. Indexing needs neither: it walks the registry of the formats
featcache decodes, asks each to parse the header, and reports the size as displayed (after the
EXIF orientation). Decoding, and the guard against bombs, happen at extraction time.
"""

from __future__ import annotations

import os
import re
import stat
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


def header_of_local(path: str) -> Header:
    """Header of a local file; special files (FIFOs, devices) are refused without being opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        reason = "broken symbolic link" if os.path.islink(path) else "file vanished"
        raise ImageError(path, reason) from e
    except OSError as e:
        raise ImageError(path, f"cannot stat: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(path, "not a regular file")
    try:
        with open(path, "rb", buffering=_HEADER_BLOCK) as f:
            header = read_header(f, path)
    except OSError as e:
        raise ImageError(path, f"cannot read: {e.strerror or e}") from e
    return replace(header, size=st.st_size, mtime=st.st_mtime)


def header_of_remote(fs, path: str, uri: str) -> Header:
    """Header of a file on any fsspec filesystem, fetching only the first blocks; its size and ETag
    come from the file's details, which opening it has already fetched (no request of their own)."""
    try:
        with fs.open(path, "rb", block_size=_HEADER_BLOCK, cache_type="readahead") as f:
            details = getattr(f, "details", None) or {}
            etag = details.get("ETag", details.get("etag"))
            return replace(read_header(f, uri), size=getattr(f, "size", None), etag=etag)
    except FileNotFoundError as e:
        raise ImageError(uri, "file not found") from e
    except OSError as e:
        raise ImageError(uri, f"cannot read: {e}") from e

