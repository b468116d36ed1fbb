"""Try it: predict new images (uploads or the camera) with a finished run; top-k bars; CSV for many."""

import hashlib
import io
import threading
from pathlib import Path

import pandas as pd
import streamlit as st

from pages import _charts as charts
from pages import _compute as compute
from pages import _session as session
from tl_core.data import IMAGE_EXTENSIONS, image_from_bytes
from tl_core.errors import DatasetError
from tl_core.explain import explain_image
from tl_core.export import load_model, predict_pil, write_predictions_csv

session.ensure_router()

st.title("Try it")
st.caption("Give the model images it has never seen. It always answers with one of its classes, even for an "
           "image that belongs to none of them: watch the confidence.")

SHOW_CHARTS = 12
#: Grad-CAM overlays are drawn for at most this many images (each takes a backward pass).
SHOW_CAMS = 6


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def _model(run_dir: str, stamp: tuple):
    # read-only and shared: the same trained model serves every user; `stamp` (the run's files) reloads it
    # when the run changes (a temperature applied on the Evaluate page)
    return load_model(run_dir)


@st.cache_resource(show_spinner=False)
def _cam_lock() -> threading.Lock:
    # Grad-CAM hooks into the shared model: one explanation at a time
    return threading.Lock()


@st.cache_data(show_spinner=False, max_entries=128)
def _cam(run_dir: str, stamp: tuple, digest: str, _tm, _image) -> dict:
    """Grad-CAM overlay of one image (keyed by the run's files and the image's bytes)."""
    with _cam_lock():
        res = explain_image(_tm, _image)
    ov = res["overlay"]
    ov.thumbnail((480, 480))
    return {"overlay": ov, "target": res["target"], "flat": res["flat"]}


with session.page_errors():
    ws = session.workspace()
    by_id = session.finished_runs(ws)
    ids = list(by_id)
    run_id = st.selectbox(
        "Model (a finished run)", ids, key=session.bind("run", ids, ids[0]), on_change=session.picked,
        args=("run",),
        format_func=lambda i: f"{i} · {Path(by_id[i]['data']).name} · {by_id[i]['config'].get('backbone')} · "
                              f"{(by_id[i].get('summary') or {}).get('val_accuracy') or 0:.1%}",
    )
    run_dir = ws.run_dir(run_id)
    stamp = compute.file_stamp(run_dir / "meta.json", run_dir / "model.safetensors")
    tm = _model(str(run_dir), stamp)
    st.caption(f"Classes: {', '.join(tm.classes)}")
    top_k = st.slider("Show the top", 1, min(10, len(tm.classes)), min(3, len(tm.classes)),
                      help="How many of the most likely classes to show per image.")

    files = st.file_uploader("Images", type=sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS),
                             accept_multiple_files=True,
                             help="One or many; many give a CSV to download. " + session.upload_note())
    st.caption(session.upload_note("each image"))
    show_cam = st.toggle("Show where the model looked (Grad-CAM)", value=True, key="try_gradcam",
                         help="A heat-map over each image: red marks the parts that made the model choose its "
                              f"answer. Drawn for the first {SHOW_CAMS} images.")
    inputs = [(f.name, f.getvalue()) for f in files or []]
    if st.toggle("Use the camera", help="Take a picture with this device's camera (the browser asks first)."):
        shot = st.camera_input("Take a picture")
        if shot is not None:
            inputs.append(("camera.jpg", shot.getvalue()))

    images, names, digests = [], [], []
    for name, data in inputs:
        try:
            images.append(image_from_bytes(data, name))
            names.append(name)
            digests.append(hashlib.sha256(data).hexdigest())
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
        if show_cam and n < SHOW_CAMS:
            a, cam_col, b = st.columns([1, 1, 3])
        else:
            (a, b), cam_col = st.columns([1, 3]), None
        a.image(img, width=160, caption="your image")
        if cam_col is not None:
            with cam_col, st.spinner("Grad-CAM…"):
                cam = _cam(str(run_dir), stamp, digests[n], tm, img)
            cam_col.image(cam["overlay"], width=160,
                          caption=f"where it saw '{cam['target']}'" + (" (no clear region)" if cam["flat"] else ""))
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
