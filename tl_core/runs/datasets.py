"""A workspace's uploaded datasets as the runs and tasks see them: which runs and tasks read one, and renaming or
deleting one while the runs that trained on it follow (a ``NAME@VERSION`` reference takes the new name, saved
predictions point at the pictures' new paths). The dataset catalogue itself is :mod:`tl_core.data.library`;
this is the cross-run part, so it lives in the jobs layer, above the run store and the task kinds.

It also receives uploads for the app's server: :func:`receive_zip` and :func:`receive_folder` only write the
bytes into the workspace's ``uploads/incoming/`` folder and queue an ``intake`` task; a worker unpacks, hashes and
checks them, registers the dataset with its first version and writes its first report
(:func:`tl_core.data.library.save_uploaded_zip`). The command line calls that engine function directly."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from ..access import Actor, require
from ..data.intake import pack_uploaded_folder
from ..data.library import safe_name, uploaded_dataset_dir
from ..errors import DatasetError
from ..fileio import write_atomic, writing_atomic
from ..storage.files import RunFiles
from ..storage.store import ACTIVE_STATUSES
from ..storage.workspace import Workspace
from . import tasks
from .kinds import KINDS

__all__ = ["dataset_runs", "dataset_users", "rename_dataset", "delete_dataset", "receive_zip", "receive_folder",
           "INCOMING_GRACE_S"]

log = logging.getLogger(__name__)


def _reads(data: str, folder: Path, ws: Workspace) -> bool:
    """Whether a run or task given ``data`` reads the files of ``folder``: the folder itself, a file or folder
    inside it, or a zip that :func:`open_data` unpacks into it (``datasets/<zip stem>``)."""
    if not isinstance(data, str) or not data:
        return False
    name, at, _ = data.partition("@")
    if at and "/" not in data:  # NAME@VERSION of a managed dataset
        return ws.datasets_dir.resolve() / name == folder
    p = Path(data).expanduser()
    try:
        p = p.resolve()
    except OSError:
        return False
    return p == folder or folder in p.parents or (
        p.suffix.lower() == ".zip" and ws.datasets_dir.resolve() / p.stem == folder)


def _param_paths(params: dict) -> Iterable[str]:
    for v in (params or {}).values():
        if isinstance(v, str):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (x for x in v if isinstance(x, str))


def dataset_runs(ws: Workspace, name: str) -> list[dict]:
    """Every run of the workspace (any status) that trained or trains on the uploaded dataset ``name``."""
    folder = uploaded_dataset_dir(ws, name).resolve()
    return [r for r in ws.store().list() if _reads(str(r.get("data") or ""), folder, ws)]


def dataset_users(ws: Workspace, name: str) -> list[str]:
    """What is reading the uploaded dataset ``name`` now: queued or running runs and tasks, one phrase each
    (``"run 20250101-… (running)"``, ``"a task checking the data (queued)"``); empty when nothing is."""
    folder = uploaded_dataset_dir(ws, name).resolve()
    store = ws.store()
    users = [f"run {r['id']} ({r['status']})" for r in store.list()
             if r["status"] in ACTIVE_STATUSES and _reads(str(r.get("data") or ""), folder, ws)]
    for t in store.tasks():
        if t["status"] in ACTIVE_STATUSES and t["kind"] != "train" and any(
                _reads(v, folder, ws) for v in _param_paths(t.get("params") or {})):
            users.append(f"a task {_task_label(t['kind'])} ({t['status']})")
    return users


def _task_label(kind: str) -> str:
    label = KINDS[kind].label if kind in KINDS else kind.replace("_", " ")
    return label[:1].lower() + label[1:]


def _refuse_if_used(ws: Workspace, name: str, doing: str) -> None:
    users = dataset_users(ws, name)
    if users:
        raise DatasetError(f"Dataset {name!r} cannot be {doing} while it is in use by {', '.join(users[:3])}"
                           f"{' …' if len(users) > 3 else ''}; wait until it has finished or cancel it (runs on the "
                           "Train page), then try again.")


def rename_dataset(ws: Workspace, name: str, new_name: str, actor: Actor | None = None) -> Path:
    """Rename the uploaded dataset ``name`` to ``new_name`` (sanitised like every upload name).

    Runs that trained on it follow it: a ``NAME@VERSION`` reference takes the new name, and a finished run's saved
    predictions point at the pictures' new paths (its image views find them).

    Returns:
        The dataset's new folder.
    Raises:
        DatasetError: no such uploaded dataset, an empty new name, a dataset of that name exists already, or
            a queued or running run or task reads it.
        AccessError: ``actor`` is a student outside their own project (:mod:`tl_core.access`).
    """
    folder = uploaded_dataset_dir(ws, name)
    require(actor, ws, f"rename the dataset {name!r}")
    if not str(new_name).strip():
        raise DatasetError("Give the dataset a new name (letters, digits, '-', '_' or '.').")
    target_name = safe_name(new_name, fallback="")
    if not target_name:
        raise DatasetError(f"{new_name!r} has no letter or digit; give the dataset a name such as 'my_photos'.")
    if target_name == name:
        return folder
    target = ws.datasets_dir / target_name
    if target.exists():
        raise DatasetError(f"A dataset called {target_name!r} exists already; choose another name.")
    _refuse_if_used(ws, name, "renamed")
    trained = [r for r in dataset_runs(ws, name) if r["status"] == "done"]
    try:
        os.rename(folder, target)  # atomic on one file system: the dataset is under one name or the other
    except OSError as e:
        raise DatasetError(f"Could not rename {name!r} to {target_name!r} ({e.strerror or e}).") from None
    for r in trained:  # their image views (mistakes, Grad-CAM, maps) find the pictures under the new name
        try:
            RunFiles(ws.run_dir(r["id"])).move_images(folder.resolve(), target.resolve())
        except Exception as e:  # a run whose files are damaged keeps its old paths; the rename stands
            log.warning("run %s: image paths not updated after the rename (%s)", r["id"], e)
    # runs refer to a version by name (NAME@VERSION): they follow the dataset to its new name
    store = ws.store()
    for r in store.list():
        data = str(r.get("data") or "")
        if data.startswith(f"{name}@") and "/" not in data:
            summary = r.get("summary") or {}
            if summary.get("dataset_version") == data:
                summary = {**summary, "dataset_version": f"{target_name}@{data.split('@', 1)[1]}"}
            store.update(r["id"], data=f"{target_name}@{data.split('@', 1)[1]}", summary=summary or None)
    log.info("dataset %s renamed to %s", name, target_name)
    return target


def delete_dataset(ws: Workspace, name: str, actor: Actor | None = None) -> int:
    """Delete the uploaded dataset ``name`` and its images from the workspace.

    The folder is first moved out of the dataset list in one step (a hidden name), then removed, so the list
    never shows a half-deleted dataset. Runs that trained on it are kept (with their results); the caches keep
    nothing that names it.

    Returns:
        How many runs (finished, failed or cancelled) trained on it and are kept.
    Raises:
        DatasetError: no such uploaded dataset, or a queued or running run or task reads it.
        AccessError: ``actor`` is a student outside their own project (:mod:`tl_core.access`).
    """
    folder = uploaded_dataset_dir(ws, name)
    require(actor, ws, f"delete the dataset {name!r}")
    _refuse_if_used(ws, name, "deleted")
    kept = len(dataset_runs(ws, name))
    trash = ws.datasets_dir / f".deleting-{name}-{os.getpid()}-{time.time_ns()}"
    try:
        os.rename(folder, trash)
    except OSError as e:
        raise DatasetError(f"Could not delete {name!r} ({e.strerror or e}).") from None
    shutil.rmtree(trash, ignore_errors=True)
    log.info("dataset %s deleted (%d run(s) trained on it are kept)", name, kept)
    return kept


# --------------------------------------------------------------------------------------------------
# uploads: the server receives the bytes, a worker does the rest
# --------------------------------------------------------------------------------------------------
#: An incoming upload that no queued or running intake task reads is removed when the next upload arrives, once
#: it is this old (the grace covers another session's upload written but not yet queued); what a cancelled task
#: or one whose worker died left there.
INCOMING_GRACE_S = 300.0


def _incoming_file(ws: Workspace, suffix: str) -> Path:
    """A new file name in the workspace's incoming folder, after removing the uploads no task will read."""
    d = ws.incoming_dir
    d.mkdir(parents=True, exist_ok=True)
    waiting = {str(v) for t in ws.store().tasks(kind="intake") if t["status"] in ACTIVE_STATUSES
               for k, v in (t.get("params") or {}).items() if k in ("upload", "labels") and v}
    cutoff = time.time() - INCOMING_GRACE_S
    for old in d.iterdir():
        try:
            if str(old) not in waiting and old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:  # another server removed it first
            pass
    return d / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(6)}{suffix}"


def _submit_intake(ws: Workspace, upload: Path, labels: Path | None, filename: str, val_split: float, seed: int,
                   owner: str | None, source: dict[str, Any] | None) -> tasks.Task:
    params: dict[str, Any] = {"upload": str(upload), "labels": str(labels) if labels else None, "name": filename,
                              "val_split": float(val_split), "seed": int(seed), "source": source or {}}
    try:
        return tasks.submit(ws, "intake", params, owner=owner)
    except BaseException:  # the queue is full (or the store failed): the upload waits for no task
        upload.unlink(missing_ok=True)
        if labels is not None:
            labels.unlink(missing_ok=True)
        raise


def receive_zip(ws: Workspace, filename: str, data: bytes, labels_csv: bytes | None = None, *,
                val_split: float = 0.2, seed: int = 0, owner: str | None = None,
                source: dict[str, Any] | None = None) -> tasks.Task:
    """Receive an uploaded dataset zip (and the labels CSV uploaded beside it): write the bytes into the
    workspace's incoming folder (atomically) and queue the ``intake`` task that unpacks, checks and registers it.
    Nothing is unpacked, hashed or decoded here: this is what the app's server calls.

    Args:
        ws: the workspace (project) the dataset goes into.
        filename: the uploaded file's name (it names the dataset).
        data: the zip's bytes.
        labels_csv: the bytes of a ``path,label`` CSV uploaded next to the zip.
        val_split: the validation share of the first report the task writes (the page's setting).
        seed: its split seed.
        owner: who asked (a session id), for display.
        source: what the caller wants to know again when the task ends (kept in its parameters; the Data page
            keeps which uploader it came from).
    Returns:
        The queued task; its result names the new dataset, its error says why an upload was refused.
    Raises:
        DatasetError: the upload is empty. QueueFullError: too many tasks wait (nothing is kept).
    """
    if not data:
        raise DatasetError(f"{filename} is empty; upload a .zip with one folder per class.")
    upload = _incoming_file(ws, ".zip")
    write_atomic(upload, data)
    labels = None
    if labels_csv is not None:
        labels = upload.with_suffix(".labels.csv")
        write_atomic(labels, labels_csv)
    return _submit_intake(ws, upload, labels, filename, val_split, seed, owner, source)


def receive_folder(ws: Workspace, files: Iterable[tuple[str, bytes]], *, val_split: float = 0.2, seed: int = 0,
                   owner: str | None = None, source: dict[str, Any] | None = None) -> tasks.Task:
    """Receive a folder uploaded from the browser (``[(path inside the folder, bytes)]``): pack it into a stored zip
    in the incoming folder (bytes copied, nothing decoded) and queue the ``intake`` task, so that it goes through
    the same checks as a zip (:func:`tl_core.data.intake.pack_uploaded_folder`). The other arguments are
    :func:`receive_zip`'s.

    Returns:
        The queued task.
    Raises:
        DatasetError: no files, or a path that leaves the folder. QueueFullError: too many tasks wait.
    """
    upload = _incoming_file(ws, ".zip")
    with writing_atomic(upload) as tmp:
        name = pack_uploaded_folder(files, tmp)
    return _submit_intake(ws, upload, None, name, val_split, seed, owner, source)
