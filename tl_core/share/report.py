"""A self-contained HTML report of one run, for stakeholders: it opens offline, from a file or an email.

One HTML file holds everything: plotly.js inlined once (so the charts work without network), the
training curves, confusion matrix, per-class table, calibration, the most confidently wrong images
(thumbnails embedded as base64 data URIs), the dataset summary and the configuration.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ExportError

__all__ = ["build_report", "write_report", "MAX_THUMBNAILS"]

log = logging.getLogger(__name__)

#: How many misclassified images the report shows at most.
MAX_THUMBNAILS = 24
_THUMB_PX = 160
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}

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
pre { background: white; padding: 12px; border-radius: 8px; overflow-x: auto; }
"""


def _read_json(path: Path, required: bool) -> Any:
    if not path.is_file():
        if required:
            raise ExportError(f"{path.parent} is not a finished run: {path.name} is missing.")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}); the run directory is damaged.") from None


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f}%"


def _figure_html(fig: Any, first: bool, div_id: str) -> str:
    """A plotly figure as a <div>; plotly.js goes inline with the first figure only."""
    import plotly.io as pio

    return pio.to_html(fig, include_plotlyjs=bool(first), full_html=False, config=_PLOT_CONFIG, div_id=div_id,
                       include_mathjax=False)


def _curves_figure(history: Sequence[dict[str, Any]], strategy: str) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    epochs = [h.get("epoch") for h in history]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Accuracy"))
    styles = {"train": dict(color="#3366cc"), "val": dict(color="#dc3912")}
    for split in ("train", "val"):
        loss = [h.get(f"{split}_loss") for h in history]
        acc = [h.get(f"{split}_acc") for h in history]
        name = "training" if split == "train" else "validation"
        fig.add_trace(go.Scatter(x=epochs, y=loss, mode="lines+markers" if len(epochs) < 30 else "lines",
                                 name=f"{name} loss", line=styles[split], legendgroup=split), row=1, col=1)
        fig.add_trace(go.Scatter(x=epochs, y=acc, mode="lines+markers" if len(epochs) < 30 else "lines",
                                 name=f"{name} accuracy", line={**styles[split], "dash": "dot"}, legendgroup=split),
                      row=1, col=2)
    xlabel = "L-BFGS step (linear probe)" if strategy == "linear" else "epoch"
    fig.update_xaxes(title_text=xlabel)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_layout(height=360, margin=dict(l=50, r=20, t=40, b=50), legend=dict(orientation="h", y=-0.25),
                      template="plotly_white")
    return fig


def _confusion_figure(cm: list[list[int]], classes: Sequence[str], title: str) -> Any:
    import plotly.graph_objects as go

    z = np.asarray(cm, dtype=float)
    rows = z.sum(1, keepdims=True)
    frac = np.divide(z, rows, out=np.zeros_like(z), where=rows > 0)
    text = [[f"{int(z[i, j])}" for j in range(len(classes))] for i in range(len(classes))]
    fig = go.Figure(go.Heatmap(z=frac, x=list(classes), y=list(classes), text=text, texttemplate="%{text}",
                               colorscale="Blues", zmin=0, zmax=1, colorbar=dict(title="row share"),
                               hovertemplate="true %{y}<br>predicted %{x}<br>%{text} images<extra></extra>"))
    size = max(360, min(900, 60 * len(classes) + 160))
    fig.update_layout(title=title, height=size, width=size + 120, template="plotly_white",
                      xaxis=dict(title="predicted class", side="bottom", tickangle=-30),
                      yaxis=dict(title="true class", autorange="reversed"), margin=dict(l=90, r=20, t=50, b=90))
    return fig


def _calibration_figure(probs: np.ndarray, y: np.ndarray, temperature: float) -> tuple[Any, float]:
    """Reliability diagram of the saved (T = 1) probabilities, and of the temperature-scaled ones when T != 1."""
    import plotly.graph_objects as go

    from .evaluate import calibration
    from .export import _with_temperature

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                             line=dict(color="#9aa5b1", dash="dash")))
    curves = [("trained model", probs, "#dc3912")]
    if temperature != 1.0:
        curves.append((f"with temperature {temperature:.2f}", _with_temperature(probs, temperature), "#3366cc"))
    ece = 0.0
    for name, p, color in curves:
        cal = calibration(p, y)
        bins = [b for b in cal["bins"] if b["count"]]
        ece = float(cal["ece"])
        fig.add_trace(go.Scatter(x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins],
                                 mode="lines+markers", name=f"{name} (ECE {ece:.3f})", line=dict(color=color),
                                 marker=dict(size=[6 + min(b["count"], 40) / 2 for b in bins]),
                                 text=[f"{b['count']} images" for b in bins],
                                 hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{text}<extra></extra>"))
    fig.update_layout(height=380, width=520, template="plotly_white", xaxis=dict(title="confidence", range=[0, 1]),
                      yaxis=dict(title="accuracy", range=[0, 1.02]), margin=dict(l=60, r=20, t=30, b=50),
                      legend=dict(orientation="h", y=-0.25))
    return fig, ece


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
    from .data import load_image
    from .errors import DatasetError

    try:
        im = load_image(path)
    except DatasetError:
        return None
    im.thumbnail((_THUMB_PX, _THUMB_PX))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _ece_card(val: dict[str, Any], cal: dict[str, Any], meta: dict[str, Any]) -> str:
    if float(meta.get("temperature", 1.0)) != 1.0 and cal.get("ece_after") is not None:
        return f"{cal['ece_after']:.3f} (was {cal.get('ece_before', val.get('ece', 0)):.3f})"
    return "n/a" if val.get("ece") is None else f"{val['ece']:.3f}"


def _per_class_table(per_class: dict[str, dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{_esc(c)}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td><td>{r['f1']:.3f}</td>"
        f"<td>{r['support']}</td></tr>" for c, r in per_class.items())
    return ("<table class='per-class'><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
            f"<th>images</th></tr></thead><tbody>{rows}</tbody></table>")


def build_report(run_dir: str | os.PathLike, image_roots: Sequence[str | os.PathLike] = ()) -> str:
    """One self-contained HTML page about a finished run.

    Args:
        run_dir: the run directory (``meta.json``, ``config.json``, ``metrics.json``; ``predictions.json``
            adds the reliability diagram).
        image_roots: extra folders to look for misclassified images whose recorded path is relative.
    Returns:
        The HTML document as a string (plotly.js inlined once; thumbnails as data URIs; no network needed).
    Raises:
        ExportError: the directory is not a finished run or its files are damaged.
    """
    import plotly

    from . import __version__

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a run directory; give a run id or a run directory.")
    meta = _read_json(run_dir / "meta.json", True)
    config = _read_json(run_dir / "config.json", True)
    metrics = _read_json(run_dir / "metrics.json", True)
    predictions = _read_json(run_dir / "predictions.json", False)
    classes = list(meta["classes"])
    val = metrics.get("val") or {}
    test = metrics.get("test") or {}
    ds = meta.get("dataset") or {}
    w = meta.get("weights") or {}
    strategy = config.get("strategy", "?")
    trained = time.strftime("%Y-%m-%d %H:%M", time.localtime((run_dir / "meta.json").stat().st_mtime))

    figures: list[str] = []

    def fig(f: Any, div_id: str) -> str:
        out = _figure_html(f, first=not figures, div_id=div_id)
        figures.append(div_id)
        return f"<div class='plot'>{out}</div>"

    parts: list[str] = []
    title = f"{', '.join(classes[:6])}{' …' if len(classes) > 6 else ''} classifier"
    parts.append(f"<h1>{_esc(title)}</h1>")
    parts.append(f"<p class='sub'>Run {_esc(run_dir.name)} · {_esc(meta.get('backbone'))} · {_esc(strategy)} strategy · "
                 f"weights: {_esc(w.get('source'))} ({_esc(w.get('detail'))}) · trained {trained}</p>")
    cards = [("validation accuracy", _pct(val.get("accuracy"))), ("macro F1", f"{val.get('macro_f1', 0):.3f}" if val else "n/a")]
    if test:
        cards.append(("test accuracy", _pct(test.get("accuracy"))))
    cards += [("classes", str(len(classes))), ("images", str(ds.get("num_images", "?"))),
              ("validation images", str(val.get("count", "?"))),
              ("training time", f"{metrics.get('seconds', 0):.1f} s"),
              ("calibration error (ECE)", _ece_card(val, metrics.get("calibration") or {}, meta))]
    parts.append("<div class='cards'>" + "".join(
        f"<div class='card'><div class='v'>{_esc(v)}</div><div class='k'>{_esc(k)}</div></div>" for k, v in cards) + "</div>")

    history = metrics.get("history") or []
    parts.append("<h2>Training curves</h2>")
    if history:
        note = ("Linear probe: the backbone is frozen and only the last layer is fitted (L-BFGS); each step is "
                "reported as an epoch." if strategy == "linear" else
                f"Best epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')} (its weights are the ones kept).")
        parts.append(fig(_curves_figure(history, strategy), "curves") + f"<p class='note'>{_esc(note)}</p>")
    else:
        parts.append("<p class='note'>No per-epoch history was recorded for this run.</p>")

    for rep, name, key in ((val, "validation", "val"), (test, "test", "test")):
        if not rep:
            continue
        parts.append(f"<h2>Confusion matrix ({name} images)</h2>")
        parts.append(fig(_confusion_figure(rep["confusion"], classes, f"Rows = true class, columns = predicted ({rep.get('count')} images)"),
                         f"confusion-{key}"))
        parts.append(f"<h2>Per-class metrics ({name} images)</h2>")
        parts.append(_per_class_table(rep.get("per_class") or {}))
        parts.append(f"<p class='note'>Accuracy {_pct(rep.get('accuracy'))}; macro F1 {rep.get('macro_f1')}; "
                     f"log loss {rep.get('log_loss')}. Precision: of the images predicted as the class, the share "
                     "that truly are; recall: of the images of the class, the share found.</p>")

    rows = (predictions or {}).get("val") or []
    cidx = {c: i for i, c in enumerate(classes)}
    usable = [r for r in rows if r.get("label") in cidx and len(r.get("probs") or []) == len(classes)]
    if usable:
        probs = np.array([r["probs"] for r in usable], dtype=np.float64)
        y = np.array([cidx[r["label"]] for r in usable])
        temperature = float(meta.get("temperature", 1.0))
        cal_fig, ece = _calibration_figure(probs, y, temperature)
        parts.append("<h2>Calibration</h2>")
        parts.append(fig(cal_fig, "calibration") +
                     f"<p class='note'>Do confidences mean what they say? Points on the diagonal are perfectly calibrated. "
                     f"Expected calibration error {ece:.3f} on {len(usable)} validation images"
                     + ("" if temperature == 1.0 else
                        f" with temperature scaling (T = {temperature:.3f}, fitted on these same images, so optimistic)")
                     + ".</p>")

    wrong = metrics.get("top_losses") or []
    parts.append("<h2>Most confidently wrong images</h2>")
    if not wrong:
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
    parts.append(f"<p>Source <code>{_esc(ds.get('source'))}</code>: {_esc(ds.get('num_images'))} images; split "
                 f"{_esc(', '.join(f'{k} {v}' for k, v in (ds.get('split') or {}).items()))}; imbalance "
                 f"{_esc(ds.get('imbalance_ratio'))}×; {len(ds.get('skipped') or [])} file(s) skipped.</p>")
    if counts:
        parts.append("<table class='counts'><thead><tr><th>class</th><th>images</th></tr></thead><tbody>" +
                     "".join(f"<tr><td>{_esc(c)}</td><td>{n}</td></tr>" for c, n in counts.items()) + "</tbody></table>")
    for warning in ds.get("warnings") or []:
        parts.append(f"<div class='warn'>{_esc(warning)}</div>")

    parts.append("<h2>Model and configuration</h2>")
    pre = meta.get("preprocess") or {}
    parts.append(f"<p>Architecture <code>{_esc(meta.get('arch'))}</code>; input {_esc(pre.get('input_size'))} px "
                 f"({_esc(pre.get('interpolation'))}); pretrained weights {_esc(w.get('source'))}: {_esc(w.get('detail'))}. "
                 "A pretrained backbone carries the biases of its pretraining data; check the model on the images "
                 "that matter for your use.</p>")
    parts.append(f"<pre>{_esc(json.dumps(config, indent=2, sort_keys=True))}</pre>")
    parts.append(f"<p class='note'>Generated by TL Studio {__version__} on {time.strftime('%Y-%m-%d %H:%M')} with "
                 f"plotly {plotly.__version__}; this file is self-contained and works offline.</p>")

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
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return {"path": str(out), "bytes": out.stat().st_size}
