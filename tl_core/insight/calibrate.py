"""Calibration of a trained run: reliability diagram, expected calibration error, temperature scaling.

A model is calibrated when, among the images it labels with 80 % confidence, 80 % are right. Modern
networks (and a linear probe with weak regularisation) are usually over-confident. Temperature scaling
(Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) divides every logit by one number T,
fitted on the validation images by minimising the negative log-likelihood (L-BFGS on log T); it never
changes which class is predicted, only how sure the model says it is. :func:`calibrate_run` saves T as
``meta.json['temperature']`` (which every predict function and export applies) and records ECE and NLL
before and after in ``metrics.json['calibration']``.

The "after" figures measured on the images T was fitted on are optimistic. :func:`calibrate_run` also measures the
ECE after scaling out of fold (T fitted on the other folds' images, :data:`CV_FOLDS` of them), and both ECEs carry a
bootstrap 95% interval: on a few dozen images the ECE moves by several points from one sample to the next.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import RunError
from ..metrics import ece_interval, expected_calibration_error, reliability_diagram, softmax
from ..storage.files import RunFiles, resolve_run
from ..storage.workspace import Workspace

__all__ = [
    "TEMPERATURE_BOUNDS",
    "negative_log_likelihood",
    "fit_temperature",
    "out_of_fold_probs",
    "validation_logits",
    "calibrate_run",
]

log = logging.getLogger(__name__)

#: The fitted temperature is kept inside these bounds (a tiny validation set can push it to extremes).
TEMPERATURE_BOUNDS = (0.05, 20.0)
#: Folds of the out-of-fold "ECE after" (each image scored with a T fitted on the others).
CV_FOLDS = 5


def negative_log_likelihood(logits: np.ndarray, labels: Sequence[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / temperature).

    Args:
        logits: (N, C) raw scores.
        labels: N class indices.
        temperature: positive divisor of the logits.
    Returns:
        The mean NLL in nats.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(y) == 0:
        return 0.0
    return float(nn.functional.cross_entropy(z / temperature, y))


def fit_temperature(logits: np.ndarray, labels: Sequence[int], max_iter: int = 100,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (L-BFGS on log T).

    Args:
        logits: (N, C) raw validation scores.
        labels: N true class indices.
        max_iter: L-BFGS iterations.
        bounds: T is clipped into this range.
    Returns:
        T (> 1 softens an over-confident model, < 1 sharpens an under-confident one); 1.0 for no data.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(y) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)
    lo, hi = math.log(bounds[0]), math.log(bounds[1])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        # clamp inside the objective so that the line search never leaves the bounds' plateau unbounded
        loss = nn.functional.cross_entropy(z / torch.exp(log_t.clamp(lo, hi)), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(torch.exp(log_t.detach().clamp(lo, hi)))
    return t if math.isfinite(t) else 1.0


def _temperature_for(logits: np.ndarray, labels: np.ndarray) -> tuple[float, str | None]:
    """T fitted on these images, and why it was kept at 1 (or None): with no mistakes to learn from, the NLL
    always prefers a sharper model, and nothing justifies sharpening it."""
    t = fit_temperature(logits, labels)
    if t < 1.0 and int((logits.argmax(1) != labels).sum()) == 0:
        return 1.0, ("The model made no mistakes on the validation images, so there is no evidence to make it more "
                     "confident; the temperature was kept at 1.")
    return t, None


def out_of_fold_probs(logits: np.ndarray, labels: np.ndarray, folds: int = CV_FOLDS, seed: int = 0) -> np.ndarray:
    """Softmax probabilities of every image with a temperature fitted on the other folds' images only (the folds
    of a seeded permutation; at most one per image): what temperature scaling gives images it was not fitted on."""
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n)
    probs = np.zeros(logits.shape, dtype=np.float64)
    for part in np.array_split(order, max(2, min(folds, n))):
        rest = np.setdiff1d(order, part)
        t, _ = _temperature_for(logits[rest], labels[rest])
        probs[part] = softmax(logits[part], t)
    return probs


def _run_dir(run: str | os.PathLike, workspace: Workspace | None) -> Path:
    p = Path(run)
    if p.suffix.lower() == ".zip" and p.is_file():
        raise RunError(f"{p.name} is an exported bundle; calibrate the run directory it came from, then export again.")
    return resolve_run(run, workspace)


def validation_logits(run: str | os.PathLike, workspace: Workspace | None = None) -> dict[str, Any]:
    """Raw logits of a run's validation images, as saved with the run (exact: no image is read again).

    They are the outputs of the model that made the run's validation predictions: for a refitted linear run,
    the head fitted on training images alone (the saved head has seen these images, so its outputs on them
    are in-sample and too sure); the temperature fitted on them is applied to the saved model.

    Args:
        run: run directory or run id.
        workspace: where run ids live (default ``$TL_HOME``).
    Returns:
        {"logits" (N, C), "labels" (N,), "paths", "classes", "model" (which head produced them),
        "temperature" (the run's current T)}.
    Raises:
        RunError: not a finished run, or it recorded no validation predictions.
    """
    files = RunFiles(_run_dir(run, workspace))
    meta = files.meta()
    if meta.multi_label:
        raise RunError(f"{files.where} is a multi-label model: temperature scaling here calibrates one-class-per-image "
                       "probabilities, and its labels are decided by per-label thresholds instead.")
    split = files.predictions().get("val")
    y = split.targets(meta.classes) if split is not None else np.zeros(0, np.int64)
    keep = y >= 0
    if split is None or not keep.any():
        raise RunError(f"{files.where} recorded no validation predictions; calibration needs validation images.")
    return {"logits": split.logits[keep], "labels": y[keep], "paths": [p for p, k in zip(split.paths, keep) if k],
            "classes": meta.classes, "model": split.model, "temperature": meta.temperature}


def calibrate_run(run: str | os.PathLike, workspace: Workspace | None = None, bins: int = 10,
                  apply: bool = True) -> dict[str, Any]:
    """Fit temperature scaling on a run's validation images and (by default) save it with the run.

    Args:
        run: run directory or run id.
        workspace: where run ids and caches live (default ``$TL_HOME``).
        bins: reliability-diagram bins.
        apply: write T into ``meta.json`` and the result into ``metrics.json['calibration']``.
    Returns:
        {"temperature", "previous_temperature", "ece_before", "ece_before_ci", "ece_after", "ece_after_oof",
        "ece_after_oof_ci", "helps_out_of_fold", "nll_before", "nll_after", "accuracy", "count", "bins",
        "reliability_before", "reliability_after" (see :func:`reliability_diagram`), "applied", "model" (which head
        produced the logits), "warning" (or None), "run_dir"}. "before" is the raw model (T = 1); "after" uses the fitted T. Both are
        measured on the validation images T was fitted on, so "after" is an optimistic estimate; "ece_after_oof"
        scores each image with a T fitted on the other folds (:func:`out_of_fold_probs`). The ``_ci`` entries are
        bootstrap 95% intervals over the images (:func:`tl_core.metrics.ece_interval`). "helps_out_of_fold": the raw
        model's ECE is above the whole interval of the out-of-fold ECE after scaling (a gain beyond chance).
    Raises:
        RunError: not a finished run or no validation predictions.
    """
    d = _run_dir(run, workspace)
    v = validation_logits(d, workspace)
    logits, y = v["logits"], v["labels"]
    t, warning = _temperature_for(logits, y)
    if warning is None and len(y) < 30:
        warning = f"Only {len(y)} validation images: the temperature is a rough estimate."
    before = reliability_diagram(softmax(logits), y, bins)
    after = reliability_diagram(softmax(logits, t), y, bins)
    oof = out_of_fold_probs(logits, y) if len(y) >= 2 else softmax(logits, t)

    def rounded(ci: list[float] | None) -> list[float] | None:
        return [round(float(b), 6) for b in ci] if ci else None

    ece_before, oof_ci = round(before["ece"], 6), rounded(ece_interval(oof, y, bins))
    result = {
        "temperature": round(t, 6),
        "previous_temperature": v["temperature"],
        "ece_before": ece_before,
        "ece_before_ci": rounded(ece_interval(softmax(logits), y, bins)),
        "ece_after": round(after["ece"], 6),
        "ece_after_oof": round(expected_calibration_error(oof, y, bins), 6),
        "ece_after_oof_ci": oof_ci,
        # a clear gain: the raw model's ECE lies above the whole interval of the out-of-fold ECE after scaling
        "helps_out_of_fold": bool(oof_ci and oof_ci[1] < ece_before),
        "nll_before": round(negative_log_likelihood(logits, y), 6),
        "nll_after": round(negative_log_likelihood(logits, y, t), 6),
        "accuracy": round(before["accuracy"], 6),
        "count": int(len(y)),
        "bins": bins,
        "reliability_before": before,
        "reliability_after": after,
        "applied": False,
        "model": v["model"],
        "warning": warning,
        "run_dir": str(d),
    }
    if apply:
        RunFiles(d).set_temperature(result["temperature"], {k: result[k] for k in (
            "temperature", "ece_before", "ece_before_ci", "ece_after", "ece_after_oof", "ece_after_oof_ci",
            "helps_out_of_fold", "nll_before", "nll_after", "count", "bins", "model", "warning")})
        result["applied"] = True
    return result
