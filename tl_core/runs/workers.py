"""The background job queue used by the app: trainings run in separate worker processes.

A page calls :func:`submit`; the run is written to the store as ``queued`` and a detached worker
process (``python -m tl_core.jobs worker``) claims queued runs one at a time and runs them with
``train.run_training``. At most ``max_workers`` workers run at once (a lock file per slot), and at
most ``max_queued`` runs may wait, so a classroom cannot overload the machine. Cancel is real: a flag
in the store stops the loop at its next check point, and a worker that does not stop within the grace
period is killed. A worker that dies leaves its run marked failed/interrupted by :func:`recover`.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .config import TrainConfig
from .errors import TLError
from .runs import Workspace, _pid_alive

__all__ = ["QueueFullError", "submit", "cancel", "recover", "ensure_workers", "default_max_workers",
           "MAX_QUEUED", "worker_main"]

log = logging.getLogger(__name__)

#: Runs allowed to wait in the queue at once; one more is refused with a clear message.
MAX_QUEUED = 50
#: Seconds a worker gets to honour a cancel before it is killed.
CANCEL_GRACE_S = 5.0


class QueueFullError(TLError):
    """Too many trainings are waiting."""


def default_max_workers() -> int:
    """Concurrent trainings: one per 4 cores (torch already uses every core for one training), at least 1.

    ``TL_MAX_WORKERS`` overrides it.
    """
    env = os.environ.get("TL_MAX_WORKERS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // 4)


def _slot_dir(ws: Workspace) -> Path:
    d = ws.top / "workers"  # shared by every project: the limit is per machine
    d.mkdir(parents=True, exist_ok=True)
    return d


def _slot_busy(path: Path) -> bool:
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def ensure_workers(ws: Workspace, max_workers: int | None = None) -> int:
    """Start worker processes for free slots while runs are queued; returns how many were started."""
    max_workers = max_workers or default_max_workers()
    queued = _queued_count(ws)
    started = 0
    for slot in range(max_workers):
        if started >= queued:
            break
        lock = _slot_dir(ws) / f"slot-{slot}.lock"
        if _slot_busy(lock):
            continue
        log_path = _slot_dir(ws) / f"slot-{slot}.log"
        with open(log_path, "ab") as logf:
            subprocess.Popen(
                [sys.executable, "-m", "tl_core.jobs", "worker", "--home", str(ws.top), "--slot", str(slot)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True, close_fds=True,
                env={**os.environ, "TL_HOME": str(ws.top)},
            )
        started += 1
    return started


def submit(ws: Workspace, data: str | os.PathLike, cfg: TrainConfig, owner: str | None = None,
           name: str | None = None, start_worker: bool = True) -> str:
    """Queue a training run and make sure a worker will pick it up.

    Raises:
        ConfigError: the configuration is invalid (checked before anything is queued).
        DatasetError: the data path does not exist.
        QueueFullError: ``MAX_QUEUED`` runs are already waiting.
    """
    from .backbones import check_backbone_name

    cfg = cfg.resolved()
    check_backbone_name(cfg.backbone)
    if not Path(data).exists():
        from .errors import DatasetError

        raise DatasetError(f"{data} does not exist; choose a dataset first.")
    store = ws.store()
    waiting = len(store.list(status="queued"))
    if waiting >= MAX_QUEUED:
        raise QueueFullError(f"The training queue is full ({waiting} runs waiting); try again when some have finished.")
    run_id = store.create_run(str(data), cfg.to_dict(), status="queued", name=name, owner=owner)
    store.update(run_id, progress={"stage": "queued", "time": time.time()})
    if start_worker:
        ensure_workers(ws)
    return run_id


def cancel(ws: Workspace, run_id: str, grace_s: float = CANCEL_GRACE_S, wait: bool = False) -> None:
    """Stop a run: queued runs are cancelled at once; a running one at its next check point, or killed.

    Args:
        wait: block until the run has stopped (tests, CLI); the app passes False and polls the store.
    """
    store = ws.store()
    store.request_cancel(run_id)
    run = store.get(run_id)
    if run["status"] != "running":
        return
    pid = run.get("pid")
    deadline = time.monotonic() + grace_s
    if not wait:
        # a short-lived watchdog kills the worker if it ignores the flag (a forward pass never hangs
        # that long, so this only fires for a stuck process)
        subprocess.Popen([sys.executable, "-m", "tl_core.jobs", "watchdog", "--home", str(ws.home),
                          "--run", run_id, "--grace", str(grace_s)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
        return
    _watchdog(ws, run_id, pid, deadline)


def _watchdog(ws: Workspace, run_id: str, pid: int | None, deadline: float) -> None:
    store = ws.store()
    while time.monotonic() < deadline:
        if store.get(run_id)["status"] != "running":
            return
        time.sleep(0.1)
    run = store.get(run_id)
    if run["status"] == "running" and pid and _pid_alive(int(pid)):
        log.warning("worker %s ignored cancel of %s; killing it", pid, run_id)
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    if store.get(run_id)["status"] == "running":
        store.update(run_id, status="cancelled", error="Cancelled (the worker was stopped).", pid=None)
    ensure_workers(ws)  # other queued runs still need a worker


def recover(ws: Workspace) -> list[str]:
    """Mark runs whose worker is gone as interrupted (in every project) and restart workers for queued runs."""
    dead = [rid for w in ws.all_workspaces() for rid in w.store().mark_dead_workers("interrupted")]
    started = ensure_workers(ws)
    deadline = time.monotonic() + 3.0
    while dead and not started and _queued_count(ws) and time.monotonic() < deadline:
        # the kernel releases a killed worker's slot lock a moment after the process is gone: until then
        # its slot looks busy, and the runs queued behind it would wait for a worker that never comes
        time.sleep(0.1)
        started = ensure_workers(ws)
    return dead


def _queued_count(ws: Workspace) -> int:
    return sum(len(w.store().list(status="queued")) for w in ws.all_workspaces())


def _claim_any(ws: Workspace, pid: int) -> tuple[Workspace, str] | None:
    """The oldest queued run of the top workspace or any project (projects are served in turn)."""
    for w in ws.all_workspaces():
        run_id = w.store().claim_next(pid)
        if run_id is not None:
            return w, run_id
    return None


def worker_main(home: str, slot: int) -> int:
    """Worker loop: hold the slot lock, run queued runs (of every project under ``home``) until none is left."""
    from .train import run_training

    ws = Workspace(Path(home))
    lock_path = _slot_dir(ws) / f"slot-{slot}.lock"
    lock = open(lock_path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another worker holds this slot
    while True:
        claimed = _claim_any(ws, os.getpid())
        if claimed is None:
            # A run queued while we held the slot saw it busy and started no worker: free the slot, then
            # look once more, so that such a run is never left waiting with no worker to run it.
            fcntl.flock(lock, fcntl.LOCK_UN)
            if not _queued_count(ws):
                return 0
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0  # a worker started meanwhile holds the slot and will run it
            continue
        run_ws, run_id = claimed
        store = run_ws.store()
        run = store.get(run_id)
        try:
            cfg = TrainConfig.from_dict(run["config"])
        except Exception as e:
            store.update(run_id, status="failed", error=f"Unreadable configuration: {e}", pid=None)
            continue
        log.info("worker %d: run %s", os.getpid(), run_id)
        run_training(run_ws, run["data"], cfg, run_id=run_id, raise_errors=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tl_core.jobs")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--home", required=True)
    w.add_argument("--slot", type=int, default=0)
    d = sub.add_parser("watchdog")
    d.add_argument("--home", required=True)
    d.add_argument("--run", required=True)
    d.add_argument("--grace", type=float, default=CANCEL_GRACE_S)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "worker":
        return worker_main(args.home, args.slot)
    ws = Workspace(Path(args.home))
    run = ws.store().get(args.run)
    _watchdog(ws, args.run, run.get("pid"), time.monotonic() + args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
