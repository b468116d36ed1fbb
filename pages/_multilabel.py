"""The multi-label views of the Evaluate and Try it pages: micro/macro F1, mAP and exact match, a per-label
table with each label's 2x2 confusion, the images with the most wrong labels, and a label set with a
probability per label. Single-label views (confusion matrix, calibration, Grad-CAM per class, embedding map)
say why they do not apply instead of showing something wrong."""

from pathlib import Path

import pandas as pd
import streamlit as st

from tl_core.storage.files import RunFiles
from tl_core.share.multilabel import worst_images

#: Views of the Evaluate page that ask "which one class?", and what they would show.
SINGLE_LABEL_VIEWS = "the confusion matrix, calibration (temperature scaling), Grad-CAM of mistakes and the embedding map"


def per_label_frame(m: dict) -> pd.DataFrame:
    """One row per label: precision, recall, F1, AP, images, threshold, and its 2x2 confusion (TP, FP, FN, TN)."""
    rows = []
    for label, r in m["per_label"].items():
        (tn, fp), (fn, tp) = m["label_confusion"][label]
        rows.append({"label": label, "precision": r["precision"], "recall": r["recall"], "f1": r["f1"],
                     "AP": r.get("ap"), "images": r["support"], "threshold": r.get("threshold", 0.5),
                     "TP": tp, "FP": fp, "FN": fn, "TN": tn})
    return pd.DataFrame(rows).set_index("label")


def show_evaluate(files: RunFiles, m: dict, split: str, split_name: str) -> None:
    """The Evaluate page of a multi-label run."""
    c = st.columns(4)
    c[0].metric("Micro F1", f"{m['micro_f1']:.3f}", help="F1 over every (image, label) decision together: frequent "
                "labels weigh more.")
    c[1].metric("Macro F1", f"{m['macro_f1']:.3f}", help="F1 averaged over labels, so every label counts equally.")
    c[2].metric("mAP", "n/a" if m.get("mAP") is None else f"{m['mAP']:.3f}", help="Mean average precision: how well "
                "each label's probabilities rank its images above the others, averaged over labels (1 = perfect), "
                "whatever the thresholds.")
    c[3].metric("Exact match", f"{m['exact_match']:.1%}", help="Share of images whose predicted label set is exactly "
                "the true one (every label right).")
    st.caption(f"Multi-label model: each of the {len(m['classes'])} labels is its own yes/no question, decided by the "
               f"label's threshold (chosen on the validation images for the best F1). Measured on {m['count']} "
               f"{split_name.split(' ')[0].lower()} images.")
    st.subheader("Per label")
    st.dataframe(per_label_frame(m), width="stretch", column_config={
        "precision": st.column_config.NumberColumn(help="Of the images given this label, the share that have it.",
                                                   format="%.2f"),
        "recall": st.column_config.NumberColumn(help="Of the images that have this label, the share found.",
                                                format="%.2f"),
        "f1": st.column_config.NumberColumn(help="Harmonic mean of precision and recall.", format="%.2f"),
        "AP": st.column_config.NumberColumn(help="Average precision of the label's probabilities.", format="%.2f"),
        "threshold": st.column_config.NumberColumn(help="The label is predicted when its probability reaches this.",
                                                   format="%.2f"),
        "TP": st.column_config.NumberColumn(help="Has the label, predicted: right."),
        "FP": st.column_config.NumberColumn(help="Lacks the label, predicted anyway."),
        "FN": st.column_config.NumberColumn(help="Has the label, missed."),
        "TN": st.column_config.NumberColumn(help="Lacks the label, not predicted: right."),
    })
    st.caption("TP, FP, FN and TN are each label's 2×2 confusion: rows of images that have or lack the label "
               "against whether it was predicted.")
    st.subheader("Images with the most wrong labels")
    meta = files.meta()
    worst = worst_images(files.predictions().get(split), meta.classes, meta.thresholds, meta.temperature, k=18)
    if not worst:
        st.success("Every image got exactly its labels.")
    else:
        cols = st.columns(6)
        shown = 0
        for r in worst:
            if not Path(r["path"]).is_file():
                continue
            with cols[shown % 6]:
                st.image(r["path"], width="stretch")
                parts = []
                if r["missed"]:
                    parts.append("missed **" + ", ".join(r["missed"]) + "**")
                if r["extra"]:
                    parts.append("extra **" + ", ".join(r["extra"]) + "**")
                st.caption("true " + ", ".join(r["true"]) + " · " + " · ".join(parts))
            shown += 1
    st.info(f"For multi-label models {SINGLE_LABEL_VIEWS} are not shown: they ask which one class an image "
            "belongs to, and here an image can have several labels or none.")


def show_prediction(r: dict) -> None:
    """One Try it answer of a multi-label model: the label set with a probability each."""
    chosen = ", ".join(f"{x['label']} ({x['p']:.0%})" for x in r["labels"]) or "no label"
    st.markdown(f"**{r['path']}** → {chosen}")
    frame = pd.DataFrame({"label": list(r["probs"]), "probability": list(r["probs"].values())})
    frame["predicted"] = frame["label"].isin([x["label"] for x in r["labels"]])
    st.dataframe(frame.sort_values("probability", ascending=False), hide_index=True, width="stretch",
                 column_config={"probability": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0,
                                                                                format="%.2f")})
