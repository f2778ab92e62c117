"""Decoding a source image into the uint8 ``(3, H, W)`` tensor every teacher view starts from.

What a user of the cache may rely on:
- EXIF orientation is applied (the image as displayed, matching the manifest's width/height).
- Transparency (RGBA, LA, palette with a transparent colour) is composited onto white, as the
  transformers image processors do.
- Grayscale, CMYK, palette and 16-bit images become 8-bit RGB (16-bit values are scaled, not clipped).
- Only the formats in :data:`featcache.images.FORMATS` are decoded, and an image above
  ``max_pixels`` is refused before a pixel is decoded (a decompression bomb fails alone).
Every failure is an :class:`ImageError` carrying a one-line reason for ``errors.parquet``.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from featcache.errors import ImageError
from featcache.images import FORMATS, read_header

#: Pillow's own bomb limit (2 x MAX_IMAGE_PIXELS): 178,956,970 pixels.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
BACKGROUND = (255, 255, 255)


def decode(data: bytes, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The image in ``data`` as a uint8 ``(3, H, W)`` tensor, oriented as displayed."""
    return as_tensor(decode_rgb(data, uri, max_pixels)[0])


def decode_rgb(data: bytes, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               reduce: int = 1) -> tuple[Image.Image, int]:
    """(the image in ``data`` as an RGB Pillow image oriented as displayed, its reduction ``s``).

    ``reduce`` > 1 lets a JPEG decode at 1/2, 1/4 or 1/8 of its size in the DCT (Pillow's draft
    mode: far less work), by the largest such ``s`` <= ``reduce``; pixel edges then map as x -> x / s.
    Other formats decode whole (``s`` = 1)."""
    if not data:
        raise ImageError(uri, "empty file (0 bytes)")
    header = read_header(io.BytesIO(data), uri)  # size from the header alone, nothing decoded yet
    pixels = header.width * header.height
    if pixels > max_pixels:
        raise ImageError(uri, f"{header.width}x{header.height} is {pixels / 1e6:.1f} MP, over the "
                              f"{max_pixels / 1e6:.1f} MP limit (decompression bomb guard, max_pixels)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Truncated File Read" on open
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                scale = 1
                if reduce > 1 and im.format == "JPEG":
                    s = 1 << min(3, reduce.bit_length() - 1)  # 8, 4 or 2: what the DCT can drop
                    width, height = im.size
                    im.draft(im.mode, (-(-width // s), -(-height // s)))
                    scale = round(width / im.size[0])
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im)), scale
    except Image.UnidentifiedImageError:
        raise ImageError(uri, f"not an image in a decoded format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise ImageError(uri, f"Pillow's own bomb guard (raise PIL.Image.MAX_IMAGE_PIXELS too): {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error) as e:
        raise ImageError(uri, f"cannot decode: {type(e).__name__}: {str(e).strip() or 'no detail'}") from None


def as_tensor(im: Image.Image) -> torch.Tensor:
    """An RGB Pillow image as a uint8 ``(3, H, W)`` tensor."""
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a.astype(np.float64) * (255.0 / peak), 0, 255).round().astype(np.uint8)
        im = Image.fromarray(a, "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, BACKGROUND + (255,))
        im = Image.alpha_composite(background, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im
