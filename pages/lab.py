"""Lab: the transfer-vs-scratch learning curve — validation accuracy against images per class, for the
pretrained backbone (linear probe and fine-tuned) and the same network trained from scratch.

The lab takes a minute or more on a laptop CPU, so it runs as a background task of the server
(``tl_core.app_support.start_task``): the page polls it, the user may switch pages or refresh and find it
again (same dataset and settings, same task), and Cancel stops it at its next step.
"""

import pandas as pd
import streamlit as st

from pages import _charts as charts
from pages import _session as session
from tl_core.app_support import dataset_signature, get_task, start_task
from tl_core.lab import ARMS, learning_curve

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


def _task_key(path, backbone, sizes, epochs, image_size, arms, val_split, seed) -> str:
    return "|".join(map(str, ("lab", path, dataset_signature(path), backbone, tuple(sizes), epochs, image_size,
                              tuple(arms), val_split, seed)))


def _progress_text(task, arms: list[str], n_sizes: int) -> tuple[float, str]:
    """(fraction, text) from the task's events: a point counts when its accuracy (or last epoch) is in."""
    finished = {(e.get("arm"), e.get("images_per_class")) for e in task.events
                if e.get("val_accuracy") is not None
                or (e.get("arm") == "finetune" and e.get("done") == e.get("total"))}
    total = max(1, len(arms) * n_sizes)
    p = task.progress or {}
    arm = p.get("arm")
    if arm == "features":
        text = f"{p.get('message', 'Pretrained features')}: {p.get('done')}/{p.get('total')} images"
    elif arm in charts.ARM_NAMES and p.get("val_accuracy") is not None:
        text = (f"{charts.ARM_NAMES[arm]} with {p.get('images_per_class')} images per class reached "
                f"{p['val_accuracy']:.0%}")
    elif arm in charts.ARM_NAMES:
        text = f"{charts.ARM_NAMES[arm]}, {p.get('images_per_class')} images per class"
        if p.get("total"):
            text += f": epoch {p.get('done')}/{p.get('total')} done"
    else:
        text = "Starting (loading the backbone)…"
    return min(1.0, len(finished) / total), f"{len(finished)}/{total} points · {text} · {task.seconds:.0f} s"


def task_panel(task, arms: list[str], n_sizes: int) -> None:
    """Progress and Cancel while the lab runs (polled every second); redraws the page when it ends."""

    @st.fragment(run_every=1.0)
    def live() -> None:
        if not task.active:
            st.rerun()  # finished: show the result on the whole page
        frac, text = _progress_text(task, arms, n_sizes)
        st.progress(frac, text=text)
        st.caption("The lab runs on the server: you may switch pages or refresh and come back to it.")
        if st.button("Cancel the lab", icon=":material/stop:"):
            task.cancel()
            st.toast("Cancelling at the next step…")

    live()


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
    key = _task_key(path, backbone, sizes, int(epochs), int(image_size), arms, val_split, seed)
    task = get_task(key)

    if task is None or task.status == "cancelled":
        if task is not None:
            st.caption("The last lab with these settings was cancelled.")
        if st.button("Run the lab", type="primary", icon=":material/science:",
                     help="Trains len(sizes) x 3 small models in the background (about a minute on the emoji "
                          "sample)."):
            start_task(key, learning_curve, data=str(path), backbone=backbone, sizes=sizes, epochs=int(epochs),
                       image_size=int(image_size), arms=arms, val_split=val_split, seed=seed, workspace=ws)
            st.rerun()
    elif task.active:
        task_panel(task, list(arms), len(sizes))
    elif task.status == "failed":
        st.error(task.error or "The lab failed.")
        if st.button("Try again", icon=":material/refresh:"):
            start_task(key, learning_curve, data=str(path), backbone=backbone, sizes=sizes, epochs=int(epochs),
                       image_size=int(image_size), arms=arms, val_split=val_split, seed=seed, workspace=ws)
            st.rerun()
    else:
        show_result(task.result)
