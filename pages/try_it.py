"""Try it: predict new images (uploads or the camera) with a finished run; top-k bars; CSV for many."""

import io
from pathlib import Path

import pandas as pd
import streamlit as st

from pages import _charts as charts
from pages import _session as session
from tl_core.data import IMAGE_EXTENSIONS, image_from_bytes
from tl_core.errors import DatasetError
from tl_core.export import load_model, predict_pil, write_predictions_csv

session.ensure_router()

st.title("Try it")
st.caption("Give the model images it has never seen. It always answers with one of its classes, even for an "
           "image that belongs to none of them: watch the confidence.")

SHOW_CHARTS = 12


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def _model(run_dir: str):
    # read-only and shared: the same trained model serves every user
    return load_model(run_dir)


with session.page_errors():
    ws = session.workspace()
    runs = ws.store().list(status="done")
    if not runs:
        st.info("No finished run yet: train one first.")
        session.link("train", "Go to Train", ":material/model_training:")
        st.stop()
    by_id = {r["id"]: r for r in runs}
    ids = list(by_id)
    run_id = st.selectbox(
        "Model (a finished run)", ids, key=session.bind("run", ids, ids[0]), on_change=session.picked,
        args=("run",),
        format_func=lambda i: f"{i} · {Path(by_id[i]['data']).name} · {by_id[i]['config'].get('backbone')} · "
                              f"{(by_id[i].get('summary') or {}).get('val_accuracy') or 0:.1%}",
    )
    tm = _model(str(ws.run_dir(run_id)))
    st.caption(f"Classes: {', '.join(tm.classes)}")
    top_k = st.slider("Show the top", 1, min(10, len(tm.classes)), min(3, len(tm.classes)),
                      help="How many of the most likely classes to show per image.")

    files = st.file_uploader("Images", type=sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS),
                             accept_multiple_files=True, help="One or many; many give a CSV to download.")
    inputs = [(f.name, f.getvalue()) for f in files or []]
    if st.toggle("Use the camera", help="Take a picture with this device's camera (the browser asks first)."):
        shot = st.camera_input("Take a picture")
        if shot is not None:
            inputs.append(("camera.jpg", shot.getvalue()))

    images, names = [], []
    for name, data in inputs:
        try:
            images.append(image_from_bytes(data, name))
            names.append(name)
        except DatasetError as e:
            st.warning(str(e))
    if not images:
        st.info("Upload an image (or take one) to see what the model predicts.")
        st.stop()

    rows = predict_pil(tm, images, top_k=top_k)
    for r, name in zip(rows, names):
        r["path"] = name
    st.subheader("Predictions")
    for n, (img, r) in enumerate(zip(images[:SHOW_CHARTS], rows)):
        a, b = st.columns([1, 3])
        a.image(img, width=160)
        with b:
            st.markdown(f"**{r['path']}** → **{r['label']}** ({r['confidence']:.1%})")
            st.plotly_chart(charts.top_k(r["top_k"]), width="stretch", key=f"topk-{n}")
    if len(rows) > SHOW_CHARTS:
        st.caption(f"Charts for the first {SHOW_CHARTS}; all {len(rows)} are in the table below.")
    if len(rows) > 1:
        st.dataframe(pd.DataFrame([{"image": r["path"], "prediction": r["label"], "confidence": r["confidence"]}
                                   for r in rows]), hide_index=True, width="stretch")
        buf = io.StringIO()
        write_predictions_csv(rows, buf)
        st.download_button("Download predictions (CSV)", buf.getvalue(), file_name=f"predictions-{run_id}.csv",
                           mime="text/csv")
