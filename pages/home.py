"""Home: what transfer learning is, the four steps and where you are, and a one-click sample path."""

import streamlit as st

from pages import _session as session
from tl_core.config import TrainConfig
from tl_core.models.catalogue import CATALOGUE
from tl_core.share.progress import kept_model

session.ensure_router()

DONE, TODO = ":material/check_circle:", ":material/radio_button_unchecked:"


def _run_icon(status: str) -> str:
    return {"done": DONE, "queued": ":material/pending:", "running": ":material/pending:"}.get(status, ":material/error:")


st.title("TL Studio")
st.markdown(
    "**Transfer learning** reuses a network that already learned to see from 1.3 million photos (ImageNet) "
    "and teaches only what is new: your classes. "
    "The pretrained layers turn each image into a rich description of shapes and textures, and a small new "
    "final layer learns which descriptions belong to which of your labels. "
    "Because most of the knowledge is borrowed, a few dozen images per class and a few minutes on a laptop "
    "are often enough for a useful classifier."
)

with session.page_errors():
    ws = session.workspace()
    store = ws.store()
    ds_ref = session.get("dataset")
    ds_label = session.dataset_options(ws).get(ds_ref)
    backbone = session.get("backbone")
    run_id = session.get("run")
    runs = store.list()
    # the selected run, else the newest one: never "no run yet" beside finished runs
    run = store.get(run_id) if run_id and store.exists(run_id) else (runs[0] if runs else None)
    done_runs = [r for r in runs if r["status"] == "done"]
    run_backbone = kept_model(run)[0] if run else None  # an auto run: the backbone it kept
    # what is chosen now (or the default a new run would use), and what the run shown under Train used
    used = f" Run {run['id']} used {run_backbone}." if run_backbone and run_backbone != backbone else ""

    if st.button("Try it with sample data", type="primary", icon=":material/play_arrow:",
                 help="Selects the emoji sample (5 classes, 200 images), the EfficientNet-Lite0 backbone and the "
                      "default strategy (auto: a linear probe, and what its time budget affords), then opens the "
                      "Train page: press Start there."):
        session.select("dataset", "sample/emoji")
        session.select("backbone", session.DEFAULT_BACKBONE)
        session.select("weights", "auto")
        st.session_state["strategy"] = TrainConfig().strategy
        st.session_state.pop("w_strategy", None)
        session.switch_to("train")

    st.subheader("Four steps")
    steps = [
        ("1. Data", "data",
         f"{DONE} {ds_label}" if ds_label else f"{TODO} Not chosen yet: pick a sample dataset or upload your images.",
         "Images sorted into one folder per class."),
        ("2. Backbone", "backbone",
         (f"{DONE} {backbone} for the next run." if backbone else
          f"{TODO} Not chosen: the next run uses the default {session.DEFAULT_BACKBONE} (works offline).") + used,
         "The pretrained network whose knowledge you borrow."),
        ("3. Train", "train",
         (f"{_run_icon(run['status'])} Run {run['id']}: {run['status']}"
          + (f" ({len(runs)} runs in all)" if len(runs) > 1 else "") if run else f"{TODO} No run yet."),
         "Fit the new final layer (and optionally more) on your images."),
        ("4. Evaluate & try", "evaluate",
         (f"{DONE} {len(done_runs)} finished run(s) to inspect" if done_runs else f"{TODO} Needs a finished run."),
         "See accuracy and mistakes, then predict new images."),
    ]
    cols = st.columns(4)
    for col, (title, key, state, what) in zip(cols, steps):
        with col.container(border=True):
            st.markdown(f"**{title}**")
            st.caption(what)
            st.write(state)
            session.link(key, f"Open {title.split('. ', 1)[1]}", ":material/arrow_forward:")

    with st.expander("What the words mean"):
        st.markdown(
            "- **Backbone**: the pretrained network (here EfficientNet-Lite, ResNet, ConvNeXt, ViT …).\n"
            "- **Linear probe**: keep the backbone frozen and fit only a new last layer — fast and a strong baseline.\n"
            "- **Fine-tuning**: also adjust some (partial) or all (full) pretrained layers, with a small learning rate.\n"
            "- **Validation images**: held back from training, used only to measure how good the model is.\n"
            "- **Confusion matrix**: how often each true class was predicted as each class.\n"
            f"- Offline backbones here: {', '.join(n for n, s in CATALOGUE.items() if s.package)}."
        )
