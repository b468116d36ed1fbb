"""Predicting and evaluating with a multi-label model: each image gets the set of labels whose probability
``sigmoid(logit / T)`` reaches the label's threshold (chosen on validation, saved in ``meta.json``).

Prediction rows keep the single-label fields (``label``: the predicted set joined by ``;``, sorted, ``confidence``: the
highest label probability, ``top_k``) and add ``labels`` [{label, p}] (the predicted set, most probable
first) and ``probs`` {label: p} (every label). The CSV has ``path,labels`` and one ``p_<label>`` column per
label.
"""

from __future__ import annotations

import csv
import io
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..data.intake import ImageItem
from ..errors import DatasetError
from ..metrics import figure_of
from ..models.multilabel import LABEL_SEPARATOR, label_matrix, multilabel_metrics, predict_sets, sigmoid

if TYPE_CHECKING:
    from .loading import TrainedModel

__all__ = ["SINGLE_LABEL_ONLY", "is_multi_label", "rows_of_logits", "multilabel_row", "evaluate_multilabel", "write_multilabel_csv", "thresholds_of"]

#: What the single-label-only views say for a multi-label model.
SINGLE_LABEL_ONLY = ("This view is for single-label models: a multi-label model answers one yes/no question per "
                     "label, so there is no one predicted class to {what}.")


def is_multi_label(tm: "TrainedModel") -> bool:
    """Whether a loaded model is multi-label (one sigmoid output per label)."""
    return bool(tm.meta.multi_label)


def thresholds_of(tm: "TrainedModel") -> list[float]:
    """The model's per-label thresholds (0.5 each where none were saved)."""
    return list(tm.meta.thresholds or [0.5] * len(tm.classes))


def multilabel_row(p: np.ndarray, classes: Sequence[str], thresholds: Sequence[float], top_k: int = 3
                   ) -> dict[str, Any]:
    """One image's answer: the predicted label set with a probability each, and every label's probability."""
    on = predict_sets(p[None, :], thresholds)[0]
    order = np.argsort(-p, kind="stable")
    chosen = [{"label": classes[int(k)], "p": float(p[k])} for k in order if on[k]]
    return {"label": LABEL_SEPARATOR.join(sorted(c["label"] for c in chosen)),  # as a labels CSV cell
            "confidence": float(p[order[0]]),
            "labels": chosen, "probs": {c: float(v) for c, v in zip(classes, p)},
            "top_k": [{"label": classes[int(k)], "confidence": float(p[k])} for k in order[:max(1, top_k)]]}


def rows_of_logits(tm: "TrainedModel", logits: np.ndarray, top_k: int = 3) -> list[dict[str, Any]]:
    """Prediction rows of a batch of logits (probabilities with the model's temperature)."""
    th = thresholds_of(tm)
    return [multilabel_row(p, tm.classes, th, top_k) for p in sigmoid(logits, tm.temperature)]


def evaluate_multilabel(tm: "TrainedModel", items: Sequence[ImageItem], logits: np.ndarray) -> dict[str, Any]:
    """The multi-label report (:func:`tl_core.models.multilabel.multilabel_metrics`) of labelled images.

    ``per_class`` repeats ``per_label`` and ``confusion`` is None (there is no one predicted class), so readers
    of the single-label document find its keys. ``worst`` lists the images with the most wrong labels.

    Raises:
        DatasetError: the data is single-label, or has labels the model does not know.
    """
    if items and not any(i.labels for i in items):
        raise DatasetError("The model is multi-label but the data has one label per image; give a CSV of "
                           "'path,labels' with labels joined by ';'.")
    unknown = sorted({lab for i in items for lab in i.label_set} - set(tm.classes))
    if unknown:
        raise DatasetError(f"The data has labels the model was not trained on: {', '.join(unknown[:10])}; "
                           f"the model knows {', '.join(tm.classes)}.")
    y = label_matrix([i.label_set for i in items], tm.classes)
    probs = sigmoid(logits, tm.temperature)
    rep = multilabel_metrics(y, probs, tm.classes, thresholds_of(tm))
    rep["per_class"] = rep["per_label"]
    rep["confusion"] = None
    pred = predict_sets(probs, rep["thresholds"])
    wrong = (pred != y).sum(1)
    order = np.argsort(-wrong, kind="stable")
    rep["worst"] = [{"path": str(items[k].path), "true": list(items[k].label_set),
                     "predicted": [c for c, on in zip(tm.classes, pred[k]) if on], "wrong_labels": int(wrong[k])}
                    for k in order[:20] if wrong[k]]
    return rep


def write_multilabel_csv(rows: Sequence[dict[str, Any]], classes: Sequence[str],
                         out: str | os.PathLike | io.StringIO) -> None:
    """CSV with ``path``, ``labels`` (the predicted set, ``a;b``), one ``p_<label>`` probability column per label,
    ``unknown`` and ``ood_score`` (empty for a model without open-set files)."""
    own = not isinstance(out, io.StringIO)
    f = open(out, "w", newline="", encoding="utf-8") if own else out
    try:
        w = csv.writer(f)
        w.writerow(["path", "labels", *[f"p_{c}" for c in classes], "unknown", "ood_score"])
        for r in rows:
            unknown, score = r.get("unknown"), r.get("ood_score")
            w.writerow([r["path"], r["label"], *[f"{r['probs'][c]:.6f}" for c in classes],
                        "" if unknown is None else str(bool(unknown)).lower(),
                        "" if score is None else f"{score:.6f}"])
    finally:
        if own:
            f.close()


# -- the model card and the report ----------------------------------------------------------------------
def card_intended_use(classes: Sequence[str], thresholds: Sequence[float] | None) -> str:
    """The model card's intended-use paragraph of a multi-label model."""
    th = ", ".join(f"{c} {t:.2f}" for c, t in zip(classes, thresholds or [0.5] * len(classes)))
    return (f"Tags an image with any of {len(classes)} labels: {', '.join(classes)} (several at once, or none). "
            "Each label is its own yes/no answer: the probability sigmoid(logit / T) of each label is compared with "
            f"that label's threshold, chosen on the validation images for the best F1 ({th}). Meant for images like "
            "the training images and for the purpose they were collected for. Not intended for decisions about people "
            "(identity, health, eligibility) or for safety-critical use without further validation.")


def card_metrics_lines(rep: dict[str, Any], title: str) -> list[str]:
    """A multi-label metrics section of the model card (Markdown lines)."""
    lines = [f"### {title}", "",
             f"Micro F1 {figure_of(rep, 'micro_f1')}, macro F1 {figure_of(rep, 'macro_f1')}, mean average precision "
             f"{figure_of(rep, 'mAP')}, exact match (every label right) {figure_of(rep, 'exact_match')}.", "",
             "| label | precision | recall | F1 | AP | support | threshold | TN | FP | FN | TP |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    conf = rep.get("label_confusion") or {}
    for c, r in (rep.get("per_label") or {}).items():
        (tn, fp), (fn, tp) = conf.get(c, [[0, 0], [0, 0]])
        ap = "n/a" if r.get("ap") is None else f"{r['ap']:.3f}"
        lines.append(f"| {c} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {ap} | {r['support']} | "
                     f"{r.get('threshold', 0.5):.3f} | {tn} | {fp} | {fn} | {tp} |")
    return lines + [""]


def worst_images(split: Any, classes: Sequence[str], thresholds: Sequence[float] | None, temperature: float = 1.0,
                 k: int | None = None) -> list[dict[str, Any]]:
    """Saved predictions (a :class:`~tl_core.storage.files.SplitPredictions`) with wrong labels, most wrong labels
    first (then the largest probability gap): path, true, predicted, missed, extra, wrong_labels."""
    if split is None or not len(split):
        return []
    y = label_matrix(split.labels, classes)
    p = sigmoid(split.logits, temperature)
    t = np.asarray(thresholds if thresholds is not None else [0.5] * len(classes))
    pred = predict_sets(p, t)
    rows = []
    for n, path in enumerate(split.paths):
        wrong = pred[n] != y[n]
        if not wrong.any():
            continue
        rows.append({"path": path, "true": [c for c, v in zip(classes, y[n]) if v],
                     "predicted": [c for c, v in zip(classes, pred[n]) if v],
                     "missed": [c for c, v, q in zip(classes, y[n], pred[n]) if v and not q],
                     "extra": [c for c, v, q in zip(classes, y[n], pred[n]) if q and not v],
                     "wrong_labels": int(wrong.sum()), "gap": float(np.abs(p[n] - t)[wrong].max())})
    rows.sort(key=lambda r: (-r["wrong_labels"], -r["gap"], r["path"]))
    return rows[:k] if k else rows
