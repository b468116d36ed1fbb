"""Running one training as a torchrun group: ``tl-core train ... --nproc N`` and a worker with
``TL_TRAIN_PROCS`` (or every GPU on a GPU machine) launch PyTorch's own ``torchrun`` here.

The parent (the command line or the worker) creates the run, starts ``torchrun`` in a process group of its
own and waits: each rank runs :func:`rank_main` on the same run id, rank 0 writes the run. Whatever happens,
no process is left behind: the group is killed as a whole on cancel and when the parent dies (the kernel
signals torchrun when its parent goes), and a rank that dies fails the run with the reason torchrun
reported.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..config import TrainConfig
from ..data.versions import pin
from ..settings import setting
from ..storage.workspace import Workspace

__all__ = ["train_procs", "group_command", "run_group", "train_with_group", "rank_main", "failure_reason"]


def train_procs() -> int:
    """Processes a worker trains one run with: ``TL_TRAIN_PROCS``, else every GPU on a GPU machine, else 1."""
    value = setting("TL_TRAIN_PROCS", "")
    if isinstance(value, int):
        return value
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no usable torch build: one process
        gpus = 0
    return gpus if (value == "all" or not value) and gpus > 1 else 1


def group_command(home: str | os.PathLike, run_id: str, nproc: int, log_dir: str | os.PathLike) -> list[str]:
    """``torchrun`` on one machine with ``nproc`` processes, each running :func:`rank_main` on ``run_id``; torchrun
    keeps its own files in ``log_dir`` (without it, it leaves an empty ``/tmp/torchelastic_*`` folder behind)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={int(nproc)}",
            "--log-dir", str(log_dir), "-m", "tl_core.runs.launch", "--tl-home", str(home), "--tl-run", run_id]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: torchrun stops its ranks on SIGTERM
    except (OSError, AttributeError):
        pass


_FAILURE = re.compile(r"^\s*rank\s*:\s*(\d+).*?^\s*exitcode\s*:\s*(-?\d+)", re.S | re.M)


def failure_reason(log_text: str, world: int) -> str | None:
    """The first failed rank and how it ended, from torchrun's error summary (its "Root Cause" entry); None
    when it names none."""
    root = log_text.rfind("Root Cause")
    m = _FAILURE.search(log_text, root if root >= 0 else 0)
    if not m:
        return None
    rank, code = int(m.group(1)), int(m.group(2))
    how = (f"was killed ({signal.Signals(-code).name})" if code < 0 and -code in {s.value for s in signal.Signals}
           else f"exited with code {code}")
    return f"Process {rank} of the {world}-process training group {how}; the run failed."


def run_group(ws: Workspace, run_id: str, nproc: int, should_cancel: Callable[[], bool] | None = None,
              log_path: Path | None = None, grace_s: float = 10.0,
              progress: Callable[[dict[str, Any]], None] | None = None) -> str:
    """Train ``run_id`` (already in the store) with ``nproc`` processes and wait; returns its final status.

    A cancel (``should_cancel``, or the run's cancel flag read by rank 0) stops every rank: rank 0 broadcasts
    it; a group that has not stopped ``grace_s`` later is killed as a whole. When the group ends without rank 0
    having recorded the outcome (rank 0 itself died), the run is failed with torchrun's account of it.
    """
    log_path = log_path or (ws.runs_dir / f".{run_id}.torchrun.log")
    env = {**os.environ, "TL_HOME": str(ws.top), "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    group_dir = ws.runs_dir / f".{run_id}.torchrun"  # torchrun's own files, removed when the group has ended
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(group_command(ws.home, run_id, nproc, group_dir), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, env=env, preexec_fn=_die_with_parent, close_fds=True)
        return _follow_group(ws, run_id, proc, nproc, log_path, should_cancel, grace_s, progress)
    finally:
        shutil.rmtree(group_dir, ignore_errors=True)


def _follow_group(ws: Workspace, run_id: str, proc: subprocess.Popen, nproc: int, log_path: Path,
                  should_cancel: Callable[[], bool] | None, grace_s: float,
                  progress: Callable[[dict[str, Any]], None] | None) -> str:
    """:func:`run_group`'s wait: progress passed on, a cancel sent to rank 0 (and the group killed after
    ``grace_s``), the outcome recorded when rank 0 could not; returns the run's final status."""
    store = ws.store()
    cancel_at: float | None = None
    seen_epochs, last_progress = 0, None
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            if progress is not None:  # what rank 0 records, passed on (the command line prints it)
                for e in store.epochs(run_id)[seen_epochs:]:
                    progress({"stage": "epoch", **e})
                    seen_epochs += 1
                now = store.get(run_id).get("progress")
                if now and now != last_progress and now.get("stage") != "epoch":
                    progress(now)
                last_progress = now
            if cancel_at is None and should_cancel is not None and should_cancel():
                store.request_cancel(run_id)  # rank 0 reads it and stops the group
                cancel_at = time.monotonic()
            if cancel_at is not None and time.monotonic() - cancel_at > grace_s:
                _kill_group(proc.pid)
                proc.wait()
                break
    except BaseException:
        _kill_group(proc.pid)  # whatever stops the parent stops the group
        raise
    _kill_group(proc.pid)  # a rank that outlived torchrun (it should not): no process stays behind
    run = store.get(run_id)
    if run["status"] in ("running", "queued"):
        try:
            text = log_path.read_text(errors="replace")[-20000:]
        except OSError:
            text = ""
        if cancel_at is not None:
            store.update(run_id, status="cancelled", error="Cancelled (the training group was stopped).", pid=None)
        else:
            store.update(run_id, status="failed", pid=None,
                         error=failure_reason(text, nproc) or f"The training group stopped (exit code {proc.returncode}); "
                                                             "the run failed.")
    elif run["status"] == "failed":  # rank 0 saw the group break; torchrun knows which rank broke it and how
        why = failure_reason(_tail(log_path), nproc)
        if why and "distributed group stopped" in (run.get("error") or ""):
            store.update(run_id, error=why)
    return store.get(run_id)["status"]


def train_with_group(ws: Workspace, data: str | os.PathLike, cfg: Any, nproc: int,
                     test_data: str | os.PathLike | None = None,
                     progress: Callable[[dict[str, Any]], None] | None = None) -> str:
    """``tl-core train ... --nproc N``: create the run, train it with a torchrun group, return its id."""
    cfg = cfg.resolved()
    data = pin(ws, data)  # an absolute path, or NAME@VERSION of a managed dataset
    store = ws.store()
    run_id = store.create_run(str(data), cfg.to_dict(), status="queued")
    if test_data is not None:
        store.update(run_id, test_data=str(Path(test_data).expanduser().resolve()))
    run_group(ws, run_id, nproc, progress=progress)
    return run_id


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-20000:]
    except OSError:
        return ""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def rank_main(argv: list[str] | None = None) -> int:
    """What each process of the group runs (started by torchrun): train ``--tl-run`` in ``--tl-home``."""
    p = argparse.ArgumentParser(prog="python -m tl_core.runs.launch")
    # names no torchrun option starts with (torchrun would take an abbreviation of its own)
    p.add_argument("--tl-home", dest="home", required=True)
    p.add_argument("--tl-run", dest="run", required=True)
    args = p.parse_args(argv)
    import logging

    from .training import run_training

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s rank %(process)d %(levelname)s %(name)s: %(message)s")
    ws = Workspace.at(args.home)
    run = ws.store().get(args.run)
    res = run_training(ws, run["data"], TrainConfig.from_saved(run["config"]), run_id=args.run, raise_errors=False,
                       test_data=run.get("test_data"))
    return 0 if res.status in ("done", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(rank_main())
