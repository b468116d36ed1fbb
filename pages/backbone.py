"""Backbone: the catalogue of pretrained networks, a recommendation, and uploading local weights."""

import pandas as pd
import streamlit as st

from pages import _session as session
from tl_core.app_support import local_weights, save_uploaded_weights, time_backbone
from tl_core.backbones import CATALOGUE, catalogue
from tl_core.config import field_help

session.ensure_router()

st.title("Backbone")
st.caption("The backbone is the pretrained network whose knowledge you borrow. Bigger ones are usually more "
           "accurate and always slower.")


@st.cache_data(show_spinner=False)
def _speed(name: str) -> float:
    return time_backbone(name)


@st.cache_data(show_spinner=False, ttl=300)
def _catalogue() -> list[dict]:
    # availability checks look at installed packages and the hub cache: cheap, but not free on every rerun
    return catalogue()


with session.page_errors():
    ws = session.workspace()
    rows = _catalogue()
    st.success(
        f"**Recommended: {session.DEFAULT_BACKBONE}.** Its ImageNet weights ship with TL Studio (no internet "
        "needed), it is small (4.7 M parameters) and fast on a laptop CPU, and a linear probe on it reaches "
        "95% on the emoji sample in seconds. Try a larger Lite1/Lite2 when accuracy matters more than speed."
    )

    speeds = st.session_state.setdefault("backbone_speed", {})
    table = pd.DataFrame([{
        "backbone": r["name"],
        "params (M)": r["params_m"],
        "input (px)": r["input_size"],
        "ImageNet top-1 (%)": r["imagenet_top1"],
        "ms / image here": speeds.get(r["name"]),
        "weights": r["weights"],
        "offline": "yes" if r["available_offline"] else "needs internet once",
        "notes": r["note"],
    } for r in rows])
    st.dataframe(
        table, hide_index=True, width="stretch",
        column_config={
            "params (M)": st.column_config.NumberColumn(help="Millions of weights: memory and, roughly, compute."),
            "input (px)": st.column_config.NumberColumn(help="Side of the square image the network sees."),
            "ImageNet top-1 (%)": st.column_config.NumberColumn(
                help="Accuracy on ImageNet's 1000 classes: a rough guide to how good its features are."),
            "ms / image here": st.column_config.NumberColumn(
                help="Forward pass time per image on this machine (batch of 8). Press 'Measure speed'.", format="%.1f"),
            "weights": st.column_config.TextColumn(
                help="packaged: shipped in a Python package, works offline; hub: downloaded by timm on first use."),
        },
    )
    if st.button("Measure speed on this machine", help="Times one batch of 8 images per backbone (a few seconds)."):
        bar = st.progress(0.0, text="Timing…")
        for n, r in enumerate(rows):
            speeds[r["name"]] = _speed(r["name"])
            bar.progress((n + 1) / len(rows), text=f"Timed {r['name']}")
        st.rerun()

    names = list(CATALOGUE)
    offline = {r["name"]: r["available_offline"] for r in rows}
    choice = st.selectbox(
        "Backbone for training", names, key=session.bind("backbone", names, session.DEFAULT_BACKBONE),
        on_change=session.picked, args=("backbone",),
        format_func=lambda n: f"{n}  ({'offline' if offline[n] else 'needs internet'})",
        help=field_help("backbone"),
    )
    if not offline[choice] and session.weights_path(session.get("weights"), ws) == "auto":
        st.warning(f"{choice}'s weights are not on this machine: training downloads them from the model hub, "
                   "which fails offline. Offline alternatives: the EfficientNet-Lite backbones, or upload a "
                   "weights file below.")

    st.subheader("Weights")
    local = local_weights(ws)
    weight_opts = ["auto"] + [w["name"] for w in local]
    st.radio(
        "Pretrained weights", weight_opts, key=session.bind("weights", weight_opts, "auto"),
        on_change=session.picked, args=("weights",),
        format_func=lambda w: "Packaged (offline) or the model hub" if w == "auto" else f"Local file: {w}",
        help=field_help("weights"),
    )

    with st.expander("Upload local weights (.safetensors or .pth)"):
        st.caption("Weights of a timm architecture, for example downloaded once on another machine. "
                   ".safetensors is preferred; a .pth must hold plain tensors (it is loaded with "
                   "`weights_only=True`, never unpickled as code). The classifier layer is replaced anyway.")
        arch = st.selectbox("Architecture of the file", names, index=names.index(choice), key="weights_arch")
        up = st.file_uploader("Weights file", type=["safetensors", "pth", "pt", "bin"], key="weights_upload")
        if up is not None and up.file_id not in st.session_state.setdefault("_handled_uploads", set()):
            st.session_state["_handled_uploads"].add(up.file_id)
            with st.spinner("Checking that the weights fit…"):
                info = save_uploaded_weights(ws, up.name, up.getvalue(), arch)
            session.select("backbone", arch)
            session.select("weights", info["path"].rsplit("/", 1)[-1])
            st.success(f"Saved {up.name}: {info['tensors']} tensors fit {arch}. Training will use it.")
