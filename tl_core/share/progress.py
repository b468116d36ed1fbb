"""What a user reads about a run: a progress line with the time left, durations, how a run ended, and the rows
of the runs table and the run comparison (readable column names, settings as people read them, and settings a
strategy does not use left blank). Plain data; pages draw it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from ..config import field_spec, fields_for_strategy

__all__ = ["describe_progress", "duration_text", "runs_rows", "compare_rows", "setting_text", "ended_text",
           "stop_text", "features_text", "features_cell", "task_progress", "timing_text", "RUN_SETTINGS",
           "COMPARED_SETTINGS", "MISSING", "curve_step", "kept_model", "strategy_text", "model_text"]

#: Settings shown per run in the runs table.
RUN_SETTINGS = ("epochs", "lr", "batch_size", "augment", "seed")
#: Settings compared side by side.
COMPARED_SETTINGS = ("backbone", "strategy", "epochs", "lr", "batch_size", "augment", "seed", "val_split")
#: What a table shows for a value a run does not have (a setting its strategy does not use, no test split).
MISSING = "—"


_STAGES = {
    "queued": "Waiting in the queue",
    "check": "Checking the images",
    "decode": "Decoding the images",
    "extract": "Computing features with the frozen backbone",
    "features": "Choosing the features (cross-validation on the cached features)",
    "probe": "Fitting the linear probe (head initialisation)",
    "train": "Training",
    "epoch": "Training",
    "refit": "Refitting the head on training + validation images",
    "evaluate": "Evaluating the best checkpoint",
    "done": "Done",
}


def duration_text(seconds: float) -> str:
    """A duration as people read it: ``42 s`` or ``3 min 05 s``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s"


def describe_progress(status: str, progress: dict[str, Any] | None,
                      epochs: Sequence[dict[str, Any]] = (), cancelling: bool = False,
                      patience: int | None = None) -> tuple[float, str]:
    """A progress fraction (0-1) and one line of text (stage, counts, time left) for a run.

    The time left counts what is still to come, the final evaluation of the best checkpoint included
    (:func:`_time_left`). While a cancel is pending the line says so at once: the worker stops at its next check
    point, a few seconds later.

    Args:
        status: the run's status.
        progress: the run's last progress event (``stage``, counts, ``eta_s``).
        epochs: the run's epoch records so far (epoch 0: the probe fine-tuning starts from).
        cancelling: a cancel was asked for and the run has not stopped yet.
        patience: the run's early-stopping patience (its config), to say when it may end sooner.
    Returns:
        (fraction done, the line).
    """
    p = progress or {}
    stage = p.get("stage", "queued" if status == "queued" else "")
    if status == "done":
        return 1.0, "Done"
    if status in ("failed", "cancelled", "interrupted"):
        return 0.0, status.capitalize()
    text = _STAGES.get(stage, stage.capitalize() or "Starting")
    if stage == "evaluate" and p.get("message"):  # which pass of the end: the best checkpoint, the open-set bank
        text = str(p["message"])
    frac = 0.0
    if stage in ("epoch", "train", "probe") and p.get("epochs"):
        ep, total_ep = int(p.get("epoch") or 0), int(p["epochs"])
        if stage == "train" and p.get("total"):
            frac = float(p.get("done", 0)) / float(p["total"])
        else:
            frac = ep / max(1, total_ep)
        text += f": epoch {ep}/{total_ep}"
    elif p.get("total"):
        frac = float(p.get("done", 0)) / float(p["total"])
        text += f": {p.get('done', 0)}/{p['total']} images"
    elif stage == "evaluate":
        frac = 1.0
    if cancelling and status in ("running", "queued"):
        return min(1.0, max(0.0, frac)), f"Cancelling… (was: {text}); it stops at its next check point"
    eta = _time_left(stage, p, epochs, int(patience or 0))
    if eta is not None and status == "running":
        text += f" · about {duration_text(eta[0])} left"
        if eta[1] is not None:
            text += f" ({duration_text(eta[1])} if early stopping ends it now)"
    return min(1.0, max(0.0, frac)), text


def _time_left(stage: str, p: dict[str, Any], epochs: Sequence[dict[str, Any]],
               patience: int = 0) -> tuple[float, float | None] | None:
    """Seconds left for a fine-tuning run (and, where early stopping may end it sooner, the seconds left if it
    does so at the first chance), or the engine's ``eta_s`` for another stage; None when unknown.

    Inside an epoch the engine's ``eta_s`` (the pace of this epoch's steps after its first) counts the training
    steps; between epochs the finished epochs are the pace (the first, which warms the loaders and caches up, only
    while it is the only one). Added to either: a validation pass after each epoch still to come, and the final
    "Evaluating the best checkpoint", one more (timed by the last epoch's seconds beyond its training pass, else
    by the probe's epoch 0).
    """
    eta = p.get("eta_s")
    tuned = [e for e in epochs if not e.get("probe")]
    evals = [float(e["seconds"]) - float(e["train_seconds"]) for e in tuned
             if e.get("seconds") is not None and e.get("train_seconds") is not None]
    evals = evals or [float(e["seconds"]) for e in epochs if e.get("probe") and e.get("seconds") is not None]
    eval_s = evals[-1] if evals else 0.0
    if stage == "evaluate":
        if eta is not None:  # a pass that counts its images (the open-set bank's)
            return float(eta), None
        if not evals or not p.get("time"):
            return None
        return max(0.0, eval_s - (time.time() - float(p["time"]))), None
    if stage not in ("epoch", "train") or not p.get("epochs"):
        return (float(eta), None) if eta is not None else None
    total_ep = int(p["epochs"])
    secs = [float(e.get("seconds") or 0) for e in tuned]
    if len(secs) > 1:
        secs = secs[1:]  # the first epoch warms up: later ones are the pace
    per_epoch = sum(secs) / len(secs) if secs else None
    if stage == "train":  # inside epoch `epoch`: its steps left and those of the epochs after it, then validations
        ep = int(p.get("epoch") or 1)
        steps, step = int(p.get("steps") or 0), int(p.get("step") or 0)
        left_epochs = total_ep - ep + 1.0 - (step / steps if steps else 0.0)
        if eta is not None:  # the validation after this epoch and each later one, then the final evaluation
            left = float(eta) + eval_s * (total_ep - ep + 2)
        elif per_epoch is not None:
            left = per_epoch * left_epochs + eval_s
        else:
            return None
    else:  # between epochs: `epoch` finished
        ep = int(p.get("epoch") or 0)
        if per_epoch is None:
            return None
        left_epochs = float(total_ep - ep)
        left = per_epoch * left_epochs + eval_s
    best = [int(e["epoch"]) for e in epochs if e.get("best")]
    if patience and best and per_epoch is not None:
        stop_at = max(best) + patience  # no better epoch from here: the last epoch it runs
        if stop_at < total_ep:
            sooner = left - per_epoch * (total_ep - stop_at)
            return left, (max(eval_s, sooner) if sooner < left - 1 else None)
    return left, None


def setting_text(name: str, value: Any) -> str | None:
    """A :class:`~tl_core.config.TrainConfig` value as people read it: a choice by its label ("Linear probe",
    "Light"), whole numbers without ".0", the validation share as a percentage; None stays None (blank)."""
    if value is None:
        return None
    try:
        spec = field_spec(name)
    except KeyError:
        spec = None
    if spec is not None and spec.choices and value in spec.choices:
        return spec.choices[value].label.split(" (")[0]
    if isinstance(value, bool):
        return "yes" if value else "no"
    if name == "val_split" and isinstance(value, (int, float)):
        return f"{value:.0%}"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and name != "lr" else f"{value:g}"
    return str(value)


def _used(cfg: dict[str, Any]) -> set[str]:
    return set(fields_for_strategy(cfg.get("strategy", "")))


def kept_model(run: dict[str, Any]) -> tuple[str | None, str | None]:
    """The backbone and strategy of the model a run holds, the ones every surface names: its config's, or for an
    ``auto`` run the try it kept (``summary.auto``: e.g. Lite2's linear probe, or the partial fine-tune); an auto
    run that has not kept one yet: its config's backbone and ``"auto"``.

    Args:
        run: a store row (``config``, ``summary``).
    Returns:
        (backbone, strategy name), each None where the row has none.
    """
    cfg = run.get("config") or {}
    auto = (run.get("summary") or {}).get("auto") or {}
    if cfg.get("strategy") == "auto" and auto.get("kept"):
        return auto.get("backbone") or cfg.get("backbone"), str(auto["kept"])
    return cfg.get("backbone"), cfg.get("strategy")


def strategy_text(run: dict[str, Any]) -> str | None:
    """A run's strategy as the runs table and the comparison show it: "Linear probe", or for an ``auto`` run what it
    kept, "Auto → linear probe" (:func:`kept_model`)."""
    strategy = (run.get("config") or {}).get("strategy")
    kept = kept_model(run)[1]
    if strategy == "auto" and kept != "auto":
        return f"Auto → {(setting_text('strategy', kept) or '').lower()}"
    return setting_text("strategy", strategy)


def model_text(run: dict[str, Any]) -> str:
    """The model a run holds in a few words, for a run's header and its label in a list: "efficientnet_lite0 ·
    Linear probe", or for an ``auto`` run the try it kept, "auto → efficientnet_lite2 linear probe"."""
    backbone, kept = kept_model(run)
    if (run.get("config") or {}).get("strategy") == "auto" and kept != "auto":
        return f"auto → {backbone} {(setting_text('strategy', kept) or '').lower()}"
    return f"{backbone} · {setting_text('strategy', kept)}"


def _as_kept(run: dict[str, Any]) -> dict[str, Any]:
    """A run's config with the kept backbone and strategy (which settings and features its model used)."""
    backbone, strategy = kept_model(run)
    return {**(run.get("config") or {}), "backbone": backbone, "strategy": strategy}


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


def runs_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (one per run) for the runs table, with readable column names: run, status, when, data, settings
    and results.

    Accuracies and times stay numbers (the table formats and sorts them); settings are text as
    :func:`setting_text` writes them. Settings the run's strategy does not use (a linear probe has no learning
    rate, batches or augmentation) and results a run does not have are None: the table shows them blank
    (:data:`MISSING`), never a misleading default or the word "None".
    """
    rows = []
    for r in runs:
        cfg = _as_kept(r)  # an auto run: the try it kept (its backbone, the settings and features it used)
        s = r.get("summary") or {}
        w = r.get("weights") or s.get("weights") or {}
        used = _used(cfg)
        row = {
            "Run": r["id"],
            "Status": r["status"],
            "Data": Path(str(r.get("data", ""))).name,
            "Backbone": cfg.get("backbone"),
            "Strategy": strategy_text(r),
            "Features": features_cell(cfg, s),
            "Val accuracy": s.get("val_accuracy"),
            "Test accuracy": s.get("test_accuracy"),
            "Seconds": s.get("seconds"),
            "Best epoch": _int(s.get("best_epoch")),
        }
        for key in RUN_SETTINGS:
            row[field_spec(key).label] = setting_text(key, cfg.get(key)) if key in used else None
        row.update({"Weights": w.get("source"),
                    "Created": time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])),
                    "Error": r.get("error") or None})
        rows.append(row)
    return rows


def compare_rows(runs: Sequence[dict[str, Any]], val_metrics: dict[str, dict[str, Any] | None] | None = None
                 ) -> dict[str, dict[str, str]]:
    """The run comparison as text: {row label: {run id: value}}, settings first, then results.

    Args:
        runs: the runs compared (store rows).
        val_metrics: per run id, its validation metrics (``macro_f1``, ``log_loss``, ``count``) when known.
    Returns:
        Every cell a string; a setting the run's strategy does not use, or a result it does not have, is
        :data:`MISSING`.
    """
    val_metrics = val_metrics or {}
    out: dict[str, dict[str, str]] = {"Status": {}, "Data": {}}
    for key in COMPARED_SETTINGS:
        out[field_spec(key).label] = {}
    out["Features"] = {}  # two runs, two stories: which features each model's last layer saw
    for label in ("Val accuracy", "Test accuracy", "Best epoch", "Seconds", "Macro F1", "Log loss", "Val images"):
        out[label] = {}

    def pct(v: Any) -> str:
        return MISSING if v is None else f"{float(v):.1%}"

    def num(v: Any, fmt: str) -> str:
        return MISSING if v is None else format(float(v), fmt)

    for r in runs:
        i, cfg, s = r["id"], _as_kept(r), r.get("summary") or {}
        used = _used(cfg)
        m = val_metrics.get(i) or {}
        out["Status"][i] = r["status"]
        out["Data"][i] = Path(str(r.get("data", ""))).name or MISSING
        for key in COMPARED_SETTINGS:
            text = (strategy_text(r) if key == "strategy" else
                    setting_text(key, cfg.get(key)) if key in used else None)
            out[field_spec(key).label][i] = MISSING if text is None else text
        out["Features"][i] = features_cell(cfg, s) or MISSING
        out["Val accuracy"][i] = pct(s.get("val_accuracy"))
        out["Test accuracy"][i] = pct(s.get("test_accuracy"))
        out["Best epoch"][i] = MISSING if s.get("best_epoch") is None else str(int(s["best_epoch"]))
        out["Seconds"][i] = num(s.get("seconds"), ".1f")
        out["Macro F1"][i] = num(m.get("macro_f1"), ".3f")
        out["Log loss"][i] = num(m.get("log_loss"), ".3f")
        out["Val images"][i] = MISSING if m.get("count") is None else str(int(m["count"]))
    return out


def ended_text(status: str, error: str | None) -> str:
    """One line on a run that ended without a model: "Cancelled before it started.", "Interrupted: the worker
    process died." — the status word once, never "Cancelled: Cancelled…"."""
    word = status.capitalize()
    err = (error or "").strip()
    if not err:
        return f"{word}."
    if err.lower().startswith(status.lower()):
        return err
    return f"{word}: {err}"


_FEATURE_NAMES = {"last": "the last layer", "depths": "several depths", "flip": "the last layer, flipped views averaged"}


def features_cell(cfg: dict[str, Any], summary: dict[str, Any]) -> str | None:
    """Which features a run's last layer saw, in a few words for the runs table and the comparison: a linear run's
    probe variant (and whether auto chose it); a fine-tuned run's last layer, which its epoch-0 probe started from
    (whatever a linear run with ``features`` auto would choose); None for a scratch run or an unfinished one."""
    strategy = cfg.get("strategy")
    if strategy == "linear":
        v = (summary.get("features") or {}).get("variant")
        if not v:
            return None
        return _FEATURE_NAMES.get(v, v) + (" (auto)" if cfg.get("features") == "auto" else "")
    if strategy in ("partial", "full"):
        return "the last layer, fine-tuned (its probe started there)"
    return None


def features_text(features: dict[str, Any] | None) -> str | None:
    """How a linear run's probe features were chosen (``meta.json`` ``features``, written by
    :mod:`tl_core.models.feature_variants`), in one line for the Train and Evaluate pages, e.g. "Features: several
    depths (C=1), chosen by 5-fold cross-validation (0.877 vs 0.803 for the last layer)". None without a record."""
    if not features or not features.get("variant"):
        return None
    v = features["variant"]
    line = f"Features: {_FEATURE_NAMES.get(v, v)} (C={features.get('linear_c', 1.0):g})"
    cv = features.get("cv") or {}
    if features.get("chosen_by") == "cross-validation" and cv:
        mine = cv.get(f"{v}@{float(features.get('linear_c', 1.0)):g}")
        last = next((s for key, s in cv.items() if key.startswith("last@")), None)
        line += f", chosen by {features.get('folds')}-fold cross-validation"
        if mine is not None and last is not None and v != "last":
            line += (f" ({mine:.3f} vs {last:.3f} for the last layer)" if mine != last else
                     f" ({mine:.3f}, tied with the last layer: a tie goes to several depths)")
        elif mine is not None:
            best_other = max((s for key, s in cv.items() if not key.startswith("last@")), default=None)
            line += f" ({mine:.3f}" + (f" vs {best_other:.3f} for several depths)" if best_other is not None else ")")
    elif features.get("chosen_by") == "cross-validation":
        line += ", the default (too few images per class to cross-validate)"
    return line


def curve_step(run: dict[str, Any]) -> str:
    """What one point of a run's training curves is: ``"solver round"`` for a linear probe (also the probe an
    ``auto`` run kept), ``"epoch"`` for fine-tuning.

    Args:
        run: a store row (``config``, ``summary``).
    """
    return "solver round" if kept_model(run)[1] == "linear" else "epoch"


def stop_text(strategy: str, stop: dict[str, Any], best_epoch: int | None) -> str | None:
    """One or two sentences on how training ended and what would change the outcome.

    Early stopping is named with its numbers ("stopped at epoch 4 of 20: validation did not improve for 4
    epochs"), and the advice fits it: more epochs cannot help a run that patience stopped.
    """
    if not stop:
        return None
    if strategy == "linear" or stop.get("reason") in ("converged", "iterations"):  # auto may keep the probe
        steps = stop.get("iterations") or stop.get("epoch")  # a run saved before iterations were recorded: rounds
        unit = "L-BFGS iterations" if stop.get("iterations") else "solver rounds"
        if stop.get("reason") == "converged":
            return (f"The linear probe converged after {steps} {unit} and keeps that fit: it minimises the "
                    "classic recipe's objective on the training images. It does not pick a step that scored best "
                    "on validation: that would tune it to the validation images and make its score look better "
                    "than it is.")
        return (f"The linear probe stopped after {steps} {unit} without converging; lower the probe's C (a "
                "stronger regularisation converges faster).")
    epoch, epochs, patience = stop.get("epoch"), stop.get("epochs"), stop.get("patience")
    if stop.get("reason") == "patience":
        text = (f"Stopped at epoch {epoch} of {epochs}: validation accuracy did not improve for {patience} "
                f"epoch{'s' if patience != 1 else ''} (early stopping), so the epoch-{best_epoch} weights were kept.")
        if best_epoch == 0:
            text += (" Fine-tuning never beat the linear probe it started from (epoch 0, on the last layer's "
                     "features): more epochs would stop at the same place. More images per class give it room to "
                     "help; a larger patience lets it try longer. A linear run may choose other features and score "
                     "differently: the Runs comparison shows which features each run used.")
        else:
            text += " More epochs would not change this; a larger patience lets it try longer."
        return text
    if best_epoch == epochs:
        return (f"Ran all {epochs} epochs and was still improving at the last one: more epochs may help.")
    if best_epoch == 0:
        return (f"Ran all {epochs} epochs without beating the linear probe it started from (epoch 0, on the last "
                "layer's features) on the validation images, so the probe's weights were kept. More images per "
                "class give fine-tuning room to help.")
    return f"Ran all {epochs} epochs; epoch {best_epoch} was the best on validation and its weights were kept."


def task_progress(progress: dict[str, Any] | None, label: str) -> tuple[float, str]:
    """A running task's progress fraction (0-1) and one line: what it does, counts, time left.

    Uses the task's own ``fraction`` and ``eta_s`` when it reports them (time-weighted progress), else
    ``done``/``total``.
    """
    p = progress or {}
    text = str(p.get("message") or label)
    done, total = p.get("done"), p.get("total")
    if p.get("fraction") is not None:
        frac = float(p["fraction"])
    elif total:
        frac = float(done or 0) / float(total)
    else:
        frac = 0.0
    if total:
        text += f": {done or 0}/{total}"
    eta = p.get("eta_s")
    if eta is not None:
        text += f" · about {duration_text(float(eta))} left"
    return min(1.0, max(0.0, frac)), text


def timing_text(total_s: float, waited_s: float = 0.0, ran_s: float | None = None) -> str:
    """How long a result took from the click ("12 s from the click"), with the wait in the queue and the
    run time when the wait was noticeable (at least 2 s and a tenth of the whole)."""
    text = f"{duration_text(total_s)} from the click"
    if waited_s >= 2.0 and waited_s >= 0.1 * total_s:
        ran = total_s - waited_s if ran_s is None else ran_s
        text += f" (waited {duration_text(waited_s)} in the queue, ran {duration_text(ran)})"
    return text
