"""Backbone: the catalogue of pretrained networks, a recommendation, and uploading local weights."""

import time

import pandas as pd
import streamlit as st

from pages import _access as access
from pages import _session as session
from pages import _tasks as task_ui
from tl_core.config import field_help
from tl_core.data.library import dataset_signature
from tl_core.models.catalogue import CATALOGUE, catalogue, local_weights, store_uploaded_weights
from tl_core.runs import tasks
from tl_core.share.progress import MISSING
from tl_core.errors import TLError
from tl_core.share import figures as charts

session.ensure_router()

st.title("Backbone")
st.caption("The backbone is the pretrained network whose knowledge you borrow. Bigger ones are usually more "
           "accurate and always slower.")


@st.cache_data(show_spinner=False, ttl=300)
def _catalogue() -> list[dict]:
    # availability checks look at installed packages and the hub cache: cheap, but not free on every rerun
    return catalogue()



def speed_section(ws, rows: list[dict]) -> dict[str, float]:
    """Milliseconds per image measured on this machine (a ``time_backbone`` task per backbone), by name."""
    speeds = {}
    for r in rows:
        t = tasks.find(ws, "time_backbone", {"backbone": r["name"]})
        if t is not None and t.status == "done":
            try:
                speeds[r["name"]] = task_ui.result(ws, t)["ms_per_image"]
            except Exception:  # a result removed by hand: measured again on the next press
                pass
    return speeds


def speed_controls(ws, rows: list[dict], speeds: dict[str, float]) -> None:
    """The 'Measure speed' button, and the timing's progress while the workers measure."""
    found = {r["name"]: tasks.find(ws, "time_backbone", {"backbone": r["name"]}) for r in rows}
    active = [t for t in found.values() if t is not None and t.active]
    if not active:
        missing = [n for n, t in found.items() if t is None or t.status != "done"]
        failed = [f"{n}: {t.error}" for n, t in found.items() if t is not None and t.status == "failed"]
        if failed:
            st.caption("Could not time " + "; ".join(failed[:3]))
        if missing and st.button("Measure speed on this machine", icon=":material/speed:",
                                 help="Times one batch of 8 images per backbone (a few seconds each), on the "
                                      "server's workers."):
            for n in missing:
                if task_ui.submit(ws, "time_backbone", {"backbone": n}) is None:
                    break
            st.rerun()
        return
    ids = [t.id for t in found.values() if t is not None]

    @st.fragment(run_every=task_ui.POLL_S)
    def live() -> None:
        session.recover_now(ws)
        now = [tasks.get(ws, i) for i in ids]
        if not any(t.active for t in now):
            st.rerun()
        done = sum(t.status == "done" for t in now)
        first = min(t.created for t in now)
        queued = [t for t in now if t.status == "queued"]
        text = f"Timed {done} of {len(now)} backbones"
        if queued and len(queued) == len([t for t in now if t.active]):
            text += " · " + tasks.describe_wait(ws, queued[0])
        st.progress(done / max(1, len(now)), text=f"{text} · {time.time() - first:.0f} s since the click")
        if st.button("Cancel timing", icon=":material/stop:", key="speed-cancel"):
            for t in now:
                if t.active:
                    try:
                        tasks.cancel(ws, t.id, actor=access.actor())
                    except TLError as e:  # another user's timing (tl_core.access)
                        st.error(str(e))
                        break

    live()


def _use_backbone(name: str) -> None:
    session.select("backbone", name)
    st.session_state["_advisor_flash"] = name


def advisor_params(ws, picked: list[str], per_class: int) -> dict | None:
    """The ``advise`` task's parameters for the chosen dataset, the backbones ``picked`` and ``per_class`` images
    per class; None without a dataset or a backbone to compare."""
    path = session.dataset_path(session.get("dataset"), ws)
    if path is None or not picked:
        return None
    return {"data": str(path), "signature": dataset_signature(path), "backbones": list(picked),
            "max_per_class": int(per_class), "val_split": float(session.setting("val_split", 0.2)),
            "seed": int(session.setting("seed", 0))}


def advisor_section(ws, rows: list[dict]) -> bool:
    """'Which backbone fits my data?': the advisor's ranking for the chosen dataset; whether it showed one."""
    st.header("Which backbone fits my data?")
    path = session.dataset_path(session.get("dataset"), ws)
    if path is None:
        st.info("Choose a dataset first: the advisor compares the backbones on your own images.")
        session.link("data", "Go to Data", ":material/folder_open:")
        return False
    st.caption(f"Before any training, each backbone looks at a sample of **{path.name}** once (features are cached, "
               "so comparing again is quick; training computes its own). They are ranked by **LogME**, a transferability "
               "score: how well a simple linear model can explain your labels from the backbone's features. A quick "
               "linear probe and a k-nearest-neighbour check on held-out images confirm the ranking.")
    offline = [r["name"] for r in rows if r["available_offline"]]
    names = [r["name"] for r in rows]
    c1, c2 = st.columns([3, 1])
    # remembered across page switches (Streamlit forgets the state of widgets a page does not draw)
    wkey = session.remember("advisor_backbones", offline)
    st.session_state[wkey] = [n for n in st.session_state[wkey] if n in names]
    picked = session.keep("advisor_backbones", c1.multiselect(
        "Backbones to compare", names, key=wkey,
        format_func=lambda n: n if n in offline else f"{n} (needs internet)",
        help="The backbones whose weights are on this machine are preselected; the others download weights from "
             "the model hub, which fails offline."))
    per_class = session.keep("advisor_per_class", c2.select_slider(
        "Images per class", [10, 20, 30, 50, 100], key=session.remember("advisor_per_class", 30),
        help="At most this many images of each class are looked at (a seeded sample): more is slower and more "
             "reliable."))
    if not picked:
        st.caption("Pick at least one backbone.")
        return False
    params = advisor_params(ws, list(picked), int(per_class))
    result = task_ui.task_view(ws, "advise", params, f"Comparing {len(picked)} backbone(s) on {path.name}",
                               button="Compare backbones", icon=":material/leaderboard:", key="advise",
                               button_help="Embeds the sample with each backbone (a few seconds each the first "
                                           "time), on the server.")
    if result is None:
        return False

    rec, conf = result["recommended"], result["confidence"]
    box = {"high": st.success, "medium": st.info, "low": st.warning}[conf]
    box(f"**Recommended: {rec}** · confidence **{conf}**. {result['reason']}")
    if "_advisor_flash" in st.session_state:
        st.success(f"{st.session_state.pop('_advisor_flash')} is now the backbone for training.")
    elif session.get("backbone", session.DEFAULT_BACKBONE) != rec:
        st.button(f"Use {rec} for training", on_click=_use_backbone, args=(rec,), icon=":material/check:")
    table = pd.DataFrame([{
        "rank": r["rank"], "backbone": r["backbone"], "LogME": r["logme"], "LEEP": r["leep"],
        "probe accuracy": r["probe_accuracy"], "k-NN accuracy": r["knn_accuracy"], "seconds": r["seconds"],
        "params (M)": r["params_m"], "weights": r["weights"],
    } for r in result["ranking"]])
    st.dataframe(table, hide_index=True, width="stretch", placeholder=MISSING, column_config={
        "LogME": st.column_config.NumberColumn(format="%.3f", help="Transferability score (You et al., 2021): log "
                                               "evidence per image of a Bayesian linear model from the features to "
                                               "your labels. Higher is better; compare within one dataset only."),
        "LEEP": st.column_config.NumberColumn(format="%.3f", help="Log expected empirical prediction (Nguyen et al., "
                                              "2020): how well the ImageNet head's own 1000-class guesses predict "
                                              "your labels (closer to 0 is better). It judges the head, not the "
                                              "features, so it may rank differently; the ranking is by LogME."),
        "probe accuracy": st.column_config.NumberColumn(format="percent", help="Validation accuracy of a linear "
                                                        "probe (logistic regression) fitted on the training part of "
                                                        "the sample."),
        "k-NN accuracy": st.column_config.NumberColumn(format="percent", help="Validation accuracy of a 5-nearest-"
                                                       "neighbour vote on cosine similarity of the features."),
        "seconds": st.column_config.NumberColumn(format="%.1f", help="Time this backbone took here (features "
                                                 "already cached take almost none)."),
    })
    st.plotly_chart(charts.advisor_scores(result["ranking"]), width="stretch", key="advisor-chart")
    st.caption(f"{result['images']} images ({result['train']} to fit, {result['val']} to check; at most "
               f"{result['max_per_class']} per class) in {result['seconds']:.1f} s. {result['method']}")
    for f in result["failed"]:
        st.warning(f"{f['backbone']} could not be compared: {f['error']}")
    return True


with session.page_errors():
    ws = session.workspace()
    rows = _catalogue()
    # filled once the advisor section below knows whether it shows a recommendation (its task can finish while
    # this page runs): one recommendation on the page, never the safe default next to the advisor's
    banner = st.empty()

    speeds = speed_section(ws, rows)
    table = pd.DataFrame([{
        "backbone": r["name"],
        "params (M)": r["params_m"],
        "input (px)": r["input_size"],
        "ImageNet top-1 (%)": r["imagenet_top1"],
        "ms / image here": speeds.get(r["name"]),
        "weights": r["weights"],
        "offline": "yes" if r["available_offline"] else "needs internet once",
        "licence": r["license"],
        "notes": r["note"],
    } for r in rows])
    st.dataframe(
        table, hide_index=True, width="stretch", placeholder=MISSING,
        column_config={
            "params (M)": st.column_config.NumberColumn(help="Millions of weights: memory and, roughly, compute."),
            "input (px)": st.column_config.NumberColumn(help="Side of the square image the network sees."),
            "ImageNet top-1 (%)": st.column_config.NumberColumn(
                help="Accuracy on ImageNet's 1000 classes: a rough guide to how good its features are."),
            "ms / image here": st.column_config.NumberColumn(
                help="Forward pass time per image on this machine (batch of 8). Press 'Measure speed'.", format="%.1f"),
            "weights": st.column_config.TextColumn(
                help="packaged: shipped in a Python package, works offline; hub: downloaded by timm on first use."),
            "licence": st.column_config.TextColumn(help="The licence of the pretrained weights: what you may do "
                                                        "with a model fine-tuned from them."),
        },
    )
    speed_controls(ws, rows, speeds)

    if advisor_section(ws, rows):
        banner.caption("The advisor below has compared backbones on your dataset: its recommendation is the first "
                       "row of its table.")
    else:
        banner.success(
            f"**Safe default: {session.DEFAULT_BACKBONE}.** Its ImageNet weights ship with TL Studio (no internet "
            "needed), it is small (4.7 M parameters) and fast on a laptop CPU, and a linear probe on it reaches "
            "95% on the emoji sample in seconds. Not sure? Ask the advisor below which backbone fits your data."
        )
    st.divider()

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
        up = st.file_uploader("Weights file", type=["safetensors", "pth", "pt", "bin"], key="weights_upload",
                              help=session.upload_note("the weights file"))
        st.caption(session.upload_note("the weights file"))
        if up is not None and up.file_id not in st.session_state.setdefault("_handled_uploads", set()):
            st.session_state["_handled_uploads"].add(up.file_id)
            saved = store_uploaded_weights(ws, up.name, up.getvalue())
            # loading a weights file into the network is a worker's job (the check deletes a file that does
            # not fit); the interactive lane answers in about a second once warm
            _, info = task_ui.wait_for(ws, "check_weights", {"path": str(saved), "backbone": arch},
                                       "Checking that the weights fit")
            session.select("backbone", arch)
            session.select("weights", saved.name)
            st.success(f"Saved {up.name}: {info['tensors']} tensors fit {arch}. Training will use it.")
