"""One small image set laid out three ways: loose files in two folders, two webdataset tar shards
built with the stdlib ``tarfile``, and a Parquet image table (HF's struct<bytes, path>), with the same
images in the same order, so that every layout's manifest has the same rows and its extraction must
give the very same arrays as the loose files'. Real scikit-image photos, an EXIF-rotated JPEG, and
three bad members: a text file named .jpg (refused at index), a PNG cut in half and a 30000x30000
header-only PNG (both refused when decoded)."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.images import HEADER_ONLY_SIZE, header_only_png_bytes, orientation6_jpeg_bytes, photo
from tests.support.teachers import save_dinov3

SHARDS = ("00000", "00001")
#: (sample key, field, bytes) per shard, in sorted key order (the loose folders' order)
_HALF = photo("chelsea").read_bytes()


def _photo(name: str) -> bytes:
    return photo(name).read_bytes()


MEMBERS = {
    "00000": [("00_astronaut", "png", _photo("astronaut")), ("01_coffee", "png", _photo("coffee")),
              ("02_rotated", "jpg", orientation6_jpeg_bytes()), ("03_notes", "jpg", b"this is not a JPEG\n"),
              ("04_truncated", "png", _HALF[:len(_HALF) // 2]), ("05_chelsea", "png", _photo("chelsea")),
              ("x_repeat", "png", _photo("rocket"))],
    "00001": [("00_camera", "png", _photo("camera")), ("01_bomb", "png", header_only_png_bytes(*HEADER_ONLY_SIZE)),
              ("02_coins", "png", _photo("coins")), ("x_repeat", "png", _photo("horse"))],
}
INDEX_FAILS = {("00000", "03_notes")}
DECODE_FAILS = {("00000", "04_truncated"): "cannot decode: OSError: image file is truncated",
                ("00001", "01_bomb"): "900.0 MP, over the 179.0 MP limit"}
GOOD = [(s, k) for s in SHARDS for k, _, _ in MEMBERS[s] if (s, k) not in INDEX_FAILS]


def labels() -> dict[tuple[str, str], int]:
    """The .cls label of every sample: its position in the whole set."""
    return {(s, k): n for n, (s, k) in enumerate((s, k) for s in SHARDS for k, _, _ in MEMBERS[s])}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


@dataclass(frozen=True)
class Layouts:
    loose: Path  # folder with 00000/ and 00001/
    tars: Path  # folder with 00000.tar and 00001.tar
    table: Path  # images.parquet


@pytest.fixture(scope="session")
def layouts(tmp_path_factory) -> Layouts:
    root = tmp_path_factory.mktemp("layouts")
    loose, tars = root / "loose", root / "tars"
    tars.mkdir()
    cls = labels()
    rows = []
    for shard in SHARDS:
        (loose / shard).mkdir(parents=True)
        members = []
        for key, ext, data in MEMBERS[shard]:
            (loose / shard / f"{key}.{ext}").write_bytes(data)
            members += [(f"{key}.cls", str(cls[shard, key]).encode()), (f"{key}.{ext}", data)]
            rows.append({"image": {"bytes": data, "path": f"{key}.{ext}"}, "label": cls[shard, key],
                         "shard": shard, "tags": [1, 2]})
        members.append(("zz_readme.txt", b"not a sample with an image"))
        write_tar(tars / f"{shard}.tar", members)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([r["image"] for r in rows], image),
                      "label": [r["label"] for r in rows], "shard": [r["shard"] for r in rows],
                      "tags": [r["tags"] for r in rows]})
    pq.write_table(table, root / "images.parquet", row_group_size=3)
    return Layouts(loose, tars, root / "images.parquet")


@pytest.fixture(scope="session")
def dinov3(tmp_path_factory) -> str:
    return str(save_dinov3(tmp_path_factory.mktemp("teacher") / "dinov3")[0])
