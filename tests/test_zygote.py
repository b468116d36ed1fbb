"""The worker zygote (tl_core/storage/zygote.py): a process that imported torch and timm once forks each new worker.

A child runs in the requester's environment, folder and cores, with TL Studio's own modules imported afresh; a stale
socket or a missing zygote makes the caller start the worker the plain way and a zygote start for the next one; a
forked worker is found by its slot lock, not by its ``/proc`` environment (which is the zygote's).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_for
from tl_core.storage import zygote
from tl_core.storage.processes import alive, kill_workers, start_time

pytestmark = pytest.mark.processes

#: What the probe module the child runs writes: what it found when it started.
PROBE = '''
import json, os, sys
fresh = "tl_core" not in sys.modules  # TL Studio's own code is imported afresh in each child
import tl_core
out = {"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "probe": os.environ.get("TL_PROBE"),
       "torch_preloaded": "torch" in sys.modules, "fresh": fresh, "tl_core": os.path.dirname(tl_core.__file__),
       "cpus": sorted(os.sched_getaffinity(0)), "sid": os.getsid(0), "args": sys.argv[1:],
       "threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None}
print("probe ran", flush=True)
open(os.environ["TL_PROBE_OUT"], "w").write(json.dumps(out))
'''


@pytest.fixture
def probe_dir(tmp_path, monkeypatch):
    """A folder with the probe module, as the requester's working directory; zygotes of this test leave 3 s
    after their last request."""
    d = tmp_path / "cwd"
    d.mkdir()
    (d / "tl_probe_mod.py").write_text(PROBE)
    monkeypatch.chdir(d)
    monkeypatch.setenv("TL_ZYGOTE_IDLE_S", "3")
    return d


def _forked(tmp_path: Path, env: dict[str, str], timeout: float = 120) -> int:
    """spawn_forked until a zygote answers (the first calls start one and return None)."""
    return wait_for(lambda: zygote.spawn_forked("tl_probe_mod", ["a", "b"], tmp_path / "child.log", env),
                    timeout, "a zygote to answer", 0.3)


def test_a_forked_child_runs_in_the_requesters_environment_folder_and_cores(probe_dir, tmp_path):
    out = tmp_path / "probe.json"
    env = {**os.environ, "TL_PROBE": "hello", "TL_PROBE_OUT": str(out), "TL_THREADS": "3"}
    # a stale socket where this environment's zygote would listen: nobody answers, so a zygote is started
    path = zygote.socket_path(zygote.zygote_key(env, str(probe_dir)))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    stale.bind(str(path))
    stale.close()
    assert zygote.spawn_forked("tl_probe_mod", [], tmp_path / "child.log", env) is None
    mine = sorted(os.sched_getaffinity(0))
    pid = _forked(tmp_path, env)
    doc = json.loads(wait_for(lambda: out.is_file() and out.read_text(), 60, "the probe's output"))
    assert doc["pid"] == pid and doc["probe"] == "hello" and doc["cwd"] == str(probe_dir)
    assert doc["torch_preloaded"] and doc["fresh"] and doc["args"] == ["a", "b"]
    assert doc["tl_core"] == str(Path(__file__).resolve().parent.parent / "tl_core")
    assert doc["cpus"] == mine and doc["sid"] == doc["pid"]  # its own session, the requester's cores
    assert doc["threads"] == 3  # torch's pool sized by the requester's TL_THREADS, not the zygote's
    assert doc["ppid"] != os.getpid()  # the zygote's child, not ours: nothing to reap here
    assert "probe ran" in wait_for(lambda: (tmp_path / "child.log").read_text(), 30, "the child's log")
    wait_for(lambda: not alive(pid), 30, "the child to end")
    # the zygote runs with no TL_* variable: a look-up of processes by TL_HOME never finds it
    zpids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
             and str(path).encode() in _read(p / "cmdline")]
    assert zpids and all(b"TL_PROBE=" not in _read(Path(f"/proc/{z}/environ")) for z in zpids)
    # and it leaves when idle (3 s here), with its socket
    wait_for(lambda: not any(alive(z) for z in zpids), 30, "the idle zygote to leave")
    assert not path.exists() and not path.with_suffix(".lock").exists() and not path.with_suffix(".log").exists()


def test_warming_up_starts_the_zygote_once_ahead_of_the_first_worker(probe_dir, tmp_path, monkeypatch):
    """warm_up (what a test session does before its first worker; tl_core.runs.workers.warm_zygote) starts this
    environment's zygote at once, the way a first request that finds none does (that it then forks the next
    request is the first test's), and warming up again while it starts starts nothing."""
    from tl_core.storage import processes

    starts: list[list[str]] = []
    monkeypatch.setattr(processes, "spawn_detached", lambda cmd, *a, **k: starts.append(cmd))  # it never comes up
    env = {**os.environ, "TL_PROBE": "warm"}
    assert zygote.warm_up(env) and zygote.warm_up(env)
    path = zygote.socket_path(zygote.zygote_key(env, str(probe_dir)))
    assert len(starts) == 1 and "tl_core.storage.zygote" in starts[0] and str(path) in starts[0]
    assert zygote.spawn_forked("tl_probe_mod", [], tmp_path / "child.log", env) is None and len(starts) == 1
    path.with_suffix(".lock").unlink()  # this test's own (its key names its folder)


def test_another_environment_gets_another_zygote(probe_dir):
    env = dict(os.environ)
    key = zygote.zygote_key(env, str(probe_dir))
    # TL Studio's settings, and what libraries set for themselves on import, are applied in the child: one zygote
    same = {**env, "TL_HOME": "/elsewhere", "TL_MAX_WORKERS": "3", "TORCHINDUCTOR_CACHE_DIR": "/tmp/x",
            "KMP_DUPLICATE_LIB_OK": "True"}
    assert zygote.zygote_key(same, str(probe_dir)) == key
    assert zygote.zygote_key({**env, "OMP_NUM_THREADS": "7"}, str(probe_dir)) != key
    assert zygote.zygote_key({**env, "PYTHONPATH": "/x"}, str(probe_dir)) != key
    assert zygote.zygote_key({**env, "GOMP_SPINCOUNT": "7"}, str(probe_dir)) != key  # read when torch loads
    assert zygote.zygote_key(env, "/another/checkout") != key


def test_a_zygote_that_never_listens_is_not_started_again_for_every_worker(probe_dir, tmp_path, monkeypatch):
    """A zygote that fails before it listens (its log says why) is started again only after RETRY_S: meanwhile each
    worker starts the plain way, without paying a failing start of its own."""
    from tl_core.storage import processes

    starts: list[list[str]] = []
    monkeypatch.setattr(processes, "spawn_detached", lambda cmd, *a, **k: starts.append(cmd))  # it never comes up
    env = {**os.environ, "TL_PROBE": "never"}
    assert zygote.spawn_forked("tl_probe_mod", [], tmp_path / "child.log", env) is None
    assert zygote.spawn_forked("tl_probe_mod", [], tmp_path / "child.log", env) is None
    assert len(starts) == 1 and "tl_core.storage.zygote" in starts[0]
    lock = zygote.socket_path(zygote.zygote_key(env, str(probe_dir))).with_suffix(".lock")
    old = time.time() - zygote.RETRY_S - 1
    os.utime(lock, (old, old))
    assert zygote.spawn_forked("tl_probe_mod", [], tmp_path / "child.log", env) is None
    assert len(starts) == 2  # tried again once the wait was over
    lock.unlink()  # this test's own (its key names its folder)


def test_kill_workers_finds_a_worker_by_its_slot_lock(tmp_path):
    """A forked worker's /proc shows the zygote's command line and environment: its slot lock says who it is."""
    home = tmp_path / "home"
    (home / "workers").mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wait_for(lambda: start_time(sleeper.pid), 10, "the sleeper to start")
        (home / "workers" / "compute-0.lock").write_text(f"{sleeper.pid} {start_time(sleeper.pid)}\n")
        (home / "workers" / "compute-1.lock").write_text(f"{sleeper.pid} 1\n")  # a pid used again: not this one
        assert kill_workers(tmp_path / "other") == 0 and sleeper.poll() is None
        assert kill_workers(home) == 1
        assert sleeper.wait(timeout=10) == -9
    finally:
        sleeper.kill()
        sleeper.wait()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
