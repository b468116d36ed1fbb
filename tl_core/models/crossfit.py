"""Out-of-fold estimates on cached features: the k-fold cross-validated accuracy of the linear probe on every
labelled image (a small set's steadiest figure), and out-of-fold probabilities of the training images, on which
a multi-label run chooses its per-label thresholds (so that the images its figures are reported on choose
nothing).

Each fold is the same L-BFGS probe as the run's (:mod:`tl_core.models.probe`, the same C and feature variant),
fitted on the other folds. The features are already extracted: k fits of a logistic regression.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import torch

from ..config import TrainConfig
from ..metrics import wilson_interval
from .probe import fit_linear_head, fit_ovr_head

__all__ = ["MAX_FOLDS", "stratified_folds", "multilabel_folds", "cross_validated_accuracy", "out_of_fold_probs"]

#: folds of every out-of-fold estimate (fewer where the smallest class has fewer images)
MAX_FOLDS = 5


def stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number (0..k-1) of each image: each class dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), np.int64)
    start = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        fold_of[idx] = (np.arange(len(idx)) + start) % k  # classes continue where the last one stopped
        start += len(idx)
    return fold_of


def multilabel_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold number of each image of a (N, C) label matrix: images dealt round-robin, those of the rarest labels
    first (shuffled within), so that each label's positives spread over the folds."""
    rng = np.random.default_rng(seed)
    freq = y.sum(0)
    rarest = np.where(y.any(1), np.where(y > 0, freq[None, :], np.inf).min(1), np.inf)
    order = np.lexsort((rng.random(len(y)), rarest))
    fold_of = np.empty(len(y), np.int64)
    fold_of[order] = np.arange(len(y)) % k
    return fold_of


def _probe_cfg(cfg: TrainConfig) -> TrainConfig:
    return dataclasses.replace(cfg, epochs=max(int(cfg.epochs or 0), 100))


def cross_validated_accuracy(feats: np.ndarray, y: np.ndarray, n_classes: int, cfg: TrainConfig,
                             should_cancel: Callable[[], bool] | None = None) -> dict[str, Any] | None:
    """k-fold cross-validated accuracy of the linear probe on these images (stratified, seeded by ``cfg.seed``).

    Args:
        feats: (N, D) features as the probe sees them (the run's variant applied).
        y: N class indices.
        cfg: the run's config (its ``linear_c`` is the C used; ``class_balance`` as in the run; ``seed`` deals
            the folds).
    Returns:
        {"accuracy", "accuracy_ci" (Wilson over the N out-of-fold predictions), "correct", "count", "folds",
        "seconds"}; None where a class has fewer than two images (nothing to cross-validate).
    """
    t0 = time.perf_counter()
    y = np.asarray(y, np.int64)
    present = np.bincount(y, minlength=n_classes)
    k = int(min(MAX_FOLDS, present[present > 0].min())) if len(y) else 0
    if k < 2:
        return None
    fold_of = stratified_folds(y, k, cfg.seed)
    pred = np.empty(len(y), np.int64)
    pcfg = _probe_cfg(cfg)
    for f in range(k):
        tr, te = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
        head, _ = fit_linear_head(feats[tr], y[tr], feats[:0], y[:0], n_classes, pcfg, should_cancel=should_cancel)
        with torch.no_grad():
            pred[te] = head(torch.from_numpy(np.ascontiguousarray(feats[te], np.float32))).argmax(1).numpy()
    correct = int((pred == y).sum())
    return {"accuracy": round(correct / len(y), 6), "accuracy_ci": wilson_interval(correct, len(y)),
            "correct": correct, "count": int(len(y)), "folds": k, "seconds": round(time.perf_counter() - t0, 3)}


def out_of_fold_probs(feats: np.ndarray, y: np.ndarray, cfg: TrainConfig,
                      should_cancel: Callable[[], bool] | None = None) -> np.ndarray | None:
    """Out-of-fold per-label probabilities of a multi-label probe (one-vs-rest, the run's C) on these images.

    Args:
        feats: (N, D) features.
        y: (N, C) 0/1 label matrix.
    Returns:
        (N, C) probabilities, each from a probe fitted without that image; None for fewer than 4 images.
    """
    y = np.asarray(y, np.int64)
    k = min(MAX_FOLDS, len(y) // 2)
    if k < 2:
        return None
    fold_of = multilabel_folds(y, k, cfg.seed)
    out = np.zeros(y.shape, np.float64)
    pcfg = _probe_cfg(cfg)
    for f in range(k):
        tr, te = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
        head, _ = fit_ovr_head(feats[tr], y[tr], feats[:0], y[:0], pcfg, should_cancel=should_cancel)
        with torch.no_grad():
            z = head(torch.from_numpy(np.ascontiguousarray(feats[te], np.float32))).double().numpy()
        out[te] = 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))
    return out
