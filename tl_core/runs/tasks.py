"""Tasks: every long computation the app asks for runs in a bounded pool of worker processes, never in the
server.

A page calls :func:`submit` with a task kind (``tl_core.runs.kinds``) and JSON parameters. The task is
stored in the workspace's run store with a *key* (its kind and parameters, which name everything the result
depends on: a dataset's file signature, a run's file stamps), so that:

- the same request made twice (two tabs, thirty students) is one task, and a finished one is a stored
  result that later requests read at once;
- a page finds its task again from its own inputs after a refresh or a restart of the server
  (:func:`find`); the task itself never lived in the server, so it finished or kept running meanwhile.

Three lanes of workers (``tl_core.runs.workers``): ``compute`` (training, the audit, the advisor, the
embedding map, the domain gap, Grad-CAM, calibration, the lab, exports, the report, speed timing) runs at
most ``TL_MAX_WORKERS`` tasks at once, machine-wide; ``interactive`` (Try it's predictions and heat-maps,
augmentation previews, checking uploaded weights) has its own small pool that keeps a few models warm, so
that a prediction does not wait behind a training; ``intake`` (unpacking and checking an upload) has one
worker of its own, so that an upload waits neither behind a training nor in front of a prediction.
Projects take turns (round robin,
:func:`tl_core.runs.workers.queue_order`). At most :data:`MAX_QUEUED` tasks wait per lane, and at most
``TL_QUEUE_PER_PROJECT`` (10) compute tasks of one project, and as many uploads; one more is refused with
:class:`QueueFullError`. Cancel is real: a flag the task checks, and a worker that ignores it
is killed.

Why not a task-queue library: Celery, RQ and Dramatiq need a broker (Redis, RabbitMQ) that a laptop or a
classroom machine does not run; Huey's SQLite backend keeps its own task table beside the run store (two
sources of truth), has no progress, cannot stop a running task, and shares no key between identical
requests. The run store already gives all of that in a few hundred lines, with the same SQLite file the
pages read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..access import Actor, require
from ..classroom.challenge import check_submission_cap, submission_params
from ..config import TrainConfig
from ..data.versions import pin
from ..errors import RunError, TLError
from ..settings import setting
from ..storage.store import ACTIVE_STATUSES, task_ran_s, task_waited_s
from ..storage.workspace import TASK_RESULT, Workspace
from . import workers  # called through the module: tests and callers replace its functions
from .kinds import kind_spec
from .workers import prune

__all__ = ["QueueFullError", "Task", "MAX_QUEUED", "CAPPED_LANES", "task_key", "submit", "find", "get", "result",
           "cancel", "queue_position", "describe_wait", "submit_training", "cancel_run", "cancel_all",
           "submit_challenge_run", "delete_run", "prune"]

log = logging.getLogger(__name__)

#: Tasks allowed to wait in one lane (all projects together); one more is refused.
MAX_QUEUED = 50

#: The lanes where one project may have at most ``TL_QUEUE_PER_PROJECT`` tasks waiting (counted per lane: queued
#: uploads do not hold back a training, nor trainings an upload); interactive tasks take a second and need no cap.
CAPPED_LANES = ("compute", "intake")
#: A finished task's result file (JSON), under ``<workspace>/tasks/<id>/``, with any images it refers to.
RESULT_FILE = TASK_RESULT  # the name other modules knew it by


class QueueFullError(TLError):
    """Too many tasks are waiting."""


@dataclass(frozen=True)
class Task:
    """A task as the store records it (see the ``tasks`` table), with derived timings."""

    id: str
    kind: str
    key: str
    lane: str
    params: dict[str, Any]
    status: str
    created: float
    started: float | None
    finished: float | None
    progress: dict[str, Any]
    error: str | None
    run_id: str | None
    shared: bool = False  # submit() found an identical request's task instead of making one

    @classmethod
    def from_row(cls, row: dict[str, Any], shared: bool = False) -> "Task":
        return cls(id=row["id"], kind=row["kind"], key=row["key"], lane=row["lane"], params=row.get("params") or {},
                   status=row["status"], created=row["created"], started=row.get("started"),
                   finished=row.get("finished"), progress=row.get("progress") or {}, error=row.get("error"),
                   run_id=row.get("run_id"), shared=shared)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def waited_s(self) -> float:
        """Seconds from the click to a worker starting it (so far, when still queued)."""
        return task_waited_s(vars(self))

    @property
    def ran_s(self) -> float:
        """Seconds the worker spent on it (so far, when still running)."""
        return task_ran_s(vars(self))

    @property
    def total_s(self) -> float:
        """Seconds from the click to the result: what a user waited."""
        return (self.finished or time.time()) - self.created


def task_key(kind: str, params: dict[str, Any]) -> str:
    """The key of a request: its kind and canonical parameters (everything its result depends on)."""
    raw = kind + "|" + json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return kind + ":" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def submit(ws: Workspace, kind: str, params: dict[str, Any], owner: str | None = None, share: bool = True,
           run_id: str | None = None, start_worker: bool = True) -> Task:
    """Queue a task of ``kind`` (or join the identical one already queued, running or done).

    Args:
        ws: the workspace (project) the task belongs to.
        kind: a name in :data:`tl_core.runs.kinds.KINDS`.
        params: JSON-able parameters; with the kind they form the key.
        owner: who asked (a session id), for display.
        share: False makes a new task even when an identical one exists (a run, a "compute again").
        run_id: the run a training task executes.
        start_worker: start a worker for it (tests pass False to look at the queue).
    Returns:
        The task (``shared`` tells whether it was already there).
    Raises:
        ConfigError: unknown kind. QueueFullError: :data:`MAX_QUEUED` tasks of its lane are waiting, or
            ``TL_QUEUE_PER_PROJECT`` tasks of this workspace's in its lane (compute or intake).
    """
    spec = kind_spec(kind)
    key = task_key(kind, params) if share else f"{kind}:{run_id or ''}:{time.time_ns()}"
    store = ws.store()
    if share:
        existing = store.find_task(key)
        if existing is not None and existing["status"] in ("queued", "running", "done"):
            return Task.from_row(existing, shared=True)
    waiting = sum(len(w.store().tasks(status="queued", lane=spec.lane)) for w in ws.all_workspaces())
    if waiting >= MAX_QUEUED:
        raise QueueFullError(f"The queue is full ({waiting} tasks waiting); try again when some have finished.")
    mine, cap = len(store.tasks(status="queued", lane=spec.lane)), setting("TL_QUEUE_PER_PROJECT")
    if spec.lane in CAPPED_LANES and mine >= cap:
        where = "this project" if ws.is_project else "the shared workspace"
        raise QueueFullError(f"{where[0].upper()}{where[1:]} has {mine} tasks waiting already, the most one project "
                             "may queue; try again when one has started.")
    task_id, shared = store.create_task(kind, key, spec.lane, params, owner=owner, run_id=run_id, share=share)
    if start_worker and not shared:
        workers.ensure_workers(ws, spec.lane)
    return Task.from_row(store.task(task_id), shared=shared)


def find(ws: Workspace, kind: str, params: dict[str, Any]) -> Task | None:
    """The newest task made for this exact request (any status), or None: how a page finds its task again."""
    row = ws.store().find_task(task_key(kind, params))
    return None if row is None else Task.from_row(row)


def get(ws: Workspace, task_id: str) -> Task:
    """The task ``task_id``. Raises RunError when there is none."""
    return Task.from_row(ws.store().task(task_id))


def task_dir(ws: Workspace, task_id: str) -> Path:
    """The folder of a task's files (:meth:`Workspace.task_dir`)."""
    return ws.task_dir(task_id)


def result(ws: Workspace, task: Task | str) -> Any:
    """A done task's result (JSON data; files it names are in :func:`task_dir`).

    Raises:
        RunError: the task is not done, or its result was removed.
    """
    t = get(ws, task) if isinstance(task, str) else task
    if t.status != "done":
        raise RunError(f"Task {t.id} is {t.status}; it has no result" + (f" ({t.error})" if t.error else "") + ".")
    f = task_dir(ws, t.id) / RESULT_FILE
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RunError(f"The result of task {t.id} is gone (cleaned up or damaged); ask for it again.") from None


def cancel(ws: Workspace, task_id: str, wait: bool = False, actor: Actor | None = None) -> None:
    """Stop a task: a queued one at once; a running one at its next check point, or its worker is killed.


    Args:
        actor: who asks (:mod:`tl_core.access`); None checks nothing.
    Raises:
        AccessError: a student cancels a task of another project or of the shared workspace not queued by them.
    """
    require(actor, ws, "cancel this task", ws.store().task(task_id).get("owner"))
    workers.stop_task(ws, task_id, wait=wait)


def queue_position(ws: Workspace, task: Task) -> dict[str, int]:
    """Where a queued task stands in its lane, machine-wide, in the order the workers will take them (projects
    take turns: :func:`tl_core.runs.workers.queue_order`).


    Returns:
        {"ahead": tasks that will start before it, "groups": other projects (or the shared workspace) among
        them, "running": tasks of its lane running now, "slots": how many run at once}.
    """
    running = sum(len(w.store().tasks(status="running", lane=task.lane)) for w in ws.all_workspaces())
    order = workers.queue_order(ws, task.lane)
    ids = [row["id"] for _, row in order]
    ahead = ids.index(task.id) if task.id in ids else len(ids)
    mine = next((w.home for w, row in order if row["id"] == task.id), ws.home)
    groups = len({w.home for w, _ in order[:ahead]} - {mine})
    return {"ahead": ahead, "groups": groups, "running": running, "slots": workers.lane_slots(task.lane)}


def describe_wait(ws: Workspace, task: Task) -> str:
    """One line for a user whose task waits: where it stands, why (the groups taking turns before it) and for how
    long it has waited."""
    pos = queue_position(ws, task)
    place = "next" if pos["ahead"] == 0 else f"number {pos['ahead'] + 1}"
    turns = ""
    if pos["groups"]:
        turns = (f" · {pos['groups']} other group{'s' if pos['groups'] > 1 else ''} ahead of you "
                 f"{'take' if pos['groups'] > 1 else 'takes'} turns with yours")
    return (f"Waiting in the queue: {place} in line, {pos['running']} task(s) running "
            f"(this server runs {pos['slots']} at a time){turns} · waited {task.waited_s:.0f} s")


def submit_training(ws: Workspace, data: str | os.PathLike, cfg: TrainConfig, owner: str | None = None,
                    name: str | None = None, start_worker: bool = True) -> str:
    """Queue a training run for a worker and return its run id.

    Raises:
        ConfigError: the configuration is invalid (checked before anything is queued).
        DatasetError: the data path does not exist.
        QueueFullError: too many tasks are waiting.
    """
    cfg = cfg.resolved()
    data = pin(ws, data)  # an absolute path, or NAME@VERSION of a managed dataset (the version trained on)
    store = ws.store()
    run_id = store.create_run(str(data), cfg.to_dict(), status="queued", name=name, owner=owner)
    store.update(run_id, progress={"stage": "queued", "time": time.time()})
    try:
        submit(ws, "train", {"run_id": run_id}, owner=owner, share=False, run_id=run_id,
               start_worker=start_worker)
    except TLError:
        store.delete(run_id)
        raise
    return run_id


def cancel_run(ws: Workspace, run_id: str, wait: bool = False, actor: Actor | None = None) -> None:
    """Stop a run: queued at once; running at its next check point, or its worker is killed.

    Raises:
        AccessError: ``actor`` is a student and the run is another project's (or the shared workspace's and
            not queued by them).
    """
    store = ws.store()
    require(actor, ws, f"cancel run {run_id}", store.get(run_id).get("owner"))
    store.request_cancel(run_id)
    for t in store.tasks(kind="train"):
        if t.get("run_id") == run_id and t["status"] in ("queued", "running"):
            cancel(ws, t["id"], wait=wait)


def cancel_all(ws: Workspace) -> int:
    """Cancel every queued and running task of one workspace (a project, or the shared workspace), its trainings
    included: what the teacher does before resetting or deleting a project. Returns how many.

    A queued task stops at once; a running one at its next check point, or its worker is killed. A run whose task
    is gone but whose row still says queued is marked cancelled.
    """
    store = ws.store()
    n = 0
    for t in store.tasks():
        if t["status"] in ACTIVE_STATUSES:
            if t.get("run_id"):
                cancel_run(ws, t["run_id"])
            else:
                cancel(ws, t["id"])
            n += 1
    trained = {t.get("run_id") for t in store.tasks(kind="train")}
    for r in store.list():
        if r["status"] == "queued" and r["id"] not in trained:
            store.set_status(r["id"], "cancelled", "Cancelled by the teacher.")
    return n


def submit_challenge_run(ws: Workspace, run_id: str, owner: str | None = None, start_worker: bool = True) -> Task:
    """Submit a finished run of this project to the class challenge: a ``challenge_score`` task scores it in a
    worker (the same run submitted twice is one task).

    The project's submissions are capped (:data:`tl_core.classroom.challenge.MAX_SUBMISSIONS`); the worker
    refuses a run that learned from locked images.

    Raises:
        RunError: no challenge is set up, the run is not finished, or the project has made its submissions.
        QueueFullError: too many tasks are waiting.
    """
    params = submission_params(ws, run_id)
    existing = find(ws, "challenge_score", params)
    if existing is None or existing.status not in ("queued", "running", "done"):
        check_submission_cap(ws)  # the same run again is the task already made: it costs no submission
    return submit(ws, "challenge_score", params, owner=owner, start_worker=start_worker)


def delete_run(ws: Workspace, run_id: str, actor: Actor | None = None) -> None:
    """Delete a finished run: its row, its files, and the tasks made from it (their results name its files).

    Raises:
        RunError: the run is queued or running (cancel it first).
        AccessError: ``actor`` is a student and the run is another project's (or the shared workspace's and
            not queued by them).
    """
    store = ws.store()
    run = store.get(run_id)
    require(actor, ws, f"delete run {run_id}", run.get("owner"))
    if run["status"] in ACTIVE_STATUSES:
        raise RunError(f"Run {run_id} is {run['status']}; cancel it before deleting it.")
    run_dir = str(ws.run_dir(run_id))
    for t in store.tasks():
        if t.get("run_id") == run_id or (t.get("params") or {}).get("run") == run_dir:
            if t["status"] not in ACTIVE_STATUSES:
                store.delete_task(t["id"])
                shutil.rmtree(task_dir(ws, t["id"]), ignore_errors=True)
    store.delete(run_id, ws.runs_dir)
