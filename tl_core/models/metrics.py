"""Metrics of predictions: softmax with a temperature, accuracy, confusion matrix, per-class report, most
confidently wrong images, calibration (reliability bins, ECE).

Compute here, plot elsewhere (``tl_core.share.figures``): everything returns arrays or dicts. No torch.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = [
    "softmax",
    "normalise_rows",
    "compute_metrics",
    "confusion_matrix",
    "per_class_report",
    "top_losses",
    "calibration",
    "reliability_diagram",
    "expected_calibration_error",
]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities softmax(logits / T) in float64: the one place a temperature is applied."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if z.size == 0:
        return z
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        cm[int(t), int(p)] += 1
    return cm


def per_class_report(cm: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class from a confusion matrix."""
    rep = {}
    for i, c in enumerate(classes):
        tp = float(cm[i, i])
        support = int(cm[i].sum())
        predicted = float(cm[:, i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if (precision + recall) else 0.0
        rep[c] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "support": support}
    return rep


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width confidence bins (Guo et al., 2017)."""
    if len(probs) == 0:
        return 0.0
    conf = probs.max(1)
    correct = probs.argmax(1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def calibration(probs: np.ndarray, y_true: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability diagram data: per bin mean confidence, accuracy and count; and the ECE."""
    conf = probs.max(1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(1) == y_true) if len(probs) else np.zeros(0, bool)
    edges = np.linspace(0, 1, bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        rows.append({"lo": float(lo), "hi": float(hi), "count": int(m.sum()),
                     "confidence": float(conf[m].mean()) if m.any() else None,
                     "accuracy": float(correct[m].mean()) if m.any() else None})
    return {"bins": rows, "ece": expected_calibration_error(probs, y_true, bins)}


def compute_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, confusion (rows = true), per-class precision/recall/F1/support, macro F1, log loss, ECE."""
    y = np.asarray(y_true, dtype=np.int64)
    n = len(classes)
    if len(y) == 0:
        return {"accuracy": 0.0, "count": 0, "classes": list(classes), "confusion": np.zeros((n, n), int).tolist(),
                "per_class": per_class_report(np.zeros((n, n), int), classes), "macro_f1": 0.0, "log_loss": None, "ece": 0.0}
    pred = probs.argmax(1)
    cm = confusion_matrix(y, pred, n)
    per = per_class_report(cm, classes)
    eps = 1e-12
    return {
        "accuracy": round(float((pred == y).mean()), 6),
        "count": int(len(y)),
        "classes": list(classes),
        "confusion": cm.tolist(),
        "per_class": per,
        "macro_f1": round(float(np.mean([v["f1"] for v in per.values()])), 6),
        "log_loss": round(float(-np.log(np.clip(probs[np.arange(len(y)), y], eps, 1)).mean()), 6),
        "ece": round(expected_calibration_error(probs, y), 6),
    }


def top_losses(paths: Sequence[str], y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str],
               k: int | None = None, wrong_only: bool = True) -> list[dict[str, Any]]:
    """The most confidently wrong images first: path, true, predicted, confidence, loss."""
    rows = []
    for path, t, p in zip(paths, y_true, probs):
        pred = int(np.argmax(p))
        if wrong_only and pred == int(t):
            continue
        rows.append({"path": str(path), "true": classes[int(t)], "predicted": classes[pred],
                     "confidence": float(p[pred]), "true_prob": float(p[int(t)]),
                     "loss": float(-np.log(max(float(p[int(t)]), 1e-12)))})
    rows.sort(key=lambda r: (-r["confidence"], r["path"]) if wrong_only else (-r["loss"], r["path"]))
    return rows[:k] if k else rows


def normalise_rows(matrix: Sequence[Sequence[float]]) -> list[list[float]]:
    """Each row divided by its sum (rows of zeros stay zero): a confusion matrix as recall per class."""
    m = np.asarray(matrix, dtype=np.float64)
    sums = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(sums > 0, m / np.where(sums == 0, 1, sums), 0.0)
    return out.tolist()


def reliability_diagram(probs: np.ndarray, labels: Sequence[int], bins: int = 10) -> dict[str, Any]:
    """Reliability-diagram data for a plot of accuracy against confidence.

    Args:
        probs: (N, C) class probabilities.
        labels: N true class indices.
        bins: equal-width confidence bins over (0, 1].
    Returns:
        {"bins": [{lo, hi, count, confidence, accuracy, gap}] (confidence/accuracy/gap None for empty
        bins; gap = confidence - accuracy, positive = over-confident), "ece", "mce" (largest gap of a
        non-empty bin), "accuracy", "mean_confidence", "count"}.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    cal = calibration(p, y, bins)
    gaps = []
    for b in cal["bins"]:
        b["gap"] = None if b["confidence"] is None else float(b["confidence"] - b["accuracy"])
        if b["gap"] is not None:
            gaps.append(abs(b["gap"]))
    n = len(y)
    return {"bins": cal["bins"], "ece": float(cal["ece"]), "mce": float(max(gaps)) if gaps else 0.0,
            "accuracy": float((p.argmax(1) == y).mean()) if n else 0.0,
            "mean_confidence": float(p.max(1).mean()) if n else 0.0, "count": int(n)}


