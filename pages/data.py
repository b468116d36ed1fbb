"""Data: choose a sample dataset, upload a zip, or build a dataset class by class; see its report."""

import pandas as pd
import streamlit as st

from pages import _charts as charts
from pages import _session as session
from tl_core.app_support import add_class_images, save_uploaded_zip
from tl_core.config import field_help
from tl_core.data import IMAGE_EXTENSIONS

session.ensure_router()

st.title("Data")
st.caption("A dataset is a set of images sorted into one folder per class: `cats/1.jpg`, `dogs/7.png`, … "
           "Choose one below, or bring your own.")

IMAGE_TYPES = sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def _once(upload_id: str) -> bool:
    """True the first time an upload is seen: the uploader keeps its file across reruns."""
    seen = st.session_state.setdefault("_handled_uploads", set())
    if upload_id in seen:
        return False
    seen.add(upload_id)
    return True


def _flash(message: str, warnings: list[str] | None = None) -> None:
    """Keep a message for the next run (the page reruns right after an upload to show the new dataset)."""
    st.session_state["_data_flash"] = (message, warnings or [])


with session.page_errors():
    if "_data_flash" in st.session_state:
        message, warnings = st.session_state.pop("_data_flash")
        st.success(message)
        for w in warnings:
            st.warning(w)
    ws = session.workspace()
    options = session.dataset_options(ws)
    refs = list(options)
    st.selectbox(
        "Dataset", refs, key=session.bind("dataset", refs), on_change=session.picked, args=("dataset",),
        format_func=lambda r: options[r], placeholder="Choose a dataset",
        help="Sample datasets ship with TL Studio; uploaded ones are kept in the workspace on this server.",
    )

    chosen = session.dataset_path(session.get("dataset"), ws) is not None
    building = st.session_state.get("_class_uploads", 0) > 0  # stay open while a dataset is built class by class
    with st.expander("Bring your own images", expanded=not chosen or building, icon=":material/upload:"):
        tab_zip, tab_classes = st.tabs(["Upload a zip", "Add images class by class"])
        with tab_zip:
            st.caption("A .zip holding one folder per class (sub-folders `train/`, `val/`, `test/` with class "
                       "folders inside are understood too), or a .zip of images plus a CSV of `path,label` rows "
                       "(inside the zip, or uploaded here first). Files that are not images are skipped and listed.")
            labels = st.file_uploader("Labels CSV (optional)", type=["csv"], key="csv_upload",
                                      help="Only when the images are not sorted into class folders: one "
                                           "'path,label' row per image, paths relative to the zip's top folder.")
            up = st.file_uploader("Dataset .zip", type=["zip"], key="zip_upload",
                                  help="Up to 200 MB. Unpacked safely into the workspace's datasets folder.")
            if up is not None and _once(up.file_id):
                folder = save_uploaded_zip(ws, up.name, up.getvalue(),
                                           labels_csv=labels.getvalue() if labels is not None else None)
                ref = session.dataset_ref_for_path(folder, ws)
                session.select("dataset", ref)
                _flash(f"Unpacked {up.name} as dataset '{folder.name}'.")
                st.rerun()

        with tab_classes:
            st.caption("Build a dataset from images on your computer: name a class, add its images, repeat for "
                       "every class (at least two classes, 10+ images each recommended).")
            c1, c2 = st.columns(2)
            ds_name = c1.text_input("Dataset name", value="my_images", key="build_name",
                                    help="Letters, digits, '-', '_' and '.'; other characters become '_'.")
            cls_name = c2.text_input("Class name", key="build_class", placeholder="e.g. cats",
                                     help="The label these images get.")
            # a new key after each addition empties the uploader for the next class
            n_added = st.session_state.setdefault("_class_uploads", 0)
            files = st.file_uploader("Images of this class", type=IMAGE_TYPES, accept_multiple_files=True,
                                     key=f"class_upload_{n_added}")
            if st.button("Add to dataset", disabled=not files):
                folder, saved, skipped = add_class_images(ws, ds_name, cls_name,
                                                          [(f.name, f.getvalue()) for f in files])
                _flash(f"Added {len(saved)} image(s) to class '{cls_name}' of '{folder.name}'.",
                       [f"{s['path']}: {s['reason']}" for s in skipped])
                session.select("dataset", session.dataset_ref_for_path(folder, ws))
                st.session_state["_class_uploads"] = n_added + 1
                st.rerun()

    path = session.dataset_path(session.get("dataset"), ws)
    if path is None:
        st.info("No dataset chosen yet. Tip: **emoji (sample data)** trains in seconds.")
        st.stop()

    val_split = session.setting("val_split", 0.2)
    seed = session.setting("seed", 0)
    rep = session.dataset_report(path, val_split, seed)

    st.header(f"Report: {path.name}")
    m = st.columns(5)
    m[0].metric("Classes", rep["num_classes"])
    m[1].metric("Images", rep["num_images"])
    m[2].metric("Training", rep["split"]["train"], help=field_help("val_split"))
    m[3].metric("Validation", rep["split"]["val"], help="Held back from training to measure accuracy.")
    m[4].metric("Skipped files", len(rep["skipped"]))
    for w in rep["warnings"]:
        st.warning(w)
    if rep["imbalance_ratio"] < 3:
        st.caption(f"Class balance: the largest class has {rep['imbalance_ratio']:.1f}× the images of the smallest.")

    left, right = st.columns([3, 2])
    with left:
        st.subheader("Images per class")
        st.plotly_chart(charts.class_counts(rep["counts"], rep["split_counts"] or None), width="stretch")
    with right:
        st.subheader("Train / validation split")
        st.caption(f"Stratified and seeded (seed {seed}): {val_split:.0%} of each class is held out for "
                   "validation" + (", plus the folder's own test split." if rep["split"]["test"] else "."))
        table = pd.DataFrame(rep["split_by_class"])
        if not rep["split"]["test"]:
            table = table.drop(columns="test")
        table.index.name = "class"
        st.dataframe(table, width="stretch")

    if rep["skipped"]:
        with st.expander(f"Skipped files ({len(rep['skipped'])})", expanded=len(rep["skipped"]) <= 10):
            st.dataframe(pd.DataFrame(rep["skipped"]), width="stretch", hide_index=True)

    st.subheader("Thumbnails")
    for cls, paths in rep["thumbnails"].items():
        st.markdown(f"**{cls}** — {rep['counts'].get(cls, 0)} images")
        if paths:
            st.image(paths, width=84)
