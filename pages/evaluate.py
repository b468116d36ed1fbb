"""Evaluate: accuracy, per-class precision/recall/F1, the confusion matrix and the most confident mistakes."""

from pathlib import Path

import pandas as pd
import streamlit as st

from pages import _charts as charts
from pages import _session as session
from tl_core.app_support import normalise_rows, run_metrics

session.ensure_router()

st.title("Evaluate")
st.caption("Measured on the validation images, which the model never trained on.")


def _label(run: dict) -> str:
    cfg = run.get("config") or {}
    acc = (run.get("summary") or {}).get("val_accuracy")
    acc_txt = f"{acc:.1%}" if isinstance(acc, (int, float)) else "?"
    return f"{run['id']} · {Path(run['data']).name} · {cfg.get('backbone')} · {cfg.get('strategy')} · {acc_txt}"


with session.page_errors():
    ws = session.workspace()
    runs = ws.store().list(status="done")
    if not runs:
        st.info("No finished run yet: train one first.")
        session.link("train", "Go to Train", ":material/model_training:")
        st.stop()
    by_id = {r["id"]: r for r in runs}
    ids = list(by_id)
    # the newest finished run stands in while the current run is not finished (without replacing it)
    run_id = st.selectbox("Run", ids, key=session.bind("run", ids, ids[0]), on_change=session.picked,
                          args=("run",), format_func=lambda i: _label(by_id[i]), help="Any finished run; newest first.")
    metrics = run_metrics(ws, run_id)

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

    st.subheader("Most confident mistakes (validation)")
    wrong = metrics.get("top_losses") or []
    if not wrong:
        st.success("No validation image was misclassified.")
    else:
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
