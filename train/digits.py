"""A small labelled image set that ships offline: scikit-learn's digits (UCI optdigits, 8×8, 16 grey levels).

``write_digits(folder)`` renders them as RGB PNGs and writes ``folder/digits.csv`` (uri, label, split), a
list that ``featcache index folder/digits.csv --out ROOT`` turns into a labelled manifest for the kNN
evaluations of :mod:`featcache.train.evaluate`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from featcache.errors import UsageError

CSV = "digits.csv"
TEST_EVERY = 4  # within each class, every 4th image (in the seeded order) is a test image


def choose_split(targets: np.ndarray, n_per_class: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dataset indices to write (sorted) and whether each is a test image: per class, a seeded
    permutation, its first ``n_per_class``, every ``TEST_EVERY``-th of them to test (stratified)."""
    rng = np.random.default_rng(seed)
    smallest = int(np.bincount(targets).min())
    if n_per_class is not None and not 1 <= n_per_class <= smallest:
        raise UsageError(f"n_per_class={n_per_class}: the digits have {smallest} to "
                         f"{int(np.bincount(targets).max())} images per class; use 1..{smallest} or None (all)")
    chosen, test = [], []
    for label in np.unique(targets):
        order = rng.permutation(np.flatnonzero(targets == label))[:n_per_class]
        chosen.append(order)
        test.append(np.arange(len(order)) % TEST_EVERY == TEST_EVERY - 1)
    chosen, test = np.concatenate(chosen), np.concatenate(test)
    keep = np.argsort(chosen)
    return chosen[keep], test[keep]


def render(digit: np.ndarray, size: int) -> Image.Image:
    """One 8×8 digit (values 0..16) as a ``size``×``size`` RGB image, upscaled bilinearly."""
    grey = Image.fromarray(np.round(digit * (255 / 16)).astype(np.uint8))  # mode "L"
    return grey.resize((size, size), Image.BILINEAR).convert("RGB")


def write_digits(folder, n_per_class: int | None = None, size: int = 64, seed: int = 0) -> Path:
    """Write the digits as ``folder/images/<label>/<k>.png`` (``k``: the index in ``load_digits``) and
    ``folder/digits.csv`` (uri absolute, label, split "train"/"test"); returns the csv's path."""
    if size < 8:
        raise UsageError(f"size={size}: the images must be at least 8 pixels (the digits are 8×8)")
    folder = Path(folder).absolute()
    digits = load_digits()
    chosen, test = choose_split(digits.target, n_per_class, seed)
    rows = []
    for k, is_test in zip(chosen, test):
        label = int(digits.target[k])
        path = folder / "images" / str(label) / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        render(digits.images[k], size).save(path, compress_level=1)  # fast; a few KB each
        rows.append((str(path), label, "test" if is_test else "train"))
    out = folder / CSV
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("uri", "label", "split"))
        writer.writerows(rows)
    return out
