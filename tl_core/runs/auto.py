"""The ``auto`` strategy: try what the data can afford within a time budget, keep the best, say why.

1. ``linear`` with features ``auto`` (the probe chooses its features by cross-validation): cheap, and the
   baseline every other try must beat.
2. If the training images are enough for fine-tuning to have room (:data:`MIN_PER_CLASS_TO_FINETUNE` per class,
   single-label) and the estimated time fits what is left of the budget: a short ``partial`` fine-tune (LP-FT:
   it starts from a linear probe) on the **same split**.
3. Both are scored on the same validation images. Fine-tuning is kept only when its paired gain over the probe
   is above its 95% interval (the validation images are the same, so each image's right/wrong pairs up); it
   otherwise costs more for a gain within noise, and the probe is kept. The fine-tune's figure is that of the
   epoch it kept, chosen on those validation images: slightly optimistic, which is one more reason to demand
   a gain beyond noise.

The run directory then holds the kept model exactly as a run of that strategy writes it (its ``config.json``
says which); the summary adds ``auto``: what was tried, each score with its Wilson interval and time, the
paired difference and the sentence of why (e.g. "Fine-tuning gained +0.4 ± 2.1 points on the 40 validation
images: kept linear, 6.0x faster").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import TrainConfig
from ..metrics import wilson_interval
from ..models.training import Progress
from ..storage.files import RunFiles

__all__ = ["AUTO_BUDGET_S", "MIN_PER_CLASS_TO_FINETUNE", "train_auto", "paired_difference"]

log = logging.getLogger(__name__)

#: Seconds ``auto`` may spend in all (the linear probe always runs; fine-tuning only if its estimate fits).
AUTO_BUDGET_S = 600.0
#: Fewest training images per class for which ``auto`` tries fine-tuning: below it, default fine-tunes of small
#: sets kept their epoch-0 probe (issue 24: 3 of 3 runs), so the try would only cost time.
MIN_PER_CLASS_TO_FINETUNE = 20
#: Rough cost of one fine-tuning image step relative to one inference forward pass (forward + backward of the
#: unfrozen blocks, augmentation), for the budget. One measurement (emoji, 160 training images, loaded 2-core
#: machine): with 3.0 the estimate was 1958 s for a fine-tune that took 745 s, so about 1.2; 1.5 stays cautious.
_TRAIN_STEP_COST = 1.5


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[float, float]:
    """Mean paired difference b - a of per-image correctness on the same images, and its 95% half-width.

    Args:
        correct_a, correct_b: 0/1 per image, aligned.
    Returns:
        (difference in points, half-width in points) of a normal interval on the paired differences.
    """
    d = np.asarray(correct_b, np.float64) - np.asarray(correct_a, np.float64)
    n = len(d)
    if n == 0:
        return 0.0, 100.0
    se = float(d.std(ddof=1)) / np.sqrt(n) if n > 1 else 1.0
    return 100.0 * float(d.mean()), 100.0 * 1.96 * se


def _val_correct(run_dir: Path) -> np.ndarray:
    preds = RunFiles(run_dir).predictions()
    val = preds.get("val")
    if val is None or not len(val.labels):
        return np.zeros(0)
    cidx = {c: i for i, c in enumerate(preds.classes)}
    return (np.asarray(val.logits).argmax(1) == np.array([cidx[lab] for lab in val.labels])).astype(np.float64)


def _tried(strategy: str, summary: dict[str, Any], seconds: float, correct: np.ndarray) -> dict[str, Any]:
    lo, hi = wilson_interval(int(correct.sum()), len(correct))
    return {"strategy": strategy, "val_accuracy": summary.get("val_accuracy"),
            "val_accuracy_ci": [round(lo, 4), round(hi, 4)], "val_images": len(correct),
            "seconds": round(seconds, 2), "features": (summary.get("features") or {}).get("variant") or
            ("last layer, fine-tuned" if strategy != "linear" else None)}


def _forward_seconds_per_image(cfg: TrainConfig) -> float:
    """Seconds of one inference forward pass per image on this machine, timed on a small batch."""
    import torch

    from ..models.backbones import build_model
    from ..models.preprocess import data_config_for

    model, _ = build_model(cfg.backbone, 2, weights=cfg.weights)
    size = data_config_for(model)["input_size"][-1]
    x = torch.zeros(8, 3, size, size)
    model.eval()
    with torch.inference_mode():
        model(x[:2])  # warm-up
        t0 = time.perf_counter()
        model(x)
    return (time.perf_counter() - t0) / len(x)


def train_auto(train_model: Callable[..., dict[str, Any] | None], data: str | os.PathLike, cfg: TrainConfig,
               workspace: Any, run_dir: Path,
               progress: Progress | None = None, should_cancel: Callable[[], bool] | None = None,
               test_data: str | os.PathLike | None = None, runtime: Any = None,
               budget_s: float | None = None) -> dict[str, Any] | None:
    """Run the ``auto`` strategy (see the module docstring) and write the kept run into ``run_dir``.

    Args:
        train_model: :func:`tl_core.runs.training.train_model`, which runs each try (and dispatches here).
        data, workspace, run_dir, progress, should_cancel, test_data, runtime: as ``train_model``.
        cfg: the run's config (strategy ``auto``); each try keeps its other settings.
        budget_s: seconds to spend in all (default :data:`AUTO_BUDGET_S`).
    Returns:
        The kept try's summary with ``auto`` added (see the module docstring); None on ranks other than 0.
    """
    emit: Progress = progress or (lambda e: None)
    budget = AUTO_BUDGET_S if budget_s is None else float(budget_s)
    t0 = time.perf_counter()
    base = dataclasses.replace(cfg, epochs=None, lr=None, patience=None)

    def quiet(label: str) -> Progress:
        # each try's epochs are its own (the run's curves are those of the kept try, in its metrics)
        def f(e: dict[str, Any]) -> None:
            if e.get("stage") in ("epoch", "probe"):
                return
            emit({**e, "auto": label})
        return f

    staging = run_dir.parent / f".{run_dir.name}.auto"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        emit({"stage": "check", "message": "auto: trying the linear probe (features chosen by cross-validation)"})
        lin_cfg = dataclasses.replace(base, strategy="linear")  # features as asked (default auto)
        t = time.perf_counter()
        lin = train_model(data, lin_cfg, workspace, staging / "linear", quiet("linear probe"), should_cancel,
                          test_data, runtime)
        if lin is None:
            return None
        lin_s = time.perf_counter() - t
        lin_correct = _val_correct(staging / "linear")
        tried = [_tried("linear", lin, lin_s, lin_correct)]
        kept, kept_summary = "linear", lin
        n_train = int((lin.get("split") or {}).get("train") or 0)
        per_class = n_train / max(1, len(lin["classes"]))
        difference = None
        if lin.get("multi_label"):
            reason = "Multi-label data: auto keeps the linear probe (fine-tuning is not compared on label sets yet)."
        elif per_class < MIN_PER_CLASS_TO_FINETUNE:
            reason = (f"{per_class:.0f} training images per class (fewer than {MIN_PER_CLASS_TO_FINETUNE}): "
                      "fine-tuning has no room to beat the probe on so few, so auto did not try it; kept linear.")
        elif len(lin_correct) < 10:
            reason = "Too few validation images to compare fine-tuning with the probe; kept linear."
        else:
            part_cfg = dataclasses.replace(base, strategy="partial").resolved()
            per_image = _forward_seconds_per_image(part_cfg)
            estimate = part_cfg.epochs * (n_train * _TRAIN_STEP_COST + len(lin_correct)) * per_image + 10.0
            left = budget - (time.perf_counter() - t0)
            if estimate > left:
                reason = (f"A short fine-tune would take about {estimate:.0f} s and {max(0.0, left):.0f} s of the "
                          f"{budget:.0f} s budget are left; kept linear.")
            else:
                emit({"stage": "check", "message": f"auto: trying a short partial fine-tune (~{estimate:.0f} s)"})
                t = time.perf_counter()
                part = train_model(data, part_cfg, workspace, staging / "partial", quiet("partial fine-tune"),
                                   should_cancel, test_data, runtime)
                part_s = time.perf_counter() - t
                part_correct = _val_correct(staging / "partial")
                tried.append({**_tried("partial", part, part_s, part_correct), "estimated_s": round(estimate, 1)})
                diff, hw = paired_difference(lin_correct, part_correct)
                difference = {"points": round(diff, 2), "half_width": round(hw, 2), "images": len(lin_correct)}
                ratio = part_s / max(lin_s, 1e-6)
                if diff - hw > 0:
                    kept, kept_summary = "partial", part
                    reason = (f"Fine-tuning gained {diff:+.1f} ± {hw:.1f} points on the {len(lin_correct)} "
                              f"validation images, beyond noise: kept partial ({ratio:.1f}x the probe's time).")
                else:
                    reason = (f"Fine-tuning gained {diff:+.1f} ± {hw:.1f} points on the {len(lin_correct)} "
                              f"validation images, within noise: kept linear, {ratio:.1f}x faster.")
        RunFiles.discard([run_dir])
        os.replace(staging / kept, run_dir)
        seconds = time.perf_counter() - t0
        return {**kept_summary, "seconds": round(seconds, 3),
                "auto": {"kept": kept, "tried": tried, "difference": difference, "reason": reason,
                         "budget_s": budget, "seconds": round(seconds, 2)}}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
