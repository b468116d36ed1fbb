"""Splits: the stratified, seeded train / validation split of a dataset, and seeded per-class samples."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .intake import Dataset, ImageItem

__all__ = ["Split", "split_dataset", "sample_items"]


@dataclass
class Split:
    """Train / validation / (optional) test lists of one dataset."""

    train: list[ImageItem]
    val: list[ImageItem]
    test: list[ImageItem]


def split_dataset(ds: Dataset, val_split: float = 0.2, seed: int = 0,
                  max_per_class: int | None = None) -> Split:
    """Stratified, seeded train/validation split (a folder layout's own split is respected).

    Every class keeps at least one training and one validation image.
    """
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

