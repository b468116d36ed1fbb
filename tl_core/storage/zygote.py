"""A warm parent for worker processes: one process that has imported torch and timm once, and forks each new
task worker instead of a fresh interpreter importing them again (~3 s of CPU and of waiting per worker on a 2-core
machine; ~0.1 s forked).

Only the heavy third-party libraries are imported before the fork; TL Studio's own modules are imported afresh in
each child, from the requester's working directory, so that a changed checkout runs its new code. A zygote serves
one environment: its key (:func:`zygote_key`) hashes the interpreter, the working directory (first on
``sys.path``), the preloaded libraries' files on disk, the CPU priority and the few environment variables that
shape a process before its first task (``PYTHONPATH``, the thread pools' sizes, ...); a request from another
environment gets a zygote of its own. The zygote itself runs with no ``TL_*`` variable (the requester's whole
environment is applied in the child), so that looking up processes by ``TL_HOME`` in ``/proc/<pid>/environ`` never
finds it. Its children are found by their slot locks instead (:func:`tl_core.storage.processes.worker_pids`).
Only compute and interactive workers are forked (``tl_core.runs.workers``; ``TL_ZYGOTE`` turns it off); on Linux
only, where forking a process that has imported these libraries (and started none of their thread pools) is safe.

The protocol: a Unix socket in a private folder (``<tmp>/tl-studio-<uid>/``); a request is one JSON line
(``module``, ``args``, ``env``, ``cwd``, ``log``, ``cpus``), the answer one JSON line (``pid``). The child starts
its own session, applies the environment, the folder and the CPU affinity, appends its output to ``log`` and runs
``python -m module args``. A zygote leaves after ``TL_ZYGOTE_IDLE_S`` seconds without a request. Anything that goes wrong
on the way (no zygote yet, a stale socket, a refused connection) makes the caller start the worker the plain way
(:func:`tl_core.storage.processes.spawn_detached`), and start a zygote for the next one.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from ..settings import setting, usable_cores
from . import processes

__all__ = ["PRELOAD", "RETRY_S", "zygote_key", "socket_path", "spawn_forked", "warm_up", "main"]

#: What the zygote imports before it forks: what every worker that runs a model imports, and the maps' PCA and t-SNE
#: (scikit-learn and SciPy: ~1 s more per data check otherwise).
PRELOAD = ("numpy", "PIL.Image", "torch", "timm", "safetensors.torch", "onnxruntime", "sklearn.decomposition",
           "sklearn.manifold")
#: Environment variables that shape a process before its first task: the module search path and hash seed (read
#: when the interpreter starts), the dynamic loader's, and the thread pools' sizes (read when the math libraries
#: load). A different value needs another zygote; every other variable is the requester's in the child (libraries
#: read those when called, and some set their own on import, e.g. TORCHINDUCTOR_CACHE_DIR and KMP_*: keying on
#: every variable made a zygote per test that had exported a graph).
_IMPORT_ENV = ("PYTHONPATH", "PYTHONHASHSEED", "PYTHONHOME", "LD_PRELOAD", "LD_LIBRARY_PATH", "OMP_NUM_THREADS",
               "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TIMM_FUSED_ATTN")
#: Seconds a caller waits for a zygote's answer before it starts the worker the plain way.
_ANSWER_S = 10.0
#: Seconds before a zygote that was started and never listened is started again.
RETRY_S = 60.0
#: The longest socket path used (Linux allows 107 bytes).
_MAX_SOCKET_PATH = 100



def _stamp(module: str) -> str:
    """Where ``module`` is installed and when it last changed, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return "-"
    origin = spec.origin if spec else None
    if not origin:
        return "-"
    try:
        return f"{origin}:{os.stat(origin).st_mtime_ns}"
    except OSError:
        return origin


def zygote_key(env: dict[str, str], cwd: str) -> str:
    """The zygote an environment needs: a hash of what the preloaded libraries see when imported."""
    doc = {"python": os.path.realpath(sys.executable), "version": sys.version, "cwd": cwd,
           "libs": [_stamp(m.split(".")[0]) for m in PRELOAD], "nice": os.getpriority(os.PRIO_PROCESS, 0),
           "env": sorted((k, v) for k, v in env.items() if k in _IMPORT_ENV)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def _folder() -> Path:
    d = Path(tempfile.gettempdir()) / f"tl-studio-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    if d.stat().st_uid != os.getuid() or d.stat().st_mode & 0o077:
        raise OSError(f"{d} is not a private folder of this user")
    return d


def socket_path(key: str) -> Path:
    """Where the zygote of ``key`` listens."""
    return _folder() / f"zygote-{key}.sock"


def _ask(path: Path, request: dict[str, Any]) -> int | None:
    """Send one request; the child's pid, or None when no zygote answered."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(_ANSWER_S)
            s.connect(str(path))
            s.sendall(json.dumps(request).encode() + b"\n")
            answer = s.makefile("rb").readline()
        return int(json.loads(answer)["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _start(path: Path, cwd: str, env: dict[str, str]) -> None:
    """Start a zygote for ``path`` in the background (it loads for seconds; this request does not wait), unless one
    is starting or running, or one was started less than :data:`RETRY_S` ago and never listened (it failed: its
    log says why; workers start the plain way meanwhile instead of paying a failing start each)."""
    lock = path.with_suffix(".lock")
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # one is starting or running
        fcntl.flock(f, fcntl.LOCK_UN)
        f.seek(0)
        if f.read().startswith("started") and time.time() - lock.stat().st_mtime < RETRY_S:
            return  # one was started a moment ago and ended without ever listening
        f.truncate(0)
        f.write("started\n")  # until the zygote listens (it writes "listening"); the file's mtime: when
    quiet = {k: v for k, v in env.items() if not k.startswith("TL_")}  # found by no TL_HOME look-up
    processes.spawn_detached([sys.executable, "-m", "tl_core.storage.zygote", "--socket", str(path), "--idle",
                              str(setting("TL_ZYGOTE_IDLE_S"))], path.with_suffix(".log"), env=quiet, cwd=cwd)


def _socket_for(env: dict[str, str], cwd: str) -> Path | None:
    """The socket of the zygote for ``env`` and ``cwd``, or None where there can be none."""
    try:
        path = socket_path(zygote_key(env, cwd))
    except OSError:
        return None
    return path if len(str(path)) <= _MAX_SOCKET_PATH else None  # a Unix socket's path has a length limit


def warm_up(env: dict[str, str] | None = None) -> bool:
    """Start the zygote of this environment now, in the background, unless one is starting or running: the first
    worker asked for seconds later is then forked, not started the plain way while the zygote loads. Whether one
    was asked for."""
    env = dict(os.environ if env is None else env)
    cwd = os.getcwd()
    path = _socket_for(env, cwd)
    if path is None:
        return False
    try:
        _start(path, cwd, env)
    except OSError:
        return False
    return True


def spawn_forked(module: str, args: Sequence[str], log_path: str | os.PathLike,
                 env: dict[str, str] | None = None) -> int | None:
    """Start ``python -m module args`` as a child of this environment's zygote; its pid, or None when there is no
    zygote to ask (one is then started for the next request, and the caller starts this one itself)."""
    env = dict(os.environ if env is None else env)
    cwd = os.getcwd()
    path = _socket_for(env, cwd)
    if path is None:
        return None
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    pid = _ask(path, {"module": module, "args": list(args), "env": env, "cwd": cwd, "log": str(log_path),
                      "cpus": cpus})
    if pid is None:  # the caller starts this worker itself, at once (a page never waits for a zygote to load)
        try:
            _start(path, cwd, env)
        except OSError:
            pass
    return pid


# --------------------------------------------------------------------------------------------------
# the zygote process
# --------------------------------------------------------------------------------------------------
def _child(request: dict[str, Any]) -> None:  # pragma: no cover - runs in the forked child
    """Become ``python -m module args`` in the requester's environment; never returns."""
    code = 1
    try:
        os.setsid()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        signal.alarm(0)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if request.get("cpus") and hasattr(os, "sched_setaffinity"):
            try:
                os.sched_setaffinity(0, request["cpus"])
            except OSError:
                pass
        if "torch" in sys.modules:  # its pool was sized where the zygote started: size it by the requester's
            try:                    # TL_THREADS (default: the cores applied above)
                threads = setting("TL_THREADS")
            except ConfigError:  # refused where the app starts; a worker still runs
                threads = usable_cores()
            sys.modules["torch"].set_num_threads(threads)
            sys.modules["torch"].seed()  # a fresh process's random state, not the zygote's copy
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        # TL Studio's own code afresh, from the requester's folder (``python -m`` puts it first on sys.path)
        for name in [m for m in sys.modules if m == "tl_core" or m.startswith("tl_core.")]:
            del sys.modules[name]
        sys.path[0] = request["cwd"]
        import runpy

        sys.argv = [request["module"], *request["args"]]
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child's own error goes to its log
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: Path, idle_s: float) -> int:
    """Preload, then fork a child per request until ``idle_s`` seconds pass without one."""
    lock = open(path.with_suffix(".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another zygote serves this key
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception as e:  # noqa: BLE001 - a child imports what it needs (and says what fails) anyway
            print(f"zygote: could not preload {name}: {e}", file=sys.stderr)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the system: no defunct process
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    lock.truncate(0)
    lock.write("listening\n")  # a start that got here worked (see _start)
    lock.flush()
    server.settimeout(1.0)
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            last = time.monotonic()
            with conn:
                try:
                    conn.settimeout(5.0)
                    request = json.loads(conn.makefile("rb").readline())
                except (OSError, ValueError):
                    continue
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child
                    server.close()
                    conn.close()
                    lock.close()
                    _child(request)
                try:
                    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                except OSError:
                    pass
    finally:
        server.close()
        # gone when idle, with its files (a start that failed keeps its lock and log: they say when and why)
        for leftover in (path, path.with_suffix(".log"), path.with_suffix(".lock")):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tl_core.storage.zygote --socket PATH [--idle S]``: serve that socket (:func:`serve`)."""
    p = argparse.ArgumentParser(prog="python -m tl_core.storage.zygote")
    p.add_argument("--socket", required=True)
    p.add_argument("--idle", type=float, required=True, help="seconds without a request before it leaves")
    args = p.parse_args(argv)
    return serve(Path(args.socket), args.idle)


if __name__ == "__main__":
    sys.exit(main())
