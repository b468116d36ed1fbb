"""Train: choose how to train, start a background job, and watch it live (curves, progress, cancel).

The job runs in a worker process (tl_core.jobs); this page only reads the run store, so a refresh or
another tab with the same ``?run=`` link shows the same run, still going.
"""

import streamlit as st

from pages import _charts as charts
from pages import _session as session
from tl_core import jobs
from tl_core.app_support import augmentation_preview, describe_progress
from tl_core.config import AUGMENT_PRESETS, CLASS_BALANCE, STRATEGIES, TrainConfig, field_help
from tl_core.runs import ACTIVE_STATUSES

session.ensure_router()

LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1]
BATCH_SIZES = [8, 16, 32, 64, 128]

st.title("Train")


@st.cache_data(show_spinner=False, max_entries=32)
def _preview(paths: tuple[str, ...], backbone: str, preset: str, seed: int):
    return augmentation_preview(list(paths), backbone, preset, copies=4, seed=seed)


def seed_settings_from(run: dict) -> None:
    """A fresh session (a refresh, a shared link) starts the form from the shown run's settings."""
    if "strategy" in st.session_state or st.session_state.get("_seeded_from") == run["id"]:
        return  # this session has its own settings already
    st.session_state["_seeded_from"] = run["id"]
    cfg = run.get("config") or {}
    strategy = cfg.get("strategy")
    if strategy not in STRATEGIES:
        return
    st.session_state["strategy"] = strategy
    values = {f"epochs_{strategy}": cfg.get("epochs"), f"patience_{strategy}": cfg.get("patience"),
              "batch_size": cfg.get("batch_size") if cfg.get("batch_size") in BATCH_SIZES else None,
              "seed": cfg.get("seed"), "augment": cfg.get("augment") if cfg.get("augment") in AUGMENT_PRESETS else None,
              "val_split": cfg.get("val_split"), "linear_c": cfg.get("linear_c"),
              "class_balance": cfg.get("class_balance") if cfg.get("class_balance") in CLASS_BALANCE else None}
    if strategy != "linear" and cfg.get("lr") in LRS:
        values[f"lr_{strategy}"] = cfg["lr"]
    for key, value in values.items():
        if value is not None:
            st.session_state[key] = value


def settings_form(ws, path) -> None:
    """The training settings and the Start button (submits a job)."""
    backbone = session.get("backbone", session.DEFAULT_BACKBONE)
    weights = session.weights_path(session.get("weights"), ws)
    rep = session.dataset_report(path, session.setting("val_split", 0.2), session.setting("seed", 0))
    st.markdown(f"**Data:** {path.name} — {rep['num_classes']} classes, {rep['split']['train']} training and "
                f"{rep['split']['val']} validation images · **Backbone:** {backbone}"
                + ("" if weights == "auto" else f" with local weights `{weights.rsplit('/', 1)[-1]}`"))

    keys = list(STRATEGIES)
    strategy = session.keep("strategy", st.radio(
        "Strategy", keys, key=session.remember("strategy", "linear"),
        format_func=lambda k: STRATEGIES[k].label, captions=[STRATEGIES[k].help for k in keys],
        help=field_help("strategy"),
    ))
    linear = strategy == "linear"
    defaults = STRATEGIES[strategy].defaults

    c = st.columns(4)
    epochs = session.keep(f"epochs_{strategy}", c[0].number_input(
        "Epochs", min_value=1, max_value=1000, step=1, key=session.remember(f"epochs_{strategy}", defaults["epochs"]),
        help=field_help("epochs") + (" For the linear probe: at most this many solver rounds; it stops when converged."
                                     if linear else ""),
    ))
    lr_default = defaults["lr"] if defaults["lr"] in LRS else 1e-3
    lr = session.keep(f"lr_{strategy}", c[1].select_slider(
        "Learning rate", LRS, key=session.remember(f"lr_{strategy}", lr_default), disabled=linear,
        format_func=lambda v: f"{v:g}",
        help=field_help("lr") + (" Not used by the linear probe (its solver picks its own steps)." if linear else ""),
    ))
    batch = session.keep("batch_size", c[2].select_slider(
        "Batch size", BATCH_SIZES, key=session.remember("batch_size", TrainConfig().batch_size), disabled=linear,
        help=field_help("batch_size") + (" Not used by the linear probe (it fits on all images at once)."
                                         if linear else ""),
    ))
    seed = session.keep("seed", c[3].number_input(
        "Seed", min_value=0, max_value=2**31 - 1, step=1, key=session.remember("seed", 0), help=field_help("seed"),
    ))

    presets = list(AUGMENT_PRESETS)
    augment = session.keep("augment", st.radio(
        "Augmentation", presets, key=session.remember("augment", "light"), horizontal=True,
        format_func=lambda k: AUGMENT_PRESETS[k].label, disabled=linear,
        help=field_help("augment") + " " + " ".join(f"{p.label}: {p.help}" for p in AUGMENT_PRESETS.values()),
    ))
    st.caption(AUGMENT_PRESETS[augment].help + (
        " (The linear probe computes each image's features once, without augmentation; it applies to the "
        "fine-tuning strategies.)" if linear else ""))
    with st.expander("Preview: training images after augmentation", expanded=not linear):
        samples = [paths[0] for paths in rep["thumbnails"].values() if paths][:4]
        preview = _preview(tuple(samples), backbone, augment, int(seed))
        for name, views in preview:
            st.image(views, width=110, caption=[name] + [""] * (len(views) - 1))

    with st.expander("Advanced"):
        a = st.columns(4)
        val_split = session.keep("val_split", a[0].slider(
            "Validation share", 0.05, 0.5, step=0.05, key=session.remember("val_split", 0.2),
            help=field_help("val_split")))
        balance = session.keep("class_balance", a[1].selectbox(
            "Class balance", list(CLASS_BALANCE), key=session.remember("class_balance", "none"),
            format_func=lambda k: CLASS_BALANCE[k].label,
            help=field_help("class_balance") + " " + " ".join(f"{b.label}: {b.help}" for b in CLASS_BALANCE.values())))
        patience = session.keep(f"patience_{strategy}", a[2].number_input(
            "Early-stopping patience", min_value=0, max_value=100, step=1,
            key=session.remember(f"patience_{strategy}", defaults["patience"]), help=field_help("patience"),
            disabled=linear))
        linear_c = session.keep("linear_c", a[3].number_input(
            "Linear probe C", min_value=0.001, max_value=1000.0, key=session.remember("linear_c", 1.0),
            format="%.3g", help=field_help("linear_c"), disabled=not linear))

    if st.button("Start training", type="primary", icon=":material/play_arrow:"):
        cfg = TrainConfig(
            backbone=backbone, strategy=strategy, weights=weights, epochs=int(epochs),
            lr=None if linear else float(lr), batch_size=int(batch), val_split=float(val_split), seed=int(seed),
            augment=augment, class_balance=balance, patience=None if linear else int(patience),
            linear_c=float(linear_c),
        )
        run_id = jobs.submit(ws, str(path), cfg)
        session.select("run", run_id)
        st.rerun()


def run_panel(ws, run_id: str) -> None:
    """The current run, polled from the store every second while it is queued or running."""
    store = ws.store()
    active = store.get(run_id)["status"] in ACTIVE_STATUSES

    @st.fragment(run_every=1.0 if active else None)
    def live() -> None:
        if not store.exists(run_id):  # deleted meanwhile (another tab, the CLI): redraw without it
            st.rerun()
        status = None
        with session.page_errors():
            if active:
                # a worker killed while the server is up (kill -9, out of memory) leaves its run 'running':
                # look for dead workers every few seconds so the run is marked and queued runs get a worker
                session.recover_now(ws)
            run = store.get(run_id)
            epochs = store.epochs(run_id)
            status = run["status"]
            cfg = run.get("config") or {}
            st.subheader(f"Run {run_id}")
            st.markdown(f"**Status:** {status} · {cfg.get('backbone')} · {cfg.get('strategy')} · "
                        f"data `{run['data'].rsplit('/', 1)[-1]}`")
            st.caption("This run's link keeps `?run=…` in the address: refresh, or open it in another tab, "
                       "and you see the same run (training continues on the server).")
            frac, text = describe_progress(status, run.get("progress"), epochs)
            if status in ACTIVE_STATUSES:
                st.progress(frac, text=text)
                if st.button("Cancel training", icon=":material/stop:", help="Stops the worker at its next check point "
                                                               "(killed after a few seconds if it does not stop)."):
                    jobs.cancel(ws, run_id)
                    st.toast("Cancelling…")
            elif status == "done":
                s = run.get("summary") or {}
                st.success(f"Done in {s.get('seconds', 0):.1f} s: validation accuracy "
                           f"**{(s.get('val_accuracy') or 0):.1%}** (best epoch {s.get('best_epoch')}, weights: "
                           f"{(s.get('weights') or {}).get('source')}).")
                if cfg.get("strategy") in ("partial", "full") and s.get("best_epoch") == 0:
                    st.info("Fine-tuning did not beat the linear probe it started from on the validation images, so "
                            "the probe's weights were kept (epoch 0). More images per class, or more epochs, give "
                            "fine-tuning room to help.")
                l1, l2 = st.columns(2)
                session.link("evaluate", "See the evaluation", ":material/analytics:", where=l1)
                session.link("try", "Try the model on new images", ":material/image_search:", where=l2)
            elif status == "failed":
                st.error(run.get("error") or "The run failed.")
            else:
                st.warning(f"{status.capitalize()}: {run.get('error') or ''}")
            if epochs:
                st.plotly_chart(charts.training_curves({run_id: epochs}), width="stretch", key=f"curves-{run_id}")
            elif status in ACTIVE_STATUSES:
                st.caption("The curves appear after the first epoch.")
        if active and status is not None and status not in ACTIVE_STATUSES:
            st.rerun()  # the run ended: redraw the page once without polling

    live()


with session.page_errors():
    ws = session.workspace()
    path = session.dataset_path(session.get("dataset"), ws)
    run_id = session.get("run")
    if run_id and not ws.store().exists(run_id):
        session.select("run", None)
        run_id = None
    if run_id:
        seed_settings_from(ws.store().get(run_id))
        run_panel(ws, run_id)
        st.divider()
    if path is None:
        st.info("Choose a dataset first.")
        session.link("data", "Go to Data", ":material/folder_open:")
    else:
        st.header("New training run" if run_id else "Settings")
        settings_form(ws, path)
