"""The embedding-map scatter with a click-to-see-the-image panel (the Data and Evaluate pages share it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from tl_core.share import figures as charts


def _short(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def frame(result: dict[str, Any]) -> pd.DataFrame:
    """The DataFrame of an ``embedding_map`` task's result (rows and attributes, as JSON)."""
    df = pd.DataFrame(result["rows"])
    df.attrs.update(result.get("attrs") or {})
    return df


def embedding_map_with_picker(df, key: str, highlight: bool = False) -> None:
    """An embedding-map scatter with the clicked image shown beside it (plotly hover cannot show images)."""
    fig, rows = charts.embedding_map(df, highlight_misclassified=highlight)
    left, right = st.columns([3, 1])
    with left:
        event = st.plotly_chart(fig, key=key, on_select="rerun", selection_mode=("points", "box", "lasso"),
                                width="stretch")
    with right:
        points = list(getattr(getattr(event, "selection", None), "points", None) or [])
        picked = []
        for pt in points:
            c, i = pt.get("curve_number"), pt.get("point_index")
            if c is not None and i is not None and c < len(rows) and i < len(rows[c]):
                picked.append(df.loc[rows[c][i]])
        if not picked:
            st.caption("Click a dot (or draw a box around several) to see the images here.")
        for r in picked[:6]:
            if Path(r["path"]).is_file():
                st.image(r["path"], width=150)
            pred = (f" · predicted **{r['predicted']}** ({r['confidence']:.0%})"
                    if isinstance(r.get("predicted"), str) else "")
            split = f" · {r['split']} folder" if r.get("split") else ""
            st.caption(f"**{r['label']}** · {_short(r['path'])}{split}{pred}")
        if len(picked) > 6:
            st.caption(f"… and {len(picked) - 6} more.")
