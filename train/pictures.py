"""Student-against-teacher pictures for ``RUN/pictures/`` (DESIGN.md §5; the report's Fig. 2).

One PNG per image: [image | teacher PCA | student PCA | MSE per cell + colour bar]. The three principal
components are fitted on the teacher's features over Ω (the cells with a target) and both maps are projected
onto them with the teacher's min/max colour scaling, so equal colours mean equal features; cells outside Ω
are grey. Panels, heatmap colours and colour bar are those of :mod:`featcache.viz`. :class:`Pictures` is the
training loop's evaluator that draws them: the image panel and the title name the image by its ``image_id``.

One colour scale per run: a run's error maps are comparable only if their colours mean the same MSE at every
step, so :class:`Pictures` fixes each teacher's scale at the run's first picture — the 99th percentile of that
picture's per-cell MSE (:func:`error_scale`), the untrained student's error, so later steps darken as the student
learns — and saves it in ``RUN/pictures/error-scale.json``, which a resumed run reads back (cells above it take the
top colour and the bar says ``≥``). Each PNG records its title and scale as text chunks (:data:`featcache.viz.TITLE_KEY`,
:data:`featcache.viz.SCALE_KEY`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from featcache.errors import UsageError
from featcache.store.location import locate
from featcache.train.data import Item, collate, to_device
from featcache.viz import HEIGHT, colorbar, error_scale, heat, panel, save_png, strip, titled

if TYPE_CHECKING:
    from featcache.train.config import TrainConfig
    from featcache.train.task import DistillTask

GREY = (128, 128, 128)  # cells outside Ω
ERROR_LABEL = "MSE per cell"
ERROR_NAME = "MSE per cell, mean over channels of (s − t)²"  # s: student, t: teacher; fits a bar
SCALE_FILE = "error-scale.json"  # in the pictures folder: cleared with it when a run starts over


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


def _error_panels(err: np.ndarray, omega: np.ndarray, vmax: float) -> list[Image.Image]:
    rgb = heat(np.nan_to_num(err), vmax)
    rgb[~omega] = GREY
    return [panel(rgb, ERROR_LABEL), colorbar(vmax, ERROR_NAME, clipped=bool(err[omega].max() > vmax))]


def _image_panel(image: np.ndarray, label: str = "image") -> Image.Image:
    h, w = image.shape[:2]
    width = max(1, round(HEIGHT * w / h))
    return panel(np.asarray(Image.fromarray(image).resize((width, HEIGHT), Image.BILINEAR)), label, width)


def pca_picture(student: np.ndarray, teacher: np.ndarray, omega: np.ndarray | None, path,
                image: np.ndarray | None = None, title: str = "", vmax: float | None = None,
                image_label: str = "image") -> tuple[Path, np.ndarray]:
    """Write the picture of ``student`` against ``teacher`` ((h, w, C) features on one grid; ``omega``
    (h, w) marks the cells with a target, all when None; ``image``: the crop as (H, W, 3) uint8, its panel
    labelled ``image_label``) to ``path`` as PNG; a ``title`` adds a line above. The error map's colours run
    from 0 to ``vmax`` (this picture's :func:`error_scale` when None). Returns the path and the per-cell
    MSE (NaN off Ω)."""
    student, teacher = np.asarray(student), np.asarray(teacher)
    omega = _check(student, teacher, omega)
    teacher_rgb, student_rgb = shared_pca_rgb(teacher, student, omega)
    err = cell_mse(student, teacher, omega)
    vmax = error_scale(err) if vmax is None else vmax
    panels = [] if image is None else [_image_panel(np.asarray(image, dtype=np.uint8), image_label)]
    panels += [panel(teacher_rgb, "teacher PCA"), panel(student_rgb, "student PCA (teacher's components)")]
    picture = strip(panels + _error_panels(err, omega, vmax))
    save_png(titled(picture, title) if title else picture, path, title, vmax)
    return Path(path), err


class Pictures:
    """The training loop's evaluator of pictures: PCA of student vs teacher features on held-out ``row``
    (whole view at ``eval.resolution``, the image ``image_id``), one ``step<N>-<teacher>.png`` per teacher in
    ``folder``, the error maps on the run's scale (:data:`SCALE_FILE`); no metrics."""

    def __init__(self, task: DistillTask, row: int, cfg: TrainConfig, folder: Path, image_id: str):
        self.task, self.row, self.folder, self.image_id = task, row, Path(folder), image_id
        self.every, self.resolution = cfg.eval.every, cfg.eval.resolution

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        task = self.task
        batch = to_device(collate([task.dataset[Item(self.row, self.resolution, "low", ())]]), task.device)
        with task.evaluating():
            out = task.features(batch["image"], None)
        image = batch["image"][0].cpu().permute(1, 2, 0).numpy()
        maps = {t.name: (out.dense[t.name][0].float().cpu().numpy(),
                         task.targets_of(batch[t.name], out.grid)[0].cpu().numpy(),
                         batch[t.name]["omega"][0].cpu().numpy()) for t in task.targets}
        scales = self.scales(maps, step)
        for name, (student, teacher, omega) in maps.items():
            pca_picture(student, teacher, omega, self.folder / f"step{step:07d}-{name}.png", image=image,
                        title=f"image {self.image_id}: {name}, step {step}", vmax=scales.get(name),
                        image_label=self.image_id)
        return {}

    def scales(self, maps: dict[str, tuple], step: int) -> dict[str, float]:
        """Each teacher's error scale for the whole run: read from :data:`SCALE_FILE`, or fixed now (the
        run's first picture) from this picture's errors and saved there."""
        path = self.folder / SCALE_FILE
        if path.exists():
            return json.loads(path.read_text())["scales"]
        scales = {name: error_scale(cell_mse(s, t, _check(s, t, o))) for name, (s, t, o) in maps.items()}
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"rule": "99th percentile of the per-cell MSE at the run's first picture", "step": step,
                  "image_id": self.image_id, "scales": scales}
        locate(path).write_bytes_atomic(json.dumps(record, indent=1).encode())  # a crash leaves none or all of it
        return scales
