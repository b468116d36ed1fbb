"""Open-set answers: how far an image is from the model's training images, and ``unknown`` beyond a threshold.

A classifier always answers with one of its classes, even for a cat photo shown to an emoji model. Every trained
run therefore keeps a *feature bank*: the L2-normalised pre-logit features (what the classifier head sees) of its
training images, at most :data:`MAX_BANK_ROWS` rows, float16 (``ood_bank.safetensors``). An image's score is the
cosine distance from its features to the nearest row of the bank (:func:`nn_distance`); above the run's threshold
it is ``unknown`` (the closest class is still reported).

The threshold is conformal: the ⌈(n+1)·0.95⌉-th smallest of n calibration scores (:func:`conformal_threshold`),
so about 95% of images like the calibration images pass. Calibration images are the validation images scored
against the training bank; for a linear run whose head was refitted on every image (the validation images are in
the bank) they are the bank's own rows, each scored leave-one-out. ``ood.json`` records the score's name, the
threshold, the quantile, n, the feature dimension, how it was calibrated and the calibration scores (the Evaluate
page draws them and moves the threshold: :func:`with_threshold`).

Why this score (``benchmarks/openset.py``, README): on the emoji sample against Fashion-MNIST images it separates
the two at AUROC 0.996, while energy, max-logit and max-softmax let nearly every Fashion image through.

Numpy only (no torch): the app's server reads ``ood.json`` through :class:`tl_core.runs.files.RunFiles`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["SCORE", "VERSION", "COVERAGE", "MAX_BANK_ROWS", "OpenSet", "normalise", "nn_distance",
           "conformal_threshold", "bank_indices", "build_open_set", "flagged_share", "with_threshold",
           "open_set_fields", "set_threshold", "describe", "UNKNOWN_NOTE"]

#: The score's name in ``ood.json``.
SCORE = "knn-cosine"
#: ``ood.json`` version this module writes and reads.
VERSION = 1
#: Share of in-distribution images the default threshold lets pass.
COVERAGE = 0.95
#: Rows of the feature bank at most (subsampled evenly per class above it).
MAX_BANK_ROWS = 2048
#: What a prediction says when the model predates open-set scores.
UNKNOWN_NOTE = ("This model was trained before open-set scores existed, so it cannot say when an image is unlike "
                "its training images; train it again to get them.")


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def nn_distance(feats: np.ndarray, bank: np.ndarray, exclude_self: bool = False, chunk: int = 1024) -> np.ndarray:
    """Cosine distance (1 - cosine similarity) from each row of ``feats`` to its nearest row of ``bank``.

    Args:
        feats: (N, D) features (normalised here).
        bank: (M, D) bank rows, already L2-normalised (any float dtype).
        exclude_self: ``feats`` are the bank itself: row i is not compared with bank row i (leave-one-out).
        chunk: rows per matrix product (bounds memory).
    Returns:
        float64 (N,), in [0, 2].
    """
    f = normalise(feats)
    b = np.asarray(bank, dtype=np.float32)
    if len(f) == 0 or len(b) == 0:
        return np.full(len(f), np.nan if len(b) == 0 else 0.0)
    out = np.empty(len(f), dtype=np.float64)
    for s in range(0, len(f), chunk):
        sim = f[s:s + chunk] @ b.T
        if exclude_self:
            r = np.arange(s, min(s + chunk, len(f)))
            sim[r - s, r] = -np.inf
        out[s:s + chunk] = 1.0 - sim.max(axis=1)
    return np.clip(out, 0.0, 2.0)


def conformal_threshold(scores: Sequence[float], coverage: float = COVERAGE) -> float:
    """The ⌈(n+1)·coverage⌉-th smallest score: a new image like the calibration ones passes with probability
    at least ``coverage`` (split conformal). With too few scores for that rank (n < coverage/(1-coverage)) the
    largest score is used, which lets slightly fewer pass than promised.

    Raises:
        ValueError: no scores.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("no calibration scores")
    k = math.ceil((len(s) + 1) * coverage)
    return float(s[min(k, len(s)) - 1])


def bank_indices(labels: Sequence[Any], max_rows: int = MAX_BANK_ROWS, seed: int = 0) -> np.ndarray:
    """Which rows keep in the bank: all of them up to ``max_rows``, otherwise as many per class as fit
    (classes smaller than their share give the rest to the others), chosen at random with ``seed``."""
    labels = np.asarray(labels)
    n = len(labels)
    if n <= max_rows:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    groups = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    take = [0] * len(groups)
    left = max_rows
    open_ = sorted(range(len(groups)), key=lambda g: len(groups[g]))  # smallest class first
    while open_:
        share = left // len(open_)
        if len(groups[open_[0]]) <= share:  # the smallest class fits whole; the rest share what is left
            g = open_.pop(0)
            take[g] = len(groups[g])
            left -= take[g]
            continue
        for i, g in enumerate(open_):  # none fits whole: an even share each, the remainder one by one
            take[g] = share + (1 if i < left - share * len(open_) else 0)
        break
    return np.sort(np.concatenate([grp[:t] for grp, t in zip(groups, take)]))


def flagged_share(scores: Sequence[float], threshold: float) -> float:
    """Share of ``scores`` above ``threshold`` (the images called unknown)."""
    s = np.asarray(scores, dtype=np.float64)
    return float((s > threshold).mean()) if len(s) else 0.0


def build_open_set(bank_feats: np.ndarray, calibration_feats: np.ndarray | None = None,
                   coverage: float = COVERAGE) -> tuple[dict[str, Any], np.ndarray]:
    """The ``ood.json`` record and the float16 bank of a trained model.

    Args:
        bank_feats: (M, D) pre-logit features of the training images to keep (already subsampled with
            :func:`bank_indices`).
        calibration_feats: features of held-out images (validation) to set the threshold on; None, or fewer than
            two rows, scores the bank's own rows leave-one-out instead (a head fitted on every image).
        coverage: share of calibration images the threshold lets pass.
    Returns:
        (record, bank as float16 (M, D), L2-normalised).
    Raises:
        ValueError: fewer than two bank rows (no leave-one-out score exists).
    """
    bank = normalise(bank_feats).astype(np.float16)
    if len(bank) < 2:
        raise ValueError("an open-set bank needs at least two training images")
    if calibration_feats is not None and len(calibration_feats) >= 2:
        scores, how = nn_distance(calibration_feats, bank), "validation"
    else:
        scores, how = nn_distance(bank, bank, exclude_self=True), "leave-one-out"
    record = {"score": SCORE, "version": VERSION, "threshold": conformal_threshold(scores, coverage),
              "quantile": coverage, "n": int(len(scores)), "dim": int(bank.shape[1]), "bank_rows": int(len(bank)),
              "calibration": how, "calibration_scores": [round(float(v), 6) for v in scores]}
    return record, bank


def with_threshold(record: dict[str, Any], threshold: float) -> dict[str, Any]:
    """The record with a threshold a person chose: ``quantile`` becomes the share of calibration images that
    pass it, and ``chosen`` says it was set by hand."""
    t = float(threshold)
    if not math.isfinite(t) or not 0.0 <= t <= 2.0:
        raise ValueError(f"threshold {threshold!r} must be a cosine distance between 0 and 2")
    scores = record.get("calibration_scores") or []
    return {**record, "threshold": t, "quantile": round(1.0 - flagged_share(scores, t), 6) if scores else None,
            "chosen": "by hand"}


@dataclass(frozen=True)
class OpenSet:
    """A loaded bank and its record: scores features and says which are unknown."""

    bank: np.ndarray  # (M, D) float16, L2-normalised
    record: dict[str, Any]

    @property
    def threshold(self) -> float:
        return float(self.record["threshold"])

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    def score(self, feats: np.ndarray) -> np.ndarray:
        """Cosine distance of each row of ``feats`` (pre-logit features) to the nearest training image."""
        return nn_distance(feats, self.bank)

    def unknown(self, scores: np.ndarray) -> np.ndarray:
        """True where a score is above the threshold."""
        return np.asarray(scores) > self.threshold


def describe(record: dict[str, Any] | None) -> str:
    """What the threshold means, in plain words (model card, HTML report)."""
    if record is None:
        return UNKNOWN_NOTE
    what = ("training images, each compared with the others (leave-one-out: the head was fitted on every image)"
            if record.get("calibration") == "leave-one-out" else "validation images")
    q = record.get("quantile")
    how = (f"It was chosen by hand; {q:.0%} of the {record.get('n')} {what} pass it." if record.get("chosen") else
           f"It is the conformal {q:.0%} threshold, set on {record.get('n')} {what}: about {q:.0%} of new images "
           "like the training images pass it, so about 1 in 20 of them is flagged by mistake.")
    return (f"Every prediction also gives `ood_score`, the cosine distance between the image's features (what the "
            f"classifier sees) and the nearest of {record.get('bank_rows')} training images (`ood_bank.safetensors`). "
            f"Above {float(record['threshold']):.3f} the image is called `unknown`, unlike the training images; the "
            f"closest class is still given. {how} Images unlike anything in the training set (another kind of "
            "picture, another subject) are flagged; an image of a known kind that simply belongs to none of the "
            "classes may not be.")


def open_set_fields(score: float | None, open_set: OpenSet | None) -> dict[str, Any]:
    """The ``unknown`` and ``ood_score`` fields of one prediction row (both None without open-set files)."""
    if open_set is None or score is None:
        return {"unknown": None, "ood_score": None}
    return {"unknown": bool(score > open_set.threshold), "ood_score": round(float(score), 6)}


def set_threshold(run_dir: Any, threshold: float) -> dict[str, Any]:
    """Save a threshold chosen by a person in a run's ``ood.json`` (through its owner, atomically).

    Returns:
        The new record (without the calibration scores).
    Raises:
        RunError: the run has no open-set files (trained before them).
        ConfigError: the threshold is not a distance between 0 and 2.
    """
    from ..errors import ConfigError, RunError
    from ..runs.files import RunFiles

    files = RunFiles(run_dir)
    record = files.open_set_record()
    if record is None:
        raise RunError(UNKNOWN_NOTE)
    try:
        new = with_threshold(record, threshold)
    except ValueError as e:
        raise ConfigError(f"Cannot use that threshold: {e}.") from None
    files.write_open_set(new)
    return {k: v for k, v in new.items() if k != "calibration_scores"}
