"""Which process did the work: a process is identified by its pid *and* its start time, so that a pid the
system has since given to another process is not mistaken for a live worker; and starting workers so that
they leave no defunct process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Sequence

__all__ = ["start_time", "identity", "alive", "spawn_detached", "record_slot", "worker_pids", "kill_workers"]


def start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc``); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b") ", 1)[1].split()
        return int(fields[19])  # field 22 of stat(5); fields[0] is field 3 (state)
    except (OSError, IndexError, ValueError):
        return None


def identity() -> tuple[int, int | None]:
    """(pid, start time) of this process, as recorded with the run or task it runs."""
    pid = os.getpid()
    return pid, start_time(pid)


def alive(pid: int | None, started: int | None = None) -> bool:
    """Whether the process that recorded (``pid``, ``started``) still runs: same pid, same start time, not a
    zombie. With no recorded start time only the pid is checked."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            rest = f.read().rsplit(b") ", 1)[1].split()
    except OSError:
        return True  # no /proc (macOS): the pid exists
    if rest[0] == b"Z":
        return False  # a zombie has finished
    return started is None or int(rest[19]) == int(started)


def spawn_detached(cmd: Sequence[str], log_path: str | os.PathLike, env: dict[str, str] | None = None,
                   cwd: str | os.PathLike | None = None) -> None:
    """Start ``cmd`` as a daemon: in its own session, re-parented to init, output appended to ``log_path``.

    The intermediate process exits at once and is waited for here, so the caller (the app's server) is
    never left with a defunct child when the worker ends; and the worker outlives a restart of the server.
    """
    launcher = ("import os, subprocess, sys\n"
                "log = open(sys.argv[1], 'ab')\n"
                "subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=log, "
                "start_new_session=True, close_fds=True)\n")
    subprocess.run([sys.executable, "-c", launcher, str(log_path), *cmd], env=env, check=True, cwd=cwd,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


def record_slot(lock: IO[str]) -> None:
    """Write this process's identity into the slot lock file it holds, for :func:`kill_workers` (a worker forked
    by a zygote, :mod:`tl_core.storage.zygote`, shows the zygote's command line and environment in ``/proc``)."""
    pid, started = identity()
    lock.seek(0)
    lock.truncate()
    lock.write(f"{pid} {started}\n")
    lock.flush()


def worker_pids(home: str | os.PathLike) -> list[int]:
    """The live task worker processes of one workspace: the ones recorded in its slot locks (:func:`record_slot`)
    and the ones started with ``TL_HOME=home`` (Linux ``/proc``; elsewhere only the recorded ones)."""
    found: list[int] = []
    # Workspace.workers_dir (a Workspace would create the folders of a home that may not be one)
    for lock in (Path(home) / "workers").glob("*.lock"):
        try:
            pid, started = (int(v) for v in lock.read_text().split()[:2])
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and pid not in found and alive(pid, started):
            found.append(pid)
    want = f"TL_HOME={home}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) in (os.getpid(), *found):
            continue
        try:
            if b"tl_core.runs.workers" in (proc / "cmdline").read_bytes() and want in (
                    proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def kill_workers(home: str | os.PathLike) -> int:
    """Kill (SIGKILL) the task worker processes of one workspace (:func:`worker_pids`); other workspaces' workers
    are left alone. For the tests and benchmarks that start and stop servers. Returns how many were killed."""
    killed = 0
    for pid in worker_pids(home):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:  # gone meanwhile
            pass
    return killed
