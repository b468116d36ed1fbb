"""The model card: a Markdown page that says what a model is for, what it was trained on, how good it is,
how sure it is (calibration), and where it fails. Written into every bundle; read from the run's files
through their owner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


from ..metrics import calibration, figure_of
from ..models.openset import describe as describe_open_set
from ..share.progress import features_text
from ..storage.files import PREDICTIONS, RunFiles, RunMeta
from .multilabel import card_intended_use, card_metrics_lines

__all__ = ["model_card", "pretraining_data"]


def pretraining_data(meta: dict[str, Any]) -> str:
    """What the backbone's weights were pretrained on, from the weights record and timm's tag."""
    w = meta.get("weights") or {}
    src = w.get("source")
    if src == "random":
        return "None: the network was trained from random initialisation (no pretraining)."
    if src == "local":
        return (f"Unknown: local weights file `{Path(str(w.get('detail', ''))).name}`; check where it came from "
                "and what it was trained on.")
    tag = f"{w.get('detail') or ''} {meta.get('arch') or ''}".lower()
    if "in22k" in tag or "in21k" in tag:
        base = "ImageNet-21k/22k (about 14 M images, about 21,000 classes)"
        return base + (", then fine-tuned on ImageNet-1k" if "ft_in1k" in tag else "")
    if "laion" in tag or "openai" in tag or "clip" in tag:
        return "Web-scale image-text pairs (CLIP-style pretraining)"
    return "ImageNet-1k (ILSVRC-2012: 1.28 M labelled photographs of 1,000 object classes)"


def _fmt(x: Any, nd: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _metrics_table(rep: dict[str, Any], classes: Sequence[str], title: str) -> list[str]:
    if rep.get("multi_label"):
        return card_metrics_lines(rep, title)
    lines = [f"### {title}", "",
             f"Accuracy {figure_of(rep)}; macro F1 {figure_of(rep, 'macro_f1')}; "
             f"log loss {_fmt(rep.get('log_loss'))}.", ""]
    if rep.get("per_class"):
        lines += ["| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {c} | {_fmt(r['precision'], 3)} | {_fmt(r['recall'], 3)} | {_fmt(r['f1'], 3)} | {r['support']} |"
                  for c, r in rep["per_class"].items()]
    if rep.get("confusion"):
        lines += ["", "Confusion matrix (rows = true class, columns = predicted class):", "",
                  "| true \\ predicted | " + " | ".join(classes) + " |",
                  "| --- |" + " ---: |" * len(classes)]
        lines += [f"| {c} | " + " | ".join(str(x) for x in row) + " |" for c, row in zip(classes, rep["confusion"])]
    return lines + [""]


def _calibration_lines(metrics: dict[str, Any], files: RunFiles, meta: RunMeta) -> list[str]:
    val = metrics.get("val") or {}
    if meta.multi_label:
        return ["Not measured: the reliability table and temperature scaling are for one-class-per-image "
                "predictions; this multi-label model's per-label thresholds are listed with the metrics.", ""]
    cal_rec = metrics.get("calibration") or {}
    split = files.predictions().get("val") if files.has(PREDICTIONS) else None
    if val.get("ece") is None and split is None and not cal_rec:
        return ["Not measured for this model.", ""]
    temperature = meta.temperature
    # the interval of the ECE shown: the calibration record's own, or metrics.json's (records from before have none)
    ci = cal_rec.get("ece_before_ci") if "ece_before" in cal_rec else val.get("ece_ci")
    lines = [f"Expected calibration error (ECE, 10 bins) of the trained model on the validation images: "
             f"{_fmt(cal_rec.get('ece_before', val.get('ece')))}"
             + (f" (95% CI {_fmt(ci[0])}–{_fmt(ci[1])}, bootstrap)" if ci else "")
             + " (0 = confidences match accuracy exactly)."]
    if temperature != 1.0:
        oof, oof_ci = cal_rec.get("ece_after_oof"), cal_rec.get("ece_after_oof_ci")
        lines.append(f"Temperature scaling applied: T = {_fmt(temperature, 3)} (probabilities = softmax(logits / T)); "
                     f"ECE after scaling {_fmt(cal_rec.get('ece_after'))}, measured on the same "
                     f"{cal_rec.get('count', 'validation')} images T was fitted on, so optimistic"
                     + (f"; out of fold (each image scored with a T fitted on the others) {_fmt(oof)}"
                        + (f" (95% CI {_fmt(oof_ci[0])}–{_fmt(oof_ci[1])}, bootstrap)" if oof_ci else "")
                        if oof is not None else "") + ".")
    else:
        lines.append("Temperature scaling: not applied.")
    if cal_rec.get("warning"):
        lines.append(f"Note: {cal_rec['warning']}")
    if split is not None and len(split):
        y = split.targets(meta.classes)
        keep = y >= 0
        cal = calibration(split.probs(temperature)[keep], y[keep])
        lines += ["", f"Reliability on the validation images{' (with the temperature)' if temperature != 1.0 else ''}:",
                  "", "| confidence bin | images | mean confidence | accuracy |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {b['lo']:.1f}-{b['hi']:.1f} | {b['count']} | {_fmt(b['confidence'], 3)} | {_fmt(b['accuracy'], 3)} |"
                  for b in cal["bins"] if b["count"]]
    return lines + [""]


def model_card(files: RunFiles) -> str:
    """A Markdown model card.

    Sections: intended use, backbone and its pretraining data, training data (classes, counts,
    imbalance, skipped files), training configuration, metrics per class with the confusion matrix,
    calibration (when measured), limitations and the bias caveat.

    Args:
        files: the run's (or bundle's) files; saved predictions, when there are, add a reliability table.
    Returns:
        Markdown text.
    """
    run_meta = files.meta()
    chosen = features_text(run_meta.features)  # linear runs: which features the probe chose, and why
    meta = run_meta.to_dict()
    config = files.config_dict()
    metrics = files.metrics().to_dict()
    classes = list(meta["classes"])
    ds = meta.get("dataset") or {}
    w = meta.get("weights") or {}
    counts = ds.get("counts") or {}
    skipped = ds.get("skipped") or []
    val, test = metrics.get("val") or {}, metrics.get("test") or {}
    title = ", ".join(classes[:6]) + (" …" if len(classes) > 6 else "")
    strategy = config.get("strategy", "?")
    if run_meta.multi_label:
        intended = card_intended_use(classes, run_meta.thresholds)
    else:
        intended = (
            f"Sorts an image into one of {len(classes)} classes: {', '.join(classes)}. Meant for images like the "
            "training images (same kind of subject, camera, framing and style) and for the purpose they were collected "
            "for. It always answers with one of these classes, even for an image that belongs to none of them, so do "
            "not use it to detect whether something is present at all. Not intended for decisions about people "
            "(identity, health, eligibility) or for safety-critical use without further validation.")
    lines = [
        f"# Model card: {title} {'multi-label ' if run_meta.multi_label else ''}classifier",
        "",
        f"Made with TL Studio by transfer learning ({strategy} strategy on `{meta.get('backbone')}`).",
        "",
        "## Intended use",
        "",
        intended,
        "",
        "## Backbone",
        "",
        f"- Architecture: `{meta.get('arch')}` (catalogue name `{meta.get('backbone')}`)",
        f"- Pretrained weights: {w.get('source', '?')} — {w.get('detail', '?')} (fingerprint `{w.get('fingerprint', '?')}`)",
        f"- Pretraining data: {pretraining_data(meta)}",
        f"- Input: {meta['preprocess']['input_size']}×{meta['preprocess']['input_size']} RGB; resize the shorter side to "
        f"{meta['preprocess']['resize']} px ({meta['preprocess']['interpolation']}), centre crop, scale to 0-1, "
        f"normalise with mean {list(meta['preprocess']['mean'])} and std {list(meta['preprocess']['std'])}",
        "",
        "## Training data",
        "",
        f"- Source: `{ds.get('source', '?')}` (content fingerprint `{ds.get('fingerprint', '?')}`), "
        f"{ds.get('num_images', '?')} usable images",
        f"- Split: {', '.join(f'{k} {v}' for k, v in (ds.get('split') or {}).items()) or 'n/a'}",
        f"- Imbalance: the largest class has {_fmt(ds.get('imbalance_ratio'), 2)}× the images of the smallest",
    ]
    if ds.get("image_size"):
        s = ds["image_size"]
        lines.append(f"- Image sizes: {s.get('min_width')}-{s.get('max_width')} × {s.get('min_height')}-{s.get('max_height')} px")
    lines.append(f"- Skipped files: {len(skipped)}"
                 + (": " + "; ".join(f"`{Path(str(s.get('path'))).name}` ({s.get('reason')})" for s in skipped[:10])
                    + (f"; … and {len(skipped) - 10} more" if len(skipped) > 10 else "") if skipped else ""))
    if counts:
        lines += ["", "| class | images |", "| --- | ---: |"] + [f"| {c} | {n} |" for c, n in counts.items()]
    for warning in ds.get("warnings") or []:
        lines.append(f"\n> Data warning: {warning}")
    lines += [
        "",
        "## Training configuration",
        "",
        (f"Strategy `linear` (frozen backbone; the last layer fitted by "
         f"{'one-vs-rest ' if run_meta.multi_label else ''}logistic regression in "
         f"{metrics.get('epochs_run', '?')} L-BFGS steps)" if strategy == "linear" else
         f"Strategy `{strategy}`, {metrics.get('epochs_run', '?')} epochs run (best epoch {metrics.get('best_epoch', '?')})")
        + f", {_fmt(metrics.get('seconds'), 1)} s." + (f" {chosen}." if chosen else ""),
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True),
        "```",
        "",
        "## Metrics",
        "",
    ]
    if run_meta.refitted:
        lines += ["The linear head was validated on the validation images, then fitted again on training + "
                  "validation images for this model; the validation figures below are those of the fit that never "
                  "saw them.", ""]
    lines += ["Each figure comes with its 95% interval: the range the figure would likely fall in on more images "
              "like these (Wilson for accuracy, a bootstrap over the images for F1 and mAP).", ""]
    cv = metrics.get("cv")
    if cv:
        lines += ["### Cross-validated", "",
                  f"Cross-validated on {cv.get('count')} images ({cv.get('folds')} folds, every labelled image "
                  f"predicted by the probe fitted without it): {figure_of(cv)}.", ""]
    if val:
        lines += _metrics_table(val, classes, "Validation images")
    if test:
        lines += _metrics_table(test, classes, "Held-out test images")
    if not val and not test:
        lines += ["No metrics were recorded with this model.", ""]
    lines += ["## Calibration", ""]
    lines += _calibration_lines(metrics, files, run_meta)
    open_set = files.open_set_record()
    lines += ["## Images unlike the training images", "", describe_open_set(open_set), ""]
    n_val = val.get("count")
    lines += [
        "## Limitations and caveats",
        "",
        f"- The metrics come from {n_val if n_val is not None else 'a few'} held-out images; with this few, accuracy "
        "on new images can easily differ by several points (the 95% intervals above say how many), and more for images unlike the training set (other cameras, "
        "lighting, backgrounds, drawings vs photos).",
        ("- It knows only the classes above and will confidently pick one of them for anything else; the `unknown` flag "
         "(above) catches images unlike the training images, not every image outside the classes." if open_set else
         "- It knows only the classes above and will confidently pick one of them for anything else (out-of-distribution "
         "images are not rejected)."),
        "- Confidence scores are probabilities from a softmax; they are not guaranteed to be calibrated (see above).",
        "- Bias: the pretrained backbone carries the biases of its pretraining data (ImageNet-style datasets "
        "over-represent some regions, cultures, objects and people and under-represent others), and the fine-tuned "
        "model inherits them, along with any bias in how the training images were collected and labelled. Check "
        "performance separately on the groups of images that matter for your use before relying on it.",
        "",
        "## Files",
        "",
        "`model.safetensors` (weights), `meta.json` (classes, architecture, preprocessing), `config.json` "
        "(training configuration), `metrics.json` (validation metrics and training curves), `ood.json` and "
        "`ood_bank.safetensors` (the `unknown` thresholds and the training images' content features and style "
        "statistics, with their file names and labels: see docs/openset.md), `manifest.json` "
        "(SHA-256 of each file). Predict with `tl-core predict THIS.zip image.jpg ...` or in Python with "
        "`tl_core.share.loading.load_bundle('THIS.zip')`.",
    ]
    return "\n".join(lines) + "\n"

