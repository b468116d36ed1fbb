"""Plotly figures: the engine computes the numbers, these draw them, for the app's pages and the HTML report alike
(one drawing of each chart). No streamlit here."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

__all__ = ["class_counts", "training_curves", "confusion", "top_k", "advisor_scores", "embedding_map", "domain_gap",
           "reliability", "ARM_NAMES", "learning_curve", "ood_histogram", "style_gap"]

_COLORS = qualitative.Plotly

# Layout shared by every chart (app and HTML report alike), so that no chart's pieces overlap:
# - plotly's modebar (zoom, download…) appears over the top-right corner of a chart on hover: the top margin keeps
#   a band for it above the (subplot) titles, and a little room even on charts with nothing above the plot;
# - the legend sits below everything, at the bottom of the figure (``yref="container"``), with a bottom margin
#   that holds the tick labels, the x-axis title and the legend's rows: never over the axis title.
# - Subplot titles are two short lines (at most :data:`TITLE_LINE` characters each): side by side on a phone
#   (390 px) each subplot is about 170 px wide, and a longer line is clipped at the chart's edge.
#: The most characters one line of a subplot title has (see above).
TITLE_LINE = 21
_TOP_TITLED = 64  # a chart with (subplot) titles or annotations above the plot
_TOP_PLAIN = 36  # nothing above the plot: room for the modebar only
_AXIS_BAND = 62  # tick labels and the x-axis title below the plot
_LEGEND_ROW = 24


def _layout(titled: bool = False, legend_rows: int = 0, x_title: bool = True) -> dict[str, Any]:
    """Margins and legend placement for a chart (see above): ``legend_rows`` 0 means no legend shown."""
    bottom = (_AXIS_BAND if x_title else 30) + legend_rows * _LEGEND_ROW
    out: dict[str, Any] = dict(margin=dict(l=10, r=10, t=_TOP_TITLED if titled else _TOP_PLAIN, b=bottom),
                               modebar=dict(bgcolor="rgba(255,255,255,0.7)"))
    if legend_rows:
        out["legend"] = dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0, xanchor="left")
    return out


def _legend_rows(n_entries: int, per_row: int = 4) -> int:
    return 0 if n_entries == 0 else -(-n_entries // per_row)


def class_counts(counts: Mapping[str, int], split_counts: Mapping[str, Mapping[str, int]] | None = None) -> go.Figure:
    """Images per class; stacked by split when the folder layout gives one."""
    fig = go.Figure()
    if split_counts:
        for name, c in split_counts.items():
            fig.add_bar(x=list(c), y=list(c.values()), name=name)
        fig.update_layout(barmode="stack")
    else:
        fig.add_bar(x=list(counts), y=list(counts.values()), marker_color=_COLORS[0],
                    text=list(counts.values()), textposition="outside", cliponaxis=False)
    fig.update_layout(height=300, xaxis_title="class", yaxis_title="images",
                      **_layout(legend_rows=_legend_rows(len(split_counts or {}))))
    return fig


def training_curves(series: Mapping[str, Sequence[Mapping[str, Any]]], x_title: str = "epoch") -> go.Figure:
    """Loss and accuracy per epoch; per run the training curve dashed and the validation curve solid.

    Args:
        series: run name -> its recorded rows (``epoch``, ``train_loss``, ``val_acc``, ...).
        x_title: what one step is: ``"epoch"`` for fine-tuning, ``"solver round"`` for a linear probe
            (its rows are rounds of L-BFGS iterations, see :mod:`tl_core.models.probe`).
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss<br>(lower is better)", "Accuracy<br>(higher is better)"),
                        horizontal_spacing=0.08)
    for n, (name, rows) in enumerate(series.items()):
        color = _COLORS[n % len(_COLORS)]
        x = [r["epoch"] for r in rows]
        for col, metric in ((1, "loss"), (2, "acc")):
            for split, dash in (("train", "dot"), ("val", "solid")):
                key = f"{split}_{metric}"
                y = [r.get(key) for r in rows]
                if not any(v is not None for v in y):
                    continue
                label = ("training" if split == "train" else "validation")
                fig.add_scatter(x=x, y=y, mode="lines+markers" if len(x) < 30 else "lines",
                                line=dict(color=color, dash=dash), legendgroup=f"{name}-{split}",
                                name=f"{name} {label}" if len(series) > 1 else label,
                                showlegend=col == 1, row=1, col=col)
    last = max((r["epoch"] for rows in series.values() for r in rows), default=0)
    # whole epochs only (epoch 0 is the linear probe fine-tuning starts from); epochs and losses are never
    # negative, so a run with a single epoch is a dot on positive axes, not one floating around 0
    fig.update_xaxes(title_text=x_title, rangemode="nonnegative", **({"dtick": 1} if last <= 20 else {}))
    fig.update_yaxes(rangemode="tozero", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    entries = sum(1 for t in fig.data if t.showlegend is not False)
    fig.update_layout(height=340 + 24 * max(0, _legend_rows(entries) - 1),
                      **_layout(titled=True, legend_rows=_legend_rows(entries)))
    return fig


def confusion(matrix: Sequence[Sequence[float]], classes: Sequence[str], normalised: bool) -> go.Figure:
    """Confusion matrix heatmap, rows = true class, columns = predicted class, numbers in the cells."""
    n = len(classes)
    fig = go.Figure(go.Heatmap(
        z=matrix, x=list(classes), y=list(classes), colorscale="Blues",
        zmin=0, zmax=1 if normalised else None,
        texttemplate="%{z:.0%}" if normalised else "%{z}",
        hovertemplate="true %{y}<br>predicted %{x}<br>%{z" + (":.1%" if normalised else "") + "}<extra></extra>",
        colorbar=dict(title="share" if normalised else "images"),
    ))
    side = min(700, 140 + 48 * n)
    fig.update_layout(height=side, xaxis_title="predicted class", yaxis_title="true class",
                      yaxis_autorange="reversed", **_layout())
    fig.update_xaxes(side="bottom", tickangle=-30 if n > 6 else 0)
    return fig


def top_k(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Horizontal bars of the top-k classes of one prediction, best on top."""
    labels = [r["label"] for r in rows][::-1]
    conf = [r["confidence"] for r in rows][::-1]
    fig = go.Figure(go.Bar(x=conf, y=labels, orientation="h", marker_color=_COLORS[0],
                           text=[f"{c:.1%}" for c in conf], textposition="auto"))
    fig.update_layout(height=60 + 34 * len(rows), xaxis=dict(range=[0, 1], tickformat=".0%"),
                      **{**_layout(x_title=False), "margin": dict(l=10, r=10, t=_TOP_PLAIN, b=10)})
    return fig


# --------------------------------------------------------------------------------------------------
# insight views (issue 8)
# --------------------------------------------------------------------------------------------------
def advisor_scores(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Per backbone: the transferability score (LogME) and the quick probe / k-NN accuracies."""
    names = [r["backbone"] for r in rows]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("LogME transferability<br>(higher is better)",
                                        "Quick accuracy on<br>validation images"))
    # LogME is often negative and only its order matters: dots (not bars from 0, which read upside down)
    scores = [r["logme"] for r in rows]
    spread = (max(scores) - min(scores)) or abs(max(scores)) or 1.0
    fig.add_scatter(x=names, y=scores, mode="markers+text", marker=dict(size=16, color=_COLORS[0]),
                    text=[f"{v:.3f}" for v in scores], textposition="top center", name="LogME", showlegend=False,
                    cliponaxis=False, row=1, col=1)
    fig.update_yaxes(range=[min(scores) - 0.35 * spread, max(scores) + 0.35 * spread], row=1, col=1)
    for n, (key, label) in enumerate((("probe_accuracy", "linear probe"), ("knn_accuracy", "k-NN"))):
        fig.add_bar(x=names, y=[r[key] for r in rows], name=label, marker_color=_COLORS[n + 1],
                    text=[f"{r[key]:.0%}" for r in rows], textposition="outside", cliponaxis=False, row=1, col=2)
    fig.update_yaxes(range=[0, 1.12], tickformat=".0%", row=1, col=2)
    fig.update_layout(height=360, barmode="group", **_layout(titled=True, legend_rows=1, x_title=False))
    return fig


def embedding_map(df: Any, title: str = "", highlight_misclassified: bool = False) -> tuple[go.Figure, list[list[int]]]:
    """Scatter of a 2-D embedding map, one trace per class; optionally the misclassified points ringed in red.

    Returns:
        (figure, rows): ``rows[c][i]`` is the DataFrame row of point ``i`` of trace ``c`` (for click selection).
    """
    fig = go.Figure()
    rows: list[list[int]] = []
    has_pred = "predicted" in df and df["predicted"].notna().any()
    for n, (label, part) in enumerate(df.groupby("label", sort=True)):
        names = [str(p).rsplit("/", 1)[-1] for p in part["path"]]
        extra = [f"<br>predicted {p} ({c:.0%})" if isinstance(p, str) else ""
                 for p, c in zip(part["predicted"], part["confidence"])] if has_pred else [""] * len(part)
        fig.add_scatter(
            x=part["x"].tolist(), y=part["y"].tolist(), mode="markers", name=str(label),
            marker=dict(size=8, color=_COLORS[n % len(_COLORS)], line=dict(width=0.5, color="white")),
            selected=dict(marker=dict(size=13)), unselected=dict(marker=dict(opacity=0.45)),
            customdata=list(zip(names, [f"<br>{s} folder" if s else "" for s in part["split"]], extra)),
            hovertemplate="<b>%{fullData.name}</b> · %{customdata[0]}%{customdata[1]}%{customdata[2]}"
                          "<extra></extra>",
        )
        rows.append([int(i) for i in part.index])
    if highlight_misclassified and "misclassified" in df:
        wrong = df[df["misclassified"]]
        if len(wrong):
            fig.add_scatter(
                x=wrong["x"].tolist(), y=wrong["y"].tolist(), mode="markers", name=f"misclassified ({len(wrong)})",
                marker=dict(size=15, symbol="circle-open", color="#dc2626", line=dict(width=2.5)),
                customdata=[[str(p).rsplit("/", 1)[-1], t, pr] for p, t, pr in
                            zip(wrong["path"], wrong["label"], wrong["predicted"])],
                hovertemplate="<b>misclassified</b> · %{customdata[0]}<br>true %{customdata[1]}, predicted "
                              "%{customdata[2]}<extra></extra>",
            )
            rows.append([int(i) for i in wrong.index])
    fig.update_xaxes(showticklabels=False, title_text="")
    fig.update_yaxes(showticklabels=False, title_text="", scaleanchor=None)
    fig.update_layout(height=460, title=dict(text=title, font=dict(size=14)), clickmode="event+select",
                      margin=dict(l=10, r=10, t=_TOP_TITLED if title else _TOP_PLAIN, b=10),
                      legend=dict(orientation="v", x=1.01, y=1))
    return fig, rows


def domain_gap(per_class: Mapping[str, Mapping[str, Any]], levels: Sequence[tuple[float, str, str]]) -> go.Figure:
    """Mean max-softmax of the ImageNet head per class, with the thresholds of the gap levels."""
    names = list(per_class)
    vals = [per_class[c]["mean_max_softmax"] for c in names]
    fig = go.Figure(go.Bar(x=vals, y=names, orientation="h", marker_color=_COLORS[0],
                           text=[f"{v:.2f}" for v in vals], textposition="inside", insidetextanchor="end",
                           hovertemplate="%{y}: %{x:.2f}<extra></extra>"))
    for lo, level, _ in levels:
        if lo > 0:
            fig.add_vline(x=lo, line=dict(color="#9ca3af", dash="dash"),
                          annotation_text=f"{level} above", annotation_position="top")
    fig.update_layout(height=140 + 30 * len(names), xaxis=dict(range=[0, 1], title="how sure the ImageNet head is "
                                                                               "(mean max-softmax)"),
                      yaxis=dict(autorange="reversed"), **_layout(titled=True))
    return fig


def style_gap(per_class: Mapping[str, Mapping[str, Any]], bounds: Sequence[Sequence[Any]]) -> go.Figure:
    """The style gap per class (distance of the images' feature statistics from the backbone's ImageNet ones),
    with the level bounds ``[(upper bound, level), ...]`` as lines; classes without one are left out."""
    names = [c for c in per_class if per_class[c].get("style_gap") is not None]
    vals = [per_class[c]["style_gap"] for c in names]
    fig = go.Figure(go.Bar(x=vals, y=names, orientation="h", marker_color=_COLORS[1],
                           text=[f"{v:.2f}" for v in vals], textposition="inside", insidetextanchor="end",
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    for hi, level in bounds:
        fig.add_vline(x=hi, line=dict(color="#9ca3af", dash="dash"), annotation_text=f"{level} below",
                      annotation_position="top")
    top = max([*vals, *(b[0] for b in bounds)], default=0.5)
    fig.update_layout(height=140 + 30 * len(names), xaxis=dict(range=[0, top * 1.1], title="style gap (0 = ImageNet's "
                                                                                             "average statistics)"),
                      yaxis=dict(autorange="reversed"), **_layout(titled=True))
    return fig


#: reliability bins with fewer images are drawn as open markers, off the line
RELIABILITY_MIN_BIN = 5


def reliability(before: Mapping[str, Any], after: Mapping[str, Any] | None = None,
                temperature: float | None = None) -> go.Figure:
    """Reliability diagram: accuracy against confidence per bin (on the diagonal = calibrated)."""
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#9ca3af", dash="dash"),
                    name="perfectly calibrated", hoverinfo="skip")
    curves = [("before (T = 1)", before, _COLORS[1])]
    if after is not None:
        curves.append((f"after temperature scaling (T = {temperature:.2f})" if temperature else "after", after,
                       _COLORS[2]))
    for name, rel, color in curves:
        # the line joins the bins that hold enough images to mean something; a bin of one or two images (an
        # accuracy of 0% or 100% by chance) is an open marker off the line, not a steep swing of it
        full = [b for b in rel["bins"] if b.get("count", 0) >= RELIABILITY_MIN_BIN]
        few = [b for b in rel["bins"] if 0 < b.get("count", 0) < RELIABILITY_MIN_BIN]
        for solid, bins in ((True, full), (False, few)):
            if not bins:
                continue
            fig.add_scatter(
                x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins],
                mode="lines+markers" if solid else "markers", legendgroup=name, showlegend=solid or not full,
                name=f"{name}: ECE {rel['ece']:.3f}",
                line=dict(color=color),
                marker=dict(size=[6 + 14 * (b["count"] / max(1, rel["count"])) ** 0.5 for b in bins], color=color,
                            symbol="circle" if solid else "circle-open"),
                customdata=[[b["count"], b["lo"], b["hi"]] for b in bins],
                hovertemplate="confidence %{x:.0%} → accuracy %{y:.0%}<br>%{customdata[0]} images "
                              "(bin %{customdata[1]:.1f}–%{customdata[2]:.1f})"
                              + ("" if solid else "<br>too few images to read much into") + "<extra></extra>",
            )
    fig.update_layout(height=400, xaxis=dict(range=[0, 1.02], tickformat=".0%", title="confidence (predicted)"),
                      yaxis=dict(range=[0, 1.02], tickformat=".0%", title="accuracy (actual)"),
                      **_layout(legend_rows=_legend_rows(len(curves) + 1, per_row=2)))
    return fig


ARM_NAMES = {"linear": "pretrained, linear probe", "finetune": "pretrained, fine-tuned", "scratch": "from scratch"}


def learning_curve(rows: Sequence[Mapping[str, Any]], n_classes: int) -> go.Figure:
    """Validation accuracy against images per class, one line per lab arm; time taken beside it."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.1,
                        subplot_titles=("Validation accuracy<br>(higher is better)", "Time taken<br>(seconds)"))
    arms = [a for a in ARM_NAMES if any(r["arm"] == a for r in rows)]
    sizes = sorted({r["images_per_class"] for r in rows})
    for n, arm in enumerate(arms):
        pts = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["images_per_class"])
        color = {"linear": _COLORS[0], "finetune": _COLORS[2], "scratch": _COLORS[1]}.get(arm, _COLORS[n])
        fig.add_scatter(
            x=[r["images_per_class"] for r in pts], y=[r["val_accuracy"] for r in pts], mode="lines+markers",
            name=ARM_NAMES[arm], legendgroup=arm,
            line=dict(color=color, width=3, dash="dot" if arm == "scratch" else "solid"),
            marker=dict(size=9), customdata=[[r["train_images"], r["seconds"]] for r in pts],
            hovertemplate="%{x} images per class (%{customdata[0]} in all)<br>accuracy %{y:.0%}"
                          "<br>%{customdata[1]:.1f} s<extra>" + ARM_NAMES[arm] + "</extra>",
            row=1, col=1,
        )
        fig.add_bar(x=[str(r["images_per_class"]) for r in pts], y=[r["seconds"] for r in pts], name=ARM_NAMES[arm],
                    legendgroup=arm, showlegend=False, marker_color=color, row=1, col=2,
                    hovertemplate="%{x} per class: %{y:.1f} s<extra>" + ARM_NAMES[arm] + "</extra>")
    if n_classes:
        fig.add_scatter(x=[sizes[0], sizes[-1]] if sizes else [0, 1], y=[1 / n_classes] * 2, mode="lines",
                        line=dict(color="#9ca3af", dash="dash"), name=f"chance ({1 / n_classes:.0%})", row=1, col=1)
    fig.update_xaxes(title_text="training images per class", type="log", tickvals=sizes, row=1, col=1)
    fig.update_xaxes(title_text="images per class", type="category", row=1, col=2)
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%", row=1, col=1)
    entries = sum(1 for t in fig.data if t.showlegend is not False)
    fig.update_layout(height=440, barmode="group", **_layout(titled=True, legend_rows=_legend_rows(entries, 3)))
    return fig


def ood_histogram(scores: Sequence[float], threshold: float, saved: float | None = None,
                  what: str = "validation images", foreign: Sequence[float] | None = None,
                  xaxis: str = "distance to the nearest training image (cosine)") -> go.Figure:
    """The distribution of open-set scores with the threshold as a line (and the saved one, dotted, when a
    different one is being tried): right of it is ``unknown``. ``foreign``: scores of images the user says are
    foreign, overlaid in another colour (a good threshold has them on its right)."""
    fig = go.Figure(go.Histogram(x=list(scores), nbinsx=40, marker_color=_COLORS[0], name=what,
                                 opacity=0.75 if foreign else 1.0))
    if foreign:
        fig.add_histogram(x=list(foreign), nbinsx=40, marker_color=_COLORS[1], name="foreign images", opacity=0.75)
        fig.update_layout(barmode="overlay")
    fig.add_vline(x=threshold, line=dict(color="crimson", width=2),
                  annotation_text=f"threshold {threshold:.3f}", annotation_position="top right")
    if saved is not None and abs(saved - threshold) > 1e-9:
        fig.add_vline(x=saved, line=dict(color="grey", width=1, dash="dot"),
                      annotation_text=f"saved {saved:.3f}", annotation_position="top left")
    fig.update_layout(xaxis_title=xaxis, yaxis_title="images" if foreign else what,
                      bargap=0.05, height=340 if foreign else 320, showlegend=bool(foreign),
                      **_layout(titled=True, legend_rows=1 if foreign else 0))
    return fig
