"""Lab: the transfer-vs-scratch learning curve — validation accuracy against images per class, for the
pretrained backbone (linear probe and fine-tuned) and the same network trained from scratch.

The lab takes a minute or more on a laptop CPU, so it is a task of a worker process (``tl_core.runs.tasks``,
kind ``lab``): the page polls it, the user may switch pages, refresh or come back after a restart of the
server and find it again (same dataset and settings, same task), and Cancel stops it at its next step.
"""

import pandas as pd
import streamlit as st

from pages import _session as session
from pages import _tasks as task_ui
from tl_core.config import LAB_ARMS as ARMS
from tl_core.data.library import dataset_signature
from tl_core.share.progress import duration_text
from tl_core.share import figures as charts

session.ensure_router()

SIZES = [2, 5, 10, 20, 50, None]  # images per class; None = every training image
DEFAULT_SIZES = [5, 10, 20, None]
IMAGE_SIZES = [64, 96, 128, 160, 224]

st.title("Lab")
st.caption("Transfer learning against training from scratch: the learning curve.")
st.markdown(
    "How many images does a network need? This experiment trains on **5, 10, 20 … images per class** of your "
    "dataset, three ways, and measures each on the same validation images:\n"
    + "".join(f"- **{charts.ARM_NAMES[a]}**: {ARMS[a]}\n" for a in ARMS)
    + "\nThe pretrained lines start high because the backbone already learned to see from a million photos; "
      "the scratch line must learn everything from your few images. That gap is transfer learning."
)


def progress_line(task) -> tuple[float, str]:
    """(fraction, text) of the running lab: the task's time-weighted fraction and time left when it reports
    them, else the step it is at."""
    p = task.progress or {}
    arm = p.get("arm")
    if p.get("message"):
        text = str(p["message"])
    elif arm == "features":
        text = f"Pretrained features: {p.get('done')}/{p.get('total')} images"
    elif arm in charts.ARM_NAMES and p.get("val_accuracy") is not None:
        text = (f"{charts.ARM_NAMES[arm]} with {p.get('images_per_class')} images per class reached "
                f"{p['val_accuracy']:.0%}")
    elif arm in charts.ARM_NAMES:
        text = f"{charts.ARM_NAMES[arm]}, {p.get('images_per_class')} images per class"
        if p.get("total"):
            text += f": epoch {p.get('done')}/{p.get('total')} done"
    else:
        text = "Starting (loading the backbone)"
    if p.get("fraction") is not None:
        frac = float(p["fraction"])
    elif p.get("total"):
        frac = float(p.get("done") or 0) / float(p["total"])
    else:
        frac = 0.0
    if p.get("points"):
        text = f"{p.get('points_done', 0)}/{p['points']} points · {text}"
    if p.get("eta_s") is not None:
        text += f" · about {duration_text(float(p['eta_s']))} left"
    return min(1.0, max(0.0, frac)), text


def show_result(res: dict) -> None:
    rows = res["rows"]
    st.plotly_chart(charts.learning_curve(rows, len(res["classes"])), width="stretch", key="lab-curve")
    st.info(res["reading"])
    table = pd.DataFrame(rows).pivot_table(index="images_per_class", columns="arm", values="val_accuracy")
    table = table[[a for a in charts.ARM_NAMES if a in table.columns]].rename(columns=charts.ARM_NAMES)
    table.index.name = "images per class"
    st.dataframe(table, width="stretch", column_config={c: st.column_config.NumberColumn(format="percent")
                                                        for c in table.columns})
    st.caption(f"{res['backbone']} ({res['weights']} weights) at {res['image_size']} px, {res['epochs']} epoch(s) "
               f"for fine-tuning and scratch, {res['val']} validation images; took {res['seconds']:.0f} s in all "
               f"(the pretrained backbone's one pass over the images: {res['feature_seconds']:.1f} s).")
    for arm, why in (res.get("skipped") or {}).items():
        st.warning(f"{charts.ARM_NAMES.get(arm, arm)} was skipped: {why}")


with session.page_errors():
    ws = session.workspace()
    path = session.dataset_path(session.get("dataset"), ws)
    if path is None:
        st.info("Choose a dataset first (the emoji sample shows the effect in about a minute).")
        session.link("data", "Go to Data", ":material/folder_open:")
        st.stop()
    backbone = session.get("backbone", session.DEFAULT_BACKBONE)
    st.markdown(f"**Data:** {path.name} · **Backbone:** {backbone}")

    # remembered across page switches (Streamlit forgets the state of widgets a page does not draw)
    c = st.columns([3, 1, 1])
    sizes = session.keep("lab_sizes", c[0].multiselect(
        "Images per class", SIZES, key=session.remember("lab_sizes", DEFAULT_SIZES),
        format_func=lambda n: "all" if n is None else str(n),
        help="Each point trains on this many images of every class (nested: the 5 are among the 10). 'all' uses "
             "every training image."))
    epochs = session.keep("lab_epochs", c[1].number_input(
        "Epochs", 1, 20, key=session.remember("lab_epochs", 4),
        help="Epochs of the fine-tuned and the scratch networks (the same for both, so the comparison is fair)."))
    image_size = session.keep("lab_image_size", c[2].selectbox(
        "Image size (px)", IMAGE_SIZES, key=session.remember("lab_image_size", 128),
        help="The lab runs at a reduced size to fit in a minute or two on a CPU."))
    arms = session.keep("lab_arms", st.multiselect(
        "Compare", list(ARMS), key=session.remember("lab_arms", list(ARMS)), format_func=charts.ARM_NAMES.get,
        help=" ".join(f"{charts.ARM_NAMES[a]}: {ARMS[a]}" for a in ARMS)))
    if not sizes or not arms:
        st.caption("Pick at least one size and one way of training.")
        st.stop()
    sizes = sorted(sizes, key=lambda n: float("inf") if n is None else n)
    val_split, seed = float(session.setting("val_split", 0.2)), int(session.setting("seed", 0))
    params = {"data": str(path), "signature": dataset_signature(path), "backbone": backbone, "sizes": sizes,
              "epochs": int(epochs), "image_size": int(image_size), "arms": list(arms), "val_split": val_split,
              "seed": seed}
    res = task_ui.task_view(ws, "lab", params, "The lab", button="Run the lab", icon=":material/science:",
                            key="lab", describe=progress_line,
                            button_help=f"Trains {len(sizes)} x {len(arms)} small models on the server's workers "
                                        "(about a minute on the emoji sample).")
    if res is not None:
        show_result(res)
