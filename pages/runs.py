"""Runs & export: every run with its settings and results, comparison, delete, and downloads: the model
bundle, verified ONNX and TorchScript exports, and a self-contained HTML report."""

from pathlib import Path

import pandas as pd
import streamlit as st

from pages import _charts as charts
from pages import _compute as compute
from pages import _session as session
from tl_core.app_support import run_metrics, runs_rows
from tl_core.export import EXPORT_FORMATS, PARITY_TOLERANCE, export_for_download, export_run
from tl_core.report import build_report
from tl_core.runs import ACTIVE_STATUSES

session.ensure_router()

st.title("Runs & export")


def _delete(ws, run_ids: list[str]) -> None:
    # a button callback: runs before the page is drawn, so it may reset the selection widgets
    for i in run_ids:
        ws.store().delete(i, ws.runs_dir)
        (ws.home / "exports" / f"tl-studio-{i}.zip").unlink(missing_ok=True)
    if session.get("run") in run_ids:
        session.select("run", None)
    st.session_state["runs_selected"] = []
    st.session_state["confirm_delete"] = False
    st.session_state["_deleted"] = len(run_ids)


FORMAT_LABELS = {"onnx": "ONNX", "torchscript": "TorchScript"}


@st.cache_data(show_spinner=False, max_entries=4)
def _export(run_dir: str, fmt: str, stamp: tuple) -> dict:
    # exports are deterministic for the run's files (`stamp`); the bytes are kept for the download buttons
    return export_for_download(run_dir, fmt)


def _verification_text(v: dict) -> str:
    return (f"Verified on {v['images']} images ({v['image_source']}) with {v['runtime']}: same top-1 class on "
            f"{v['top1_agree']}/{v['images']} images, largest probability difference {v['max_prob_diff']:.1e} "
            f"(allowed {v.get('tolerance', PARITY_TOLERANCE):.0e}).")


def export_panel(ws, run_id: str) -> None:
    """ONNX / TorchScript exports with their verification numbers, and the HTML report, for one finished run."""
    run_dir = ws.run_dir(run_id)
    stamp = compute.file_stamp(run_dir / "meta.json", run_dir / "model.safetensors")
    done = st.session_state.setdefault("_exports", set())
    cols = st.columns(3)
    for col, fmt in zip(cols, FORMAT_LABELS):
        with col:
            st.markdown(f"**{FORMAT_LABELS[fmt]}**")
            st.caption(EXPORT_FORMATS[fmt])
            if (run_id, fmt) not in done:
                slot = st.empty()
                if not slot.button(f"Export {FORMAT_LABELS[fmt]}", key=f"exp-{fmt}-{run_id}",
                                   icon=":material/output:",
                                   help="Exports the model, then runs the exported file on the run's validation "
                                        "images and compares it with PyTorch before offering it."):
                    continue
                slot.empty()  # exported from now on: the downloads take the button's place
                done.add((run_id, fmt))
            with st.spinner(f"Exporting and verifying {FORMAT_LABELS[fmt]}…"):
                res = _export(str(run_dir), fmt, stamp)
            v = res["verification"]
            (st.success if v["passed"] else st.error)(_verification_text(v))
            model, *sidecars = res["files"]
            st.download_button(f"Model .{model['name'].rsplit('.', 1)[-1]} ({len(model['data']) / 1e6:.1f} MB)",
                               model["data"], file_name=model["name"], mime=model["mime"],
                               key=f"dl-{fmt}-{run_id}", icon=":material/download:", on_click="ignore",
                               help=f"Saved as {model['name']}.")
            for f in sidecars:
                st.download_button("Classes and preprocessing (.json)", f["data"], file_name=f["name"],
                                   mime=f["mime"], key=f"dl-{fmt}-{run_id}-json", icon=":material/download:",
                                   on_click="ignore", help=f"Saved as {f['name']}: what a program needs to feed the "
                                                           "model and read its output.")
    with cols[2]:
        st.markdown("**Report**")
        st.caption("One self-contained HTML page for stakeholders: curves, confusion matrix, per-class table, "
                   "calibration and misclassified examples. Opens offline in any browser.")
        st.download_button("HTML report", data=lambda d=str(run_dir): build_report(d),
                           file_name=f"tl-studio-report-{run_id}.html", mime="text/html", key=f"report-{run_id}",
                           icon=":material/description:", on_click="ignore")


def cache_panel(ws) -> None:
    """How much the decoded-image and feature caches hold, and a button that empties them."""
    with st.expander("Cache", icon=":material/storage:"):
        usage = ws.cache_usage()
        st.caption(f"Decoded images {usage['decoded'] / 1e6:.1f} MB · features {usage['features'] / 1e6:.1f} MB. "
                   "The caches make a second run on the same images fast; they are capped (least recently used "
                   "first) and can be emptied at any time: runs are kept, the next run just decodes again.")
        if st.button("Clear the cache", key="clear_cache", icon=":material/delete_sweep:"):
            freed = ws.clear_cache()
            st.success(f"Freed {freed / 1e6:.1f} MB.")


with session.page_errors():
    ws = session.workspace()
    store = ws.store()
    runs = store.list()
    cache_panel(ws)
    if st.session_state.pop("_deleted", 0):
        st.success("Deleted.")
    if not runs:
        st.info("No runs yet.")
        session.link("train", "Go to Train", ":material/model_training:")
        st.stop()
    rows = runs_rows(runs)
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_config={
        "val_accuracy": st.column_config.NumberColumn("val accuracy", format="percent",
                                                      help="Accuracy on the validation images."),
        "test_accuracy": st.column_config.NumberColumn("test accuracy", format="percent",
                                                       help="Accuracy on the dataset's own test/ folder, if any."),
        "best_epoch": st.column_config.NumberColumn("best epoch", help="The epoch whose weights were kept."),
        "seconds": st.column_config.NumberColumn(format="%.1f"),
        "lr": st.column_config.NumberColumn(format="%g"),
    })

    by_id = {r["id"]: r for r in runs}
    current = session.get("run")
    if "runs_selected" not in st.session_state:
        st.session_state["runs_selected"] = [current] if current in by_id else []
    # drop runs deleted meanwhile (another tab, the CLI) before the widget sees them
    st.session_state["runs_selected"] = [i for i in st.session_state["runs_selected"] if i in by_id]
    chosen = st.multiselect(
        "Select runs", list(by_id), key="runs_selected",
        format_func=lambda i: f"{i} · {by_id[i]['status']} · {(by_id[i].get('config') or {}).get('backbone')} · "
                              f"{(by_id[i].get('config') or {}).get('strategy')}",
        help="One to download or delete it; two or more to compare them.",
    )
    if not chosen:
        st.caption("Select runs above to compare, download or delete them.")
        st.stop()

    st.subheader("Comparison" if len(chosen) > 1 else "Run details")
    series = {i: store.epochs(i) for i in chosen}
    if any(series.values()):
        st.plotly_chart(charts.training_curves({k: v for k, v in series.items() if v}), width="stretch")
    table = []
    for i in chosen:
        r = by_id[i]
        cfg = r.get("config") or {}
        s = r.get("summary") or {}
        row = {"run": i, "status": r["status"], "data": Path(r["data"]).name, **{k: cfg.get(k) for k in (
            "backbone", "strategy", "epochs", "lr", "batch_size", "augment", "seed", "val_split")}}
        if cfg.get("strategy") == "linear":  # the probe's solver has no learning rate, batches or augmentation
            row.update(lr=None, batch_size=None, augment=None)
        row.update({"val accuracy": s.get("val_accuracy"), "test accuracy": s.get("test_accuracy"),
                    "best epoch": s.get("best_epoch"), "seconds": s.get("seconds")})
        if r["status"] == "done":
            try:
                val = run_metrics(ws, i)["val"]
                row.update({"macro F1": val.get("macro_f1"), "log loss": val.get("log_loss"), "val images": val["count"]})
            except Exception as e:  # files removed by hand: the row still shows what the store knows
                row["error"] = str(e)
        table.append(row)
    st.table(pd.DataFrame(table).set_index("run").T.astype(str).replace({"None": "", "nan": ""}))

    st.subheader("Download and share")
    exports = ws.home / "exports"
    for i in chosen:
        if by_id[i]["status"] != "done":
            st.caption(f"{i}: {by_id[i]['status']}, nothing to download.")
            continue
        with st.container(border=True):
            st.markdown(f"**Run {i}** · {(by_id[i].get('config') or {}).get('backbone')} · "
                        f"{(by_id[i].get('config') or {}).get('strategy')}")
            bundle = exports / f"tl-studio-{i}.zip"
            c1, c2 = st.columns([1, 3])
            if bundle.is_file():
                c1.download_button("Download bundle", bundle.read_bytes(), file_name=bundle.name,
                                   mime="application/zip", key=f"dl-{i}", icon=":material/download:")
                c2.caption(f"Bundle: model weights (safetensors), config, metrics and a model card "
                           f"({bundle.stat().st_size / 1e6:.1f} MB). Predict with `tl-core predict {bundle.name} "
                           "IMAGE`.")
            else:
                if c1.button("Prepare bundle", key=f"prep-{i}", help="Writes a zip bundle of the trained model."):
                    with st.spinner("Writing the bundle…"):
                        export_run(ws.run_dir(i), "bundle", bundle)
                    st.rerun()
                c2.caption("Bundle: " + EXPORT_FORMATS["bundle"])
            export_panel(ws, i)

    st.subheader("Delete")
    active = [i for i in chosen if by_id[i]["status"] in ACTIVE_STATUSES]
    if active:
        st.caption(f"Running or queued runs cannot be deleted ({', '.join(active)}): cancel them on the Train page.")
    deletable = [i for i in chosen if i not in active]
    if deletable:
        sure = st.checkbox(f"Yes, delete {len(deletable)} run(s) and their files", key="confirm_delete")
        st.button("Delete", disabled=not sure, icon=":material/delete:", on_click=_delete, args=(ws, deletable))
