"""Image files with known ground truth for tests of the image indexer and decoder.

Everything here writes into a folder the caller owns (normally pytest's ``tmp_path``)
and returns what a test needs to check the code under test:

* :func:`skimage_photos` / :func:`photo` -- the real photos shipped inside the
  scikit-image wheel (read-only, never copy them into the repository).
* :func:`write_header_cases` -- good and bad files for an indexer that reads only
  image headers, each described by a :class:`Case`.
* :func:`write_non_image_files` -- files a folder scan by extension must skip.
* :func:`write_many_small_pngs` / :func:`write_nested_small_pngs` -- thousands of
  small, valid, pixel-distinct PNG files, written fast.

PNG files that must not be built by Pillow (a 30000x30000 header with almost no
data, a complete 20000x20000 bomb) are assembled chunk by chunk with
:func:`png_chunk`; :func:`iter_png_chunks` reads them back without Pillow.

Pillow facts the cases rely on (Pillow 13, default ``Image.MAX_IMAGE_PIXELS``):

* ``Image.open`` already raises ``DecompressionBombError`` for any image above
  ``2 * MAX_IMAGE_PIXELS`` (about 179 MP), i.e. for both 400 MP and 900 MP cases;
  the check is on the header size only, nothing is allocated.  With
  ``MAX_IMAGE_PIXELS = None`` the same ``open`` returns the size lazily.
* ``load()`` does not repeat the check, so never call it on those two files
  after lifting the limit: it would allocate 400 MB / 900 MB.
* A PNG cut inside its IHDR raises a plain ``OSError("Truncated File Read")``
  from ``Image.open``, not ``UnidentifiedImageError``.
* ``PngImageFile.getexif()`` calls ``load()`` (an eXIf chunk may follow IDAT), so
  on a PNG it decodes the whole image; read ``im.info.get("exif")`` instead.
  ``JpegImageFile.getexif()`` reads the header only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXIF_ORIENTATION_TAG = 0x0112

#: Stem of the scikit-image photo behind the cases that need a real file (451x300 RGB PNG).
CASE_PHOTO = "chelsea"

#: EXIF case: pixels as stored in the file, (width, height).
ORIENTATION6_STORED_SIZE = (40, 30)
#: EXIF case: size a viewer displays after applying Orientation=6, (width, height).
ORIENTATION6_DISPLAY_SIZE = (30, 40)
#: EXIF case: (x, y) in the *displayed* image -> expected colour (JPEG, so approximate).
ORIENTATION6_PROBES: dict[tuple[int, int], tuple[int, int, int]] = {
    (22, 10): (255, 0, 0),  # top-right quadrant: red
    (7, 10): (0, 0, 255),  # top-left: blue
    (7, 30): (0, 0, 255),  # bottom-left: blue
    (22, 30): (0, 0, 255),  # bottom-right: blue
}

HEADER_ONLY_SIZE = (30000, 30000)
BOMB_SIZE = (20000, 20000)
SMALL_PNG_SIZE = (32, 24)


@dataclasses.dataclass(frozen=True)
class Case:
    """One file written by :func:`write_header_cases` and what must be true of it.

    ``ok``: a header-only reader (``Image.open`` without ``load``) must succeed
    (given ``Image.MAX_IMAGE_PIXELS = None`` for the two huge cases).
    ``size``: (width, height) as displayed, i.e. after EXIF orientation; None
    when the file cannot be indexed.
    ``decodes``: ``load()`` succeeds with Pillow's defaults.
    ``kind``: "file", "symlink", "directory" or "fifo" (never open a fifo).
    """

    name: str
    path: Path
    ok: bool
    size: tuple[int, int] | None
    note: str
    decodes: bool = True
    kind: str = "file"


# --------------------------------------------------------------------------- photos


def skimage_data_dir() -> Path:
    """Return the ``skimage/data`` folder of the installed wheel without importing it."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("scikit-image is not installed")
    return Path(spec.origin).parent / "data"


@functools.cache
def _photo_paths() -> tuple[Path, ...]:
    """Cache the sorted PNG/JPEG files of ``skimage/data``."""
    folder = skimage_data_dir()
    return tuple(
        sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    )


def skimage_photos() -> list[Path]:
    """Return the real photos (``*.png``, ``*.jpg``) shipped with scikit-image, sorted."""
    return list(_photo_paths())


def photo(name: str) -> Path:
    """Return the scikit-image photo whose stem is ``name`` (e.g. ``"coffee"``)."""
    for path in _photo_paths():
        if path.stem == name:
            return path
    known = ", ".join(p.stem for p in _photo_paths())
    raise FileNotFoundError(f"no scikit-image photo named {name!r}; known: {known}")


PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left")


def photo_tensors(n: int):
    """The first ``n`` of five real colour photos as ``(3, H, W)`` uint8 tensors (torch imported late:
    the rest of this module needs none)."""
    import torch
    from PIL import Image

    return [torch.from_numpy(np.array(Image.open(photo(p)).convert("RGB"))).permute(2, 0, 1) for p in PHOTO_NAMES[:n]]


# ------------------------------------------------------------------------ PNG bytes


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """Return one PNG chunk: length, type, data and CRC."""
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_ihdr(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """Return an IHDR chunk (no compression/filter/interlace variants)."""
    fields = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return png_chunk(b"IHDR", fields)


def iter_png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes, bool]]:
    """Yield ``(type, data, crc_ok)`` for each chunk of a PNG held in memory."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG signature")
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        crc_bytes = data[pos + 8 + length : pos + 12 + length]
        crc_ok = len(crc_bytes) == 4 and struct.unpack(">I", crc_bytes)[0] == (
            zlib.crc32(kind + body) & 0xFFFFFFFF
        )
        yield kind, body, crc_ok
        pos += 12 + length


def png_header_size(data: bytes) -> tuple[int, int]:
    """Return (width, height) straight from the IHDR bytes, without Pillow."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("no IHDR at the start of this PNG")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def encode_rgb_png(pixels: np.ndarray, level: int = 1) -> bytes:
    """Encode an (h, w, 3) uint8 array as an 8-bit RGB PNG (filter 0), without Pillow."""
    height, width, _ = pixels.shape
    rows = np.zeros((height, 1 + width * 3), dtype=np.uint8)
    rows[:, 1:] = pixels.reshape(height, width * 3)
    idat = zlib.compress(rows.tobytes(), level)
    return (
        PNG_SIGNATURE
        + png_ihdr(width, height, 8, 2)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def header_only_png_bytes(width: int, height: int, rows: int = 4) -> bytes:
    """Return a grey PNG whose IHDR says ``width x height`` but whose IDAT holds ``rows`` rows."""
    scanlines = np.zeros((rows, 1 + width), dtype=np.uint8)  # filter byte 0, then pixels
    scanlines[:, 1:] = (np.arange(width)[None, :] + np.arange(rows)[:, None]) & 0xFF
    return (
        PNG_SIGNATURE
        + png_ihdr(width, height, 8, 0)
        + png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 9))
        + png_chunk(b"IEND", b"")
    )


def bomb_png_bytes(width: int, height: int, rows_per_block: int = 1000) -> bytes:
    """Return a complete, valid 1-bit grey PNG of ``width x height`` that compresses tiny.

    The pixels are all black; the scanlines are compressed block by block so the
    full raw image (about ``width * height / 8`` bytes) is never held at once.
    """
    row = b"\0" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - start)))
    parts.append(compressor.flush())
    return (
        PNG_SIGNATURE
        + png_ihdr(width, height, 1, 0)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------- JPEG bytes


def _pil_bytes(image: Image.Image, fmt: str, **params: object) -> bytes:
    """Encode a Pillow image in memory."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def jpeg_scan_start(data: bytes) -> int:
    """Return the offset of the first entropy-coded byte (just after the SOS segment)."""
    sos = data.find(b"\xff\xda")
    if sos < 0:
        raise ValueError("no SOS marker in this JPEG")
    (length,) = struct.unpack(">H", data[sos + 2 : sos + 4])
    return sos + 2 + length


def _garbage(count: int, seed: int) -> bytes:
    """Return deterministic bytes that never contain 0xFF (so they form no JPEG marker)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 0xFF, count, dtype=np.uint8).tobytes()


def noisy_rgb(width: int, height: int, seed: int) -> Image.Image:
    """Return an RGB gradient with noise, so JPEG has a long entropy-coded scan."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    shape = (height, width, 1)
    base = np.concatenate(
        [np.broadcast_to(x, shape), np.broadcast_to(y, shape), np.full(shape, 128, np.float32)],
        axis=2,
    )
    noise = rng.normal(0, 40, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def corrupt_body_jpeg_bytes() -> bytes:
    """Return a 160x120 JPEG whose header parses but whose scan is cut and garbled, no EOI."""
    data = _pil_bytes(noisy_rgb(160, 120, seed=7), "JPEG", quality=90)
    start = jpeg_scan_start(data)
    keep = (len(data) - start) // 3
    return data[: start + keep] + _garbage(64, seed=1)


def corrupt_header_jpeg_bytes() -> bytes:
    """Return a JPEG that keeps SOI ``FF D8 FF`` but whose next 61 bytes are garbage."""
    data = _pil_bytes(noisy_rgb(40, 30, seed=3), "JPEG")
    return data[:3] + b"\x13" + _garbage(60, seed=2) + data[64:]


def orientation6_jpeg_bytes() -> bytes:
    """Return a 40x30 JPEG, top-left 20x15 red, rest blue, tagged EXIF Orientation=6."""
    image = Image.new("RGB", ORIENTATION6_STORED_SIZE, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 15))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    return _pil_bytes(image, "JPEG", quality=95, exif=exif.tobytes())


# ------------------------------------------------------------------- header cases


def _simple_images() -> list[tuple[str, str, Image.Image, str, str]]:
    """Return (case name, file name, image, format, note) for the small synthetic images."""
    gray = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1)), "L")
    gray16 = (np.arange(36 * 48, dtype=np.uint32).reshape(36, 48) * 37 % 65536).astype(np.uint16)
    palette = Image.fromarray((np.arange(17 * 33).reshape(17, 33) % 16).astype(np.uint8), "P")
    palette.putpalette([v for i in range(16) for v in (i * 16, 255 - i * 16, (i * 64) % 256)])
    rgba = np.zeros((20, 50, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, np.arange(50, dtype=np.uint8)[None, :] * 5
    return [
        ("png_1x1", "one_pixel.png", Image.new("RGB", (1, 1), (10, 20, 30)), "PNG", "1x1 RGB PNG"),
        ("png_gray", "gray.png", gray, "PNG", "8-bit greyscale PNG, mode L"),
        ("png_gray16", "gray16.png", Image.fromarray(gray16), "PNG",
         "16-bit greyscale PNG, Pillow mode I;16, values up to 65535"),
        ("png_rgba", "rgba.png", Image.fromarray(rgba, "RGBA"), "PNG",
         "RGBA PNG with an alpha ramp"),
        ("png_palette", "palette.png", palette, "PNG", "palette (mode P) PNG, 16 colours"),
        ("jpeg_cmyk", "cmyk.jpg", Image.new("CMYK", (24, 16), (10, 200, 30, 40)), "JPEG",
         "CMYK JPEG (Adobe APP14); convert to RGB before use"),
    ]


def _good_cases(folder: Path) -> list[Case]:
    """Write the files that a header reader must index correctly and that decode."""
    source = photo(CASE_PHOTO)
    unicode_path = folder / "фото café 1.png"
    shutil.copyfile(source, unicode_path)
    cases = [
        Case("unicode_name", unicode_path, True, png_header_size(source.read_bytes()),
             f"copy of skimage {source.name} under a non-ASCII name with spaces"),
    ]
    for name, filename, image, fmt, note in _simple_images():
        path = folder / filename
        path.write_bytes(_pil_bytes(image, fmt))
        cases.append(Case(name, path, True, image.size, note))
    exif_path = folder / "orientation6.jpg"
    exif_path.write_bytes(orientation6_jpeg_bytes())
    cases.append(Case(
        "jpeg_exif_orientation6", exif_path, True, ORIENTATION6_DISPLAY_SIZE,
        "stored 40x30 with the top-left 20x15 red and the rest blue, EXIF Orientation=6; "
        "displayed (after rotating 90 degrees clockwise, ImageOps.exif_transpose) it is 30x40 "
        "with the top-right 15x20 quadrant red and the rest blue; see ORIENTATION6_PROBES",
    ))
    return cases


def _undecodable_cases(folder: Path) -> list[Case]:
    """Write files whose header is fine but which must not or cannot be decoded."""
    header_only = folder / "header_only_30000.png"
    header_only.write_bytes(header_only_png_bytes(*HEADER_ONLY_SIZE))
    bomb = folder / "bomb_20000.png"
    bomb.write_bytes(bomb_png_bytes(*BOMB_SIZE))
    body = folder / "corrupt_body.jpg"
    body.write_bytes(corrupt_body_jpeg_bytes())
    source = photo(CASE_PHOTO).read_bytes()
    half = folder / "truncated_half.png"
    half.write_bytes(source[: len(source) // 2])
    return [
        Case("png_header_only_30000", header_only, True, HEADER_ONLY_SIZE,
             "IHDR says 30000x30000 8-bit grey but the IDAT holds 4 rows; reading the header "
             "must not allocate; Image.open raises DecompressionBombError unless "
             "MAX_IMAGE_PIXELS is lifted; never call load() (900 MB)", decodes=False),
        Case("png_bomb_20000", bomb, True, BOMB_SIZE,
             "complete valid 1-bit 20000x20000 PNG (400 MP) in a few tens of kB; a decoder "
             "must refuse it (Image.open raises DecompressionBombError with default limits)",
             decodes=False),
        Case("jpeg_corrupt_body", body, True, (160, 120),
             "header parses (160x120) but the scan is cut after a third, followed by 64 "
             "garbage bytes and no EOI: decode must fail (load() raises OSError)", decodes=False),
        Case("png_truncated_half", half, True, png_header_size(source),
             f"first half of skimage {CASE_PHOTO}.png: header parses, decode must fail "
             "(load() raises OSError: image file is truncated)", decodes=False),
    ]


def _bad_cases(folder: Path) -> list[Case]:
    """Write files and file-system entries that an indexer must reject without crashing."""
    entries = {
        "jpeg_empty": (folder / "empty.jpg", b"", "zero-byte .jpg"),
        "jpeg_text": (folder / "notes.jpg", b"this is not a JPEG\n", "text file named .jpg"),
        "png_truncated_20_bytes": (folder / "truncated_20.png",
                                   photo(CASE_PHOTO).read_bytes()[:20],
                                   "first 20 bytes of a real PNG, cut inside IHDR; Image.open "
                                   "raises plain OSError('Truncated File Read')"),
        "jpeg_corrupt_header": (folder / "corrupt_header.jpg", corrupt_header_jpeg_bytes(),
                                "SOI FF D8 FF kept, next 61 bytes garbage: UnidentifiedImageError"),
    }
    cases = []
    for name, (path, data, note) in entries.items():
        path.write_bytes(data)
        cases.append(Case(name, path, False, None, note, decodes=False))
    link = folder / "dangling.png"
    link.symlink_to(folder / "does_not_exist.png")
    cases.append(Case("symlink_dangling", link, False, None,
                      "symlink to a missing file", decodes=False, kind="symlink"))
    directory = folder / "dir.png"
    directory.mkdir()
    cases.append(Case("dir_png", directory, False, None,
                      "a directory named like an image", decodes=False, kind="directory"))
    if hasattr(os, "mkfifo"):
        fifo = folder / "pipe.jpg"
        os.mkfifo(fifo)
        cases.append(Case("fifo_jpg", fifo, False, None,
                          "FIFO named .jpg: never open it (open() blocks without a writer)",
                          decodes=False, kind="fifo"))
    return cases


def write_header_cases(folder: Path) -> list[Case]:
    """Write every header case into ``folder`` (created if needed) and return them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return _good_cases(folder) + _undecodable_cases(folder) + _bad_cases(folder)


def cases_by_name(cases: list[Case]) -> dict[str, Case]:
    """Index cases by their ``name``."""
    return {case.name: case for case in cases}


# ------------------------------------------------------------------ other files


def write_non_image_files(folder: Path) -> list[Path]:
    """Write a README.txt and a labels.csv, which a scan by image extension must ignore."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    readme = folder / "README.txt"
    readme.write_text("Test images for featcache.\n", encoding="utf-8")
    labels = folder / "labels.csv"
    labels.write_text("file,label\nimg_000000.png,cat\nimg_000001.png,dog\n", encoding="utf-8")
    return [readme, labels]


@functools.cache
def _small_bases() -> tuple[np.ndarray, ...]:
    """Return eight different 24x32 RGB base images (gradients and noise)."""
    width, height = SMALL_PNG_SIZE
    return tuple(np.asarray(noisy_rgb(width, height, seed=seed)) for seed in range(8))


def small_png_bytes(index: int) -> bytes:
    """Return a valid 32x24 RGB PNG whose pixels are unique to ``index``.

    The first four pixels of row 0 hold ``index`` as 12 big-endian bytes.
    """
    bases = _small_bases()
    pixels = bases[index % len(bases)].copy()
    pixels[0, :4] = np.frombuffer(index.to_bytes(12, "big"), np.uint8).reshape(4, 3)
    return encode_rgb_png(pixels)


def small_png_index(pixels: np.ndarray) -> int:
    """Recover the index that :func:`small_png_bytes` wrote into an (h, w, 3) array."""
    return int.from_bytes(np.ascontiguousarray(pixels[0, :4], np.uint8).tobytes(), "big")


def write_many_small_pngs(folder: Path, n: int) -> list[Path]:
    """Write ``n`` pixel-distinct 32x24 PNGs ``img_000000.png``... into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n):
        path = folder / f"img_{index:06d}.png"
        path.write_bytes(small_png_bytes(index))
        paths.append(path)
    return paths


def write_nested_small_pngs(
    folder: Path, n: int, per_folder: int = 100, fanout: int = 10
) -> list[Path]:
    """Write ``n`` small PNGs two folders deep: ``folder/000/03/img_000342.png``.

    Each leaf folder holds ``per_folder`` files; each middle folder ``fanout`` leaves.
    Returns the paths in index order (which is also sorted order).
    """
    folder = Path(folder)
    paths = []
    for index in range(n):
        leaf = index // per_folder
        sub = folder / f"{leaf // fanout:03d}" / f"{leaf % fanout:02d}"
        if index % per_folder == 0:
            sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img_{index:06d}.png"
        path.write_bytes(small_png_bytes(index))
        paths.append(path)
    return paths
