"""Predictions, metrics, confusion matrix, per-class report, most confidently wrong images, calibration.

Compute here, plot in pages: everything returns arrays, dicts or DataFrames.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .data import DecodedImageCache, ImageItem, Dataset
from .errors import CancelledError, DatasetError
from .transforms import Preprocess

__all__ = [
    "predict_items",
    "predict_images",
    "compute_metrics",
    "confusion_matrix",
    "per_class_report",
    "top_losses",
    "calibration",
    "expected_calibration_error",
]


@torch.inference_mode()
def predict_items(model: nn.Module, items: Sequence[ImageItem], pre: Preprocess, decoded: DecodedImageCache,
                  batch_size: int = 64, temperature: float = 1.0,
                  should_cancel: Callable[[], bool] | None = None) -> np.ndarray:
    """Class probabilities (N, C) for dataset items, eval preprocessing."""
    model.eval()
    out = []
    for start in range(0, len(items), batch_size):
        if should_cancel and should_cancel():
            raise CancelledError("Cancelled during evaluation.")
        x = torch.stack([pre.eval_from_resized(decoded.get(i, pre.resize, pre.interpolation))
                         for i in items[start:start + batch_size]])
        logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        out.append(torch.softmax(logits / temperature, dim=1).numpy())
    n_cls = getattr(model, "num_classes", 0)
    return np.concatenate(out) if out else np.zeros((0, n_cls), np.float32)


@torch.inference_mode()
def predict_images(model: nn.Module, images: Sequence[Any], pre: Preprocess, batch_size: int = 32,
                   temperature: float = 1.0) -> np.ndarray:
    """Class probabilities for RGB Pillow images."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.stack([pre.eval_from_pil(im) for im in images[start:start + batch_size]])
        out.append(torch.softmax(model(x).float() / temperature, dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


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
