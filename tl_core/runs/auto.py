"""The ``auto`` strategy (the default): try what the data and a time budget can afford, keep the best, say why.

1. ``linear`` with features ``auto`` on the run's backbone (the probe chooses its features by cross-validation
   on every labelled image): cheap, always run, and the baseline every other try must beat.
2. The other offline backbones' linear probes (:data:`OFFLINE_BACKBONES`, packaged weights), where the evidence
   can matter (at least :data:`MIN_IMAGES_TO_COMPARE_BACKBONES` labelled images, and the first probe below
   :data:`NO_ROOM_ACCURACY`) and each one's estimated time fits what is left of the budget. They are scored by
   the same cross-validation (same images, same folds: the folds are drawn in the images' content order), and
   the best score is kept (a tie keeps the cheaper backbone, by the catalogue's CPU cost).
3. If the training images are enough for fine-tuning to have room (:data:`MIN_PER_CLASS_TO_FINETUNE` per class,
   single-label) and the estimated time fits what is left: a short ``partial`` fine-tune (LP-FT: it starts from
   a linear probe) of the kept backbone on the **same split**. It is kept only when its paired gain over the
   kept probe's on the same validation images is above its 95% interval; it otherwise costs more for a gain
   within noise. The fine-tune's figure is that of the epoch it kept, chosen on those validation images:
   slightly optimistic, one more reason to demand a gain beyond noise.

Each try runs with the run's settings except :data:`SETTINGS_AUTO_CHOOSES` (epochs, learning rate, patience: each
try's strategy defaults); ``tl-core train`` says so when they are given (:func:`settings_used`).

The budget is ``TrainConfig.time_budget`` (``--time-budget``; default :data:`~tl_core.config.DEFAULT_TIME_BUDGET_S`).
A try whose estimate exceeds what is left is not run and is listed as skipped with the estimate ("skipped
partial fine-tune: estimated 6 min 10 s > 1 min 48 s left").

Under torchrun rank 0 decides alone (its clock and its scores) and announces each try before it runs it, and the
end; the other ranks run what it announces (:func:`_follow`), so every rank takes part in the same tries' collectives.
(Before, the other ranks returned after the first probe, and a fine-tune that rank 0 found room for failed with
"Connection closed by peer".)

The run directory then holds the kept model exactly as a run of that strategy writes it (its ``config.json``
says which); the summary adds ``auto``: every try (run or skipped) with its score, interval, time, estimate and
why it was kept or not, and the sentence of why (e.g. "Fine-tuning gained +0.4 ± 2.1 points on the 40
validation images: kept linear, 6.0x faster").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import TrainConfig, fields_for_strategy
from ..fileio import write_json_atomic
from ..metrics import wilson_interval
from ..models.distributed import gather
from ..models.multilabel import label_matrix, predict_sets, sigmoid
from ..models.training import Progress
from ..share.progress import duration_text
from ..storage.files import RunFiles

__all__ = ["MIN_PER_CLASS_TO_FINETUNE", "MIN_IMAGES_TO_COMPARE_BACKBONES", "NO_ROOM_ACCURACY", "OFFLINE_BACKBONES",
           "SETTINGS_AUTO_CHOOSES", "train_auto", "paired_difference", "duration_text", "settings_used"]

log = logging.getLogger(__name__)

#: Fewest training images per class for which ``auto`` tries fine-tuning: below it, default fine-tunes of small
#: sets kept their epoch-0 probe (issue 24: 3 of 3 runs), so the try would only cost time.
MIN_PER_CLASS_TO_FINETUNE = 20
#: Rough cost of one fine-tuning image step relative to one inference forward pass (forward + backward of the
#: unfrozen blocks, augmentation), for the budget. One measurement (emoji, 160 training images, loaded 2-core
#: machine): with 3.0 the estimate was 1958 s for a fine-tune that took 745 s, so about 1.2; 1.5 stays cautious.
_TRAIN_STEP_COST = 1.5
#: The backbones whose weights come with TL Studio (no network), cheapest first: the ones auto may compare.
OFFLINE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
#: Fewest labelled images for which auto compares backbones. The gap to resolve is small: Lite2 is 2.6 ImageNet
#: points above Lite0, and on the emoji sample its held-out figure was 2 points above (93.0 vs 91.0 on 100 test
#: images, within noise; benchmarks/RESULTS.md). Two cross-validated scores on n images at ~90% differ by noise of
#: about ±1.96·sqrt(2·0.09/n) unpaired, less as the folds are shared: ±2.3 points at 500 (±3.4 at 300). Below 500
#: a backbone's probe (1.6-2.3x the first probe's time when its features are not cached) would mostly buy noise.
MIN_IMAGES_TO_COMPARE_BACKBONES = 500
#: A cross-validated accuracy at or above this leaves another backbone no room to show a gain.
NO_ROOM_ACCURACY = 0.98
#: Seconds a try costs beyond its forward passes (its model's build, the probe's fit), for the budget.
_TRY_OVERHEAD_S = 5.0


#: The settings auto does not take from the run: each try uses its strategy's own (a short fine-tune's epochs).
SETTINGS_AUTO_CHOOSES = ("epochs", "lr", "patience")


def settings_used(strategy: str) -> set[str]:
    """The :class:`~tl_core.config.TrainConfig` fields a run of ``strategy`` uses: the strategy's own fields, and for
    ``auto`` also those of the fine-tune it may try, except :data:`SETTINGS_AUTO_CHOOSES`.

    Args:
        strategy: a strategy name (``auto``, ``linear`` ...).
    Returns:
        The field names; a given setting outside them has no effect on the run.
    """
    used = set(fields_for_strategy(strategy))
    if strategy == "auto":
        used |= set(fields_for_strategy("partial")) - set(SETTINGS_AUTO_CHOOSES)
    return used


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
    """1/0 per validation image: the predicted class is the label (multi-label: the predicted label set, at the
    run's own thresholds, is exactly the image's)."""
    files = RunFiles(run_dir)
    preds = files.predictions()
    val = preds.get("val")
    if val is None or not len(val.labels):
        return np.zeros(0)
    meta = files.meta()
    if meta.multi_label:
        chosen = predict_sets(sigmoid(np.asarray(val.logits)), meta.thresholds)
        return (chosen == label_matrix(list(val.labels), preds.classes)).all(axis=1).astype(np.float64)
    cidx = {c: i for i, c in enumerate(preds.classes)}
    return (np.asarray(val.logits).argmax(1) == np.array([cidx[lab] for lab in val.labels])).astype(np.float64)


def _cv_score(summary: dict[str, Any]) -> tuple[float, int] | None:
    """(cross-validated accuracy of the chosen features, labelled images it rests on), or None without one."""
    feats = summary.get("features") or {}
    cv = feats.get("cv") or {}
    split = summary.get("split") or {}
    n = int(split.get("train") or 0) + int(split.get("val") or 0)
    if not cv or not n:
        return None
    return float(max(cv.values())), n


def _tried(strategy: str, backbone: str, summary: dict[str, Any], seconds: float,
           correct: np.ndarray) -> dict[str, Any]:
    lo, hi = wilson_interval(int(correct.sum()), len(correct))
    row: dict[str, Any] = {
        "strategy": strategy, "backbone": backbone, "status": "not kept", "val_accuracy": summary.get("val_accuracy"),
        "val_accuracy_ci": [round(lo, 4), round(hi, 4)], "val_images": len(correct), "seconds": round(seconds, 2),
        "features": (summary.get("features") or {}).get("variant") or
        ("last layer, fine-tuned" if strategy != "linear" else None)}
    cv = _cv_score(summary) if strategy == "linear" else None
    if cv is not None:  # the score auto compares probes by: cross-validation on every labelled image
        score, n = cv
        clo, chi = wilson_interval(round(score * n), n)
        row.update(score=round(score, 4), score_ci=[round(clo, 4), round(chi, 4)], scored_by="cross-validation",
                   score_images=n)
    else:
        row.update(score=summary.get("val_accuracy"), score_ci=row["val_accuracy_ci"], scored_by="validation",
                   score_images=len(correct))
    return row


def _skipped(strategy: str, backbone: str, why: str, estimate: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"strategy": strategy, "backbone": backbone, "status": "skipped", "why": why}
    if estimate is not None:
        row["estimated_s"] = round(estimate, 1)
    return row


def _relative_cost(backbone: str, base: str) -> float:
    """A backbone's forward pass relative to ``base``'s (the catalogue's CPU timings; 1.0 where one is unknown)."""
    from ..models.catalogue import CATALOGUE

    a, b = CATALOGUE.get(backbone), CATALOGUE.get(base)
    if a is None or b is None or not a.cpu_ms or not b.cpu_ms:
        return 1.0
    return float(a.cpu_ms) / float(b.cpu_ms)


def _catalogue_seconds_per_image(backbone: str) -> float:
    """A cold probe's seconds per image when this machine has none on record: the catalogue's forward pass on the
    reference 2-core CPU times :data:`_CATALOGUE_MARGIN` (decoding, preprocessing, the fit, a busy machine)."""
    from ..models.catalogue import CATALOGUE

    spec = CATALOGUE.get(backbone)
    return (spec.cpu_ms if spec is not None and spec.cpu_ms else 50.0) / 1000.0 * _CATALOGUE_MARGIN


#: A cold probe's whole time per image against the catalogue's bare forward pass (batch 8, idle reference CPU): a
#: cautious guess (issue 24's idle cold train + evaluate of 1,300 digits, 48 s, is ~37 ms per image, 1.9x Lite0's
#: 19.2 ms; a loaded machine is slower). Used only until this machine's first cold run records its own figure.
_CATALOGUE_MARGIN = 4.0
#: In the workspace's feature cache: a cold linear probe's seconds per image on this machine, by backbone, so that a
#: re-train (features cached: nothing to time) estimates what an uncached try costs without building a model.
_SPEED_RECORD = "auto_speed.json"


class _Clock:
    """Seconds per image of a linear probe whose features are not cached yet, by backbone: what this run's
    first probe took when it extracted its features (a cold run: forward passes, decoding and the fit, a cautious
    upper bound), else this machine's record of an earlier cold run, else the catalogue's estimate. Scaled
    between backbones by the catalogue's CPU cost ratios; a cold try's own time is recorded for later runs."""

    def __init__(self, workspace: Any, base: str) -> None:
        self.base = base
        cache_dir = getattr(workspace, "cache_dir", None)
        # beside the features it is about: counted, evicted and cleared with them (tl_core.cache)
        self.path = Path(cache_dir) / "features" / _SPEED_RECORD if cache_dir is not None else None
        self.record: dict[str, float] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.record = {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (OSError, ValueError, TypeError, AttributeError):
                self.record = {}

    def observe(self, backbone: str, summary: dict[str, Any], seconds: float, n_items: int) -> None:
        """Record a try's seconds per image if it extracted (most of) its features."""
        misses = int(((summary.get("feature_cache") or {}).get("misses")) or 0)
        if n_items and misses >= max(1, n_items // 2):
            self.record[backbone] = seconds / n_items
            if self.path is not None:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(self.path, self.record)
                except OSError as e:  # an estimate only: the next run measures again
                    log.warning("could not record auto's speed in %s: %s", self.path, e)

    def per_image(self, backbone: str) -> float:
        if backbone in self.record:
            return self.record[backbone]
        if self.base in self.record:
            return self.record[self.base] * _relative_cost(backbone, self.base)
        return _catalogue_seconds_per_image(backbone)


def _announce(runtime: Any, what: TrainConfig | None) -> TrainConfig | None:
    """Rank 0's ``what`` (the next try's config, or None: no more) on every rank of a torchrun group; in one
    process, ``what`` itself."""
    if runtime is None or not runtime.distributed:
        return what
    return gather(runtime, what)[0]


def _follow(train_model: Callable[..., dict[str, Any] | None], data: str | os.PathLike, workspace: Any,
            should_cancel: Callable[[], bool] | None, test_data: str | os.PathLike | None, runtime: Any) -> None:
    """A rank other than 0 of a torchrun group: run each try rank 0 announces (each writes nothing there), until it
    announces the end."""
    while (try_cfg := _announce(runtime, None)) is not None:
        train_model(data, try_cfg, workspace, Path(os.devnull), None, should_cancel, test_data, runtime)
    return None


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
        budget_s: seconds to spend in all (default ``cfg.time_budget``).
    Returns:
        The kept try's summary with ``auto`` added (see the module docstring); None on ranks other than 0.
    """
    emit: Progress = progress or (lambda e: None)
    budget = float(cfg.time_budget if budget_s is None else budget_s)
    t0 = time.perf_counter()
    base = dataclasses.replace(cfg, **dict.fromkeys(SETTINGS_AUTO_CHOOSES))  # each try's strategy defaults
    if runtime is not None and runtime.distributed and not runtime.is_main:
        return _follow(train_model, data, workspace, should_cancel, test_data, runtime)

    def run_try(try_cfg: TrainConfig, folder: str, label: str) -> dict[str, Any] | None:
        _announce(runtime, try_cfg)  # the other ranks of a torchrun group run it too
        return train_model(data, try_cfg, workspace, staging / folder, quiet(label, folder), should_cancel, test_data,
                           runtime)

    def left() -> float:
        return budget - (time.perf_counter() - t0)

    held: dict[str, list[dict[str, Any]]] = {}  # each try's epoch rows, by its staging folder's name

    def quiet(label: str, key: str) -> Progress:
        # each try's epochs are its own: held back, and the kept try's passed on once it is kept (the run's
        # curves, in the store, are those of the model it keeps)
        def f(e: dict[str, Any]) -> None:
            if e.get("stage") in ("epoch", "probe"):
                held.setdefault(key, []).append(e)
                return
            emit({**e, "auto": label})
        return f

    def too_long(name: str, estimate: float) -> str:
        return (f"skipped {name}: estimated {duration_text(estimate)} > {duration_text(max(0.0, left()))} left "
                f"of the {duration_text(budget)} budget")

    staging = run_dir.parent / f".{run_dir.name}.auto"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        emit({"stage": "check", "message": "auto: trying the linear probe (features chosen by cross-validation)"})
        lin_cfg = dataclasses.replace(base, strategy="linear")  # features as asked (default auto)
        t = time.perf_counter()
        lin = run_try(lin_cfg, "linear", "linear probe")
        if lin is None:
            return None
        lin_s = time.perf_counter() - t
        lin_correct = _val_correct(staging / "linear")
        tried = [_tried("linear", cfg.backbone, lin, lin_s, lin_correct)]
        split = lin.get("split") or {}
        n_train, n_val = int(split.get("train") or 0), int(split.get("val") or 0)
        n_items = n_train + n_val + int(split.get("test") or 0)
        clock = _Clock(workspace, cfg.backbone)
        clock.observe(cfg.backbone, lin, lin_s, n_items)
        multi = bool(lin.get("multi_label"))
        notes: list[str] = []

        # -- 2. the other offline backbones' probes, by the same cross-validation ---------------------------------
        k_best = 0  # index in tried of the kept probe
        summaries: dict[int, dict[str, Any]] = {0: lin}
        over_budget: list[str] = []
        others = [b for b in OFFLINE_BACKBONES if b != cfg.backbone]
        first_cv = _cv_score(lin)
        if cfg.weights not in ("auto", "packaged") or cfg.backbone not in OFFLINE_BACKBONES:
            why = None  # the user chose other weights or another backbone: theirs is the comparison to respect
        elif multi:
            why = "multi-label data: backbones are compared on single-label data only"
        elif first_cv is None:
            why = "no cross-validated score to compare backbones by (features were fixed)"
        elif first_cv[1] < MIN_IMAGES_TO_COMPARE_BACKBONES:
            why = (f"{first_cv[1]} labelled images (fewer than {MIN_IMAGES_TO_COMPARE_BACKBONES}): a difference "
                   "between backbones would be within noise")
        elif first_cv[0] >= NO_ROOM_ACCURACY:
            why = f"the first probe's cross-validated accuracy is {first_cv[0]:.1%}: no room for a gain"
        else:
            why = ""
        for b in others if why is not None else []:
            name = f"the {b} linear probe"
            if why:
                tried.append(_skipped("linear", b, f"skipped {name}: {why}"))
                continue
            estimate = n_items * clock.per_image(b) + _TRY_OVERHEAD_S
            if estimate > left():
                tried.append(_skipped("linear", b, too_long(name, estimate), estimate))
                over_budget.append(f"{b} (~{duration_text(estimate)})")
                continue
            emit({"stage": "check", "message": f"auto: trying {name} (~{duration_text(estimate)})"})
            t = time.perf_counter()
            other = run_try(dataclasses.replace(lin_cfg, backbone=b), b, f"{b} probe")
            other_s = time.perf_counter() - t
            clock.observe(b, other, other_s, n_items)
            row = {**_tried("linear", b, other, other_s, _val_correct(staging / b)), "estimated_s": round(estimate, 1)}
            tried.append(row)
            summaries[len(tried) - 1] = other
            best = tried[k_best]["score"] or 0.0
            if row["score"] is not None and (row["score"] > best or (  # a tie: the cheaper backbone
                    row["score"] == best and _relative_cost(b, cfg.backbone)
                    < _relative_cost(tried[k_best]["backbone"], cfg.backbone))):
                k_best = len(tried) - 1
        if over_budget:
            notes.append(f"The probes of {' and '.join(over_budget)} did not fit the {duration_text(budget)} budget "
                         "(raise the time budget to compare backbones).")
        kept_row = tried[k_best]
        kept_backbone = kept_row["backbone"]
        kept_dir = "linear" if k_best == 0 else kept_backbone
        kept, kept_summary = "linear", summaries[k_best]
        if k_best:
            first = tried[0]
            notes.append(f"{kept_backbone} scored {kept_row['score']:.1%} by cross-validation against "
                         f"{first['score']:.1%} for {cfg.backbone}: kept its probe.")
        probe_correct = lin_correct if k_best == 0 else _val_correct(staging / kept_dir)
        probe_s = float(kept_row["seconds"])

        # -- 3. a short partial fine-tune of the kept backbone, on the same split ---------------------------------
        per_class = n_train / max(1, len(lin["classes"]))
        difference = None
        if multi:
            reason = "Multi-label data: auto keeps the linear probe (fine-tuning is not compared on label sets yet)."
            tried.append(_skipped("partial", kept_backbone, "skipped partial fine-tune: multi-label data"))
        elif per_class < MIN_PER_CLASS_TO_FINETUNE:
            reason = (f"{per_class:.0f} training images per class (fewer than {MIN_PER_CLASS_TO_FINETUNE}): "
                      "fine-tuning has no room to beat the probe on so few, so auto did not try it; kept linear.")
            tried.append(_skipped("partial", kept_backbone, f"skipped partial fine-tune: {per_class:.0f} training "
                                  f"images per class (fewer than {MIN_PER_CLASS_TO_FINETUNE})"))
        elif len(probe_correct) < 10:
            reason = "Too few validation images to compare fine-tuning with the probe; kept linear."
            tried.append(_skipped("partial", kept_backbone, "skipped partial fine-tune: fewer than 10 validation "
                                  "images to compare it on"))
        else:
            part_cfg = dataclasses.replace(base, strategy="partial", backbone=kept_backbone).resolved()
            estimate = (part_cfg.epochs * (n_train * _TRAIN_STEP_COST + n_val) * clock.per_image(kept_backbone)
                        + 2 * _TRY_OVERHEAD_S)
            if estimate > left():
                why_skip = too_long("partial fine-tune", estimate)
                tried.append(_skipped("partial", kept_backbone, why_skip, estimate))
                reason = (f"A short fine-tune would take about {duration_text(estimate)} and "
                          f"{duration_text(max(0.0, left()))} of the {duration_text(budget)} budget are left "
                          f"(raise the time budget to try it); kept linear.")
            else:
                emit({"stage": "check",
                      "message": f"auto: trying a short partial fine-tune (~{duration_text(estimate)})"})
                t = time.perf_counter()
                part = run_try(part_cfg, "partial", "partial fine-tune")
                part_s = time.perf_counter() - t
                part_correct = _val_correct(staging / "partial")
                tried.append({**_tried("partial", kept_backbone, part, part_s, part_correct),
                              "estimated_s": round(estimate, 1)})
                diff, hw = paired_difference(probe_correct, part_correct)
                difference = {"points": round(diff, 2), "half_width": round(hw, 2), "images": len(probe_correct)}
                ratio = part_s / max(probe_s, 1e-6)
                if diff - hw > 0:
                    kept, kept_summary, kept_dir = "partial", part, "partial"
                    reason = (f"Fine-tuning gained {diff:+.1f} ± {hw:.1f} points on the {len(probe_correct)} "
                              f"validation images, beyond noise: kept partial ({ratio:.1f}x the probe's time).")
                else:
                    reason = (f"Fine-tuning gained {diff:+.1f} ± {hw:.1f} points on the {len(probe_correct)} "
                              f"validation images, within noise: kept linear, {ratio:.1f}x faster.")
        kept_index = len(tried) - 1 if kept == "partial" else k_best
        tried[kept_index]["status"] = "kept"
        probes = sum(1 for row in tried if row["strategy"] == "linear" and row["status"] != "skipped")
        best_probe = tried[k_best]
        for row in tried:
            if row["status"] == "kept":
                row["why"] = ("kept: " + reason if kept == "partial" else
                              f"kept: the best {row['scored_by']} score of the {probes} probes run" if probes > 1
                              else "kept: the only probe run (the baseline every other try must beat)")
            elif row["status"] != "not kept":
                continue
            elif row["strategy"] != "linear" or row is best_probe:  # the fine-tune, or the probe it beat
                row["why"] = "not kept: " + reason
            else:
                than = ("the kept probe" if kept == "linear" else
                        f"the {best_probe['backbone']} probe the kept fine-tune started from")
                row["why"] = (f"not kept: the same cross-validated score as {than}, from a costlier backbone"
                              if row["score"] == best_probe["score"] else
                              f"not kept: a lower cross-validated score than {than}")
        _announce(runtime, None)  # no more tries: the other ranks of a torchrun group return
        reason = " ".join(notes + [reason])
        RunFiles.discard([run_dir])
        os.replace(staging / kept_dir, run_dir)
        for e in held.get(kept_dir, []):  # the kept try's curves, as if it had been the only one
            emit(e)
        seconds = time.perf_counter() - t0
        return {**kept_summary, "seconds": round(seconds, 3),
                "auto": {"kept": kept, "backbone": kept_backbone, "tried": tried, "difference": difference,
                         "reason": reason, "budget_s": budget, "seconds": round(seconds, 2)}}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
