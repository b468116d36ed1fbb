"""Train: choose how to train, start a run, and watch it live (queue position, progress, curves, cancel).

The settings form is generated from ``tl_core.config.config_fields()``: every :class:`TrainConfig` field with
a form section gets its widget, bounds, help and per-strategy default from there, and a field that the
chosen strategy does not use is shown disabled, with the help saying why. The run is a task of a worker
process (``tl_core.runs.tasks.submit_training``); this page only reads the run store, so a refresh or
another tab with the same ``?run=`` link shows the same run, still going.
"""

from __future__ import annotations

import time
from typing import Any

import streamlit as st

from pages import _access as access
from pages import _session as session
from pages import _tasks as task_ui
from tl_core.config import STRATEGIES, FieldSpec, TrainConfig, config_fields, strategy_default
from tl_core.data.library import dataset_signature
from tl_core.models.devices import describe_auto_device
from tl_core.metrics import figure_of, format_figure
from tl_core.runs import tasks
from tl_core.share.progress import (curve_step, describe_progress, duration_text, ended_text, features_text, model_text,
                                   stop_text, timing_text)
from tl_core.storage.store import ACTIVE_STATUSES
from tl_core.access import AccessError
from tl_core.share import figures as charts

session.ensure_router()

st.title("Train")

#: The form's fields by section, in TrainConfig order (the strategy is drawn first, as a radio with captions).
FIELDS = [f for f in config_fields() if f.section]
#: Images per class and views shown in the augmentation preview.
PREVIEW_IMAGES, PREVIEW_COPIES = 4, 4
#: Fewest epochs a run that has ended needs for its training curves (one cancelled after one epoch is one dot).
MIN_EPOCHS_CHARTED = 2


def _store_key(spec: FieldSpec, strategy: str) -> str:
    """Where a field's value is remembered: per strategy when its default depends on it."""
    return f"{spec.name}_{strategy}" if spec.per_strategy else spec.name


def _is_int(spec: FieldSpec, default: Any) -> bool:
    bounds = [v for v in (spec.min, spec.max, spec.step) if v is not None]
    return isinstance(default, int) and not isinstance(default, bool) and all(float(v).is_integer() for v in bounds)


def _valid(spec: FieldSpec, value: Any) -> bool:
    """Whether a saved value can seed the field's widget."""
    if value is None:
        return False
    if spec.choices is not None:
        return value in spec.choices
    if spec.options:
        return value in spec.options
    if spec.widget == "toggle":
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (spec.min is None or value >= spec.min) and (spec.max is None or value <= spec.max)


def _default(spec: FieldSpec, strategy: str) -> Any:
    value = strategy_default(spec.name, strategy)
    if spec.options and value not in spec.options:
        # the linear probe's lr (1.0) is no option of the lr slider, which it leaves disabled anyway: show the
        # default of a strategy that uses it
        value = strategy_default(spec.name, spec.strategies[0])
        if value not in spec.options:
            value = min(spec.options, key=lambda o: abs(o - (value or 0)))
    return value


def field_widget(spec: FieldSpec, strategy: str, where: Any = st) -> Any:
    """Draw one generated settings widget and return its value (remembered across page switches)."""
    key = _store_key(spec, strategy)
    default = _default(spec, strategy)
    used = strategy in spec.strategies
    help_text = spec.help
    if spec.choices:
        help_text += " " + " ".join(f"{c.label}: {c.help}" for c in spec.choices.values())
    if not used:
        users = ", ".join(STRATEGIES[s].label.split(" (")[0].lower() for s in spec.strategies)
        help_text += f" Not used by {STRATEGIES[strategy].label.split(' (')[0].lower()}: only by {users}."
    wkey = session.remember(key, default)
    # the widget's own default is the value it holds: a browser that forgets a widget's state (Streamlit's frontend
    # does after an st.rerun from the run panel's fragment) then shows what the server will use, not the first
    # option (a "Linear probe" drawn over an auto run's settings)
    shown = st.session_state[wkey] if _valid(spec, st.session_state[wkey]) else default

    def at(cast: Any = None) -> dict[str, Any]:  # the default value argument (none for an empty field)
        return {} if shown is None else {"value": shown if cast is None else cast(shown)}

    def at_choice() -> dict[str, Any]:  # the default index argument of a radio or a select box
        return {"index": list(spec.choices).index(shown)} if shown in (spec.choices or {}) else {}

    common = dict(key=wkey, help=help_text, disabled=not used)
    if spec.widget == "number":
        if _is_int(spec, default):
            value = where.number_input(spec.label, min_value=None if spec.min is None else int(spec.min),
                                       max_value=None if spec.max is None else int(spec.max),
                                       step=int(spec.step or 1), **at(int), **common)
        else:
            value = where.number_input(spec.label, min_value=None if spec.min is None else float(spec.min),
                                       max_value=None if spec.max is None else float(spec.max),
                                       step=None if spec.step is None else float(spec.step), format="%.4g",
                                       **at(float), **common)
    elif spec.widget == "select_slider":
        value = where.select_slider(spec.label, list(spec.options), **at(),
                                    format_func=lambda v: f"{v:g}" if isinstance(v, float) else str(v), **common)
    elif spec.widget == "slider":
        value = where.slider(spec.label, float(spec.min), float(spec.max), step=float(spec.step or 0.01),
                             **at(float), **common)
    elif spec.widget == "toggle":
        value = where.toggle(spec.label, **at(bool), **common)
    elif spec.widget == "radio":
        value = where.radio(spec.label, list(spec.choices), horizontal=True, **at_choice(),
                            format_func=lambda k: spec.choices[k].label, **common)
    elif spec.widget == "select":
        value = where.selectbox(spec.label, list(spec.choices), format_func=lambda k: spec.choices[k].label,
                                **at_choice(), **common)
    else:  # a widget this page does not know: a new FieldSpec needs a line here
        raise ValueError(f"unknown widget {spec.widget!r} for {spec.name}")
    return session.keep(key, value)


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
    for spec in FIELDS:
        if strategy in spec.strategies and _valid(spec, cfg.get(spec.name)):
            st.session_state[_store_key(spec, strategy)] = cfg[spec.name]


def augmentation_preview(ws, path, rep: dict, backbone: str, preset: str, seed: int) -> None:
    """A few training images as the chosen augmentation shows them to the network (an interactive task)."""
    samples = [paths[0] for paths in rep["thumbnails"].values() if paths][:PREVIEW_IMAGES]
    if not samples:
        return
    params = {"paths": samples, "signature": dataset_signature(path), "backbone": backbone, "preset": preset,
              "seed": int(seed), "copies": PREVIEW_COPIES}
    res = task_ui.task_view(ws, "augment_preview", params, "Drawing augmented images", auto=True,
                            key="aug-preview", poll_s=0.5, show_timing=False, compact=True)
    if res is None:
        return
    task = tasks.find(ws, "augment_preview", params)
    for item in res:
        files = [task_ui.result_file(ws, task, f) for f in item["views"]]
        # one line under the first view: a long file name is shortened rather than wrapped over the row
        st.image([str(f) for f in files], width=110,
                 caption=[session.short_label(item["name"])] + [""] * (len(files) - 1))
    if any(session.short_label(item["name"]) != item["name"] for item in res):
        st.caption("Rows, top to bottom: " + ", ".join(f"`{item['name']}`" for item in res) + ".")


#: The phone's own Start button (container key ``phone-start``) shows on narrow screens only (Streamlit's columns
#: stack below 640 px).
_PHONE_CSS = ("<style>.st-key-phone-start{display:none}"
              "@media (max-width:640px){.st-key-phone-start{display:block}}</style>")


def settings_form(ws, path) -> None:
    """The training settings (generated from the config's fields) and the Start button."""
    backbone = session.get("backbone", session.DEFAULT_BACKBONE)
    weights = session.weights_path(session.get("weights"), ws)
    rep = session.dataset_report(path, session.setting("val_split", 0.2), session.setting("seed", 0), ws)
    st.markdown(f"**Data:** {path.name} — {rep['num_classes']} classes, {rep['split']['train']} training and "
                f"{rep['split']['val']} validation images · **Backbone:** {backbone}"
                + ("" if weights == "auto" else f" with local weights `{weights.rsplit('/', 1)[-1]}`")
                + f" · **Device (auto):** {describe_auto_device()}")

    # a phone (a narrow screen) shows the settings one under the other, the Start button far below them: it gets
    # one here too, above the settings (with the choices as they are), hidden on wider screens
    st.html(_PHONE_CSS)
    phone_slot = st.container(key="phone-start")
    keys = list(STRATEGIES)
    skey = session.remember("strategy", TrainConfig.strategy)
    strategy = session.keep("strategy", st.radio(
        "Strategy", keys, key=skey,  # its default is the value the server holds (as field_widget's are)
        index=keys.index(st.session_state[skey]) if st.session_state[skey] in keys else 0,
        format_func=lambda k: STRATEGIES[k].label, captions=[STRATEGIES[k].help for k in keys],
        help=next(f.help for f in config_fields() if f.name == "strategy"),
    ))
    values: dict[str, Any] = {}
    main = [f for f in FIELDS if f.section == "main"]
    cols = st.columns(len(main))
    for col, spec in zip(cols, main):
        values[spec.name] = field_widget(spec, strategy, col)
    for spec in (f for f in FIELDS if f.section == "augment"):
        values[spec.name] = field_widget(spec, strategy)
        if spec.choices:
            st.caption(spec.choices[values[spec.name]].help + (
                "" if strategy in spec.strategies else " (The linear probe computes each image's features once, "
                "without augmentation; this applies to the fine-tuning strategies.)"))

    # the Start button comes before the previews and the advanced settings (visible without scrolling); it is
    # drawn into this slot after them, so that it reads every setting of this run
    start_slot = st.container()
    with st.expander("Preview: training images after augmentation", expanded=strategy != "linear"):
        augmentation_preview(ws, path, rep, backbone, values.get("augment", "light"), int(values.get("seed", 0)))
    with st.expander("Advanced"):
        advanced = [f for f in FIELDS if f.section == "advanced"]
        for start in range(0, len(advanced), 4):
            row = st.columns(4)
            for col, spec in zip(row, advanced[start:start + 4]):
                values[spec.name] = field_widget(spec, strategy, col)

    with phone_slot:
        early = st.button("Start training", type="primary", icon=":material/play_arrow:", key="start-phone",
                          help="The settings below as they are (the chosen strategy, auto by default).")
    with start_slot:
        if st.button("Start training", type="primary", icon=":material/play_arrow:", key="start-training") or early:
            # settings the strategy does not use keep their defaults (the saved config stays honest)
            used = {k: v for k, v in values.items()
                    if strategy in next(f for f in FIELDS if f.name == k).strategies}
            cfg = TrainConfig(backbone=backbone, strategy=strategy, weights=weights, **used)
            run_id = tasks.submit_training(ws, str(path), cfg, owner=session.owner())
            session.select("run", run_id)
            st.rerun()


def _train_task(ws, run_id: str) -> tasks.Task | None:
    """The task that runs (or ran) a training run; None for a run made by the command line."""
    rows = [t for t in ws.store().tasks(kind="train") if t.get("run_id") == run_id]
    return tasks.Task.from_row(rows[-1]) if rows else None


def _done_text(run: dict, task: tasks.Task | None) -> str:
    s = run.get("summary") or {}
    if task is not None and task.finished:
        took = timing_text(task.total_s, task.waited_s, task.ran_s)
    else:  # trained by the command line: no click to count from, only the run's own training time
        took = f"{duration_text(float(s.get('seconds') or 0))} of training (started from the command line)"
    # a linear probe keeps its converged fit: it has no best epoch to name
    best = "" if s.get("best_epoch") is None else f"best epoch {s.get('best_epoch')}, "
    if s.get("multi_label"):  # label sets: F1 and mAP say more than the exact-match accuracy
        micro = format_figure(s.get("micro_f1") or 0, s.get("micro_f1_ci"), percent=False)
        return (f"Done in {took}: validation micro-F1 **{micro}**, "
                f"mAP {format_figure(s.get('mAP'), s.get('mAP_ci'), percent=False)}, exact match "
                f"{(s.get('exact_match') or 0):.1%} (multi-label; thresholds chosen on the "
                f"{s.get('thresholds_chosen_on') or 'validation images'}; {best}weights: "
                f"{(s.get('weights') or {}).get('source')}).")
    features = features_text(s.get("features"))  # linear runs: which features the probe chose, and why
    auto = (s.get("auto") or {}).get("reason")  # strategy auto: what it tried and why it kept one
    n_val = int(s.get("val_count") or 0)
    cv = s.get("cv_estimate")
    n_test = int(s.get("test_count") or 0)
    test = (" Held-out test (never used for a choice): **" + format_figure(
        s.get("test_accuracy"), s.get("test_accuracy_ci"), round(s["test_accuracy"] * n_test) if n_test else None,
        n_test or None) + "**." if s.get("test_accuracy") is not None else "")
    head, _, sure = format_figure(s.get("val_accuracy") or 0, s.get("val_accuracy_ci"),
                                  round((s.get("val_accuracy") or 0) * n_val) if n_val else None,
                                  n_val or None).partition(" (")
    return (f"Done in {took}: validation accuracy **{head}** ("
            + (f"{sure.rstrip(')')}; " if sure else "")
            + f"{best}weights: {(s.get('weights') or {}).get('source')})."
            + (f" Cross-validated on {cv['count']} images: **{figure_of(cv)}**." if cv else "")
            + test + (f" {features}." if features else "") + (f" Auto: {auto}" if auto else ""))


def _cancel_run(ws, run_id: str) -> None:
    """Cancel button callback: ask the run to stop (before the page redraws, so it says "Cancelling…" at once)."""
    try:
        tasks.cancel_run(ws, run_id, actor=access.actor())
    except AccessError as e:
        st.session_state["_cancel_error"] = str(e)


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
            task = _train_task(ws, run_id)
            st.subheader(f"Run {run_id}")
            st.markdown(f"**Status:** {status} · {model_text(run)} · "
                        f"data `{run['data'].rsplit('/', 1)[-1]}`")
            st.caption("This run's link keeps `?run=…` in the address: refresh, or open it in another tab, "
                       "and you see the same run (training continues on the server).")
            if status in ACTIVE_STATUSES:
                since = time.time() - run["created"]
                if status == "queued" and task is not None and task.status == "queued":
                    st.progress(0.0, text=tasks.describe_wait(ws, task))
                else:
                    frac, text = describe_progress(status, run.get("progress"), epochs,
                                                   cancelling=run.get("cancel_requested", False),
                                                   patience=cfg.get("patience"))
                    st.progress(frac, text=f"{text} · {since:.0f} s since the click")
                # a callback: the click's own rerun already draws "Cancelling…" above (the flag is in the store)
                st.button("Cancel training", icon=":material/stop:", on_click=_cancel_run, args=(ws, run_id),
                          disabled=bool(run.get("cancel_requested")), help="Stops the worker at its next check "
                          "point (killed after a few seconds if it does not stop).")
                if "_cancel_error" in st.session_state:
                    st.error(st.session_state.pop("_cancel_error"))
            elif status == "done":
                s = run.get("summary") or {}
                st.success(_done_text(run, task))
                why = stop_text(cfg.get("strategy", ""), s.get("stop") or {}, s.get("best_epoch"))
                if why:
                    st.info(why)
                l1, l2 = st.columns(2)
                session.link("evaluate", "See the evaluation", ":material/analytics:", where=l1)
                session.link("try", "Try the model on new images", ":material/image_search:", where=l2)
            elif status == "failed":
                st.error(run.get("error") or "The run failed.")
            else:
                st.warning(ended_text(status, run.get("error")))
            # a run still going is charted from its first epoch (the chart grows); one that ended with a single
            # epoch (cancelled early) has no curve to show
            if len(epochs) >= MIN_EPOCHS_CHARTED or (epochs and status in ACTIVE_STATUSES):
                # a linear probe's rows are solver rounds, not passes over the data
                step = curve_step(run)
                st.plotly_chart(charts.training_curves({run_id: epochs}, x_title=step), width="stretch",
                                key=f"curves-{run_id}")
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
