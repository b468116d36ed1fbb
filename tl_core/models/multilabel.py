"""Multi-label classification: label sets as 0/1 matrices, sigmoid probabilities, per-label thresholds and
the metrics (per-label precision/recall/F1/support and 2x2 confusion, micro and macro F1, mean average
precision, exact-match accuracy).

Each label is its own yes/no question: the model gives one logit per label, ``sigmoid(logit / T)`` is the
probability that the image shows it, and the image is predicted to carry every label whose probability
reaches that label's threshold. Thresholds are chosen on validation images (the F1-maximising one per label,
0.5 where validation cannot tell) and saved with the run (``meta.json`` ``thresholds``).

Compute here, plot elsewhere. No torch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..data.intake import LABEL_SEPARATOR
from ..metrics import bootstrap_interval, wilson_interval

__all__ = [
    "LABEL_SEPARATOR",
    "DEFAULT_THRESHOLD",
    "sigmoid",
    "label_matrix",
    "split_labels",
    "choose_thresholds",
    "predict_sets",
    "average_precision",
    "multilabel_metrics",
    "label_confusions",
]

#: The threshold of a label that validation cannot choose one for (no positive validation image).
DEFAULT_THRESHOLD = 0.5


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Per-label probabilities sigmoid(logits / T) in float64 (numerically stable)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def split_labels(cell: str) -> list[str]:
    """The labels of a saved ``a;b`` cell (empty for an empty cell)."""
    return [x for x in str(cell).split(LABEL_SEPARATOR) if x]


def label_matrix(label_sets: Sequence[Sequence[str] | str], classes: Sequence[str]) -> np.ndarray:
    """(N, C) 0/1 matrix of label sets (each a sequence of labels or an ``a;b`` string); unknown labels ignored."""
    idx = {c: i for i, c in enumerate(classes)}
    y = np.zeros((len(label_sets), len(classes)), dtype=np.int64)
    for n, labels in enumerate(label_sets):
        for lab in (split_labels(labels) if isinstance(labels, str) else labels):
            if lab in idx:
                y[n, idx[lab]] = 1
    return y


def _f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0


def choose_thresholds(y_true: np.ndarray, probs: np.ndarray) -> list[float]:
    """Per label, the probability threshold with the highest F1 on these (validation) images.

    Candidates are the midpoints between consecutive distinct probabilities (so the choice does not sit on one
    image's exact score); ties go to the threshold nearest 0.5. A label with no positive image here keeps
    :data:`DEFAULT_THRESHOLD`.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    out = []
    for k in range(y.shape[1] if y.ndim == 2 else 0):
        yk, pk = y[:, k], p[:, k]
        if yk.sum() == 0:
            out.append(DEFAULT_THRESHOLD)
            continue
        u = np.unique(pk)
        cands = np.concatenate([[DEFAULT_THRESHOLD], (u[:-1] + u[1:]) / 2 if len(u) > 1 else u])
        best, best_t = -1.0, DEFAULT_THRESHOLD
        for t in cands:
            pred = pk >= t
            f = _f1(float((pred & (yk == 1)).sum()), float((pred & (yk == 0)).sum()), float((~pred & (yk == 1)).sum()))
            if f > best + 1e-12 or (abs(f - best) <= 1e-12 and abs(t - 0.5) < abs(best_t - 0.5)):
                best, best_t = f, float(t)
        out.append(round(best_t, 6))
    return out


def predict_sets(probs: np.ndarray, thresholds: Sequence[float] | None) -> np.ndarray:
    """(N, C) 0/1 predictions: probability at or above the label's threshold (0.5 without thresholds)."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(thresholds if thresholds is not None else [DEFAULT_THRESHOLD] * p.shape[-1], dtype=np.float64)
    return (p >= t).astype(np.int64)


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of one label (the step-wise area of scikit-learn's ``average_precision_score``):
    sum over the ranking of (recall_n - recall_{n-1}) * precision_n, tied scores taken together."""
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the end of each group of tied scores
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _counts(y: np.ndarray, pred: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per resample (rows of idx) and label: true positives, false positives, false negatives, (B, C) each."""
    tp_i = ((y == 1) & (pred == 1)).astype(np.float64)
    fp_i = ((y == 0) & (pred == 1)).astype(np.float64)
    fn_i = ((y == 1) & (pred == 0)).astype(np.float64)
    return tp_i[idx].sum(1), fp_i[idx].sum(1), fn_i[idx].sum(1)


def _micro_f1_interval(y: np.ndarray, pred: np.ndarray) -> list[float] | None:
    def stat(idx: np.ndarray) -> np.ndarray:
        tp, fp, fn = (a.sum(1) for a in _counts(y, pred, idx))
        d = 2 * tp + fp + fn
        return np.where(d > 0, 2 * tp / np.maximum(d, 1), 0.0)
    return bootstrap_interval(stat, len(y))


def _macro_f1_interval(y: np.ndarray, pred: np.ndarray) -> list[float] | None:
    def stat(idx: np.ndarray) -> np.ndarray:
        tp, fp, fn = _counts(y, pred, idx)
        d = 2 * tp + fp + fn
        return np.where(d > 0, 2 * tp / np.maximum(d, 1), 0.0).mean(1)
    return bootstrap_interval(stat, len(y))


def _map_interval(y: np.ndarray, p: np.ndarray) -> list[float] | None:
    """Bootstrap interval of the mAP (labels without a positive image in a resample are left out of its mean)."""
    def stat(idx: np.ndarray) -> np.ndarray:
        out = np.empty(len(idx))
        for r, rows in enumerate(idx):
            aps = [average_precision(y[rows, k], p[rows, k]) for k in range(y.shape[1])]
            aps = [a for a in aps if not np.isnan(a)]
            out[r] = np.mean(aps) if aps else np.nan
        return out
    return bootstrap_interval(stat, len(y))


def label_confusions(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, list[list[int]]]:
    """Per label the 2x2 confusion [[TN, FP], [FN, TP]] (rows = truth no/yes, columns = predicted no/yes)."""
    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    out = {}
    for k, c in enumerate(classes):
        tp = int(((y[:, k] == 1) & (p[:, k] == 1)).sum())
        fp = int(((y[:, k] == 0) & (p[:, k] == 1)).sum())
        fn = int(((y[:, k] == 1) & (p[:, k] == 0)).sum())
        tn = int(len(y) - tp - fp - fn)
        out[c] = [[tn, fp], [fn, tp]]
    return out


def multilabel_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                       thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """The multi-label report of one split.

    Args:
        y_true: (N, C) 0/1 true label sets.
        probs: (N, C) per-label probabilities.
        classes: the label names.
        thresholds: per-label decision thresholds (default 0.5 each).
    Returns:
        {"multi_label": True, "micro_f1", "macro_f1", "mAP" (mean over labels with a positive image),
        "exact_match" (share of images whose predicted set equals the true one; also as ``accuracy``),
        each with its 95% interval (``micro_f1_ci``, ``macro_f1_ci``, ``mAP_ci``: percentile bootstrap over the
        images; ``exact_match_ci`` = ``accuracy_ci``: Wilson), "correct" (images whose set is exact), "hamming_loss", "count", "classes", "thresholds", "per_label" {label: precision, recall, f1, support,
        ap, threshold}, "label_confusion" {label: [[TN, FP], [FN, TP]]}}.
    """
    y = np.asarray(y_true, dtype=np.int64).reshape(-1, len(classes))
    p = np.asarray(probs, dtype=np.float64).reshape(-1, len(classes))
    t = list(thresholds) if thresholds is not None else [DEFAULT_THRESHOLD] * len(classes)
    pred = predict_sets(p, t)
    per: dict[str, dict[str, Any]] = {}
    aps = []
    for k, c in enumerate(classes):
        tp = float(((y[:, k] == 1) & (pred[:, k] == 1)).sum())
        fp = float(((y[:, k] == 0) & (pred[:, k] == 1)).sum())
        fn = float(((y[:, k] == 1) & (pred[:, k] == 0)).sum())
        ap = average_precision(y[:, k], p[:, k]) if len(y) else float("nan")
        if not np.isnan(ap):
            aps.append(ap)
        per[c] = {"precision": round(tp / (tp + fp), 4) if tp + fp else 0.0,
                  "recall": round(tp / (tp + fn), 4) if tp + fn else 0.0,
                  "f1": round(_f1(tp, fp, fn), 4), "support": int(y[:, k].sum()),
                  "ap": None if np.isnan(ap) else round(ap, 4), "threshold": float(t[k])}
    tp_all = float(((y == 1) & (pred == 1)).sum())
    fp_all = float(((y == 0) & (pred == 1)).sum())
    fn_all = float(((y == 1) & (pred == 0)).sum())
    exact = float((pred == y).all(axis=1).mean()) if len(y) else 0.0
    n_exact = int((pred == y).all(axis=1).sum())
    exact_ci = wilson_interval(n_exact, len(y)) if len(y) else None
    return {
        "multi_label": True,
        "micro_f1": round(_f1(tp_all, fp_all, fn_all), 6),
        "micro_f1_ci": _micro_f1_interval(y, pred),
        "macro_f1": round(float(np.mean([v["f1"] for v in per.values()])) if per else 0.0, 6),
        "macro_f1_ci": _macro_f1_interval(y, pred),
        "mAP": round(float(np.mean(aps)), 6) if aps else None,
        "mAP_ci": _map_interval(y, p) if aps else None,
        "exact_match": round(exact, 6),
        "exact_match_ci": exact_ci,
        "accuracy": round(exact, 6),
        "accuracy_ci": exact_ci,
        "correct": n_exact,
        "hamming_loss": round(float((pred != y).mean()), 6) if len(y) else 0.0,
        "count": int(len(y)),
        "classes": list(classes),
        "thresholds": [float(x) for x in t],
        "per_label": per,
        "label_confusion": label_confusions(y, pred, classes),
    }
