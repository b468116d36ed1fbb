"""Calibration of a trained run: reliability diagram, expected calibration error, temperature scaling.

A model is calibrated when, among the images it labels with 80 % confidence, 80 % are right. Modern
networks (and a linear probe with weak regularisation) are usually over-confident. Temperature scaling
(Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) divides every logit by one number T,
fitted on the validation images by minimising the negative log-likelihood (L-BFGS on log T); it never
changes which class is predicted, only how sure the model says it is. :func:`calibrate_run` saves T as
``meta.json['temperature']`` (which every predict function and export applies) and records ECE and NLL
before and after in ``metrics.json['calibration']``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .data import DecodedImageCache, ImageItem, file_sha256
from .errors import RunError
from .evaluate import calibration
from .runs import Workspace

__all__ = [
    "TEMPERATURE_BOUNDS",
    "reliability_diagram",
    "negative_log_likelihood",
    "fit_temperature",
    "validation_logits",
    "calibrate_run",
]

log = logging.getLogger(__name__)

#: The fitted temperature is kept inside these bounds (a tiny validation set can push it to extremes).
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


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


def _run_dir(run: str | os.PathLike, workspace: Workspace | None) -> Path:
    p = Path(run)
    if p.is_dir():
        d = p
    else:
        if p.suffix.lower() == ".zip" and p.is_file():
            raise RunError(f"{p.name} is an exported bundle; calibrate the run directory it came from, then export again.")
        d = (workspace or Workspace.default()).run_dir(str(run))
    if not (d / "meta.json").exists():
        raise RunError(f"{run} is not a trained run (no meta.json); give a run id or run directory of a finished run.")
    return d


def validation_logits(run: str | os.PathLike, workspace: Workspace | None = None) -> dict[str, Any]:
    """Raw logits of a run's validation images (the images listed in its ``predictions.json``).

    The images are run through the saved model again, so the logits are exact; when the image files
    are gone, the saved probabilities' logarithms stand in (exact up to their 6-decimal rounding). A linear
    run whose head was refitted on train + validation (meta ``fit_on``) saw these images in training: its
    training-only logits, saved in ``predictions.json``, are used instead (source "saved predictions").

    Args:
        run: run directory or run id.
        workspace: where run ids and the decoded-image cache live (default ``$TL_HOME``).
    Returns:
        {"logits" (N, C), "labels" (N,), "paths", "classes", "source": "images"|"saved predictions",
        "temperature" (the run's current T)}.
    Raises:
        RunError: not a finished run, or it recorded no validation predictions.
    """
    from .export import load_model

    d = _run_dir(run, workspace)
    try:
        preds = json.loads((d / "predictions.json").read_text())
    except (OSError, ValueError):
        raise RunError(f"{d.name} has no readable predictions.json; train the run again to calibrate it.") from None
    tm = load_model(d)
    cidx = {c: i for i, c in enumerate(tm.classes)}
    rows = [r for r in preds.get("val") or [] if r.get("label") in cidx]
    if not rows:
        raise RunError(f"{d.name} recorded no validation predictions; calibration needs validation images.")
    labels = np.array([cidx[r["label"]] for r in rows], dtype=np.int64)
    paths = [str(r["path"]) for r in rows]
    if tm.refitted:
        # the saved head was refitted on these very images: its outputs on them are in-sample and too sure;
        # the training-only fit's logits, saved with its predictions, are the out-of-sample view needed here
        if all("logits" in r for r in rows):
            logits = np.array([r["logits"] for r in rows], dtype=np.float64)
        else:
            logits = np.log(np.clip(np.array([r["probs"] for r in rows], dtype=np.float64), 1e-12, 1.0))
        source = "saved predictions"
    elif all(Path(p).is_file() for p in paths):
        items = [ImageItem(Path(p), r["label"], sha256=file_sha256(p)) for p, r in zip(paths, rows)]
        ws = workspace or Workspace.default()
        decoded = DecodedImageCache(ws.cache_dir / "decoded")
        out = []
        tm.model.eval()
        with torch.inference_mode():
            for s in range(0, len(items), 32):
                x = torch.stack([tm.pre.eval_from_resized(decoded.get(i, tm.pre.resize, tm.pre.interpolation))
                                 for i in items[s:s + 32]])
                out.append(tm.model(x.contiguous(memory_format=torch.channels_last)).double().numpy())
        logits, source = np.concatenate(out), "images"
    else:
        log.warning("%s: validation images missing; calibrating from the saved probabilities", d.name)
        probs = np.array([r["probs"] for r in rows], dtype=np.float64)
        logits, source = np.log(np.clip(probs, 1e-12, 1.0)), "saved predictions"
    return {"logits": logits, "labels": labels, "paths": paths, "classes": tm.classes, "source": source,
            "temperature": tm.temperature}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def calibrate_run(run: str | os.PathLike, workspace: Workspace | None = None, bins: int = 10,
                  apply: bool = True) -> dict[str, Any]:
    """Fit temperature scaling on a run's validation images and (by default) save it with the run.

    Args:
        run: run directory or run id.
        workspace: where run ids and caches live (default ``$TL_HOME``).
        bins: reliability-diagram bins.
        apply: write T into ``meta.json`` and the result into ``metrics.json['calibration']``.
    Returns:
        {"temperature", "previous_temperature", "ece_before", "ece_after", "nll_before", "nll_after",
        "accuracy", "count", "bins", "reliability_before", "reliability_after" (see
        :func:`reliability_diagram`), "applied", "source", "warning" (or None), "run_dir"}.
        "before" is the raw model (T = 1); "after" uses the fitted T. Both are measured on the validation
        images T was fitted on, so "after" is an optimistic estimate.
    Raises:
        RunError: not a finished run or no validation predictions.
    """
    d = _run_dir(run, workspace)
    v = validation_logits(d, workspace)
    logits, y = v["logits"], v["labels"]
    t = fit_temperature(logits, y)
    errors = int((logits.argmax(1) != y).sum())
    warning = None
    if errors == 0 and t < 1.0:
        # with no mistakes to learn from, the NLL always prefers a sharper model: do not sharpen blindly
        warning = ("The model made no mistakes on the validation images, so there is no evidence to make it more "
                   "confident; the temperature was kept at 1.")
        t = 1.0
    elif len(y) < 30:
        warning = f"Only {len(y)} validation images: the temperature is a rough estimate."
    before = reliability_diagram(_softmax(logits), y, bins)
    after = reliability_diagram(_softmax(logits, t), y, bins)
    result = {
        "temperature": round(t, 6),
        "previous_temperature": v["temperature"],
        "ece_before": round(before["ece"], 6),
        "ece_after": round(after["ece"], 6),
        "nll_before": round(negative_log_likelihood(logits, y), 6),
        "nll_after": round(negative_log_likelihood(logits, y, t), 6),
        "accuracy": round(before["accuracy"], 6),
        "count": int(len(y)),
        "bins": bins,
        "reliability_before": before,
        "reliability_after": after,
        "applied": False,
        "source": v["source"],
        "warning": warning,
        "run_dir": str(d),
    }
    if apply:
        meta = json.loads((d / "meta.json").read_text())
        meta["temperature"] = result["temperature"]
        _write_json(d / "meta.json", meta)
        mf = d / "metrics.json"
        try:
            metrics = json.loads(mf.read_text()) if mf.exists() else {}
        except ValueError:
            metrics = {}
        metrics["calibration"] = {k: result[k] for k in ("temperature", "ece_before", "ece_after", "nll_before",
                                                          "nll_after", "count", "bins", "source", "warning")}
        _write_json(mf, metrics)
        result["applied"] = True
    return result
