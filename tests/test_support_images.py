"""Check the generated test images in ``tests/support/images.py`` against Pillow.

The two huge cases are never decoded: their headers are read with the pixel
limit lifted, and their validity is checked by streaming their zlib data.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError

from tests.support import images

GOOD = [
    "unicode_name", "png_1x1", "png_gray", "png_gray16", "png_rgba", "png_palette",
    "jpeg_cmyk", "jpeg_exif_orientation6",
]
HUGE = ["png_header_only_30000", "png_bomb_20000"]
BODY_CORRUPT = ["jpeg_corrupt_body", "png_truncated_half"]
BAD_FILES = ["jpeg_empty", "jpeg_text", "png_truncated_20_bytes", "jpeg_corrupt_header"]
SPECIAL = {"symlink_dangling": "symlink", "dir_png": "directory", "fifo_jpg": "fifo"}
MODES = {"png_gray": "L", "png_gray16": "I;16", "png_rgba": "RGBA", "png_palette": "P",
         "jpeg_cmyk": "CMYK", "png_1x1": "RGB", "unicode_name": "RGB"}


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, images.Case]:
    """Write the header cases once for the whole module."""
    return images.cases_by_name(images.write_header_cases(tmp_path_factory.mktemp("cases")))


def header_orientation(im: Image.Image) -> int:
    """Return the EXIF orientation without decoding pixels.

    ``PngImageFile.getexif()`` calls ``load()`` when no eXIf chunk preceded IDAT,
    so for PNG only the header's ``info["exif"]`` is parsed.
    """
    if im.format == "PNG":
        exif = Image.Exif()
        if "exif" in im.info:
            exif.load(im.info["exif"])
    else:
        exif = im.getexif()
    return exif.get(images.EXIF_ORIENTATION_TAG, 1)


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """Return the size a viewer shows: the stored size, swapped for EXIF orientations 5-8."""
    orientation = header_orientation(im)
    width, height = im.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def inflated_length(data: bytes) -> tuple[int, bool]:
    """Stream-decompress zlib ``data``; return (bytes produced, stream complete)."""
    inflater = zlib.decompressobj()
    total, pending = 0, data
    while pending:
        total += len(inflater.decompress(pending, 1 << 20))
        pending = inflater.unconsumed_tail
    return total + len(inflater.flush()), inflater.eof


def idat(path: Path) -> bytes:
    """Return the concatenated IDAT data of a PNG, asserting every chunk's CRC."""
    chunks = list(images.iter_png_chunks(path.read_bytes()))
    assert all(crc_ok for _, _, crc_ok in chunks)
    assert [kind for kind, _, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    return b"".join(body for kind, body, _ in chunks if kind == b"IDAT")


# ------------------------------------------------------------------------- photos


def test_skimage_photos_are_real_sorted_images() -> None:
    """At least ten PNG/JPEG photos ship with scikit-image and Pillow decodes them."""
    photos = images.skimage_photos()
    assert len(photos) >= 10
    assert photos == sorted(photos)
    assert {p.suffix for p in photos} <= {".png", ".jpg"}
    for path in photos:
        with Image.open(path) as im:
            assert im.format in {"PNG", "JPEG"}
            im.load()
            assert im.width > 0 and im.height > 0


def test_photo_by_stem() -> None:
    """``photo`` finds a photo by stem and names the known ones when it cannot."""
    assert images.photo("coffee").name == "coffee.png"
    assert images.photo("rocket").name == "rocket.jpg"
    with pytest.raises(FileNotFoundError, match="astronaut"):
        images.photo("no_such_photo")


# -------------------------------------------------------------------- header cases


def test_case_names_and_flags(cases: dict[str, images.Case]) -> None:
    """Every expected case exists, with consistent ok/size/decodes/kind fields."""
    expected = set(GOOD + HUGE + BODY_CORRUPT + BAD_FILES) | (
        set(SPECIAL) if hasattr(os, "mkfifo") else set(SPECIAL) - {"fifo_jpg"})
    assert set(cases) == expected
    for case in cases.values():
        assert case.note
        assert case.ok == (case.size is not None)
        assert case.decodes == (case.name in GOOD)
        assert case.kind == SPECIAL.get(case.name, "file")
    assert cases["unicode_name"].path.name == "фото café 1.png"


@pytest.mark.parametrize("name", GOOD + BODY_CORRUPT)
def test_header_gives_size(cases: dict[str, images.Case], name: str) -> None:
    """``Image.open`` alone gives the stated size, after EXIF orientation."""
    case = cases[name]
    with Image.open(case.path) as im:
        assert displayed_size(im) == case.size
        if name in MODES:
            assert im.mode == MODES[name]


@pytest.mark.parametrize("name", GOOD)
def test_good_cases_decode(cases: dict[str, images.Case], name: str) -> None:
    """``load()`` works and ``exif_transpose`` yields the stated displayed size."""
    case = cases[name]
    with Image.open(case.path) as im:
        im.load()
        assert ImageOps.exif_transpose(im).size == case.size


def test_exif_orientation6_pixels(cases: dict[str, images.Case]) -> None:
    """Stored 40x30 with Orientation=6; displayed 30x40 with the red quadrant top-right."""
    with Image.open(cases["jpeg_exif_orientation6"].path) as im:
        assert im.size == images.ORIENTATION6_STORED_SIZE
        assert im.getexif()[images.EXIF_ORIENTATION_TAG] == 6
        shown = ImageOps.exif_transpose(im).convert("RGB")
    assert shown.size == images.ORIENTATION6_DISPLAY_SIZE
    for xy, colour in images.ORIENTATION6_PROBES.items():
        assert np.abs(np.subtract(shown.getpixel(xy), colour)).max() < 40, xy


@pytest.mark.parametrize("name", BODY_CORRUPT)
def test_corrupt_body_fails_to_decode(cases: dict[str, images.Case], name: str) -> None:
    """The header parses but ``load()`` raises OSError."""
    with Image.open(cases[name].path) as im, pytest.raises(OSError):
        im.load()


def test_png_getexif_decodes_but_jpeg_getexif_does_not(cases: dict[str, images.Case]) -> None:
    """Pillow quirk: ``getexif()`` on a PNG decodes it; on a JPEG it reads the header only."""
    with Image.open(cases["png_truncated_half"].path) as im, pytest.raises(OSError):
        im.getexif()
    with Image.open(cases["jpeg_corrupt_body"].path) as im:
        assert images.EXIF_ORIENTATION_TAG not in im.getexif()


@pytest.mark.parametrize("name", HUGE)
def test_huge_header_refused_by_default(cases: dict[str, images.Case], name: str) -> None:
    """With default limits ``Image.open`` itself raises DecompressionBombError."""
    assert Image.MAX_IMAGE_PIXELS is not None
    with pytest.raises(Image.DecompressionBombError):
        Image.open(cases[name].path)


@pytest.mark.parametrize("name", HUGE)
def test_huge_header_readable_without_limit(
    cases: dict[str, images.Case], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the limit lifted the header gives the size and no pixel buffer exists."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    case = cases[name]
    with Image.open(case.path) as im:
        assert im.size == case.size
        assert getattr(im, "_im", None) is None  # header read only, nothing allocated
    assert images.png_header_size(case.path.read_bytes()) == case.size


def test_bomb_is_complete_and_small(cases: dict[str, images.Case]) -> None:
    """The 20000x20000 bomb is a complete valid 1-bit PNG under 2 MB."""
    path = cases["png_bomb_20000"].path
    assert path.stat().st_size < 2_000_000
    width, height = images.BOMB_SIZE
    assert inflated_length(idat(path)) == (height * (1 + (width + 7) // 8), True)


def test_header_only_file_is_tiny_and_incomplete(cases: dict[str, images.Case]) -> None:
    """The 30000x30000 file holds a few rows: far fewer bytes than the header promises."""
    path = cases["png_header_only_30000"].path
    assert path.stat().st_size < 10_000
    width, height = images.HEADER_ONLY_SIZE
    produced, complete = inflated_length(idat(path))
    assert complete and produced == 4 * (1 + width) < height * (1 + width)


def test_bomb_generation_is_fast() -> None:
    """Building the bomb bytes takes well under 2 s."""
    start = time.perf_counter()
    images.bomb_png_bytes(*images.BOMB_SIZE)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_do_not_open(cases: dict[str, images.Case], name: str) -> None:
    """Broken regular files make ``Image.open`` raise OSError."""
    case = cases[name]
    assert stat.S_ISREG(os.lstat(case.path).st_mode)
    expected = OSError if name == "png_truncated_20_bytes" else UnidentifiedImageError
    with pytest.raises(expected):
        Image.open(case.path)


def test_special_entries_have_their_file_type(cases: dict[str, images.Case]) -> None:
    """Symlink, directory and FIFO are what they claim; the FIFO is never opened."""
    link = cases["symlink_dangling"].path
    assert stat.S_ISLNK(os.lstat(link).st_mode) and not link.exists()
    assert stat.S_ISDIR(os.lstat(cases["dir_png"].path).st_mode)
    if "fifo_jpg" in cases:
        assert stat.S_ISFIFO(os.stat(cases["fifo_jpg"].path).st_mode)


# --------------------------------------------------------------------- other files


def test_non_image_files(tmp_path: Path) -> None:
    """README.txt and labels.csv exist and carry no image extension."""
    paths = images.write_non_image_files(tmp_path)
    assert sorted(p.name for p in paths) == ["README.txt", "labels.csv"]
    assert all(p.is_file() and p.suffix not in images.PHOTO_SUFFIXES for p in paths)


def test_many_small_pngs(tmp_path: Path) -> None:
    """2000 files: written fast, valid, 32x24, with distinct bytes and pixels."""
    start = time.perf_counter()
    paths = images.write_many_small_pngs(tmp_path, 2000)
    assert time.perf_counter() - start < 10.0
    assert len(paths) == 2000 and paths == sorted(tmp_path.iterdir())
    assert len({hashlib.sha1(p.read_bytes()).digest() for p in paths}) == 2000
    for index, path in enumerate(paths):
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", images.SMALL_PNG_SIZE)
            assert images.small_png_index(np.asarray(im)) == index


def test_nested_small_pngs(tmp_path: Path) -> None:
    """Nested layout: two folder levels, ``per_folder`` files per leaf, sorted order."""
    paths = images.write_nested_small_pngs(tmp_path, 250, per_folder=100, fanout=2)
    assert paths == sorted(tmp_path.rglob("*.png"))
    leaves = {p.parent.relative_to(tmp_path).as_posix() for p in paths}
    assert leaves == {"000/00", "000/01", "001/00"}
    with Image.open(paths[-1]) as im:
        assert images.small_png_index(np.asarray(im)) == 249
