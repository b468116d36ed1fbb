"""Evaluate: accuracy, per-class precision/recall/F1, the confusion matrix, and a closer look: the most
confident mistakes, Grad-CAM heat-maps of them, calibration (temperature scaling), the embedding map, and the
open-set threshold (images unlike the training images)."""

from pathlib import Path

import pandas as pd
import streamlit as st

from pages import _fix as fixes
from pages import _map_view as map_view
from pages import _multilabel as ml_view
from pages import _session as session
from pages import _tasks as task_ui
from tl_core.data.library import deleted_dataset
from tl_core.data.images import IMAGE_EXTENSIONS
from tl_core.errors import DatasetError
from tl_core.insight.foreign import caught_at, save_foreign_upload
from tl_core.models.openset import UNKNOWN_NOTE, flagged_share
from tl_core.metrics import figure_of, normalise_rows
from tl_core.runs import tasks
from tl_core.storage.files import RunFiles
from tl_core.share.progress import features_text, model_text, stop_text
from tl_core.share import figures as charts

session.ensure_router()

st.title("Evaluate")
st.caption("Measured on the validation images, held out from the training that produced these figures.")


def _label(run: dict) -> str:
    acc = (run.get("summary") or {}).get("val_accuracy")
    acc_txt = f"{acc:.1%}" if isinstance(acc, (int, float)) else "?"
    return f"{run['id']} · {Path(str(run['data'])).name} · {model_text(run)} · {acc_txt}"


GRADCAM_IMAGES = 12
VIEWS = {"mistakes": "Mistakes", "gradcam": "Grad-CAM", "calibration": "Calibration", "map": "Embedding map",
         "unknown": "Unlike training"}


def _run_params(files: RunFiles) -> dict:
    # results of a run change when any of its files do (model, temperature, predictions)
    return {"run": str(files.dir), "stamp": files.stamp()}


def _caption(r: dict) -> str:
    """The caption of a misclassified image: the same words and confidence in every view."""
    return f"true **{r['true']}** · predicted **{r['predicted']}** · {r['confidence']:.0%}"


def show_mistakes(files: RunFiles, split: str, ws=None, data: str | None = None) -> None:
    """The most confident mistakes, each with one-click fixes of the dataset (exclude it, move it to the
    predicted class or another one: a new version of the data the run trained on, or of a copy of it)."""
    saved = files.predictions().get(split)
    meta = files.meta()
    wrong = saved.mistakes(meta.classes, meta.temperature) if saved is not None else []
    if not wrong:
        st.success(f"No {'validation' if split == 'val' else 'test'} image was misclassified.")
        return
    st.caption(f"{len(wrong)} misclassified image(s), most confident first: these show what the model "
               "confuses, and sometimes a wrong label in the data. A wrong label or a useless image can be fixed "
               "here: each fix makes a new version of the dataset (retrain to use it).")
    fixes.show_flash()
    rows = fixes.current_rows(ws, data) if ws is not None and data and split == "val" else None
    cols = st.columns(6)
    missing = 0
    shown = 0
    for row in wrong[:30]:
        if not Path(row["path"]).is_file():
            missing += 1
            continue
        with cols[shown % 6]:
            st.image(row["path"], width="stretch")
            st.caption(_caption(row))
            if ws is not None and data and split == "val":  # test images belong to the held-out folder
                fixes.image_actions(ws, data, row["path"], row["true"], meta.classes, "mistake", rows,
                                  suggested=row["predicted"], why="misclassified")
        shown += 1
    if missing:
        st.caption(f"{missing} image(s) are no longer on disk (the dataset was moved or deleted).")


def show_gradcam(ws, files: RunFiles, split: str) -> None:
    st.caption("**Grad-CAM** colours the parts of an image that pushed the model towards a class (red = strongest). "
               "On a mistake it shows what the model looked at: the object, or the background, a watermark, a "
               "border… Outside the centre crop the model never looked, so nothing is coloured there.")
    target = st.radio("Explain", ["predicted", "true"], horizontal=True, key="gradcam_target",
                      format_func=lambda t: {"predicted": "why it chose the wrong class",
                                             "true": "what it saw of the right class"}[t])
    params = {**_run_params(files), "target": target, "k": GRADCAM_IMAGES, "split": split}
    cams = task_ui.task_view(ws, "gradcam", params, f"Grad-CAM of up to {GRADCAM_IMAGES} misclassified images",
                             auto=True, key=f"gradcam-{target}")
    if cams is None:
        return
    if not cams:
        st.success("No misclassified validation image to explain (or their files are gone).")
        return
    task = tasks.find(ws, "gradcam", params)
    per_row = 3
    for start in range(0, len(cams), per_row):
        cols = st.columns(per_row * 2)
        for j, r in enumerate(cams[start:start + per_row]):
            if Path(r["path"]).is_file():
                cols[2 * j].image(r["path"], width="stretch")
            cols[2 * j + 1].image(str(task_ui.result_file(ws, task, r["overlay"])), width="stretch")
            cols[2 * j].caption(_caption(r))
            cols[2 * j + 1].caption(f"heat-map for **{r['target']}**" + (" (flat: no region supports it)"
                                                                         if r["flat"] else ""))


def _apply_temperature(ws, files: RunFiles) -> None:
    # a new task every time (not shared): applying changes the run's files
    task = task_ui.submit(ws, "calibrate", {**_run_params(files), "apply": True}, share=False)
    if task is not None:
        st.session_state["_calibrating"] = task.id


def _applying(ws) -> bool:
    """While the temperature is being applied: its progress (polled); then the outcome, once."""
    task_id = st.session_state.get("_calibrating")
    if not task_id:
        return False
    task = tasks.get(ws, task_id)
    if task.active:
        @st.fragment(run_every=0.5)
        def wait() -> None:
            if not tasks.get(ws, task_id).active:
                st.rerun()
            st.progress(0.5, text="Applying temperature scaling to the run…")

        wait()
        return True
    del st.session_state["_calibrating"]
    if task.status == "done":
        st.success(f"Applied: this run's predictions, Try it and exports now use T = "
                   f"{task_ui.result(ws, task)['temperature']:.3f}.")
    else:
        st.error(task.error or f"Applying the temperature {task.status}.")
    return False


def show_calibration(ws, files: RunFiles) -> None:
    st.caption("A model is **calibrated** when its confidence matches how often it is right: of the images it "
               "labels with 80% confidence, 80% are correct. **Temperature scaling** divides the model's scores by "
               "one number T fitted on the validation images: it never changes which class is predicted, only how "
               "sure the model says it is.")
    if _applying(ws):
        return
    cal = task_ui.task_view(ws, "calibrate", {**_run_params(files), "apply": False},
                            "Fitting temperature scaling on the validation images", auto=True, key="calibrate")
    if cal is None:
        return
    c = st.columns(4)
    c[0].metric("ECE before", f"{cal['ece_before']:.3f}", help="Expected calibration error of the raw model (T = 1): "
                "the average gap between confidence and accuracy, weighted by images per bin. 0 is perfect.")
    c[1].metric("ECE after", f"{cal['ece_after']:.3f}", delta=f"{cal['ece_after'] - cal['ece_before']:+.3f}",
                delta_color="inverse", help="With the fitted temperature (measured on the same validation images it "
                "was fitted on, so a little optimistic: the out-of-fold figure below scores each image with a "
                "temperature fitted on the other images).")
    if cal.get("ece_before_ci"):  # results from before the intervals have none
        c[0].caption("95% CI {:.3f}–{:.3f} (bootstrap)".format(*cal["ece_before_ci"]))
    if cal.get("ece_after_oof_ci"):
        c[1].caption("Out of fold {:.3f}, 95% CI {:.3f}–{:.3f}".format(cal["ece_after_oof"], *cal["ece_after_oof_ci"]))
    c[2].metric("Temperature T", f"{cal['temperature']:.2f}", help="T > 1 softens an over-confident model, T < 1 "
                "sharpens an under-confident one.")
    c[3].metric("Log loss before → after", f"{cal['nll_before']:.3f} → {cal['nll_after']:.3f}",
                help="Negative log-likelihood of the true class: what temperature scaling minimises.")
    if cal["warning"]:
        st.warning(cal["warning"])
    if cal.get("helps_out_of_fold") is False and abs(cal["temperature"] - 1.0) > 1e-6:
        st.info(f"Scored on images it was not fitted on, temperature scaling does not clearly help here (ECE "
                f"{cal['ece_before']:.3f} before, {cal['ece_after_oof']:.3f} out of fold after, within its interval): "
                f"on {cal['count']} validation images the fitted T may only suit these images. Applying it changes "
                "no predicted class either way.")
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
                  on_click=_apply_temperature, args=(ws, files), icon=":material/thermostat:",
                  help="Saves T with the run: predictions on Try it, the bundle and ONNX/TorchScript exports use it. "
                       "Accuracy does not change.")


def _save_threshold(threshold: float) -> None:
    st.session_state["_ood_save"] = float(threshold)


def show_open_set(ws, files: RunFiles) -> None:
    st.caption("The model compares every image with its training images (the features its classifier sees) and "
               "calls it **unknown**, *unlike your training images*, when even the closest training image is far "
               "away: a cat photo shown to an emoji model. It still names the closest class.")
    rec = files.open_set_record()
    if rec is None:
        st.info(UNKNOWN_NOTE)
        return
    pending = st.session_state.pop("_ood_save", None)
    if pending is not None:
        _, saved = task_ui.wait_for(ws, "set_ood_threshold", {**_run_params(files), "threshold": pending},
                                    "Saving the threshold")
        st.success(f"Saved: this run now calls an image unknown beyond {saved['threshold']:.3f}; Try it, predictions "
                   "and new exports use it.")
        files = RunFiles(files.dir)
        rec = files.open_set_record()
    scores = rec.get("calibration_scores") or []
    loo = rec.get("calibration") == "leave-one-out"
    what = "training images" if loo else "validation images"
    if loo:
        st.caption("This head was fitted on every labelled image, so no image is held out from it: each training "
                   "image is compared with the others (leave-one-out).")
    saved_t = float(rec["threshold"])
    top = max([saved_t, *scores]) * 1.25 if scores else 1.0
    t = st.slider("Threshold", 0.0, float(min(2.0, round(top, 3) + 0.001)), saved_t, step=0.001, format="%.3f",
                  key=f"ood_threshold-{files.dir.name}-{saved_t:.6f}",
                  help="Images farther than this from every training image are called unknown. Lower: more images "
                       "flagged (safer, more false alarms); higher: fewer.")
    chart = st.container()
    c = st.columns(2)
    c[0].metric(f"{what.capitalize()} flagged", f"{flagged_share(scores, t):.1%}",
                help=f"Share of the {len(scores)} {what} this threshold would call unknown: in-distribution images, "
                     "so each is a false alarm.")
    c[1].metric("Saved threshold", f"{saved_t:.3f}",
                help=("Chosen by hand." if rec.get("chosen") else
                      f"The conformal {rec['quantile']:.0%} threshold: about {rec['quantile']:.0%} of images like "
                      f"the {what} pass."))
    if abs(t - saved_t) > 1e-9:
        st.button(f"Save threshold {t:.3f} for this run", type="primary", on_click=_save_threshold, args=(t,),
                  icon=":material/save:", help="Try it, predictions and new exports then use it.")
    foreign = show_foreign(ws, files, t, saved_t)
    xaxis = ("distance from the training images (1 = the calibrated threshold)" if int(rec.get("version", 1)) >= 2
             else "distance to the nearest training image (cosine)")
    chart.plotly_chart(charts.ood_histogram(scores, t, saved_t, what, foreign=foreign, xaxis=xaxis),
                       width="stretch", key="ood-hist")


#: What a caught foreign image differed in, by ``ood_reason``.
FOREIGN_REASONS = {"style": "in style (colours, strokes, texture)", "content": "in what it shows",
                   "both": "in both"}


def show_foreign(ws, files: RunFiles, t: float, saved_t: float) -> list[float] | None:
    """Foreign images the user uploads (things the model should call unknown): how many the threshold catches,
    scored by a task; returns their scores for the chart (None before any are given)."""
    st.markdown("**Try it on foreign images**")
    st.caption("Drop images the model should *not* recognise (another kind of picture, other objects) or a .zip of "
               "them: this shows how many the threshold catches, and why.")
    ups = st.file_uploader("Foreign images (or a .zip)", accept_multiple_files=True,
                           type=sorted({e.lstrip(".") for e in IMAGE_EXTENSIONS} | {"zip"}),
                           key=f"foreign-{files.dir.name}", help=session.upload_note())
    paths, names = [], []
    for u in ups or []:
        try:
            paths.append(str(save_foreign_upload(ws, u.name, u.getvalue())))
            names.append(u.name)
        except DatasetError as e:
            st.warning(str(e))
    if not paths:
        return None
    params = {**_run_params(files), "images": paths, "names": names}
    res = task_ui.task_view(ws, "foreign_check", params, f"Scoring {len(paths)} upload(s) with this run",
                            auto=True, key="foreign")
    if res is None:
        return None
    for sk in res["skipped"][:5]:
        st.caption(f"Skipped {sk['path']}: {sk['reason']}")
    now = caught_at(res["scores"], t)
    lo, hi = now["interval"]
    c = st.columns(2)
    c[0].metric("Foreign images caught", f"{now['caught']} of {now['images']}",
                help="Images the threshold on the slider calls unknown; each one it lets through would get a "
                     "confident-looking class.")
    c[1].metric("Share caught", f"{now['share']:.0%}", help="With its 95% interval (Wilson): how sure this figure "
                "is from this many images.")
    st.caption(f"{now['share']:.0%} caught (95% interval {lo:.0%}–{hi:.0%}, {now['images']} images)"
               + ("" if abs(t - saved_t) < 1e-9 else f"; at the saved threshold: {res['caught']} of {res['images']}")
               + ".")
    why = {k: v for k, v in res["by_reason"].items() if v}
    if why and abs(t - saved_t) < 1e-9:
        st.caption("Caught at the saved threshold, unlike the training images " + "; ".join(
            f"{FOREIGN_REASONS[k]}: {v}" for k, v in why.items()) + ".")
    if now["images"] < 30:
        st.caption("A few images give a wide interval: drop more of them for a figure to rely on.")
    # a table, not an expander: this view is itself inside one for a multi-label run
    st.dataframe(pd.DataFrame([{"image": r["path"], "closest class": r["label"], "distance": r["ood_score"],
                                "unknown": r["ood_score"] > t, "how": r.get("ood_reason")} for r in res["rows"]]),
                 hide_index=True, width="stretch", height=min(320, 38 + 35 * len(res["rows"])))
    return res["scores"]


def show_run_map(ws, files: RunFiles) -> None:
    st.caption("The run's training data placed by the run's backbone features (PCA). Misclassified validation "
               "images are ringed in red: mistakes inside another class's cluster often mean a wrong label; "
               "mistakes between clusters, a hard image.")
    method = st.radio("Projection", ["pca", "tsne"], horizontal=True, key="eval_map_method",
                      format_func=lambda m: {"pca": "PCA (fast)", "tsne": "t-SNE (neighbourhoods, slower)"}[m])
    params = {**_run_params(files), "method": method}
    task = tasks.find(ws, "embedding_map", params)
    if task is not None and task.status == "failed":
        st.info(f"No embedding map for this run: {task.error}")
    res = task_ui.task_view(ws, "embedding_map", params, f"Drawing the embedding map ({method.upper()})", auto=True,
                            key=f"run-map-{method}")
    if res is None:
        return
    df = map_view.frame(res)
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
    files = RunFiles(ws.run_dir(run_id))
    metrics = files.metrics()
    gone = deleted_dataset(ws, by_id[run_id].get("data"))
    if gone:
        st.info(f"The dataset '{gone}' this run trained on has been deleted from this server: its figures below are "
                "kept, but its images (mistakes, Grad-CAM, the map) cannot be shown.", icon=":material/hide_image:")
    features = features_text(files.meta().features)
    if features:
        st.caption(features + ".")
    if files.meta().refitted:
        st.caption("This linear probe was checked on the validation images, then its head was fitted again on "
                   "training + validation images for the saved model (as the classic recipe uses every labelled "
                   "image). Validation figures are those of the fit that never saw them: a fair, slightly "
                   "cautious estimate for the saved model.")

    # the headline figures side by side, each with how sure it is (95% intervals)
    key = "micro_f1" if metrics.val.get("multi_label") else "accuracy"
    what = "micro-F1" if key == "micro_f1" else "accuracy"
    side = [("Validation", figure_of(metrics.val, key),
             "The images held out from training (chose the features, C, epochs, thresholds).")]
    if metrics.cv:
        side.append((f"Cross-validated ({metrics.cv.get('folds')} folds)", figure_of(metrics.cv),
                     f"Every labelled image ({metrics.cv.get('count')}) predicted by the probe fitted without it: "
                     "the steadiest figure on small data."))
    if metrics.test:
        side.append(("Test", figure_of(metrics.test, key),
                     "Held-out images no choice ever saw: the unbiased figure."))
    cols = st.columns(len(side))
    for col, (name, text, why) in zip(cols, side):
        col.metric(f"{name} {what}", text.split(" (")[0], help=why)
        col.caption(text[len(text.split(" (")[0]):].strip(" ()") or " ")

    splits = {"Validation": "val"}
    if metrics.test:
        splits["Test (held out)"] = "test"
    split_name = "Validation"
    if len(splits) > 1:
        split_name = st.radio("Images", list(splits), horizontal=True,
                              help="Validation: held out from your training data. Test: the dataset's own test/ "
                                   "folder, an uploaded test set or the locked test share.")
    split = splits[split_name]
    m = metrics.val if split == "val" else metrics.test
    classes = m["classes"]
    if m.get("multi_label"):  # label sets: their own view; the single-label views below do not apply
        ml_view.show_evaluate(files, m, split, split_name)
        with st.expander("Images unlike the training images"):
            show_open_set(ws, files)
        st.stop()

    # the split's accuracy is already among the headline figures above: here what they do not say
    c = st.columns(3)
    c[0].metric("Macro F1", f"{m['macro_f1']:.3f}", help="F1 averaged over classes, so every class counts equally.")
    c[1].metric(f"{split_name.split(' ')[0]} images", m["count"], help="How many images this is measured on.")
    c[2].metric("Calibration error", f"{m['ece']:.3f}",
                help="Expected calibration error: how far confidence is from actual accuracy (0 = calibrated).")
    for col, ci in ((c[0], m.get("macro_f1_ci")), (c[2], m.get("ece_ci"))):  # runs from before ece_ci have none
        if ci:
            col.caption(f"95% CI {ci[0]:.3f}–{ci[1]:.3f} (bootstrap)")

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

    cfg = files.config_dict()
    why = stop_text(cfg.get("strategy", ""), metrics.stop, metrics.best_epoch)
    if why:
        st.info(why)

    st.subheader("Look closer")
    view = st.segmented_control("View", list(VIEWS), format_func=VIEWS.get, default="mistakes", key="eval_view",
                                label_visibility="collapsed") or "mistakes"
    if view == "mistakes":
        st.markdown(f"**Most confident mistakes ({split_name.split(' (')[0].lower()})**")
        show_mistakes(files, split, ws, by_id[run_id].get("data"))
    elif view == "gradcam":
        show_gradcam(ws, files, split)
    elif view == "calibration":
        show_calibration(ws, files)
    elif view == "unknown":
        show_open_set(ws, files)
    else:
        show_run_map(ws, files)
