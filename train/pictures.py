"""Student-against-teacher pictures for ``RUN/pictures/`` (DESIGN.md §5; the report's Fig. 2).

One PNG per image: [image | teacher PCA | student PCA | MSE per cell + colour bar]. The three principal
components are fitted on the teacher's features over Ω (the cells with a target) and both maps are projected
onto them with the teacher's min/max colour scaling, so equal colours mean equal features; cells outside Ω
are grey. Panels, heatmap colours and colour bar are those of :mod:`featcache.viz`. :class:`Pictures` is the
training loop's evaluator that draws them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

from featcache.errors import UsageError
from featcache.train.data import Item, collate, to_device
from featcache.viz import FONT, HEIGHT, LABEL, panel, strip, colorbar, fit, heat

if TYPE_CHECKING:
    from featcache.train.config import TrainConfig
    from featcache.train.task import DistillTask

GREY = (128, 128, 128)  # cells outside Ω
ERROR_LABEL = "MSE per cell"
ERROR_NAME = "MSE per cell, mean over channels of (s − t)²"  # s: student, t: teacher; fits a bar


def _check(student: np.ndarray, teacher: np.ndarray, omega: np.ndarray | None) -> np.ndarray:
    if student.shape != teacher.shape or teacher.ndim != 3:
        raise UsageError(f"student {student.shape} and teacher {teacher.shape} must both be (h, w, C) and equal")
    omega = np.ones(teacher.shape[:2], bool) if omega is None else np.asarray(omega, bool)
    if omega.shape != teacher.shape[:2]:
        raise UsageError(f"omega {omega.shape} does not match the feature grid {teacher.shape[:2]}")
    if not omega.any():
        raise UsageError("omega holds no cell: nothing to picture")
    return omega


def shared_pca_rgb(teacher: np.ndarray, student: np.ndarray, omega: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(h, w, 3) uint8 pictures of ``teacher`` and ``student``: the teacher's first three principal
    components over Ω, each scaled to the teacher's min/max over Ω (students clipped to it); grey off Ω."""
    c = teacher.shape[-1]
    fitted = teacher[omega].astype(np.float64)
    mean = fitted.mean(axis=0)
    _, _, vt = np.linalg.svd(fitted - mean, full_matrices=False)
    basis = np.pad(vt[:3].T, ((0, 0), (0, 3 - min(3, len(vt)))))  # (C, 3); fewer than 3 components: black
    lo, hi = ((fitted - mean) @ basis).min(axis=0), ((fitted - mean) @ basis).max(axis=0)

    def rgb(x):
        t = np.clip(((x.reshape(-1, c) - mean) @ basis - lo) / np.where(hi > lo, hi - lo, 1.0), 0, 1)
        out = (t.reshape(*x.shape[:2], 3) * 255).round().astype(np.uint8)
        out[~omega] = GREY
        return out

    return rgb(teacher), rgb(student.astype(np.float64))


def cell_mse(student: np.ndarray, teacher: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """(h, w) float32 mean over channels of (student − teacher)², NaN outside Ω."""
    err = np.mean((student.astype(np.float64) - teacher.astype(np.float64)) ** 2, axis=-1).astype(np.float32)
    err[~omega] = np.nan
    return err


def _error_panels(err: np.ndarray, omega: np.ndarray) -> list[Image.Image]:
    inside = err[omega]
    vmax = float(np.percentile(inside, 99)) or float(inside.max())
    rgb = heat(np.nan_to_num(err), vmax)
    rgb[~omega] = GREY
    return [panel(rgb, ERROR_LABEL), colorbar(vmax, ERROR_NAME, clipped=bool(inside.max() > vmax))]


def _image_panel(image: np.ndarray) -> Image.Image:
    h, w = image.shape[:2]
    width = max(1, round(HEIGHT * w / h))
    return panel(np.asarray(Image.fromarray(image).resize((width, HEIGHT), Image.BILINEAR)), "image", width)


def _titled(strip: Image.Image, title: str) -> Image.Image:
    out = Image.new("RGB", (strip.width, strip.height + LABEL), (255, 255, 255))
    out.paste(strip, (0, LABEL))
    ImageDraw.Draw(out).text((2, 2), fit(title, strip.width - 4), fill=(0, 0, 0), font=FONT)
    return out


def pca_picture(student: np.ndarray, teacher: np.ndarray, omega: np.ndarray | None, path,
                image: np.ndarray | None = None, title: str = "") -> tuple[Path, np.ndarray]:
    """Write the picture of ``student`` against ``teacher`` ((h, w, C) features on one grid; ``omega``
    (h, w) marks the cells with a target, all when None; ``image``: the crop as (H, W, 3) uint8) to
    ``path`` as PNG; a ``title`` adds a line above. Returns the path and the per-cell MSE (NaN off Ω)."""
    student, teacher = np.asarray(student), np.asarray(teacher)
    omega = _check(student, teacher, omega)
    teacher_rgb, student_rgb = shared_pca_rgb(teacher, student, omega)
    err = cell_mse(student, teacher, omega)
    panels = [] if image is None else [_image_panel(np.asarray(image, dtype=np.uint8))]
    panels += [panel(teacher_rgb, "teacher PCA"), panel(student_rgb, "student PCA (teacher's components)")]
    picture = strip(panels + _error_panels(err, omega))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (_titled(picture, title) if title else picture).save(path, format="PNG")
    return path, err


class Pictures:
    """The training loop's evaluator of pictures: PCA of student vs teacher features on held-out ``row``
    (whole view at ``eval.resolution``), one ``step<N>-<teacher>.png`` per teacher in ``folder``; no metrics."""

    def __init__(self, task: DistillTask, row: int, cfg: TrainConfig, folder: Path):
        self.task, self.row, self.folder = task, row, Path(folder)
        self.every, self.resolution = cfg.eval.every, cfg.eval.resolution

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        task = self.task
        batch = to_device(collate([task.dataset[Item(self.row, self.resolution, "low", ())]]), task.device)
        with task.evaluating():
            out = task.features(batch["image"], None)
        image = batch["image"][0].cpu().permute(1, 2, 0).numpy()
        self.folder.mkdir(exist_ok=True)
        for t in task.targets:
            b = batch[t.name]
            target = task.targets_of(b, out.grid)[0]
            pca_picture(out.dense[t.name][0].float().cpu().numpy(), target.cpu().numpy(), b["omega"][0].cpu().numpy(),
                        self.folder / f"step{step:07d}-{t.name}.png", image=image,
                        title=f"{t.name}, image row {self.row}, step {step}")
        return {}
