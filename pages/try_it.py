"""Try it: predict new images (uploads or the camera) with a finished run; top-k bars; CSV for many.

The model never loads in the server: an uploaded image is kept in the workspace (content-addressed) and an
interactive worker, which keeps the model warm, predicts it and draws its Grad-CAM heat-map. Once warm it
answers in well under a second, so the page waits for it under a spinner.
"""

from pathlib import Path

import pandas as pd
import streamlit as st

from pages import _live as live_ui
from pages import _multilabel as ml_view
from pages import _session as session
from pages import _tasks as task_ui
from tl_core.data.images import IMAGE_EXTENSIONS
from tl_core.data.library import save_upload
from tl_core.errors import DatasetError, TLError
from tl_core.models.openset import UNKNOWN_NOTE
from tl_core.storage.files import RunFiles
from tl_core.share import figures as charts
from tl_core.share.progress import kept_model

session.ensure_router()

st.title("Try it")
st.caption("Give the model images it has never seen. It answers with the closest of its classes, and warns "
           "when an image is unlike its training images.")

SHOW_CHARTS = 12
#: Grad-CAM overlays are drawn for at most this many images (each takes a backward pass).
SHOW_CAMS = 6
#: How an unknown image differs from the training images, by ``ood_reason``.
REASONS = {
    "style": "in style (colours, strokes, texture)",
    "content": "in what it shows",
    "both": "both in style (colours, strokes, texture) and in what it shows",
}


def _distances(r: dict) -> str:
    """The two distances of a prediction row in words (1.0 = the run's threshold), or "" for an older run."""
    d = r.get("ood_distances") or {}
    parts = [f"{what} {d[key]:.2f}" for key, what in (("style", "style"), ("content", "content"))
             if isinstance(d.get(key), (int, float))]
    return f"distances: {', '.join(parts)}; 1.00 is this run's threshold" if parts else ""


def open_set_note(r: dict, multi: bool) -> None:
    """Whether the image is like the training images, and when it is not, in which way (style or content)."""
    if r.get("unknown") is None:
        return
    dist = _distances(r)
    if r["unknown"]:
        how = REASONS.get(r.get("ood_reason") or "")
        closest = ("these labels are only the closest answer" if multi else
                   f"**{r['label']}** is only the closest class")
        st.warning(f"Unlike your training images {how + ' ' if how else ''}("
                   + (dist if dist else f"distance {r['ood_score']:.3f}, above this run's threshold")
                   + f"): {closest}; the image may belong to none of them.", icon=":material/help:")
    else:
        score = r.get("ood_score")
        st.caption("Like your training images (" + (dist or f"distance {score:.3f}") + ").")


def nearest_images(ws, task, r: dict) -> None:
    """The closest training images (thumbnails the worker made, with their labels), or a sentence."""
    near = r.get("nearest")
    if not near:
        return
    shown = [n for n in near if n.get("thumb")]
    st.caption("Closest training images (label · distance of what they show):" if shown else
               "The closest training images are no longer on disk (the dataset was moved or deleted).")
    if not shown:
        return
    cols = st.columns(len(near))
    for col, n in zip(cols, near):
        if n.get("thumb"):
            col.image(str(task_ui.result_file(ws, task, n["thumb"])), width=90,
                      caption=f"{n.get('label') or '?'} · {n['distance']:.2f}")
        else:
            col.caption("(file gone)")


with session.page_errors():
    ws = session.workspace()
    by_id = session.finished_runs(ws)
    ids = list(by_id)
    run_id = st.selectbox(
        "Model (a finished run)", ids, key=session.bind("run", ids, ids[0]), on_change=session.picked,
        args=("run",),
        format_func=lambda i: f"{i} · {Path(by_id[i]['data']).name} · {kept_model(by_id[i])[0]} · "
                              f"{(by_id[i].get('summary') or {}).get('val_accuracy') or 0:.1%}",
    )
    files = RunFiles(ws.run_dir(run_id))
    classes = files.meta().classes
    # the run's files key every request: a temperature applied on Evaluate gives new predictions
    run = {"run": str(files.dir), "stamp": files.stamp()}
    st.caption(f"Classes: {', '.join(classes)}" if not files.meta().multi_label else
               f"Multi-label model: each image gets every label whose probability reaches the label's threshold "
               f"(labels: {', '.join(classes)}).")
    top_k = 3 if files.meta().multi_label else st.slider(  # multi-label: every label's probability is listed
        "Show the top", 1, min(10, len(classes)), min(3, len(classes)),
        help="How many of the most likely classes to show per image.")

    if st.toggle("Live: classify the camera continuously, in this browser", key="try_live",
                 help="The model runs in your browser (ONNX Runtime Web) on every camera frame: the bars and the "
                      "'unlike your training images' warning follow the camera. Nothing is sent to the server, "
                      "except a picture you choose to add to the dataset."):
        if files.meta().multi_label:
            st.info("Live shows single-label models; this one is multi-label: upload images below instead.")
        else:
            live_ui.live_view(ws, run, by_id[run_id]["data"], classes)

    uploads = st.file_uploader("Images", type=sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS),
                               accept_multiple_files=True,
                               help="One or many; many give a CSV to download. " + session.upload_note())
    st.caption(session.upload_note("each image"))
    show_cam = st.toggle("Show where the model looked (Grad-CAM)", value=True, key="try_gradcam",
                         help="A heat-map over each image: red marks the parts that made the model choose its "
                              f"answer. Drawn for the first {SHOW_CAMS} images.")
    inputs = [(f.name, f.getvalue()) for f in uploads or []]
    if st.toggle("Use the camera", help="Take a picture with this device's camera (the browser asks first)."):
        shot = st.camera_input("Take a picture")
        if shot is not None:
            inputs.append(("camera.jpg", shot.getvalue()))

    saved, names = [], []
    for name, data in inputs:
        try:
            saved.append(str(save_upload(ws, name, data)))
            names.append(name)
        except DatasetError as e:
            st.warning(str(e))
    if not saved:
        st.info("Upload an image (or take one) to see what the model predicts.")
        st.stop()

    task, pred = task_ui.wait_for(ws, "predict", {**run, "images": saved, "names": names, "top_k": int(top_k)},
                                  f"Predicting {len(saved)} image(s)")
    for s in pred["skipped"]:
        st.warning(f"{s['path']}: {s['reason']}")
    rows = pred["rows"]
    # the worker keeps the order and leaves out unreadable images: pair each row with its file in order
    pending = list(zip(names, saved))
    files_of = []
    for r in rows:
        while pending and pending[0][0] != r["path"]:
            pending.pop(0)
        files_of.append(pending.pop(0)[1] if pending else None)
    st.subheader("Predictions")
    if rows and rows[0].get("unknown") is None:
        st.caption(UNKNOWN_NOTE)
    for n, r in enumerate(rows[:SHOW_CHARTS]):
        if show_cam and n < SHOW_CAMS:
            a, cam_col, b = st.columns([1, 1, 3])
        else:
            (a, b), cam_col = st.columns([1, 3]), None
        # the image as the worker read it (RGB, small; a 16-bit or CMYK upload is converted there)
        a.image(str(task_ui.result_file(ws, task, r["image"])), width=160, caption="your image")
        if cam_col is not None and files_of[n]:
            try:
                cam_task, cam = task_ui.wait_for(ws, "explain", {**run, "image": files_of[n]},
                                                 "Grad-CAM")
                cam_col.image(str(task_ui.result_file(ws, cam_task, cam["overlay"])), width=160,
                              caption=f"where it saw '{cam['target']}'" + (" (no clear region)" if cam["flat"] else ""))
            except TLError as e:  # one heat-map failing leaves the predictions shown
                cam_col.caption(f"No heat-map: {e}")
        with b:
            if "probs" in r:  # a multi-label model: its label set, a probability per label
                ml_view.show_prediction(r)
            else:
                st.markdown(f"**{r['path']}** → **{r['label']}** ({r['confidence']:.1%})")
            open_set_note(r, "probs" in r)
            if "probs" not in r:
                st.plotly_chart(charts.top_k(r["top_k"]), width="stretch", key=f"topk-{n}")
            nearest_images(ws, task, r)
    if len(rows) > SHOW_CHARTS:
        st.caption(f"Charts for the first {SHOW_CHARTS}; all {len(rows)} are in the table below.")
    if len(rows) > 1:
        st.dataframe(pd.DataFrame([{"image": r["path"], "prediction": r["label"], "confidence": r["confidence"],
                                    "unlike training": r.get("unknown"), "how": r.get("ood_reason") or ""}
                                   for r in rows]), hide_index=True,
                     width="stretch")
        st.download_button("Download predictions (CSV)", pred["csv"], file_name=f"predictions-{run_id}.csv",
                           mime="text/csv", on_click="ignore")
