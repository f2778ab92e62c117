"""Held-out kNN top-1 of teacher and student summaries on a labelled image set.

The classifier is DINO's weighted kNN evaluation (Caron et al. 2021, ``eval_knn.py``; Wu et al. 2018):
cosine similarity between L2-normalized embeddings, the ``k`` nearest training rows vote for their label
with weight ``exp(sim / T)``. ``teacher_knn`` scores the cached teacher summaries of a view (the number a
student's summary head is distilled towards), ``student_knn`` a student's embeddings of the same images.
Labels (and an optional ``split`` column) come from the cache's manifest; see :mod:`featcache.train.digits`.

The training loop's evaluators live here too (as big_vision's ``evaluators``): objects with an ``every``
(steps) that, called with the step, return their metrics; :class:`HeldoutLosses` and :class:`Knn`, and
:class:`featcache.train.pictures.Pictures`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from featcache.errors import UsageError
from featcache.store import Cache
from featcache.store.loader import usable_rows
from featcache.train.data import Item, collate, crop_pixels, to_device
from featcache.train.pictures import Pictures

if TYPE_CHECKING:
    from featcache.train.config import TrainConfig
    from featcache.train.task import DistillTask, Target

QUERY_ELEMENTS = 1 << 24  # similarities held at once (64 MB of float32): bounds memory at any set size
TEST_EVERY = 4  # without a split column, every 4th row (by index) is a test row: a 3:1 split


def knn_predict(train_x, train_y, test_x, k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Predicted labels of ``test_x`` (int64, on ``train_x``'s device) by the similarity-weighted vote of
    the ``k`` most cosine-similar rows of ``train_x`` (``k`` clipped to the training set's size)."""
    train_x, test_x = torch.as_tensor(train_x), torch.as_tensor(test_x)
    train_y = torch.as_tensor(train_y, device=train_x.device).long()
    if len(train_x) == 0 or len(test_x) == 0 or len(train_x) != len(train_y):
        raise UsageError(f"kNN needs training and test rows, with one label per training row "
                         f"(got {len(train_x)} training rows, {len(train_y)} labels, {len(test_x)} test rows)")
    classes, train_class = torch.unique(train_y, return_inverse=True)
    train_x = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train_x))
    step = max(1, QUERY_ELEMENTS // len(train_x))
    preds = [_vote(F.normalize(q.to(train_x).float(), dim=1) @ train_x.T, train_class, len(classes), k, temperature)
             for q in test_x.split(step)]
    return classes[torch.cat(preds)]


def _vote(sim: torch.Tensor, train_class: torch.Tensor, num_classes: int, k: int, temperature: float) -> torch.Tensor:
    top_sim, top = sim.topk(k, dim=1)
    weight = ((top_sim - top_sim[:, :1]) / temperature).exp()  # exp(sim/T), rescaled per row so it cannot overflow
    votes = torch.zeros(len(sim), num_classes, device=sim.device).scatter_add_(1, train_class[top], weight)
    return votes.argmax(dim=1)


def knn_top1(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_predict` on the labelled test rows."""
    pred = knn_predict(train_x, train_y, test_x, k, temperature)
    test_y = torch.as_tensor(test_y, device=pred.device).long()
    if len(test_y) != len(pred):
        raise UsageError(f"{len(test_y)} test labels for {len(pred)} test rows")
    return float((pred == test_y).float().mean())


def labels_and_splits(manifest: pa.Table) -> tuple[np.ndarray, np.ndarray | None]:
    """The manifest's ``label`` column as int64 (text labels become the index of their sorted value) and
    its ``split`` column as str (None without one)."""
    if "label" not in manifest.column_names:
        raise UsageError("the evaluation set needs a 'label' column in its manifest")
    column = manifest.column("label")
    if column.null_count:
        raise UsageError(f"the manifest's 'label' column has {column.null_count} empty values")
    values = np.asarray(column.to_pylist())
    labels = values.astype(np.int64) if pa.types.is_integer(column.type) else np.unique(values, return_inverse=True)[1]
    if "split" not in manifest.column_names:
        return labels.astype(np.int64), None
    split = np.array([s or "" for s in manifest.column("split").to_pylist()], dtype=str)
    return labels.astype(np.int64), split


def split_masks(split: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) boolean masks over ``n`` rows: split "train" against every other split, or without a
    split column every ``TEST_EVERY``-th row by index to test."""
    if split is None:
        test = np.arange(n) % TEST_EVERY == TEST_EVERY - 1
    else:
        test = np.asarray(split) != "train"
    return ~test, test


def _read_rows(reader, rows) -> tuple[np.ndarray, np.ndarray]:
    """Summaries (float32) and valid flags of ``rows`` from the view's small arrays alone (one chunk of S
    rows per shard, crc32c checked by zarr), so no dense bytes move; rows of uncommitted shards are invalid."""
    view, rows = reader.view, np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and not 0 <= rows.min() <= rows.max() < view.num_images:
        raise UsageError(f"rows {rows.min()}..{rows.max()} are out of range: {view.key} has {view.num_images} rows")
    summaries = np.zeros((len(rows), view.spec.summary_channels), np.float32)
    valid = np.zeros(len(rows), bool)
    done = np.isin(rows // view.shard_size, sorted(reader.committed))
    if done.any():
        summaries[done] = view.group["summary"].get_orthogonal_selection((rows[done], slice(None)))
        valid[done] = view.group["valid"].get_orthogonal_selection((rows[done],)).astype(bool)
    return summaries, valid


def summaries_from_cache(reader, rows) -> np.ndarray:
    """The cached teacher summaries of ``rows`` (float32, one row each, in order); every row must be valid."""
    summaries, valid = _read_rows(reader, rows)
    if not valid.all():
        bad = [int(i) for i, ok in zip(rows, valid) if not ok][:5]
        raise UsageError(f"{reader.view.key}: rows {bad} have no features (failed or not committed)")
    return summaries


def teacher_knn(cache, view_key: str, k: int = 20) -> float:
    """kNN top-1 of the cached summaries of ``view_key`` on the manifest's labels and split (see
    :func:`split_masks`); rows without valid features are left out. ``cache``: a Cache or its root."""
    cache = cache if isinstance(cache, Cache) else Cache.open(cache)
    labels, split = labels_and_splits(cache.manifest)
    with cache.view(view_key).reader() as reader:
        summaries, valid = _read_rows(reader, range(cache.num_images))
    train, test = split_masks(split, len(labels))
    train, test = train & valid, test & valid
    if not train.any() or not test.any():
        raise UsageError(f"{view_key}: kNN needs valid training and test rows "
                         f"({int(train.sum())} training, {int(test.sum())} test)")
    return knn_top1(summaries[train], labels[train], summaries[test], labels[test], k=k)


def _batches(images: Iterable[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    """Batches (B, 3, H, W) from single images (3, H, W) or batches as given."""
    pending = []
    for x in images:
        if x.ndim == 4:
            yield x
            continue
        pending.append(x)
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


def student_knn(embed: Callable[[torch.Tensor], torch.Tensor], images: Iterable[torch.Tensor], labels,
                split: np.ndarray | None, k: int = 20, batch_size: int = 64) -> float:
    """kNN top-1 of ``embed``'s (B, D) embeddings of ``images`` (uint8 (3, H, W) images, or (B, 3, H, W)
    batches, in label order) on ``labels`` and ``split`` (see :func:`split_masks`); no gradients are kept."""
    with torch.no_grad():
        x = torch.cat([embed(b).float() for b in _batches(images, batch_size)])
    labels = np.asarray(labels)
    if len(x) != len(labels):
        raise UsageError(f"{len(x)} embeddings for {len(labels)} labels")
    train, test = split_masks(split, len(labels))
    return knn_top1(x[torch.from_numpy(train)], labels[train], x[torch.from_numpy(test)], labels[test], k=k)


# ---- the training loop's evaluators --------------------------------------------------------------

class Evaluator(Protocol):
    """What the loop calls every ``every`` steps (and at step 0 and the last): its metrics, by name."""

    every: int

    def __call__(self, step: int) -> dict[str, float]: ...


class HeldoutLosses:
    """Each loss term of the task on the held-out rows (``heldout/<term>``): the whole view at
    ``eval.resolution``, no flip, no noise, the student in eval mode."""

    def __init__(self, task: DistillTask, rows: np.ndarray, cfg: TrainConfig):
        self.task, self.rows = task, rows
        self.every, self.resolution, self.batch_size = cfg.eval.every, cfg.eval.resolution, cfg.optim.batch_size

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        with self.task.evaluating():
            for start in range(0, len(self.rows), self.batch_size):
                rows = self.rows[start:start + self.batch_size]
                batch = collate([self.task.dataset[Item(int(r), self.resolution, "low", ())] for r in rows])
                values = self.task.forward(to_device(batch, self.task.device), None)
                del values["loss"]
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v * len(rows)
        return {f"heldout/{k}": v / len(self.rows) for k, v in sums.items()}


def knn_heads(targets: list[Target], teacher: str | None, manifest: pa.Table) -> list[Target]:
    """The teachers kNN evaluates (those with summaries, or ``teacher`` alone); refused when there is
    none or the manifest has no labels."""
    heads = [t for t in targets if t.summary_channels and (not teacher or t.name == teacher)]
    if not heads:
        raise UsageError(f"eval.knn needs a teacher with summaries (eval.knn_teacher={teacher!r})")
    labels_and_splits(manifest)
    return heads


class Knn:
    """kNN top-1 on the manifest's labels for every summary teacher (or ``eval.knn_teacher``): the
    student's summaries (whole image at ``eval.resolution``) next to the cached teacher's, as
    ``knn/<teacher>/student`` and ``knn/<teacher>/teacher``. Refused at construction when it cannot run."""

    def __init__(self, task: DistillTask, cache: Cache, cfg: TrainConfig):
        self.task, self.cache = task, cache
        self.heads = knn_heads(task.targets, cfg.eval.knn_teacher, cache.manifest)
        self.every, self.resolution, self.batch_size = cfg.eval.every, cfg.eval.resolution, cfg.optim.batch_size
        self._images: list[torch.Tensor] | None = None
        self._teacher: dict[str, float] = {}  # the cached summaries do not change: scored once

    def __call__(self, step: int) -> dict[str, float]:
        labels, split = labels_and_splits(self.cache.manifest)
        rows = usable_rows(self.cache, [t.views["low"] for t in self.heads])
        summaries = self._summaries(rows)
        train, test = (torch.from_numpy(m) for m in split_masks(None if split is None else split[rows], len(rows)))
        y = torch.as_tensor(labels[rows])
        result = {}
        for t in self.heads:
            x = summaries[t.name]
            result[f"knn/{t.name}/student"] = knn_top1(x[train], y[train], x[test], y[test])
            if t.name not in self._teacher:
                self._teacher[t.name] = teacher_knn(self.cache, t.views["low"])
            result[f"knn/{t.name}/teacher"] = self._teacher[t.name]
        return result

    @torch.no_grad()
    def _summaries(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The student's summaries of ``rows`` per head (float32, on the CPU); the crops are made once."""
        if self._images is None:
            res = self.resolution
            self._images = [crop_pixels(im, (0, 0, im.width * s, im.height * s), (res, res), scale=s)
                            for im, s in map(self.task.dataset.image, rows)]
        parts: dict[str, list] = {t.name: [] for t in self.heads}
        with self.task.evaluating():
            for start in range(0, len(rows), self.batch_size):
                pixels = torch.stack(self._images[start:start + self.batch_size]).to(self.task.device)
                out = self.task.features(pixels, None)
                for t in self.heads:
                    parts[t.name].append(out.summary[t.name].float().cpu())
        return {name: torch.cat(p) for name, p in parts.items()}


def evaluators_for(cfg: TrainConfig, task: DistillTask, cache: Cache, heldout: np.ndarray,
                   pictures: Path) -> list[Evaluator]:
    """The evaluators a run's config asks for: held-out losses (when rows are held out), kNN
    (``eval.knn``), pictures into folder ``pictures`` (``eval.pictures``, of the first held-out row)."""
    found: list[Evaluator] = [HeldoutLosses(task, heldout, cfg)] if len(heldout) else []
    if cfg.eval.knn:
        found.append(Knn(task, cache, cfg))
    if cfg.eval.pictures and len(heldout):
        row = int(heldout[0])
        found.append(Pictures(task, row, cfg, pictures, cache.manifest.column("image_id")[row].as_py()))
    return found
