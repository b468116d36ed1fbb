"""Worker processes: they claim queued tasks from the run store (every project's) and run them.

Each worker holds a slot lock (``<TL_HOME>/workers/<lane>-<slot>.lock``), so at most ``lane_slots(lane)``
workers of a lane run on the machine, whichever server or command started them. Workers are started as
daemons (:func:`tl_core.storage.processes.spawn_detached`): re-parented to init, they leave no defunct process
under the server and outlive its restart. An ``intake`` worker exits when its queue is empty, a ``compute`` worker
after ``TL_COMPUTE_IDLE_S`` (default 20) idle seconds; an ``interactive`` worker stays up for a while
(``TL_INTERACTIVE_IDLE_S``, default 600) with its models warm.

A worker records its pid and start time with the task it runs; :func:`recover` (the server at start and
every few seconds while a page polls) marks a task whose process is gone ``interrupted`` and starts workers
for what is still queued. Cancel sets a flag the task checks between steps; a worker that has not stopped
after a grace period is killed (after checking it is still the same process).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from ..errors import CancelledError, TLError
from ..fileio import write_json_atomic
from ..settings import setting
from ..storage.processes import alive, identity, record_slot, spawn_detached
from ..storage.zygote import spawn_forked, warm_up
from ..storage.store import ACTIVE_STATUSES, RunStore
from ..storage.workspace import TASK_RESULT, Workspace
from .kinds import jsonable, kind_spec

__all__ = ["LANES", "lane_slots", "queue_order", "default_max_workers", "ensure_workers", "warm_zygote", "stop_task",
           "recover", "TaskContext", "run_task", "worker_main", "lower_priority", "prune", "CANCEL_GRACE_S",
           "WORKER_NICE", "INTAKE_WORKERS"]

log = logging.getLogger(__name__)

#: The lanes of workers and what runs in each.
LANES = {
    "compute": "training and every long computation (audit, advisor, maps, Grad-CAM grids, calibration, lab, "
               "exports, reports, timing); at most TL_MAX_WORKERS at once",
    "interactive": "Try it's predictions and heat-maps and other quick requests, served by workers that keep "
                   "models warm; at most TL_INTERACTIVE_WORKERS at once",
    "intake": "uploads: unpacking and checking a dataset zip or folder (seconds; a 50 MB zip of 28 phone photos "
              "took 4.4 s), so that an upload waits neither behind trainings (minutes) nor holds up predictions; "
              "one at a time",
}
#: Intake workers that run at once (an intake is short and reads the disk: one keeps up with a class).
INTAKE_WORKERS = 1
#: Seconds a worker gets to honour a cancel before it is killed.
CANCEL_GRACE_S = 5.0
#: How often a task's progress is written to the store at most (per second).
_PROGRESS_EVERY_S = 0.5
#: How often a running task looks at its cancel flag at most.
_CANCEL_CHECK_EVERY_S = 0.5
#: How much lower a worker's CPU priority is than the server's (``os.nice``), per lane: on a machine whose cores
#: the workers fill, the Streamlit server (at 0) still answers at once (its health check, every page's poll), and
#: a prediction (interactive) goes before a training (compute). Alone on the machine a worker runs as fast.
WORKER_NICE = {"interactive": 5, "intake": 5, "compute": 10}


def default_max_workers() -> int:
    """Concurrent compute tasks: one per 4 cores (torch already uses every core for one), at least 1.
    ``TL_MAX_WORKERS`` overrides it."""
    return setting("TL_MAX_WORKERS")


def lane_slots(lane: str) -> int:
    """How many workers of ``lane`` may run at once on this machine."""
    if lane == "interactive":
        return setting("TL_INTERACTIVE_WORKERS")
    if lane == "intake":
        return INTAKE_WORKERS
    return default_max_workers()


def _lock_path(ws: Workspace, lane: str, slot: int) -> Path:
    d = ws.workers_dir
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{lane}-{slot}.lock"


def _slot_busy(path: Path) -> bool:
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _queued(ws: Workspace, lane: str) -> int:
    return sum(len(w.store().tasks(status="queued", lane=lane)) for w in ws.all_workspaces())


def _use_zygote(lane: str) -> bool:
    """Whether a new worker of ``lane`` is forked from a zygote (``TL_ZYGOTE``; auto: on Linux, where forking a
    process that has imported torch is safe). Not an intake worker: it unpacks and checks images without torch."""
    choice = setting("TL_ZYGOTE")
    return lane != "intake" and (choice == "on" or (choice == "auto" and sys.platform.startswith("linux")))


def warm_zygote() -> bool:
    """Start the zygote that this environment's compute and interactive workers are forked from, ahead of the first
    of them (it imports torch and timm for seconds); nothing where workers are not forked (:func:`_use_zygote`).
    Whether one was asked for."""
    return _use_zygote("compute") and warm_up()


def ensure_workers(ws: Workspace, lane: str = "compute") -> int:
    """Start worker processes of ``lane`` for free slots while tasks wait; returns how many were started."""
    queued = _queued(ws, lane)
    started = 0
    for slot in range(lane_slots(lane)):
        if started >= queued:
            break
        lock = _lock_path(ws, lane, slot)
        if _slot_busy(lock):
            continue
        args = ["worker", "--home", str(ws.top), "--lane", lane, "--slot", str(slot)]
        env = {**os.environ, "TL_HOME": str(ws.top)}
        if not _use_zygote(lane) or spawn_forked("tl_core.runs.workers", args, lock.with_suffix(".log"), env) is None:
            spawn_detached([sys.executable, "-m", "tl_core.runs.workers", *args], lock.with_suffix(".log"), env=env)
        started += 1
    return started


# --------------------------------------------------------------------------------------------------
# cancel and recovery
# --------------------------------------------------------------------------------------------------
def _kill_if_same(pid: int | None, started: int | None) -> bool:
    if pid and alive(pid, started):
        try:
            os.kill(int(pid), signal.SIGKILL)
            return True
        except ProcessLookupError:
            pass
    return False


def _watch(ws: Workspace, task_id: str, grace_s: float) -> None:
    """Wait for a cancelled task to stop; kill its worker when it has not within ``grace_s``."""
    store = ws.store()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if store.task(task_id)["status"] != "running":
            return
        time.sleep(0.1)
    t = store.task(task_id)
    if t["status"] == "running":
        if _kill_if_same(t.get("pid"), t.get("pid_start")):
            log.warning("worker %s ignored the cancel of task %s; killed it", t.get("pid"), task_id)
        store.finish_task(task_id, "cancelled", "Cancelled (the worker was stopped).")
        if t.get("run_id"):
            store.update(t["run_id"], status="cancelled", error="Cancelled (the worker was stopped).", pid=None)
    ensure_workers(ws, t["lane"])  # other queued tasks still need a worker


def stop_task(ws: Workspace, task_id: str, wait: bool = False, grace_s: float = CANCEL_GRACE_S) -> None:
    """Cancel a task: queued ones at once; a running one at its next check point, or its worker is killed.

    Args:
        wait: block until it has stopped (tests, the command line); the app passes False and polls.
    """
    store = ws.store()
    status = store.request_task_cancel(task_id)
    t = store.task(task_id)
    if t.get("run_id"):
        store.request_cancel(t["run_id"])  # the training loop reads the run's flag
    if status != "running":
        return
    if wait:
        _watch(ws, task_id, grace_s)
        return
    # a short-lived watchdog kills the worker if it ignores the flag (a forward pass never takes that long,
    # so this only fires for a stuck process)
    spawn_detached([sys.executable, "-m", "tl_core.runs.workers", "watchdog", "--home", str(ws.home),
                    "--task", task_id, "--grace", str(grace_s)], os.devnull,
                   env={**os.environ, "TL_HOME": str(ws.top)})


def recover(ws: Workspace) -> list[str]:
    """Mark tasks and runs whose worker is gone as interrupted (in every project) and start workers for
    queued tasks. Returns the ids of the runs and tasks found dead."""
    dead: list[str] = []
    for w in ws.all_workspaces():
        store = w.store()
        for t in store.mark_dead_tasks():
            dead.append(t["id"])
            if t.get("run_id"):
                store.update(t["run_id"], status="interrupted", pid=None,
                             error="The training process stopped unexpectedly (killed, out of memory, or the "
                                   "server restarted); start the run again.")
        dead += store.mark_dead_workers("interrupted")
    for lane in LANES:
        started = ensure_workers(ws, lane)
        deadline = time.monotonic() + 3.0
        while dead and not started and _queued(ws, lane) and time.monotonic() < deadline:
            # the kernel releases a killed worker's slot lock a moment after the process is gone: until then
            # its slot looks busy, and the tasks queued behind it would wait for a worker that never comes
            time.sleep(0.1)
            started = ensure_workers(ws, lane)
    return dead


# --------------------------------------------------------------------------------------------------
# running a task
# --------------------------------------------------------------------------------------------------
class WarmModels:
    """Loaded models kept by an interactive worker: at most ``TL_WARM_MODELS`` (default 2), least recently
    used dropped first. Keyed by what was loaded and the files' stamp, so a changed run is loaded again."""

    def __init__(self, limit: int | None = None):
        self.limit = limit or setting("TL_WARM_MODELS")
        self._models: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        model = load()
        self._models[key] = model
        while len(self._models) > self.limit:
            self._models.popitem(last=False)
        return model


class TaskContext:
    """What a task function gets besides its parameters: progress, cancel, a folder for its result's files,
    and (in an interactive worker) the warm models."""

    def __init__(self, ws: Workspace, task_id: str, store: RunStore, out_dir: Path, models: WarmModels | None = None):
        self.ws, self.task_id, self.store, self.out_dir = ws, task_id, store, out_dir
        self.models = models or WarmModels(1)
        self._last_write = 0.0
        self._last_check = 0.0
        self._cancelled = False

    def progress(self, event: dict[str, Any]) -> None:
        """Record progress ({"stage", "message", "done", "total", "eta_s", ...}); written at most twice a second
        (and always when the stage changes or the work completes)."""
        now = time.monotonic()
        done = event.get("total") is not None and event.get("done") == event.get("total")
        if now - self._last_write >= _PROGRESS_EVERY_S or done or event.get("force"):
            self._last_write = now
            self.store.update_task(self.task_id, progress={k: v for k, v in event.items() if k != "force"})

    def should_cancel(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_check >= _CANCEL_CHECK_EVERY_S:
            self._last_check = now
            self._cancelled = self.store.task_cancel_requested(self.task_id)
        return self._cancelled


def _error_text(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, MemoryError) or ("out of memory" in text or "can't allocate memory" in text):
        return "Ran out of memory; use fewer or smaller images, a smaller backbone, or a lower batch size."
    if isinstance(e, OSError) and getattr(e, "strerror", None):
        return f"Could not read or write a file ({e.strerror}); free disk space or check the files, and try again."
    return f"Internal error: {type(e).__name__}: {text[:300]}"


def run_task(ws: Workspace, task_id: str, models: WarmModels | None = None) -> str:
    """Run a claimed task in this process and record its outcome; returns the final status."""
    store = ws.store()
    t = store.task(task_id)
    out_dir = ws.task_dir(task_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = TaskContext(ws, task_id, store, out_dir, models)
    try:
        spec = kind_spec(t["kind"])
        res = spec.run(ws, t.get("params") or {}, ctx)
        status = "done"
        if isinstance(res, dict) and res.get("status") in ("failed", "cancelled"):  # a training records its own
            status = res["status"]
        write_json_atomic(out_dir / TASK_RESULT, jsonable(res), indent=None)
        store.finish_task(task_id, status, res.get("error") if isinstance(res, dict) and status != "done" else None)
    except CancelledError as e:
        store.finish_task(task_id, "cancelled", str(e))
    except TLError as e:
        store.finish_task(task_id, "failed", str(e))
    except Exception as e:  # a bug or the machine's limits: record it, keep the worker alive
        if not isinstance(e, (MemoryError, OSError)):
            log.exception("task %s (%s) failed", task_id, t["kind"])
        store.finish_task(task_id, "failed", _error_text(e))
    return store.task(task_id)["status"]


def queue_order(ws: Workspace, lane: str) -> list[tuple[Workspace, dict[str, Any]]]:
    """Every queued task of ``lane`` (all projects) in the order workers will start them: projects take turns.

    Each project (and the shared workspace) is one queue, first come first served inside it. The next task
    comes from the project whose last start is the oldest (never: first of all; a tie goes to the older
    request), so a project that queued ten trainings gets one of every turn, not the next ten: round robin.
    The order depends only on the store (what is queued, when each project last started something), so a
    user's place in line (:func:`tl_core.runs.tasks.queue_position`) is the place the workers give them.

    Returns:
        (workspace, task row) pairs, next first.
    """
    heads: list[list[Any]] = []  # [turn key, workspace, its queued tasks]
    for w in ws.all_workspaces():
        store = w.store()
        queued = store.tasks(status="queued", lane=lane)
        if queued:
            heads.append([(0, store.last_started(lane), queued[0]["created"], queued[0]["id"]), w, queued])
    order: list[tuple[Workspace, dict[str, Any]]] = []
    turn = 0
    while heads:
        head = min(heads, key=lambda h: h[0])
        order.append((head[1], head[2].pop(0)))
        turn += 1
        head[0] = (1, turn)  # served now: after everyone who has waited longer
        if not head[2]:
            heads.remove(head)
    return order


def _claim_row(ws: Workspace, lane: str) -> tuple[Workspace, dict[str, Any]] | None:
    """Claim the next queued task of ``lane`` over the top workspace and every project (:func:`queue_order`): its
    workspace and its row as it was queued (kind, parameters)."""
    pid, started = identity()
    while True:
        order = queue_order(ws, lane)
        if not order:
            return None
        w, row = order[0]
        if w.store().claim_task(row["id"], pid, started):
            return w, row
        # another worker claimed it first: look again


def _claim(ws: Workspace, lane: str) -> tuple[Workspace, str] | None:
    """:func:`_claim_row`, with the task's id."""
    claimed = _claim_row(ws, lane)
    return None if claimed is None else (claimed[0], claimed[1]["id"])


#: Finished tasks older than this are forgotten (rows and result files); ``TL_TASK_KEEP_DAYS`` sets it.
KEEP_DAYS = 7.0


def prune(ws: Workspace, keep_days: float | None = None) -> int:
    """Forget finished tasks (every project's) that ended more than ``keep_days`` ago, with their files;
    a request made again computes its result again. Returns how many were removed."""
    if keep_days is None:
        keep_days = setting("TL_TASK_KEEP_DAYS", KEEP_DAYS)
    cutoff = time.time() - keep_days * 86400
    removed = 0
    for w in ws.all_workspaces():
        store = w.store()
        for t in store.tasks():
            if t["status"] not in ACTIVE_STATUSES and (t.get("finished") or t["created"]) < cutoff and t["kind"] != "train":
                store.delete_task(t["id"])
                shutil.rmtree(w.task_dir(t["id"]), ignore_errors=True)
                removed += 1
    return removed


def lower_priority(lane: str) -> None:
    """Lower this process's CPU priority by ``WORKER_NICE[lane]`` (for good: call it only in a worker process,
    never in a server or a test that runs :func:`worker_main` in-process).

    Args:
        lane: the worker's lane (trainings lowest, so that the server and interactive tasks answer first).
    """
    try:
        os.nice(WORKER_NICE[lane])
    except (OSError, AttributeError) as e:  # no nice on this platform: run at the server's priority
        log.warning("could not lower the worker's priority: %s", e)


def _heap_for(ws: Workspace, task: dict[str, Any]) -> contextlib.AbstractContextManager:
    """:func:`~tl_core.models.devices.heap_reused` for a task (its claimed row) of forward passes, else nothing."""
    try:
        forward = kind_spec(task.get("kind", "")).runs_forward_passes(ws, task.get("params") or {})
    except TLError:  # an unknown kind: run_task records the error
        forward = False
    if not forward:
        return contextlib.nullcontext()
    from ..models.devices import heap_reused

    return heap_reused()


def worker_main(home: str, lane: str = "compute", slot: int = 0, reuse_heap: bool = False) -> int:
    """Worker loop: hold the slot lock, run queued tasks of ``lane`` (every project's) until idle for
    ``TL_COMPUTE_IDLE_S`` (compute: a task right after another skips a new process's start, seconds of importing
    torch) or ``TL_INTERACTIVE_IDLE_S`` seconds (interactive), or until none is left (intake); forget old task results
    (:func:`prune`) now and then. It leaves the process's priority as it is: the worker process's entry
    (:func:`main`) lowers it first (:func:`lower_priority`), and asks for ``reuse_heap``: a task of forward passes
    (:attr:`~tl_core.runs.kinds.TaskKind.forward_passes`) then keeps its freed activations in the heap while it runs
    (:func:`~tl_core.models.devices.heap_reused`; process-wide, so not where tasks run in threads of a caller)."""

    ws = Workspace(Path(home))
    lock = open(_lock_path(ws, lane, slot), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another worker holds this slot
    record_slot(lock)
    models = WarmModels() if lane == "interactive" else None
    idle_limit = {"interactive": setting("TL_INTERACTIVE_IDLE_S"),
                  "compute": setting("TL_COMPUTE_IDLE_S")}.get(lane, 0.0)
    idle_since = time.monotonic()
    last_prune = -1e9
    while True:
        claimed = _claim_row(ws, lane)
        if claimed is not None:
            task_ws, task = claimed
            log.info("worker %d (%s): task %s", os.getpid(), lane, task["id"])
            with _heap_for(task_ws, task) if reuse_heap else contextlib.nullcontext():
                run_task(task_ws, task["id"], models)
            idle_since = time.monotonic()
            if time.monotonic() - last_prune > 3600:  # old results: at most once an hour
                last_prune = time.monotonic()
                try:
                    prune(ws)
                except Exception as e:  # maintenance never stops a worker
                    log.warning("pruning old tasks failed: %s", e)
            continue
        if time.monotonic() - idle_since < idle_limit:
            time.sleep(0.05 if time.monotonic() - idle_since < 30 else 0.25)  # answer fast while in use
            continue
        # A task queued while we held the slot saw it busy and started no worker: free the slot, then look once
        # more, so that such a task is never left waiting with no worker to run it.
        fcntl.flock(lock, fcntl.LOCK_UN)
        if not _queued(ws, lane):
            return 0
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # a worker started meanwhile holds the slot and will run it
        record_slot(lock)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tl_core.runs.workers")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--home", required=True)
    w.add_argument("--lane", choices=list(LANES), default="compute")
    w.add_argument("--slot", type=int, default=0)
    d = sub.add_parser("watchdog")
    d.add_argument("--home", required=True)
    d.add_argument("--task", required=True)
    d.add_argument("--grace", type=float, default=CANCEL_GRACE_S)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "worker":
        lower_priority(args.lane)  # a worker process only: worker_main run in-process keeps its caller's priority
        # PyTorch sizes its thread pool from OMP_NUM_THREADS where a task first imports it: TL_THREADS (forked from a
        # zygote, whose torch is loaded already, the child sets it: tl_core/storage/zygote.py). A bad value is refused
        # where the app and the commands start; here the worker keeps torch's own default.
        try:
            os.environ.setdefault("OMP_NUM_THREADS", str(setting("TL_THREADS")))
        except TLError as e:
            log.warning("%s", e)
        return worker_main(args.home, args.lane, args.slot, reuse_heap=True)
    _watch(Workspace.at(args.home), args.task, args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
