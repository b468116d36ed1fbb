"""Splits: the stratified, seeded train / validation split of a dataset, and seeded per-class samples."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .intake import Dataset, ImageItem

__all__ = ["Split", "split_dataset", "iterative_split", "sample_items"]


@dataclass
class Split:
    """Train / validation / (optional) test lists of one dataset."""

    train: list[ImageItem]
    val: list[ImageItem]
    test: list[ImageItem]


def split_dataset(ds: Dataset, val_split: float = 0.2, seed: int = 0,
                  max_per_class: int | None = None) -> Split:
    """Stratified, seeded train/validation split (a folder layout's own split is respected).

    Every class keeps at least one training and one validation image. A multi-label dataset is split by
    iterative stratification (:func:`iterative_split`).
    """
    if ds.multi_label:
        return iterative_split(ds, val_split, seed, max_per_class)
    rng = random.Random(seed)
    test = [i for i in ds.items if i.split == "test"]
    given_val = [i for i in ds.items if i.split == "val"]
    pool = [i for i in ds.items if i.split in (None, "train")]
    train: list[ImageItem] = []
    val: list[ImageItem] = list(given_val)
    by_class: dict[str, list[ImageItem]] = {}
    for item in sorted(pool, key=lambda i: (i.label, i.sha256, str(i.path))):
        by_class.setdefault(item.label, []).append(item)
    val_classes = {i.label for i in given_val}
    for label, group in by_class.items():
        rng.shuffle(group)
        if label in val_classes:
            tr = group
        else:
            n_val = min(max(1, round(len(group) * val_split)), len(group) - 1)
            val += group[:n_val]
            tr = group[n_val:]
        if max_per_class:
            tr = tr[:max_per_class]
        train += tr
    return Split(train=train, val=val, test=test)



def sample_items(items: Sequence[ImageItem], max_per_class: int | None, seed: int = 0) -> list[ImageItem]:
    """A seeded, stratified subsample of at most ``max_per_class`` images per class (order kept).

    Args:
        items: the images.
        max_per_class: cap per class; None keeps everything.
        seed: which images are drawn.
    Returns:
        The kept items in their original order.
    """
    if not max_per_class:
        return list(items)
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i in sorted(range(len(items)), key=lambda i: (items[i].label, items[i].sha256, str(items[i].path))):
        by_class.setdefault(items[i].label, []).append(i)
    keep: set[int] = set()
    for idx in by_class.values():
        rng.shuffle(idx)
        keep.update(idx[:max_per_class])
    return [it for n, it in enumerate(items) if n in keep]



def iterative_split(ds: Dataset, val_split: float = 0.2, seed: int = 0,
                    max_per_class: int | None = None) -> Split:
    """Train/validation split of a multi-label dataset by iterative stratification (Sechidis, Tsoumakas and
    Vlahavas, ECML PKDD 2011, Algorithm 1), seeded.

    Each subset wants its share of every label's images. The rarest label still to place goes first: each of
    its images joins the subset that wants that label most (ties: the subset that wants the most images, then
    at random), and the wants go down by every label the image carries. Afterwards every label keeps at least
    one training image (moved back from validation if needed) and, where it has two or more images, one
    validation image. ``max_per_class`` then caps the training images per label greedily (an image is kept
    while one of its labels is under the cap).
    """
    rng = random.Random(seed)
    test = [i for i in ds.items if i.split == "test"]
    pool = sorted((i for i in ds.items if i.split != "test"), key=lambda i: (i.label, i.sha256, str(i.path)))
    rng.shuffle(pool)
    ratios = {"val": val_split, "train": 1.0 - val_split}
    want_n = {k: r * len(pool) for k, r in ratios.items()}
    count = {lab: 0 for lab in ds.classes}
    for it in pool:
        for lab in it.labels:
            count[lab] += 1
    want = {k: {lab: r * n for lab, n in count.items()} for k, r in ratios.items()}
    left = {lab: [i for i, it in enumerate(pool) if lab in it.labels] for lab in ds.classes}
    where: dict[int, str] = {}
    while len(where) < len(pool):
        open_labels = [lab for lab in ds.classes if any(i not in where for i in left[lab])]
        if not open_labels:  # images without labels: by the overall wants
            for i in range(len(pool)):
                if i not in where:
                    k = max(ratios, key=lambda k: (want_n[k], rng.random()))
                    where[i] = k
                    want_n[k] -= 1
            break
        lab = min(open_labels, key=lambda x: (sum(1 for i in left[x] if i not in where), x))
        for i in left[lab]:
            if i in where:
                continue
            k = max(ratios, key=lambda k: (want[k][lab], want_n[k], rng.random()))
            where[i] = k
            want_n[k] -= 1
            for x in pool[i].labels:
                want[k][x] -= 1
    # every label on at least one training image, and on one validation image where it has two or more
    for lab in ds.classes:
        idx = left[lab]
        if idx and not any(where[i] == "train" for i in idx):
            where[min(idx, key=lambda i: len(pool[i].labels))] = "train"
    for lab in ds.classes:
        idx = left[lab]
        if len(idx) < 2 or any(where[i] == "val" for i in idx):
            continue
        for i in sorted(idx, key=lambda i: len(pool[i].labels)):
            # moving it must leave each of its labels a training image
            if all(sum(1 for j in left[x] if where[j] == "train" and j != i) for x in pool[i].labels):
                where[i] = "val"
                break
    train = [it for i, it in enumerate(pool) if where[i] == "train"]
    val = [it for i, it in enumerate(pool) if where[i] == "val"]
    if max_per_class:
        kept: list[ImageItem] = []
        per = {lab: 0 for lab in ds.classes}
        for it in train:
            if any(per[x] < max_per_class for x in it.labels):
                kept.append(it)
                for x in it.labels:
                    per[x] += 1
        train = kept
    return Split(train=train, val=val, test=test)
