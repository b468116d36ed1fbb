"""Splits: the stratified, seeded train / validation split of a dataset, and seeded per-class samples."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .intake import Dataset, ImageItem

__all__ = ["Split", "split_dataset", "iterative_split", "duplicate_groups", "sample_items"]


@dataclass
class Split:
    """Train / validation / (optional) test lists of one dataset."""

    train: list[ImageItem]
    val: list[ImageItem]
    test: list[ImageItem]


def duplicate_groups(items: Sequence[ImageItem]) -> list[list[ImageItem]]:
    """The images grouped by content (``sha256``; an image without one is its own group), in the order of
    each group's first image: exact duplicates, which must land on the same side of every split (a copy on
    each side would let the model be graded on an image it learnt).

    Near-duplicates (a re-saved or resized copy) are not grouped: nothing cheap at split time tells them
    apart (the audit finds them on features).
    """
    groups: dict[str, list[ImageItem]] = {}
    for it in items:
        groups.setdefault(it.sha256 or f"path:{it.path}", []).append(it)
    return list(groups.values())


def _carve_single(pool: list[ImageItem], share: float, rng: random.Random,
                  keep: set[str] | frozenset[str] = frozenset()) -> tuple[list[ImageItem], list[ImageItem]]:
    """Stratified, seeded, duplicate-aware carve of ``share`` of each class's images out of ``pool``.

    Each class's duplicate groups (a group belongs to the class of its first image, in the sorted order) are
    shuffled and taken in that order while they fit the class's share (the first always; a group that would
    overshoot is passed over for a smaller one further on; never every group: every class keeps an image on
    the rest side, and a class with one group keeps it all there). Classes in
    ``keep`` give nothing. With no duplicates this is the plain per-class shuffle.

    Returns:
        (rest, carved)
    """
    by_class: dict[str, list[list[ImageItem]]] = {}
    for g in duplicate_groups(sorted(pool, key=lambda i: (i.label, i.sha256, str(i.path)))):
        by_class.setdefault(g[0].label, []).append(g)
    rest: list[ImageItem] = []
    carved: list[ImageItem] = []
    for label, groups in by_class.items():
        rng.shuffle(groups)
        if label in keep or len(groups) < 2:
            rest += [i for g in groups for i in g]
            continue
        n_images = sum(len(g) for g in groups)
        want = min(max(1, round(n_images * share)), n_images - 1)
        take, n = [], 0
        for k, g in enumerate(groups):
            if n >= want:
                break
            if n and n + len(g) > want:  # a group that would overshoot: a smaller one further on may fit
                continue
            take.append(k)
            n += len(g)
        if len(take) == len(groups):  # never all of them
            take.pop()
        chosen = set(take)
        carved += [i for k, g in enumerate(groups) if k in chosen for i in g]
        rest += [i for k, g in enumerate(groups) if k not in chosen for i in g]
    return rest, carved


def split_dataset(ds: Dataset, val_split: float = 0.2, seed: int = 0,
                  max_per_class: int | None = None, test_split: float = 0.0) -> Split:
    """Stratified, seeded train/validation(/test) split (a folder layout's own split is respected).

    Every class keeps at least one training and (where it has two distinct images) one validation image.
    Exact duplicates (:func:`duplicate_groups`) always land in the same part. ``test_split`` > 0 first carves
    that share of each class as a locked test part (the same rules; its own seed stream, so the validation
    images drawn from the rest are unaffected by anything but the rest); only where the data has no test part
    of its own. A multi-label dataset is split by iterative stratification (:func:`iterative_split`).
    """
    if ds.multi_label:
        return iterative_split(ds, val_split, seed, max_per_class, test_split)
    rng = random.Random(seed)
    test = [i for i in ds.items if i.split == "test"]
    given_val = [i for i in ds.items if i.split == "val"]
    pool = [i for i in ds.items if i.split in (None, "train")]
    if test_split > 0 and not test:
        pool, test = _carve_single(pool, test_split, random.Random(f"test:{seed}"))
    val_classes = {i.label for i in given_val}
    rest, val = _carve_single(pool, val_split, rng, keep=val_classes)
    train: list[ImageItem] = []
    if max_per_class:
        per: dict[str, int] = {}
        for it in rest:
            if per.get(it.label, 0) < max_per_class:
                train.append(it)
                per[it.label] = per.get(it.label, 0) + 1
    else:
        train = rest
    return Split(train=train, val=list(given_val) + val, test=test)



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



def _iterative_assign(pool: list[ImageItem], classes: Sequence[str], val_split: float,
                      rng: random.Random) -> dict[int, str]:
    """Iterative stratification of ``pool`` (already shuffled) into "train" / "val": index -> side."""
    ratios = {"val": val_split, "train": 1.0 - val_split}
    want_n = {k: r * len(pool) for k, r in ratios.items()}
    count = {lab: 0 for lab in classes}
    for it in pool:
        for lab in it.labels:
            count[lab] += 1
    want = {k: {lab: r * n for lab, n in count.items()} for k, r in ratios.items()}
    left = {lab: [i for i, it in enumerate(pool) if lab in it.labels] for lab in classes}
    where: dict[int, str] = {}
    while len(where) < len(pool):
        open_labels = [lab for lab in classes if any(i not in where for i in left[lab])]
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
    for lab in classes:
        idx = left[lab]
        if idx and not any(where[i] == "train" for i in idx):
            where[min(idx, key=lambda i: len(pool[i].labels))] = "train"
    for lab in classes:
        idx = left[lab]
        if len(idx) < 2 or any(where[i] == "val" for i in idx):
            continue
        for i in sorted(idx, key=lambda i: len(pool[i].labels)):
            # moving it must leave each of its labels a training image
            if all(sum(1 for j in left[x] if where[j] == "train" and j != i) for x in pool[i].labels):
                where[i] = "val"
                break
    return where


def _carve_multi(items: list[ImageItem], classes: Sequence[str], share: float,
                 rng: random.Random) -> tuple[list[ImageItem], list[ImageItem]]:
    """(rest, carved) of a multi-label pool: iterative stratification over one image per duplicate group, each
    group's other copies following it."""
    groups = duplicate_groups(sorted(items, key=lambda i: (i.label, i.sha256, str(i.path))))
    reps = [g[0] for g in groups]
    members = {id(g[0]): g for g in groups}
    rng.shuffle(reps)
    where = _iterative_assign(reps, classes, share, rng)
    rest = [it for i, r in enumerate(reps) if where[i] == "train" for it in members[id(r)]]
    carved = [it for i, r in enumerate(reps) if where[i] == "val" for it in members[id(r)]]
    return rest, carved


def iterative_split(ds: Dataset, val_split: float = 0.2, seed: int = 0,
                    max_per_class: int | None = None, test_split: float = 0.0) -> Split:
    """Train/validation(/test) split of a multi-label dataset by iterative stratification (Sechidis, Tsoumakas
    and Vlahavas, ECML PKDD 2011, Algorithm 1), seeded.

    Each subset wants its share of every label's images. The rarest label still to place goes first: each of
    its images joins the subset that wants that label most (ties: the subset that wants the most images, then
    at random), and the wants go down by every label the image carries. Afterwards every label keeps at least
    one training image (moved back from validation if needed) and, where it has two or more images, one
    validation image. Exact duplicates are placed as one (the first copy decides; the others follow it).
    ``test_split`` > 0 first carves a locked test part the same way (where the data has none of its own).
    ``max_per_class`` then caps the training images per label greedily (an image is kept while one of its
    labels is under the cap).
    """
    rng = random.Random(seed)
    test = [i for i in ds.items if i.split == "test"]
    pool = [i for i in ds.items if i.split != "test"]
    if test_split > 0 and not test:
        pool, test = _carve_multi(pool, ds.classes, test_split, random.Random(f"test:{seed}"))
    train, val = _carve_multi(pool, ds.classes, val_split, rng)
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
