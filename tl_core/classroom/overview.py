"""The teacher's view of a class: every project on the server (``<TL_HOME>/projects/<slug>/``, plus the shared
workspace) with its datasets, runs, best accuracy and what it is running; delete or reset a project (its tasks are
cancelled first by the jobs layer, ``tl_core.runs.tasks.cancel_all``: this package sits below it);
clean up the whole class after the lesson; export the class's results (a CSV and the runs' HTML reports in
one zip).

The content-keyed caches and the worker slots are shared by every project (``tl_core.storage.workspace``) and
are never touched here: a cleaned-up class leaves the next lesson's first run as fast as this one's.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import RunError
from ..metrics import figure_of, wilson_interval
from ..share.progress import kept_model
from ..storage.store import ACTIVE_STATUSES, task_ran_s, task_waited_s
from ..storage.workspace import Workspace
from .projects import SHARED, project_of
from .projects import label as _label

__all__ = ["SHARED", "project_rows", "project_of", "reset_project", "delete_project",
           "clean_up_class", "class_stamp", "results_rows", "RESULT_COLUMNS", "results_csv", "export_class"]

log = logging.getLogger(__name__)


def _best_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished run with the highest validation accuracy (more validation images first on a tie)."""
    done = [r for r in runs if r["status"] == "done" and (r.get("summary") or {}).get("val_accuracy") is not None]
    if not done:
        return None
    return max(done, key=lambda r: ((r["summary"]["val_accuracy"]), r["summary"].get("val_count") or 0))


def _accuracy_figure(summary: dict[str, Any]) -> dict[str, Any]:
    """A run's validation accuracy as a report :func:`figure_of` reads: value, Wilson interval, counts."""
    acc, n = summary.get("val_accuracy"), int(summary.get("val_count") or 0)
    if acc is None:
        return {}
    correct = round(acc * n) if n else None
    ci = summary.get("val_accuracy_ci") or (wilson_interval(correct, n) if n else None)
    return {"accuracy": acc, "accuracy_ci": ci, "correct": correct, "count": n or None}


def _activity(ws: Workspace) -> list[dict[str, Any]]:
    """The project's queued and running tasks: kind (the page names it), status, seconds waited or run so far."""
    now = time.time()
    out = []
    for t in ws.store().tasks():
        if t["status"] in ACTIVE_STATUSES:
            running = t["status"] == "running" and t.get("started") is not None
            seconds = task_ran_s(t, now) if running else task_waited_s(t, now)
            out.append({"id": t["id"], "kind": t["kind"], "status": t["status"], "run_id": t.get("run_id"),
                        "seconds": round(max(0.0, seconds), 1)})
    return out


def project_rows(top: Workspace, include_shared: bool = True) -> list[dict[str, Any]]:
    """One row per project (and the shared workspace): what the teacher's table shows.

    Args:
        top: any workspace of the server (its ``TL_HOME`` is used).
        include_shared: add the shared workspace (runs made without a project) as a row.
    Returns:
        Rows with ``project`` (slug, or :data:`SHARED`), ``datasets`` (names), ``runs`` (count), ``done``,
        ``best_run``, ``best_accuracy`` (a proportion or None), ``best_accuracy_ci``, ``best_text`` (the figure
        with its interval, as every surface writes it), ``running``, ``queued`` (task counts), ``activity``
        (the active tasks), ``created`` and ``last_activity`` (epoch seconds).
    """
    from ..data.library import workspace_datasets

    rows = []
    for ws in Workspace(top.top).all_workspaces():
        if not ws.is_project and not include_shared:
            continue
        runs = ws.store().list()
        best = _best_run(runs)
        fig = _accuracy_figure(best["summary"]) if best else {}
        act = _activity(ws)
        stamps = [r["updated"] for r in runs] + [ws.db_path.stat().st_mtime]
        rows.append({
            "project": _label(ws),
            "datasets": [d["name"] for d in workspace_datasets(ws)],
            "runs": len(runs),
            "done": sum(r["status"] == "done" for r in runs),
            "best_run": best["id"] if best else None,
            "best_accuracy": fig.get("accuracy"),
            "best_accuracy_ci": fig.get("accuracy_ci"),
            "best_text": figure_of(fig) if fig else "—",
            "running": sum(a["status"] == "running" for a in act),
            "queued": sum(a["status"] == "queued" for a in act),
            "activity": act,
            "created": ws.home.stat().st_ctime,
            "last_activity": max(stamps),
        })
    return rows


def _refuse_while_active(ws: Workspace, doing: str) -> None:
    active = sum(t["status"] in ACTIVE_STATUSES for t in ws.store().tasks())
    if active:
        raise RunError(f"{active} task(s) of {_label(ws)} are queued or running; cancel its tasks first (a "
                       f"cancelled one may take a few seconds to stop), then {doing} again.")


def reset_project(top: Workspace, project: str | None) -> dict[str, int]:
    """Empty a project (or the shared workspace) but keep it and its link: every run, task, uploaded dataset and
    weights file goes; the shared caches stay. Refused while a task of the project is queued or running
    (``tl_core.runs.tasks.cancel_all`` first).

    Returns:
        {"runs": removed, "tasks": removed, "datasets": removed}
    Raises:
        RunError: a task of the project is queued or running (cancel its tasks first).
    """
    ws = project_of(top, project)
    _refuse_while_active(ws, "reset it")
    store = ws.store()
    n_tasks = 0
    for t in store.tasks():
        if t["status"] == "queued":  # cancelled a moment ago by another process's view of it: wait for it
            continue
        store.delete_task(t["id"])
        n_tasks += 1
    runs = store.list()
    for r in runs:
        store.delete(r["id"], ws.runs_dir)
    datasets = [p for p in ws.datasets_dir.iterdir() if p.is_dir()] if ws.datasets_dir.is_dir() else []
    for d in (ws.runs_dir, ws.tasks_dir, ws.datasets_dir, ws.home / "weights"):
        shutil.rmtree(d, ignore_errors=True)
    for d in (ws.runs_dir, ws.datasets_dir):
        d.mkdir(parents=True, exist_ok=True)
    log.info("reset %s: %d runs, %d tasks, %d datasets", _label(ws), len(runs), n_tasks, len(datasets))
    return {"runs": len(runs), "tasks": n_tasks, "datasets": len(datasets)}


def delete_project(top: Workspace, project: str) -> dict[str, int]:
    """Delete a project: its folder (runs, uploads, weights) is removed; its link stops working. Refused while a
    task of the project is queued or running (``tl_core.runs.tasks.cancel_all`` first). The shared workspace
    cannot be deleted (reset it instead).

    Returns:
        {"runs": how many runs it held}
    Raises:
        RunError: no such project, the shared workspace, or a task of the project is queued or running.
    """
    if project in (None, "", SHARED):
        raise RunError("The shared workspace cannot be deleted; reset it to empty it.")
    ws = project_of(top, project)
    _refuse_while_active(ws, "delete it")
    runs = len(ws.store().list())
    shutil.rmtree(ws.home)
    log.info("deleted project %s (%d runs)", project, runs)
    return {"runs": runs}


def clean_up_class(top: Workspace, include_shared: bool = True) -> dict[str, Any]:
    """After the lesson: delete every project and (``include_shared``) empty the shared workspace. The caches,
    the worker slots and the class challenge (``tl_core.classroom.challenge``) are kept. A project with a queued
    or running task is left (the caller cancels every project's tasks first: ``tl_core.runs.tasks.cancel_all``).

    Returns:
        {"projects": deleted slugs, "runs": runs removed, "stopping": projects left because a task was still
        queued or running (run the clean-up again in a few seconds)}
    """
    top = Workspace(top.top)
    deleted, runs, stopping = [], 0, []
    for ws in top.all_workspaces():
        if not ws.is_project:
            continue
        try:
            runs += delete_project(top, ws.name)["runs"]
            deleted.append(ws.name)
        except RunError:
            stopping.append(ws.name)
    if include_shared:
        try:
            runs += reset_project(top, None)["runs"]
        except RunError:
            stopping.append(SHARED)
    return {"projects": deleted, "runs": runs, "stopping": stopping}


def class_stamp(top: Workspace) -> str:
    """A short key that changes whenever a run of the class, or a challenge submission, changes: an export's
    task is keyed by it, so that the teacher's download is of the class as it is now."""
    import hashlib

    from .challenge import challenge_dir

    h = hashlib.sha256()
    for ws in Workspace(top.top).all_workspaces():
        for r in ws.store().list():
            h.update(f"{_label(ws)}|{r['id']}|{r['status']}|{r['updated']}\n".encode())
    subs = challenge_dir(top) / "submissions"
    for f in sorted(subs.glob("*.json")) if subs.is_dir() else []:
        h.update(f"{f.name}|{f.stat().st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


#: The export CSV's columns, in order.
RESULT_COLUMNS = ["project", "run", "name", "status", "created", "data", "backbone", "strategy", "val_accuracy",
                  "val_ci_low", "val_ci_high", "val_images", "test_accuracy", "test_ci_low", "test_ci_high",
                  "training_s", "error", "report"]


def results_rows(top: Workspace) -> list[dict[str, Any]]:
    """Every run of the class (all projects and the shared workspace), one row each (:data:`RESULT_COLUMNS`;
    ``report`` is filled by :func:`export_class`)."""
    rows = []
    for ws in Workspace(top.top).all_workspaces():
        for r in reversed(ws.store().list()):  # oldest first
            s = r.get("summary") or {}
            vci, tci = s.get("val_accuracy_ci") or [None, None], s.get("test_accuracy_ci") or [None, None]
            rows.append({
                "project": _label(ws), "run": r["id"], "name": r.get("name") or "", "status": r["status"],
                "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])),
                "data": s.get("dataset_version") or Path(str(r.get("data", ""))).name,
                **dict(zip(("backbone", "strategy"), kept_model(r))),  # an auto run: the try it kept
                "val_accuracy": s.get("val_accuracy"), "val_ci_low": vci[0], "val_ci_high": vci[1],
                "val_images": s.get("val_count"), "test_accuracy": s.get("test_accuracy"),
                "test_ci_low": tci[0], "test_ci_high": tci[1], "training_s": s.get("seconds"),
                "error": r.get("error") or "", "report": "",
            })
    return rows


def results_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV text (:data:`RESULT_COLUMNS`; blank for a value a run does not have)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in RESULT_COLUMNS})
    return buf.getvalue()


def export_class(top: Workspace, out: str | Path, reports: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write the class's results into one zip: ``results.csv`` (every run), ``leaderboard.csv`` when a class
    challenge has submissions, and ``reports/<project>/<run>.html`` (the HTML report of every finished run).

    Long (a report per run): the Teacher page runs it in a worker (task kind ``class_export``).

    Args:
        top: any workspace of the server.
        out: the zip file to write.
        reports: include the HTML reports.
        progress: (done, total) callback over the reports.
    Returns:
        {"path", "bytes", "runs", "reports", "failed": [{"run", "error"}] (reports that could not be written)}
    """
    from ..fileio import writing_atomic
    from ..share.report import build_report
    from .challenge import leaderboard, leaderboard_csv

    top = Workspace(top.top)
    rows = results_rows(top)
    failed, written = [], 0
    done = [r for r in rows if r["status"] == "done"] if reports else []
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with writing_atomic(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, r in enumerate(done):
            ws = project_of(top, r["project"])
            name = f"reports/{r['project'] if r['project'] != SHARED else 'shared'}/{r['run']}.html"
            try:
                zf.writestr(name, build_report(ws.run_dir(r["run"])))
                r["report"] = name
                written += 1
            except Exception as e:  # a damaged run must not lose the class's other results
                failed.append({"run": r["run"], "error": f"{type(e).__name__}: {e}"[:300]})
            if progress:
                progress(n + 1, len(done))
        zf.writestr("results.csv", results_csv(rows))
        board = leaderboard(top)
        if board["rows"]:
            zf.writestr("leaderboard.csv", leaderboard_csv(board))
    return {"path": str(out), "bytes": out.stat().st_size, "runs": len(rows), "reports": written, "failed": failed}

