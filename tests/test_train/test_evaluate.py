"""kNN evaluation, the digits set, and the student-vs-teacher pictures, on real data and real caches."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from featcache.decode import decode
from featcache.errors import UsageError
from featcache.store.location import locate
from featcache.manifest import index
from featcache.store import Cache, ViewSpec, commits, tables
from featcache.train.digits import write_digits
from featcache.train.evaluate import (knn_predict, knn_top1, labels_and_splits, split_masks, student_knn,
                                      summaries_from_cache, teacher_knn)
from featcache.train.pictures import ERROR_NAME, GREY, pca_picture
from featcache.viz import HEIGHT, LABEL, colorbar

CLASSES = 10


def clusters(n: int, dim: int = 32, spread: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points around ``CLASSES`` random unit centres, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLASSES, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, CLASSES, n)
    return (centres[y] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)).astype(np.float32), y


# ---- knn ----------------------------------------------------------------------------------------


def test_knn_separated_clusters_are_all_right():
    x, y = clusters(800)
    assert knn_top1(x[:600], y[:600], x[600:], y[600:]) == 1.0


def test_knn_shuffled_labels_are_near_chance():
    x, y = clusters(2000)
    shuffled = np.random.default_rng(1).permutation(y[:1500])
    assert knn_top1(x[:1500], shuffled, x[1500:], y[1500:]) < 0.3


def brute_force(train_x, train_y, test_x, k: int, temperature: float) -> np.ndarray:
    """The weighted kNN vote written out row by row in float64."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    preds = []
    for sim in b.astype(np.float64) @ a.T.astype(np.float64):
        votes: dict[int, float] = {}
        for j in np.argsort(-sim)[:k]:
            votes[int(train_y[j])] = votes.get(int(train_y[j]), 0.0) + np.exp(sim[j] / temperature)
        preds.append(max(votes, key=votes.get))
    return np.array(preds)


@pytest.mark.parametrize("k", [1, 7])
def test_knn_matches_brute_force_on_random_data(k):
    rng = np.random.default_rng(k)
    train_x, test_x = rng.standard_normal((300, 16)), rng.standard_normal((120, 16))
    train_y = rng.integers(3, 8, 300)  # labels that do not start at 0
    pred = knn_predict(train_x.astype(np.float32), train_y, test_x.astype(np.float32), k=k).numpy()
    np.testing.assert_array_equal(pred, brute_force(train_x, train_y, test_x, k, 0.07))


def test_knn_clips_k_and_batches_queries(monkeypatch):
    x, y = clusters(300)
    full = knn_predict(x[:200], y[:200], x[200:], k=10_000)  # k > rows: every row votes
    monkeypatch.setattr("featcache.train.evaluate.QUERY_ELEMENTS", 200 * 7)  # 7 query rows per batch
    np.testing.assert_array_equal(knn_predict(x[:200], y[:200], x[200:], k=10_000), full)
    np.testing.assert_array_equal(full, brute_force(x[:200], y[:200], x[200:], 200, 0.07))


# ---- digits ---------------------------------------------------------------------------------------


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_write_digits_all(tmp_path):
    rows = read_csv(write_digits(tmp_path))
    target = load_digits().target
    assert len(rows) == 1797
    for label in range(CLASSES):
        split = [r["split"] for r in rows if int(r["label"]) == label]
        assert split.count("test") == np.sum(target == label) // 4  # stratified, 1 in 4


def test_write_digits_images_and_labels(tmp_path):
    digits = load_digits()
    rows = read_csv(write_digits(tmp_path, n_per_class=8, size=48))
    assert len(rows) == 80 and {r["split"] for r in rows} == {"train", "test"}
    assert sum(r["split"] == "test" for r in rows) == 20
    for r in rows[::7]:
        k = int(r["uri"].rsplit("/", 1)[1].removesuffix(".png"))
        img = Image.open(r["uri"])
        assert img.size == (48, 48) and img.mode == "RGB"
        assert int(r["label"]) == digits.target[k] and f"/images/{r['label']}/" in r["uri"]
        small = np.asarray(img.convert("L").resize((8, 8), Image.BOX), dtype=np.float64)
        assert np.corrcoef(small.ravel(), digits.images[k].ravel())[0, 1] > 0.9  # the digit drawn is digit k


def test_write_digits_refuses_more_than_a_class_holds(tmp_path):
    with pytest.raises(UsageError, match="n_per_class=500"):
        write_digits(tmp_path, n_per_class=500)


def test_indexed_digits_keep_label_and_split(tmp_path):
    csv_path = write_digits(tmp_path / "digits", n_per_class=5)
    index(csv_path, tmp_path / "root")
    manifest = Cache.open(tmp_path / "root").manifest
    labels, split = labels_and_splits(manifest)
    rows = read_csv(csv_path)
    assert manifest.column("uri").to_pylist() == [r["uri"] for r in rows]
    np.testing.assert_array_equal(labels, [int(r["label"]) for r in rows])
    np.testing.assert_array_equal(split, [r["split"] for r in rows])
    assert labels.dtype == np.int64


def test_student_knn_on_digits(tmp_path):
    csv_path = write_digits(tmp_path / "digits", n_per_class=40)
    index(csv_path, tmp_path / "root")
    manifest = Cache.open(tmp_path / "root").manifest
    labels, split = labels_and_splits(manifest)
    images = [decode(locate(u).read_bytes(), u) for u in manifest.column("uri").to_pylist()]

    def pooled(x: torch.Tensor) -> torch.Tensor:  # back to the 8x8 digit: a good embedding
        return F.avg_pool2d(x.float(), 8).flatten(1)

    accuracy = student_knn(pooled, images, labels, split)
    assert accuracy >= 0.85
    assert student_knn(pooled, [torch.stack(images[i:i + 33]) for i in range(0, 400, 33)], labels, split) == accuracy
    noise = torch.Generator().manual_seed(0)
    assert student_knn(lambda x: torch.randn(len(x), 16, generator=noise), images, labels, split) < 0.3


# ---- teacher knn on a real cache -------------------------------------------------------------------


def labelled_cache(root, n: int, summaries: np.ndarray, split: list[str] | None = None,
                   errors: dict[int, str] | None = None, labels: np.ndarray | None = None) -> Cache:
    """A cache of ``n`` rows whose view ``toy@32`` (shards of 64 rows) holds ``summaries``; ``labels`` (and
    ``split``) in its manifest."""
    columns = {"index": pa.array(range(n), pa.int64()), "image_id": [f"img{i}" for i in range(n)],
               "uri": [f"/data/img{i}.png" for i in range(n)], "width": pa.array([32] * n, pa.int32()),
               "height": pa.array([32] * n, pa.int32())}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    if split is not None:
        columns["split"] = split
    tables.write_table(locate(root).join(tables.MANIFEST), pa.table(columns))
    cache = Cache.open(root)
    spec = ViewSpec(key="toy@32", grid=(2, 2), channels=4, summary_channels=summaries.shape[1], input_size=(32, 32),
                    teacher={"family": "test", "source": "none"})
    view = cache.create_view(spec, shard_size=64)
    for shard in range(view.num_shards):
        start, stop = view.shard_range(shard)
        view.write_shard(start, dense=np.zeros((stop - start, 2, 2, 4)), summary=summaries[start:stop],
                         box=np.zeros((stop - start, 4)),
                         errors={i: "bad" for i in (errors or {}) if start <= i < stop})
    return cache


def one_hot_summaries(labels: np.ndarray, noise: float = 0.15, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.eye(CLASSES)[labels] + noise * rng.standard_normal((len(labels), CLASSES))


def test_teacher_knn_informative_summaries_skip_failed_rows(tmp_path):
    labels = np.arange(200) % CLASSES
    split = ["train"] * 150 + ["test"] * 50
    failed = {i: "bad" for i in range(150, 170)}  # zeros if read: ~chance on 20 of 50 test rows
    cache = labelled_cache(tmp_path / "c", 200, one_hot_summaries(labels), split, failed, labels)
    assert teacher_knn(cache, "toy@32") >= 0.9
    assert teacher_knn(str(tmp_path / "c"), "toy@32", k=5) >= 0.9  # a root works too


def test_teacher_knn_without_split_column_uses_index_split(tmp_path):
    labels = np.random.default_rng(3).integers(0, CLASSES, 200)
    cache = labelled_cache(tmp_path / "c", 200, one_hot_summaries(labels), labels=labels)
    assert teacher_knn(cache, "toy@32") >= 0.9


def test_split_masks():
    train, test = split_masks(None, 8)
    assert test.tolist() == [False, False, False, True] * 2 and (train == ~test).all()
    train, test = split_masks(np.array(["train", "test", "val", "train", ""]), 5)
    assert train.tolist() == [True, False, False, True, False] and (test == ~train).all()


def test_teacher_knn_random_summaries_are_near_chance(tmp_path):
    labels = np.arange(400) % CLASSES
    summaries = np.random.default_rng(0).standard_normal((400, CLASSES))
    cache = labelled_cache(tmp_path / "c", 400, summaries, labels=labels)
    assert teacher_knn(cache, "toy@32") < 0.3


def test_summaries_from_cache_reads_rows_in_order(tmp_path):
    labels = np.arange(100) % CLASSES
    summaries = one_hot_summaries(labels)
    cache = labelled_cache(tmp_path / "c", 100, summaries, errors={7: "bad"}, labels=labels)
    with cache.view("toy@32").reader() as reader:
        rows = [70, 3, 99, 64]
        got = summaries_from_cache(reader, rows)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, summaries[rows].astype(np.float16).astype(np.float32))
        with pytest.raises(UsageError, match=r"rows \[7\]"):  # failed at extraction
            summaries_from_cache(reader, [6, 7])
        with pytest.raises(UsageError, match="out of range"):
            summaries_from_cache(reader, [100])


def test_teacher_knn_skips_uncommitted_shards(tmp_path):
    labels = np.arange(128) // 2 % CLASSES  # each label in both splits
    summaries = one_hot_summaries(labels)
    summaries[64:] = 0  # zeros would score near chance on half the test rows
    split = ["train" if i % 2 else "test" for i in range(128)]
    cache = labelled_cache(tmp_path / "c", 128, summaries, split, labels=labels)
    commits.remove_commit(cache.root, "toy@32", 1)  # written, marker gone: as after a writer killed mid-commit
    assert teacher_knn(cache, "toy@32") == 1.0
    with cache.view("toy@32").reader() as reader, pytest.raises(UsageError, match=r"rows \[64\]"):
        summaries_from_cache(reader, [64])


def test_teacher_knn_needs_a_label_column(tmp_path):
    cache = labelled_cache(tmp_path / "c", 64, np.ones((64, CLASSES)))
    with pytest.raises(UsageError, match="^the evaluation set needs a 'label' column in its manifest$"):
        teacher_knn(cache, "toy@32")


def test_text_labels_become_codes():
    labels, split = labels_and_splits(pa.table({"label": ["cat", "dog", "cat", "ant"]}))
    assert labels.tolist() == [1, 2, 1, 0] and split is None


# ---- pictures ------------------------------------------------------------------------------------

H, W = 4, 8  # grid: each cell is 64x64 pixels of a panel (HEIGHT = 256)
PANEL = round(HEIGHT * W / H)
GAP = 4


def cell_pixel(picture: np.ndarray, panel: int, r: int, c: int, top: int = 0) -> np.ndarray:
    """The RGB at the centre of cell (r, c) of the ``panel``-th feature panel (no image panel)."""
    cell = HEIGHT // H
    return picture[top + LABEL + r * cell + cell // 2, panel * (PANEL + GAP) + c * cell + cell // 2]


def features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((H, W, 16)).astype(np.float32)


def test_identical_features_give_equal_panels_and_zero_error(tmp_path):
    teacher = features()
    omega = np.ones((H, W), bool)
    omega[0, 0] = False
    path, err = pca_picture(teacher.copy(), teacher, omega, tmp_path / "p.png")
    picture = np.asarray(Image.open(path))
    bar = colorbar(0.0, ERROR_NAME, clipped=False)
    assert picture.shape == (HEIGHT + LABEL, 3 * (PANEL + GAP) + bar.width, 3)
    assert np.isnan(err[0, 0]) and (err[omega] == 0).all()
    body = slice(LABEL, LABEL + HEIGHT)
    teacher_px, student_px = (picture[body, p * (PANEL + GAP):p * (PANEL + GAP) + PANEL] for p in (0, 1))
    np.testing.assert_array_equal(teacher_px, student_px)
    inside = teacher_px[~(teacher_px == GREY).all(axis=-1)]
    assert (inside.min(axis=0) == 0).all() and (inside.max(axis=0) == 255).all()  # min/max scaling over Ω
    error_px = picture[body, 2 * (PANEL + GAP):2 * (PANEL + GAP) + PANEL]
    grey = (error_px == GREY).all(axis=-1)
    assert grey[:HEIGHT // H, :HEIGHT // H].all() and (error_px[~grey] == 0).all()  # black: zero error
    for panel in range(3):
        assert tuple(cell_pixel(picture, panel, 0, 0)) == GREY


def test_one_wrong_cell_is_the_hot_cell(tmp_path):
    teacher = features()
    student = teacher.copy()
    student[2, 5] += 3.0
    path, err = pca_picture(student, teacher, None, tmp_path / "p.png", title="one wrong cell")
    assert np.unravel_index(np.argmax(err), err.shape) == (2, 5)
    np.testing.assert_allclose(err[2, 5], 9.0, rtol=1e-5)
    picture = np.asarray(Image.open(path))
    assert picture.shape[0] == HEIGHT + 2 * LABEL  # the title line
    assert tuple(cell_pixel(picture, 2, 2, 5, top=LABEL)) == (255, 255, 0)  # the heatmap's top colour
    assert tuple(cell_pixel(picture, 2, 1, 1, top=LABEL)) == (0, 0, 0)


def test_student_uses_the_teachers_components_and_scale(tmp_path):
    teacher = features()
    mean = teacher.reshape(-1, 16).mean(axis=0)
    shrunk = mean + 0.3 * (teacher - mean)  # its own PCA with its own min/max would look the same
    path, _ = pca_picture(shrunk, teacher, None, tmp_path / "p.png")
    picture = np.asarray(Image.open(path)).astype(np.float64)
    body = slice(LABEL, LABEL + HEIGHT)
    spread = [picture[body, p * (PANEL + GAP):p * (PANEL + GAP) + PANEL].reshape(-1, 3).std(axis=0)
              for p in (0, 1)]
    np.testing.assert_allclose(spread[1], 0.3 * spread[0], rtol=0.05)


def test_pca_is_fitted_on_omega_only(tmp_path):
    teacher = features()
    omega = np.ones((H, W), bool)
    omega[3, 7] = False
    outlier = teacher.copy()
    outlier[3, 7] = 1e4  # outside Ω: must not move the components or the colour scale
    a = np.asarray(Image.open(pca_picture(teacher, teacher, omega, tmp_path / "a.png")[0]))
    b = np.asarray(Image.open(pca_picture(outlier, outlier, omega, tmp_path / "b.png")[0]))
    np.testing.assert_array_equal(a, b)


def test_image_panel_and_shape_checks(tmp_path):
    teacher = features()
    image = np.random.default_rng(0).integers(0, 255, (120, 240, 3), dtype=np.uint8)
    path, _ = pca_picture(teacher, teacher, None, tmp_path / "sub" / "p.png", image=image)
    bar = colorbar(0.0, ERROR_NAME, clipped=False)
    assert Image.open(path).size == (round(HEIGHT * 240 / 120) + GAP + 3 * (PANEL + GAP) + bar.width, HEIGHT + LABEL)
    with pytest.raises(UsageError, match="omega"):
        pca_picture(teacher, teacher, np.ones((H, W + 1), bool), tmp_path / "x.png")
    with pytest.raises(UsageError, match="student"):
        pca_picture(teacher[:, :4], teacher, None, tmp_path / "x.png")
