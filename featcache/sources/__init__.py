"""Images that live inside container files: webdataset tar shards and Parquet image tables.

``featcache index`` records where each image lies inside its container (DESIGN.md §2, the optional
manifest columns ``container``, ``member``, ``member_offset``, ``member_length``, ``row_group``,
``row_in_group``), so that extraction fetches a tar member with one ranged read and a Parquet row
with one read of its row group. ``listing`` (with ``globs`` and ``patterns``) finds the container
files a source names; ``tars`` and ``parquet`` scan them at index time; ``read`` fetches the encoded
bytes of any manifest row, loose files too, at extraction time.

A member's ``uri`` names both the container and the image: ``tar://dir/abc.jpg::s3://b/00001.tar``
(fsspec's own chained URL, which any fsspec user can open) for a tar member, and
``s3://b/train.parquet#row=17`` (the row's number in the file) for a Parquet row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from featcache.store.location import Location
from featcache.images import Header
from featcache.errors import ImageError


@dataclass(frozen=True)
class Member:
    """Where an image lies inside a container: a tar member's data (its byte range) or a Parquet row."""

    uri: str
    container: str  # URI of the tar or Parquet file
    name: str  # the tar member's name, or the Parquet column that holds the image
    offset: int | None = None  # tar: first byte of the member's data in the tar
    length: int | None = None
    row_group: int | None = None  # Parquet: the row group, and the row within it
    row: int | None = None


@dataclass(frozen=True)
class Found:
    """One image found inside a container: its id, where it is, its header (or why it is unusable),
    and the columns its container gives it (labels, captions, a table's scalar columns)."""

    image_id: str
    loc: Location  # the container
    member: Member
    header: Header | ImageError
    extra: dict = field(default_factory=dict)


@dataclass
class Scan:
    """What scanning containers gave: the images; (uri, reason) of samples that hold no image, and of
    containers that could not be read (whole or from some byte on); the bytes fetched from the tars."""

    found: list[Found]
    ignored: list[tuple[str, str]]
    failed: list[tuple[str, str]]
    bytes_read: int | None = None


def tar_uri(container: str, member: str) -> str:
    """fsspec's chained URL of a tar member (``fsspec.open`` reads it, by scanning the tar)."""
    return f"tar://{member}::{container}"


def row_uri(container: str, row: int) -> str:
    """The URI of row ``row`` (counted from 0 over the whole file) of a Parquet table."""
    return f"{container}#row={row}"
