"""Runs & export: every run with its settings and results, comparison, delete, and downloads: the model
bundle, verified ONNX, TorchScript and TFLite exports, a web page, and a self-contained HTML report."""

import importlib.util
from pathlib import Path

import pandas as pd
import streamlit as st

from pages import _access as access
from pages import _challenge as challenge_ui
from pages import _session as session
from pages import _tasks as task_ui
from tl_core.cache import cache_summary, clear_cache
from tl_core.classroom.challenge import challenge_info
from tl_core.config import EXPORT_FORMATS
from tl_core.data.library import deleted_dataset
from tl_core.metrics import compare_figures, figure_of
from tl_core.runs import tasks
from tl_core.storage.files import RunFiles
from tl_core.share.progress import MISSING, compare_rows, curve_step, model_text, runs_rows
from tl_core.storage.store import ACTIVE_STATUSES
from tl_core.access import AccessError
from tl_core.share import figures as charts

session.ensure_router()

st.title("Runs & export")


def _ci_text(ci) -> str | None:
    return f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%" if ci else None


def _paired_view(ws, run: dict, m: dict | None) -> dict:
    """What :func:`compare_figures` needs of a run: its counts, and (when its predictions can be read) which
    validation images it got right, so that two runs on the same images are compared image by image."""
    out = {"correct": (m or {}).get("correct"), "count": (m or {}).get("count")}
    if out["correct"] is None and m and m.get("accuracy") is not None and m.get("count"):
        out["correct"] = round(m["accuracy"] * m["count"])
    try:
        pred = RunFiles(ws.run_dir(run["id"])).predictions()
        val = pred.get("val")
        if val is not None and not (m or {}).get("multi_label"):
            t = val.targets(pred.classes)
            out.update(paths=list(val.paths), right=(val.logits.argmax(1) == t).astype(int).tolist())
    except Exception:  # files removed by hand: the interval of the two proportions still answers
        pass
    return out


def _with_uncertainty(ws, compared: dict, runs: list[dict], val_metrics: dict) -> None:
    """The comparison's accuracies with their 95% intervals, the cross-validated figure, and each run's
    difference from the first one: within noise or beyond it (paired on the same validation images)."""
    compared["Val accuracy"] = {r["id"]: figure_of(val_metrics.get(r["id"])) if val_metrics.get(r["id"])
                                else compared["Val accuracy"][r["id"]] for r in runs}
    compared["CV accuracy"] = {r["id"]: figure_of((r.get("summary") or {}).get("cv_estimate")) for r in runs}
    if len(runs) < 2:
        return
    first = runs[0]
    base = _paired_view(ws, first, val_metrics.get(first["id"]))
    diff = {first["id"]: "(reference)"}
    for r in runs[1:]:
        c = compare_figures(base, _paired_view(ws, r, val_metrics.get(r["id"])))
        diff[r["id"]] = c["text"] if c else MISSING
    compared[f"Val accuracy vs {first['id']}"] = diff


def _delete(ws, run_ids: list[str]) -> None:
    # a button callback: runs before the page is drawn, so it may reset the selection widgets
    deleted = []
    for i in run_ids:
        try:
            tasks.delete_run(ws, i, actor=access.actor())  # the run, its files and the exports/reports made from it
        except AccessError as e:
            st.session_state["_delete_refused"] = str(e)
            continue
        deleted.append(i)
    run_ids = deleted
    if session.get("run") in run_ids:
        session.select("run", None)
    st.session_state["runs_selected"] = []
    st.session_state["confirm_delete"] = False
    st.session_state["_deleted"] = len(run_ids)


def _data_text(run: dict) -> str:
    """The data a run trained on: its dataset version (``webcam@3f2a…``) when the dataset is versioned, else the
    folder's name."""
    return (run.get("summary") or {}).get("dataset_version") or Path(str(run.get("data", ""))).name or MISSING


FORMAT_LABELS = {"onnx": "ONNX", "torchscript": "TorchScript", "tflite": "TFLite", "webpage": "Web page"}
#: Fewest epochs a run needs for its training curves (one point says nothing and charts badly).
MIN_EPOCHS_CHARTED = 2


def _verification_text(v: dict, int8: dict | None = None) -> str:
    if "min_agreement" in v:  # TFLite: the float32 file's top-1 agreement, the int8 file's accuracy change
        acc = (f" int8: accuracy {v['accuracy']:.1%} → {int8['accuracy']:.1%} ({int8['accuracy_change_points']:+.1f} "
               "points)." if int8 and int8.get("accuracy") is not None and v.get("accuracy") is not None else "")
        return (f"float32 verified on {v['images']} held-out images with {v['runtime']}: same top-1 as the run on "
                f"{v['top1_agree']}/{v['images']} (needs {v['min_agreement']:.0%}), {v['ms_per_image']:.0f} ms an "
                f"image here.{acc}")
    return (f"Verified on {v['images']} images ({v['image_source']}) with {v['runtime']}: same top-1 class on "
            f"{v['top1_agree']}/{v['images']} images, largest probability difference {v['max_prob_diff']:.1e} "
            f"(allowed {v['tolerance']:.0e}).")


def _downloads(ws, task, res: dict, key: str, labels: dict[str, str] | None = None) -> None:
    """Download buttons for the files a done export or report task wrote (read from disk on click only)."""
    for n, f in enumerate(res["files"]):
        path = task_ui.result_file(ws, task, f["file"])
        if not path.is_file():
            st.warning(f"{f['name']} is gone from the server; export it again.")
            continue
        label = (labels or {}).get(Path(f["name"]).suffix) or f"{f['name']} ({f['bytes'] / 1e6:.1f} MB)"
        st.download_button(label, data=lambda p=path: p.read_bytes(), file_name=f["name"], mime=f["mime"],
                           key=f"{key}-{n}", icon=":material/download:", on_click="ignore",
                           help=f"Saved as {f['name']}.")


def _export_view(ws, run_id: str, fmt: str, button: str, label: str, help: str | None = None):
    """The ``export`` task of one run and format: its button, progress, then its result (or None)."""
    files = RunFiles(ws.run_dir(run_id))
    params = {"run": str(files.dir), "stamp": files.stamp(), "format": fmt}
    res = task_ui.task_view(ws, "export", params, label, button=button, icon=":material/output:",
                            key=f"exp-{fmt}-{run_id}", button_help=help)
    return res, (tasks.find(ws, "export", params) if res is not None else None)


def serve_snippet(ws, run_id: str) -> None:
    """The command that serves one run as an HTTP API (its run directory: it resolves whatever ``$TL_HOME`` and
    project the shell has), and a ``curl`` call of it (docs/serve.md)."""
    st.caption("Serve it as an HTTP API (`POST /predict`, API docs at `/docs`; add `--api-key KEY` to require a key):")
    st.code(f"tl-core serve {ws.run_dir(run_id)} --port 8000\n"
            "curl -F files=@image.jpg http://localhost:8000/predict", language="bash")


#: The modules a TFLite export needs (the ``.[edge]`` extra), and the command that installs them: the same as
#: tl_core.share.tflite's (a test checks it), which the server does not import (it imports torch).
EDGE_MODULES = ("tensorflow", "ai_edge_litert")
EDGE_INSTALL = "pip install -e '.[edge]'"


def _edge_missing() -> list[str]:
    """The modules of the ``.[edge]`` extra that are not installed (looked up without importing them: 0.2 ms)."""
    return [m for m in EDGE_MODULES if importlib.util.find_spec(m) is None]


def export_panel(ws, run_id: str) -> None:
    """ONNX / TorchScript / TFLite / web-page exports with their verification numbers, and the HTML report, for
    one finished run. Without the ``.[edge]`` extra the TFLite column shows the command that installs it instead
    of a button whose task could only fail."""
    cols = st.columns(len(FORMAT_LABELS) + 1)
    edge_missing = _edge_missing()
    for col, fmt in zip(cols, FORMAT_LABELS):
        with col:
            st.markdown(f"**{FORMAT_LABELS[fmt]}**")
            st.caption(EXPORT_FORMATS[fmt])
            if fmt == "tflite" and edge_missing:
                st.caption(f"Not installed on this server ({', '.join(edge_missing)} missing). To offer it, run "
                           "this in TL Studio's folder (a 250 MB download), then reload the page:")
                st.code(EDGE_INSTALL, language="bash")
                continue
            res, task = _export_view(ws, run_id, fmt, f"Export {FORMAT_LABELS[fmt]}",
                                     f"Exporting and verifying {FORMAT_LABELS[fmt]}",
                                     "Exports the model, then runs the exported file on the run's validation "
                                     "images and compares it with PyTorch before offering it.")
            if res is None:
                continue
            v = res["verification"]
            (st.success if v["passed"] else st.error)(_verification_text(v, res.get("int8")))
            if fmt == "webpage":
                _downloads(ws, task, res, f"dl-{fmt}-{run_id}", {
                    ".zip": f"Web page .zip ({res['files'][0]['bytes'] / 1e6:.1f} MB)"})
                st.caption("Unzip it and open index.html: it runs offline. Your own page can call "
                           "`await tlstudio.predict(img)` (see the page's 'JavaScript API').")
                continue
            if fmt == "tflite":  # two model files: float32 and int8, by name
                _downloads(ws, task, res, f"dl-{fmt}-{run_id}", {".json": "Classes and preprocessing (.json)"})
                continue
            ext = {"onnx": ".onnx", "torchscript": ".pt"}[fmt]
            model = res["files"][0]
            _downloads(ws, task, res, f"dl-{fmt}-{run_id}", {
                ext: f"Model {ext} ({model['bytes'] / 1e6:.1f} MB)", ".json": "Classes and preprocessing (.json)"})
    with cols[-1]:
        st.markdown("**Report**")
        st.caption("One self-contained HTML page for stakeholders: curves, confusion matrix, per-class table, "
                   "calibration and misclassified examples. Opens offline in any browser.")
        files = RunFiles(ws.run_dir(run_id))
        params = {"run": str(files.dir), "stamp": files.stamp()}
        res = task_ui.task_view(ws, "report", params, "Writing the HTML report", button="Prepare the HTML report",
                                icon=":material/description:", key=f"report-{run_id}")
        if res is not None:
            _downloads(ws, tasks.find(ws, "report", params), res, f"report-{run_id}", {".html": "HTML report"})


#: How the Cache panel names each of tl_core.cache's kinds.
_CACHE_NAMES = {"decoded": "Decoded images", "features": "features", "choices": "recorded choices",
                "engines": "ONNX engines", "exports": "ONNX exports of runs", "checks": "image checks"}


@st.cache_data(ttl=30, show_spinner=False)
def _cache_summary(cache_dir: str) -> dict[str, dict[str, int]]:
    """:func:`cache_summary`, measured at most every 30 s per cache folder: it stats every cached file (a full
    5 GB cache: some 25,000 files; 2,800 files took 80 ms), and the Runs page reruns on every click, expander
    closed or not, for every session of a class."""
    return cache_summary(cache_dir)


def cache_panel(ws) -> None:
    """How much each cache holds (decoded images, features, recorded choices, ONNX engines, runs' ONNX exports,
    image checks), and a button that empties them all."""
    with st.expander("Cache", icon=":material/storage:"):
        summary = _cache_summary(str(ws.cache_dir))
        st.caption(" · ".join(f"{_CACHE_NAMES[k]} {v['bytes'] / 1e6:.1f} MB" for k, v in summary.items()) + ". "
                   "The caches make a second run on the same images fast; they are capped together (least "
                   "recently used first) and can be emptied at any time: runs are kept, the next run just decodes "
                   "again.")
        if access.role() != "teacher":  # the caches serve the whole class: emptying them is the teacher's call
            st.caption("Only the teacher can empty the caches on this server.")
        elif st.button("Clear the cache", key="clear_cache", icon=":material/delete_sweep:"):
            freed = clear_cache(ws.cache_dir)
            _cache_summary.clear()  # the next rerun shows the emptied cache, not the last 30 s's figure
            st.success(f"Freed {freed / 1e6:.1f} MB.")


def challenge_panel(ws, runs: list[dict]) -> None:
    """The class challenge, when the teacher set one up: submit a finished run, and the leaderboard (figures
    only: the locked images are never shown)."""
    info = challenge_info(ws)
    if info is None:
        return
    with st.expander(f"Class challenge: {info['name']}", icon=":material/emoji_events:"):
        st.markdown(challenge_ui.challenge_caption(info))
        done = [r["id"] for r in runs if r["status"] == "done"]
        if done:
            current = session.get("run")
            pick = st.selectbox("Run to submit", done, index=done.index(current) if current in done else 0,
                                key="challenge_run", help="Your group's latest submission is the one on the "
                                                          "leaderboard.")
            challenge_ui.submit_view(ws, pick)
        else:
            st.caption("Train a run first, then submit it here.")
        challenge_ui.leaderboard_view(ws)


with session.page_errors():
    ws = session.workspace()
    store = ws.store()
    runs = store.list()
    cache_panel(ws)
    if "_delete_refused" in st.session_state:
        st.error(st.session_state.pop("_delete_refused"))
    challenge_panel(ws, runs)
    if st.session_state.pop("_deleted", 0):
        st.success("Deleted.")
    if not runs:
        st.info("No runs yet.")
        session.link("train", "Go to Train", ":material/model_training:")
        st.stop()
    rows = pd.DataFrame(runs_rows(runs)).astype({"Best epoch": "Int64"})
    rows = rows.rename(columns={"Seconds": "Training s"})  # the run's own clock, not the Train page's
    rows["Data"] = [_data_text(r) for r in runs]  # the dataset version, so that runs on different versions differ
    # how sure each accuracy is, beside it (older runs recorded no interval: blank)
    at = list(rows.columns).index("Val accuracy") + 1
    rows.insert(at, "Val 95% CI", [_ci_text((r.get("summary") or {}).get("val_accuracy_ci")) for r in runs])
    rows.insert(at + 1, "CV accuracy", [((r.get("summary") or {}).get("cv_estimate") or {}).get("accuracy")
                                         for r in runs])
    # a heading of its own: the table's toolbar (search, download, full screen) shows over the line above the
    # table, which must not be the Cache expander's (on a phone the toolbar covered it)
    st.subheader(f"All runs ({len(runs)})")
    st.dataframe(rows, hide_index=True, width="stretch", placeholder=MISSING, column_config={
        "Val accuracy": st.column_config.NumberColumn(format="percent", help="Accuracy on the validation images."),
        "Val 95% CI": st.column_config.TextColumn(help="Where the validation accuracy would likely fall on more "
                                                  "images like these (Wilson 95% interval)."),
        "CV accuracy": st.column_config.NumberColumn(format="percent", help="Linear runs: k-fold cross-validated "
                                                     "accuracy on every labelled image (the steadiest figure on "
                                                     "small data)."),
        "Test accuracy": st.column_config.NumberColumn(format="percent",
                                                       help="Accuracy on held-out test images (the dataset's own "
                                                            "test/ folder, an upload or the locked test share)."),
        "Best epoch": st.column_config.NumberColumn(help="The fine-tuning epoch whose weights were kept (a linear "
                                                    "probe has none: it keeps its converged fit)."),
        "Features": st.column_config.TextColumn(help="What the model's last layer saw: a linear run's probe features "
                                                "(auto chooses by cross-validation); a fine-tuned run starts from a "
                                                "probe on the last layer and trains on."),
        "Training s": st.column_config.NumberColumn(
            format="%.1f", help="Seconds inside the training: checking the images, training and the final "
                                "evaluation. The Train page's 'Done in … from the click' is longer: it also counts "
                                "the wait in the queue and the worker's start."),
    })

    by_id = {r["id"]: r for r in runs}
    current = session.get("run")
    if "runs_selected" not in st.session_state:
        st.session_state["runs_selected"] = [current] if current in by_id else []
    # drop runs deleted meanwhile (another tab, the CLI) before the widget sees them
    st.session_state["runs_selected"] = [i for i in st.session_state["runs_selected"] if i in by_id]
    chosen = st.multiselect(
        "Select runs", list(by_id), key="runs_selected",
        format_func=lambda i: f"{i} · {by_id[i]['status']} · {model_text(by_id[i])}",
        help="One to download or delete it; two or more to compare them.",
    )
    if not chosen:
        st.caption("Select runs above to compare, download or delete them.")
        st.stop()

    st.subheader("Comparison" if len(chosen) > 1 else "Run details")
    series = {i: store.epochs(i) for i in chosen}
    charted = {k: v for k, v in series.items() if len(v) >= MIN_EPOCHS_CHARTED}
    if charted:
        # linear probes count solver rounds, fine-tunes epochs; a mixed comparison says both
        kinds = {curve_step(by_id[i]) for i in charted}
        st.plotly_chart(charts.training_curves(charted, x_title=" / ".join(sorted(kinds, reverse=True))),
                        width="stretch")
    short = [i for i in chosen if i not in charted]
    if short:
        st.caption(f"No curves for {', '.join(short)}: fewer than {MIN_EPOCHS_CHARTED} epochs were recorded.")
    val_metrics = {}
    for i in chosen:
        if by_id[i]["status"] == "done":
            try:
                val_metrics[i] = RunFiles(ws.run_dir(i)).metrics().val
            except Exception:  # files removed by hand: the comparison still shows what the store knows
                val_metrics[i] = None
    compared = compare_rows([by_id[i] for i in chosen], val_metrics)
    compared["Data"] = {i: _data_text(by_id[i]) for i in chosen}
    _with_uncertainty(ws, compared, [by_id[i] for i in chosen], val_metrics)
    st.table(pd.DataFrame(compared).T)
    versions_seen = {(by_id[i].get("summary") or {}).get("dataset_version") for i in chosen} - {None}
    if len(versions_seen) > 1 and len({v.split("@")[0] for v in versions_seen}) == 1:
        st.caption("These runs trained on different versions of the same dataset (the Data page lists what changed "
                   "between them).")
    for i in chosen:
        gone = deleted_dataset(ws, by_id[i].get("data"))
        if gone:
            st.caption(f"Run {i}: its dataset '{gone}' has been deleted from this server; its results and model are "
                       "kept, but views of its images (mistakes, Grad-CAM) cannot show them.")

    st.subheader("Download and share")
    for i in chosen:
        if by_id[i]["status"] != "done":
            st.caption(f"{i}: {by_id[i]['status']}, nothing to download.")
            continue
        with st.container(border=True):
            st.markdown(f"**Run {i}** · {model_text(by_id[i])}")
            version = (by_id[i].get("summary") or {}).get("dataset_version")
            if version:
                st.caption(f"Trained on dataset version **{version}** (the Data page lists its versions and can "
                           "restore this one).")
            c1, c2 = st.columns([1, 3])
            with c1:
                res, task = _export_view(ws, i, "bundle", "Prepare bundle", "Writing the bundle",
                                         "Writes a zip bundle of the trained model.")
                if res is not None:
                    _downloads(ws, task, res, f"dl-{i}", {".zip": "Download bundle"})
            if res is not None:
                name = res["files"][0]["name"]
                c2.caption(f"Bundle: model weights (safetensors), config, metrics and a model card "
                           f"({res['files'][0]['bytes'] / 1e6:.1f} MB). Predict with `tl-core predict {name} IMAGE`.")
            else:
                c2.caption("Bundle: " + EXPORT_FORMATS["bundle"])
            serve_snippet(ws, i)
            export_panel(ws, i)

    st.subheader("Delete")
    active = [i for i in chosen if by_id[i]["status"] in ACTIVE_STATUSES]
    if active:
        st.caption(f"Running or queued runs cannot be deleted ({', '.join(active)}): cancel them on the Train page.")
    deletable = [i for i in chosen if i not in active]
    if deletable:
        sure = st.checkbox(f"Yes, delete {len(deletable)} run(s) and their files", key="confirm_delete")
        st.button("Delete", disabled=not sure, icon=":material/delete:", on_click=_delete, args=(ws, deletable))
