"""Metrics of predictions: softmax with a temperature, accuracy, confusion matrix, per-class report, most
confidently wrong images, calibration (reliability bins, ECE); and how sure each figure is: Wilson intervals for
proportions, percentile-bootstrap intervals for F1 and mAP, whether two runs differ beyond noise, and the one
way every surface writes a figure with its interval (:func:`format_figure`).

Compute here, plot elsewhere (``tl_core.share.figures``): everything returns arrays or dicts. No torch.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

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
    "CONFIDENCE",
    "BOOTSTRAP_RESAMPLES",
    "wilson_interval",
    "bootstrap_interval",
    "macro_f1_interval",
    "ece_interval",
    "format_figure",
    "figure_of",
    "compare_figures",
]

#: the level of every interval TL Studio shows
CONFIDENCE = 0.95
_Z = 1.959963984540054  # the standard normal's 97.5% quantile
#: resamples of every bootstrap interval (seeded: the same predictions give the same interval)
BOOTSTRAP_RESAMPLES = 1000


def wilson_interval(k: float, n: int, z: float = _Z) -> list[float]:
    """The Wilson score 95% interval of a proportion k / n (Wilson, 1927): unlike the normal approximation it
    stays inside [0, 1] and is right for small n and for proportions near 0 or 1 (18 of 20 -> 0.699-0.972).

    Args:
        k: successes (e.g. correctly classified images).
        n: trials (images); 0 gives [0, 1] (nothing is known).
        z: the normal quantile (1.96 for 95%).
    Returns:
        [lo, hi], each rounded to 6 decimals.
    """
    if n <= 0:
        return [0.0, 1.0]
    p = float(k) / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(float(max(0.0, centre - half)), 6), round(float(min(1.0, centre + half)), 6)]


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_interval(statistic: Callable[[np.ndarray], np.ndarray], n: int,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float] | None:
    """Percentile-bootstrap 95% interval of a statistic of n images (Efron and Tibshirani, 1993).

    Args:
        statistic: (B, n) arrays of image indices (each row one resample) -> (B,) values of the statistic
            (NaN where a resample cannot give one: left out).
        n: images.
        resamples: B.
        seed: the resampling seed (fixed: the same predictions give the same interval).
    Returns:
        [lo, hi] (6 decimals), or None for no images.
    """
    if n <= 0:
        return None
    vals = np.asarray(statistic(_resample_indices(n, resamples, seed)), dtype=np.float64)
    vals = vals[~np.isnan(vals)]
    if not len(vals):
        return None
    lo, hi = np.percentile(vals, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return [round(float(lo), 6), round(float(hi), 6)]


def _macro_f1_rows(y: np.ndarray, pred: np.ndarray, n_classes: int, idx: np.ndarray) -> np.ndarray:
    """Macro F1 of each resample (rows of ``idx``), vectorised: per-row class counts by one bincount."""
    b = idx.shape[0]
    off = (np.arange(b) * n_classes)[:, None]
    yt, yp = y[idx], pred[idx]
    size = b * n_classes
    tp = np.bincount((off + yt)[yt == yp], minlength=size).reshape(b, n_classes)
    true_n = np.bincount((off + yt).ravel(), minlength=size).reshape(b, n_classes)
    pred_n = np.bincount((off + yp).ravel(), minlength=size).reshape(b, n_classes)
    denom = true_n + pred_n
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1.mean(1)


def macro_f1_interval(y_true: Sequence[int], pred: Sequence[int], n_classes: int,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float] | None:
    """Bootstrap 95% interval of the macro F1 (the mean over classes, as :func:`compute_metrics` reports it)."""
    y, p = np.asarray(y_true, np.int64), np.asarray(pred, np.int64)
    return bootstrap_interval(lambda idx: _macro_f1_rows(y, p, n_classes, idx), len(y), resamples, seed)


def format_figure(value: float | None, ci: Sequence[float] | None = None, correct: int | None = None,
                  total: int | None = None, percent: bool = True) -> str:
    """A figure as every surface shows it: ``90.0% (95% CI 69.9–97.2%, 18 of 20)``.

    Args:
        value: the figure (a proportion when ``percent``; else e.g. an F1 written as 0.936).
        ci: its [lo, hi] interval (left out when None).
        correct, total: the counts behind a proportion ("18 of 20"; left out when None).
        percent: write as a percentage (accuracy, exact match) or as a 0-1 score (F1, mAP).
    Returns:
        The text; "—" for no value.
    """
    if value is None:
        return "—"
    if percent:
        head = f"{100 * value:.1f}%"
        rng = f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%" if ci else ""
    else:
        head = f"{value:.3f}"
        rng = f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else ""
    parts = ([f"95% CI {rng}"] if rng else []) + ([f"{correct} of {total}"] if total is not None and correct is not None
                                                   else [f"{total} images"] if total is not None else [])
    return f"{head} ({', '.join(parts)})" if parts else head


def figure_of(report: dict[str, Any] | None, key: str = "accuracy") -> str:
    """:func:`format_figure` of one figure of a report (:func:`compute_metrics`, ``multilabel_metrics``, a
    cross-validation record): its value, interval and, for a proportion, its counts. "—" without it.

    Args:
        report: the report.
        key: "accuracy", "exact_match" (proportions) or "micro_f1", "macro_f1", "mAP" (scores).
    """
    if not report or report.get(key) is None:
        return "—"
    proportion = key in ("accuracy", "exact_match")
    n = report.get("count") if proportion else None
    return format_figure(report[key], report.get(f"{key}_ci"), report.get("correct") if proportion else None,
                         n, percent=proportion)


def _newcombe(k1: int, n1: int, k2: int, n2: int) -> list[float]:
    """Newcombe's hybrid score interval (method 10, 1998) of p2 - p1 for two independent proportions."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1)
    l2, u2 = wilson_interval(k2, n2)
    d = p2 - p1
    return [d - float(np.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)), d + float(np.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2))]


def compare_figures(a: dict[str, Any], b: dict[str, Any], seed: int = 0) -> dict[str, Any] | None:
    """Whether run b's accuracy differs from run a's beyond noise.

    Paired where both were measured on the same images (the same ``paths``, in any order): a bootstrap of the per-image
    difference in correctness over those images (the noise of the images is shared, so it cancels out);
    otherwise Newcombe's interval of the difference of two independent proportions.

    Args:
        a, b: {"correct": k, "count": n} and optionally {"paths": [...], "right": [0/1 per image]}.
    Returns:
        {"difference" (b - a, a proportion), "ci" [lo, hi], "paired", "within_noise" (the interval holds 0),
        "text": "+1.5 points, within noise (95% interval -3.1 to +6.0)"}; None without images on either side.
    """
    na, nb = int(a.get("count") or 0), int(b.get("count") or 0)
    if not na or not nb:
        return None
    pa, pb = a.get("paths"), b.get("paths")
    paired = (bool(pa) and len(pa) == len(pb or []) and set(pa) == set(pb) and a.get("right") is not None
              and b.get("right") is not None)
    if paired:
        order_b = {p: i for i, p in enumerate(pb)}
        ra = np.asarray(a["right"], np.float64)
        rb = np.asarray(b["right"], np.float64)[[order_b[p] for p in pa]]
        diff = rb - ra
        d = float(diff.mean())
        ci = bootstrap_interval(lambda idx: diff[idx].mean(1), len(diff), seed=seed) or [d, d]
    else:
        ka, kb = int(a["correct"]), int(b["correct"])
        d = kb / nb - ka / na
        ci = _newcombe(ka, na, kb, nb)
    within = ci[0] <= 0 <= ci[1]
    text = (f"{100 * d:+.1f} points, {'within noise' if within else 'beyond noise'} "
            f"(95% interval {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}"
            f"{', same images' if paired else ''})")
    return {"difference": round(d, 6), "ci": [round(ci[0], 6), round(ci[1], 6)], "paired": paired,
            "within_noise": within, "text": text}


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


def _confidence_bins(conf: np.ndarray, bins: int) -> np.ndarray:
    """The equal-width bin of each confidence, (lo, hi] as Guo et al. bin them: 0 .. bins - 1, or -1 for a
    confidence outside (0, 1] (in no bin)."""
    which = np.searchsorted(np.linspace(0, 1, bins + 1), conf, side="left") - 1
    return np.where((which >= 0) & (which < bins), which, -1)


def _ece_rows(conf: np.ndarray, correct: np.ndarray, bins: int, idx: np.ndarray) -> np.ndarray:
    """ECE of each resample (rows of ``idx``), vectorised: per-row, per-bin sums by one bincount each. With equal
    weights per image, a bin's share times its |accuracy - confidence| is |sum of correct - sum of confidence| / n."""
    b, n = idx.shape
    c = conf[idx]
    which = _confidence_bins(c, bins)
    binned = (which >= 0).ravel()
    key = ((np.arange(b) * bins)[:, None] + which).ravel()[binned]
    size = b * bins
    gap = np.bincount(key, weights=correct[idx].ravel()[binned].astype(np.float64), minlength=size) \
        - np.bincount(key, weights=c.ravel()[binned], minlength=size)
    return np.abs(gap.reshape(b, bins)).sum(1) / n


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width confidence bins (Guo et al., 2017)."""
    if len(probs) == 0:
        return 0.0
    conf, correct = probs.max(1).astype(np.float64), probs.argmax(1) == np.asarray(y_true)
    return float(_ece_rows(conf, correct, bins, np.arange(len(conf))[None])[0])


def ece_interval(probs: np.ndarray, y_true: Sequence[int], bins: int = 10, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> list[float] | None:
    """Bootstrap 95% interval of the expected calibration error (:func:`expected_calibration_error`'s bins): on a
    few dozen images the ECE itself moves by several points from one sample of images to the next."""
    y = np.asarray(y_true, np.int64)
    if len(y) == 0:
        return None
    conf, correct = probs.max(1).astype(np.float64), probs.argmax(1) == y
    return bootstrap_interval(lambda idx: _ece_rows(conf, correct, bins, idx), len(y), resamples, seed)


def calibration(probs: np.ndarray, y_true: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability diagram data: per bin mean confidence, accuracy and count; and the ECE."""
    conf = probs.max(1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(1) == y_true) if len(probs) else np.zeros(0, bool)
    edges = np.linspace(0, 1, bins + 1)
    which = _confidence_bins(conf, bins)
    rows = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        m = which == i
        rows.append({"lo": float(lo), "hi": float(hi), "count": int(m.sum()),
                     "confidence": float(conf[m].mean()) if m.any() else None,
                     "accuracy": float(correct[m].mean()) if m.any() else None})
    return {"bins": rows, "ece": expected_calibration_error(probs, y_true, bins)}


def compute_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy with its Wilson 95% interval (``accuracy_ci``) and ``correct``, confusion (rows = true), per-class
    precision/recall/F1/support, macro F1 with its bootstrap 95% interval (``macro_f1_ci``), log loss, ECE with its
    bootstrap 95% interval (``ece_ci``)."""
    y = np.asarray(y_true, dtype=np.int64)
    n = len(classes)
    if len(y) == 0:
        return {"accuracy": 0.0, "accuracy_ci": None, "correct": 0, "count": 0, "classes": list(classes), "confusion": np.zeros((n, n), int).tolist(),
                "per_class": per_class_report(np.zeros((n, n), int), classes), "macro_f1": 0.0, "macro_f1_ci": None,
                "log_loss": None, "ece": 0.0, "ece_ci": None}
    pred = probs.argmax(1)
    cm = confusion_matrix(y, pred, n)
    per = per_class_report(cm, classes)
    eps = 1e-12
    correct = int((pred == y).sum())
    return {
        "accuracy": round(float((pred == y).mean()), 6),
        "accuracy_ci": wilson_interval(correct, len(y)),
        "correct": correct,
        "count": int(len(y)),
        "classes": list(classes),
        "confusion": cm.tolist(),
        "per_class": per,
        "macro_f1": round(float(np.mean([v["f1"] for v in per.values()])), 6),
        "macro_f1_ci": macro_f1_interval(y, pred, n),
        "log_loss": round(float(-np.log(np.clip(probs[np.arange(len(y)), y], eps, 1)).mean()), 6),
        "ece": round(expected_calibration_error(probs, y), 6),
        "ece_ci": ece_interval(probs, y),
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


