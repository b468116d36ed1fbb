"""Plotly figures of the pages: tl_core computes the numbers, these only draw them."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

_COLORS = qualitative.Plotly
_LAYOUT = dict(margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.18))


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
    fig.update_layout(height=300, xaxis_title="class", yaxis_title="images", **_LAYOUT)
    return fig


def training_curves(series: Mapping[str, Sequence[Mapping[str, Any]]]) -> go.Figure:
    """Loss and accuracy per epoch; per run the training curve dashed and the validation curve solid."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss (lower is better)", "Accuracy (higher is better)"),
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
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_layout(height=340, **_LAYOUT)
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
                      yaxis_autorange="reversed", margin=dict(l=10, r=10, t=30, b=10))
    fig.update_xaxes(side="bottom", tickangle=-30 if n > 6 else 0)
    return fig


def top_k(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Horizontal bars of the top-k classes of one prediction, best on top."""
    labels = [r["label"] for r in rows][::-1]
    conf = [r["confidence"] for r in rows][::-1]
    fig = go.Figure(go.Bar(x=conf, y=labels, orientation="h", marker_color=_COLORS[0],
                           text=[f"{c:.1%}" for c in conf], textposition="auto"))
    fig.update_layout(height=60 + 34 * len(rows), xaxis=dict(range=[0, 1], tickformat=".0%"),
                      margin=dict(l=10, r=10, t=10, b=10))
    return fig
