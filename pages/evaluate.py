"""Evaluate: accuracy, per-class precision/recall/F1, the confusion matrix, and a closer look: the most
confident mistakes, Grad-CAM heat-maps of them, calibration (temperature scaling) and the embedding map."""

from pathlib import Path

import pandas as pd
import streamlit as st

from pages import _charts as charts
from pages import _compute as compute
from pages import _map_view as map_view
from pages import _session as session
from tl_core.app_support import normalise_rows, refitted, run_metrics
from tl_core.calibrate import calibrate_run
from tl_core.embedding import embedding_map
from tl_core.errors import TLError
from tl_core.explain import explain_misclassified

session.ensure_router()

st.title("Evaluate")
st.caption("Measured on the validation images, held out from the training that produced these figures.")


def _label(run: dict) -> str:
    cfg = run.get("config") or {}
    acc = (run.get("summary") or {}).get("val_accuracy")
    acc_txt = f"{acc:.1%}" if isinstance(acc, (int, float)) else "?"
    return f"{run['id']} · {Path(run['data']).name} · {cfg.get('backbone')} · {cfg.get('strategy')} · {acc_txt}"



GRADCAM_IMAGES = 12
VIEWS = {"mistakes": "Mistakes", "gradcam": "Grad-CAM", "calibration": "Calibration", "map": "Embedding map"}


def _stamp(run_dir: Path) -> tuple:
    # results of a run change when its model, temperature or predictions do
    return compute.file_stamp(*(run_dir / f for f in ("meta.json", "model.safetensors", "predictions.json")))


def show_mistakes(metrics: dict) -> None:
    wrong = metrics.get("top_losses") or []
    if not wrong:
        st.success("No validation image was misclassified.")
        return
    st.caption(f"{len(wrong)} misclassified image(s), most confident first: these show what the model "
               "confuses, and sometimes a wrong label in the data.")
    cols = st.columns(6)
    missing = 0
    shown = 0
    for row in wrong[:30]:
        if not Path(row["path"]).is_file():
            missing += 1
            continue
        with cols[shown % 6]:
            st.image(row["path"], width="stretch")
            st.caption(f"true **{row['true']}** · predicted **{row['predicted']}** · {row['confidence']:.0%}")
        shown += 1
    if missing:
        st.caption(f"{missing} image(s) are no longer on disk (the dataset was moved or deleted).")


def _small(img, side: int = 320):
    img = img.copy()
    img.thumbnail((side, side))
    return img


def show_gradcam(run_dir: Path) -> None:
    st.caption("**Grad-CAM** colours the parts of an image that pushed the model towards a class (red = strongest). "
               "On a mistake it shows what the model looked at: the object, or the background, a watermark, a "
               "border… Outside the centre crop the model never looked, so nothing is coloured there.")
    target = st.radio("Explain", ["predicted", "true"], horizontal=True, key="gradcam_target",
                      format_func=lambda t: {"predicted": "why it chose the wrong class",
                                             "true": "what it saw of the right class"}[t])
    key = (str(run_dir), _stamp(run_dir), target, GRADCAM_IMAGES)

    def work(progress):
        progress(0, 1, f"Grad-CAM of up to {GRADCAM_IMAGES} misclassified images…")
        res = explain_misclassified(run_dir, k=GRADCAM_IMAGES, target=target)
        # keep what the grid shows (heat-maps of big photos are large arrays)
        return [{"path": r["path"], "true": r["true"], "predicted": r["predicted"], "confidence": r["confidence"],
                 "target": r["target"], "flat": r["flat"], "overlay": _small(r["overlay"])} for r in res]

    cams = compute.compute("gradcam", key, "Computing Grad-CAM heat-maps…", work)
    if not cams:
        st.success("No misclassified validation image to explain (or their files are gone).")
        return
    per_row = 3
    for start in range(0, len(cams), per_row):
        cols = st.columns(per_row * 2)
        for j, r in enumerate(cams[start:start + per_row]):
            cols[2 * j].image(r["path"], width="stretch")
            cols[2 * j + 1].image(r["overlay"], width="stretch")
            cols[2 * j].caption(f"true **{r['true']}** · predicted **{r['predicted']}** ({r['confidence']:.0%})")
            cols[2 * j + 1].caption(f"heat-map for **{r['target']}**" + (" (flat: no region supports it)"
                                                                         if r["flat"] else ""))


def _apply_temperature(run_dir: str) -> None:
    res = calibrate_run(run_dir, session.workspace(), apply=True)
    st.session_state["_calibrated"] = res["temperature"]


def show_calibration(run_dir: Path, ws) -> None:
    st.caption("A model is **calibrated** when its confidence matches how often it is right: of the images it "
               "labels with 80% confidence, 80% are correct. **Temperature scaling** divides the model's scores by "
               "one number T fitted on the validation images: it never changes which class is predicted, only how "
               "sure the model says it is.")
    key = (str(run_dir), _stamp(run_dir))
    cal = compute.compute("calibration", key, "Fitting temperature scaling on the validation images…",
                          lambda progress: calibrate_run(run_dir, ws, apply=False))
    if "_calibrated" in st.session_state:
        st.success(f"Applied: this run's predictions, Try it and exports now use T = "
                   f"{st.session_state.pop('_calibrated'):.3f}.")
    c = st.columns(4)
    c[0].metric("ECE before", f"{cal['ece_before']:.3f}", help="Expected calibration error of the raw model (T = 1): "
                "the average gap between confidence and accuracy, weighted by images per bin. 0 is perfect.")
    c[1].metric("ECE after", f"{cal['ece_after']:.3f}", delta=f"{cal['ece_after'] - cal['ece_before']:+.3f}",
                delta_color="inverse", help="With the fitted temperature (measured on the same validation images it "
                "was fitted on, so a little optimistic).")
    c[2].metric("Temperature T", f"{cal['temperature']:.2f}", help="T > 1 softens an over-confident model, T < 1 "
                "sharpens an under-confident one.")
    c[3].metric("Log loss before → after", f"{cal['nll_before']:.3f} → {cal['nll_after']:.3f}",
                help="Negative log-likelihood of the true class: what temperature scaling minimises.")
    if cal["warning"]:
        st.warning(cal["warning"])
    st.plotly_chart(charts.reliability(cal["reliability_before"], cal["reliability_after"], cal["temperature"]),
                    width="stretch", key="reliability")
    st.caption(f"Reliability diagram on {cal['count']} validation images: each point is a confidence bin (bigger = "
               "more images). Below the diagonal the model is over-confident, above it under-confident.")
    current = cal["previous_temperature"]
    if abs(current - cal["temperature"]) < 1e-6:
        st.info(f"This temperature (T = {current:.3f}) is applied to the run.")
    else:
        if abs(current - 1.0) > 1e-9:
            st.caption(f"The run currently uses T = {current:.3f}.")
        st.button(f"Apply temperature scaling (T = {cal['temperature']:.2f}) to this run", type="primary",
                  on_click=_apply_temperature, args=(str(run_dir),), icon=":material/thermostat:",
                  help="Saves T with the run: predictions on Try it, the bundle and ONNX/TorchScript exports use it. "
                       "Accuracy does not change.")


def show_run_map(run_dir: Path, ws) -> None:
    st.caption("The run's training data placed by the run's backbone features (PCA). Misclassified validation "
               "images are ringed in red: mistakes inside another class's cluster often mean a wrong label; "
               "mistakes between clusters, a hard image.")
    method = st.radio("Projection", ["pca", "tsne"], horizontal=True, key="eval_map_method",
                      format_func=lambda m: {"pca": "PCA (fast)", "tsne": "t-SNE (neighbourhoods, slower)"}[m])
    key = (str(run_dir), _stamp(run_dir), method)
    try:
        df = compute.compute("run_map", key, "Drawing the embedding map…", lambda progress: embedding_map(
            run=run_dir, method=method, workspace=ws,
            progress=lambda d, t: progress(d, t, f"Computing features: {d}/{t} images")))
    except TLError as e:
        st.info(f"No embedding map for this run: {e}")
        return
    wrong = int(df["misclassified"].sum())
    st.caption(f"{len(df)} images, {int(df['predicted'].notna().sum())} of them evaluated, {wrong} misclassified.")
    map_view.embedding_map_with_picker(df, f"run-map-{method}", highlight=True)


with session.page_errors():
    ws = session.workspace()
    by_id = session.finished_runs(ws)
    ids = list(by_id)
    # the newest finished run stands in while the current run is not finished (without replacing it)
    run_id = st.selectbox("Run", ids, key=session.bind("run", ids, ids[0]), on_change=session.picked,
                          args=("run",), format_func=lambda i: _label(by_id[i]), help="Any finished run; newest first.")
    metrics = run_metrics(ws, run_id)
    if refitted(ws, run_id):
        st.caption("This linear probe was checked on the validation images, then its head was fitted again on "
                   "training + validation images for the saved model (as the classic recipe uses every labelled "
                   "image). Validation figures are those of the fit that never saw them: a fair, slightly "
                   "cautious estimate for the saved model.")

    splits = {"Validation": "val"}
    if metrics.get("test"):
        splits["Test (held-out folder)"] = "test"
    split_name = "Validation"
    if len(splits) > 1:
        split_name = st.radio("Images", list(splits), horizontal=True,
                              help="Validation: held out from your training data. Test: the dataset's own test/ "
                                   "folder.")
    m = metrics[splits[split_name]]
    classes = m["classes"]

    c = st.columns(4)
    c[0].metric("Accuracy", f"{m['accuracy']:.1%}", help="Share of images whose top prediction is the true class.")
    c[1].metric("Macro F1", f"{m['macro_f1']:.3f}", help="F1 averaged over classes, so every class counts equally.")
    c[2].metric(f"{split_name.split(' ')[0]} images", m["count"], help="How many images this is measured on.")
    c[3].metric("Calibration error", f"{m['ece']:.3f}",
                help="Expected calibration error: how far confidence is from actual accuracy (0 = calibrated).")

    left, right = st.columns([3, 2])
    with left:
        st.subheader("Confusion matrix")
        view = st.radio("Show", ["Counts", "Row-normalised"], horizontal=True, key="cm_view",
                        help="Counts: images per (true, predicted) pair. Row-normalised: each row divided by its "
                             "total, so the diagonal is each class's recall.")
        normalised = view == "Row-normalised"
        cm = m["confusion"]
        st.plotly_chart(charts.confusion(normalise_rows(cm) if normalised else cm, classes, normalised),
                        width="stretch")
        total = sum(sum(row) for row in cm)
        st.caption(f"Rows are the true class, columns the predicted class. The cells add up to {total} images.")
        with st.expander("The matrix as numbers"):
            st.table(pd.DataFrame(cm, index=pd.Index(classes, name="true \\ predicted"), columns=classes))
    with right:
        st.subheader("Per class")
        per = pd.DataFrame(m["per_class"]).T
        per.index.name = "class"
        st.dataframe(per, width="stretch", column_config={
            "precision": st.column_config.NumberColumn(help="Of the images predicted as this class, the share that "
                                                            "really are.", format="%.2f"),
            "recall": st.column_config.NumberColumn(help="Of the images of this class, the share found.",
                                                    format="%.2f"),
            "f1": st.column_config.NumberColumn(help="Harmonic mean of precision and recall.", format="%.2f"),
            "support": st.column_config.NumberColumn(help="Images of this class.", format="%d"),
        })

    st.subheader("Look closer")
    view = st.segmented_control("View", list(VIEWS), format_func=VIEWS.get, default="mistakes", key="eval_view",
                                label_visibility="collapsed") or "mistakes"
    run_dir = ws.run_dir(run_id)
    if view == "mistakes":
        st.markdown("**Most confident mistakes (validation)**")
        show_mistakes(metrics)
    elif view == "gradcam":
        show_gradcam(run_dir)
    elif view == "calibration":
        show_calibration(run_dir, ws)
    else:
        show_run_map(run_dir, ws)
