"""Teacher inputs: which box of the source image a teacher sees, and the tensor it gets (DESIGN.md §3).

Everything is in source-image pixel coordinates. A view is "crop box b = (x0, y0, x1, y1) from the
image and resize it to the teacher's input size"; the resize and normalization constants come from
the teacher's spec. Done in torch (no torchvision), batched, on the teacher's device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featcache.errors import UsageError

POLICIES = ("squash", "center")


def view_box(width: int, height: int, policy: str = "squash") -> tuple[int, int, int, int]:
    """The box a view policy takes from a ``width`` x ``height`` image.

    ``squash``: the whole image (what the teachers' own processors do); ``center``: the largest
    centred square.
    """
    if policy == "squash":
        return (0, 0, width, height)
    if policy == "center":
        side = min(width, height)
        x0, y0 = (width - side) // 2, (height - side) // 2
        return (x0, y0, x0 + side, y0 + side)
    raise UsageError(f"unknown view policy {policy!r}; policies: {', '.join(POLICIES)}")


def crop_resize(image: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int],
                mode: str = "bilinear", antialias: bool = True) -> torch.Tensor:
    """Crop ``box`` from a ``(3, H, W)`` uint8 image and resize it to ``size``: float in [0, 1]."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= image.shape[-1] and 0 <= y0 < y1 <= image.shape[-2]):
        raise UsageError(f"box {box} is outside the {image.shape[-1]}x{image.shape[-2]} image")
    crop = image[:, y0:y1, x0:x1].unsqueeze(0).float().div_(255.0)
    if tuple(crop.shape[-2:]) == tuple(size):
        return crop[0]
    return F.interpolate(crop, size=tuple(size), mode=mode, align_corners=False, antialias=antialias)[0]


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """``(x - mean) / std`` per channel of a ``(B, 3, H, W)`` batch."""
    mean = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - mean) / std


def make_views(images: list[torch.Tensor], spec, size: tuple[int, int] | None = None, policy: str = "squash",
               device: str | torch.device = "cpu", mosaic: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized teacher inputs ``(B, 3, H, W)`` and their boxes ``(B, 4)`` for a list of images.

    With ``mosaic`` k > 1 each view is one tile of a k x k mosaic (``spec.mosaic_tile(k)``);
    ``Teacher.extract_mosaic`` composes them.
    """
    if mosaic > 1:
        size = spec.mosaic_tile(mosaic)
    else:
        size = spec.check_size(size or spec.input_size)
    boxes = [view_box(im.shape[-1], im.shape[-2], policy) for im in images]
    pixels = torch.stack([crop_resize(im.to(device), b, size, spec.resize, spec.antialias)
                          for im, b in zip(images, boxes)])
    return normalize(pixels, spec.mean, spec.std), torch.tensor(boxes, dtype=torch.float32)
