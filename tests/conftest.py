"""Shared fixtures: one content-keyed cache for the session, a private workspace per test, the sample
datasets, and one cached trained run."""

from __future__ import annotations

import json
import multiprocessing.process
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_data"
EMOJI = SAMPLES / "emoji"
FASHION = SAMPLES / "fashion_mnist"

# pytest rewrites the asserts of every test module as it imports it, and keeps the result in tests/__pycache__ for
# the next run, unless bytecode writing is off (PYTHONDONTWRITEBYTECODE, set on our CI machines): then each of
# `make test`'s four test processes rewrote ~70 modules again, ~4 s of a core each (about half of collecting the
# suite: benchmarks/RESULTS.md, 2026-12-07). So bytecode is written while the test modules are collected (this
# module is imported before them), and the setting is put back once they are (pytest_collection_finish below): modules
# that tests import later (TensorFlow's generated ones, in the system's temporary folder) are not written.
_DONT_WRITE_BYTECODE = sys.dont_write_bytecode
sys.dont_write_bytecode = False


# --------------------------------------------------------------------------------------------------
# test tiers (docs/testing.md): a test without one of these markers is in the fast tier
# --------------------------------------------------------------------------------------------------
#: Markers that take a test out of the fast tier (`make test-fast`); registered in pyproject.toml.
SLOW_TIER_MARKERS = ("processes", "browser", "slow", "finetune")


def in_fast_tier(item: pytest.Item) -> bool:
    """A test is in the fast tier unless it carries one of :data:`SLOW_TIER_MARKERS`."""
    return not any(item.get_closest_marker(m) for m in SLOW_TIER_MARKERS)


#: The test files that take longest, longest first, with their seconds in `make test` (one run of the whole suite
#: in two processes on a 2-core machine, 2026-12-07 late evening: benchmarks/RESULTS.md). They are collected first, so
#: that pytest-xdist (``-n 2 --dist loadfile --no-loadscope-reorder``) starts the long files at once and fills in
#: with the short ones: longest first keeps the two test processes busy to the end (a 20 s file collected last
#: left one process idle for 12 s). The order changes no result, only when each file runs.
LONGEST_FIRST = (
    "test_browser.py",  # ~108 s: the whole first-user flow in Chromium, and the multi-label one
    "test_train.py",  # ~100 s
    "test_distributed.py",  # ~69 s: 2-process torchrun groups
    "test_browser_data_loop.py",  # ~67 s
    "test_openset.py",  # ~40 s
    "test_webpage.py",  # ~36 s
    "test_app_pages.py",  # ~32 s
    "test_engines.py",  # ~31 s
    "test_multilabel.py",  # ~29 s
    "test_feature_variants.py",  # ~24 s
    "test_linear_cache.py",  # ~24 s
    "test_app_insights.py",  # ~21 s
    "test_export.py",  # ~20 s
    "test_browser_access.py",  # ~20 s
    "test_tflite.py",  # ~17 s
    "test_tasks.py",  # ~12 s
    "test_faults.py",  # ~12 s
    "test_serve.py",  # ~10 s
    "test_zygote.py",  # ~9 s
    "test_export_cache.py",  # ~8 s
)


def pytest_configure(config):
    """The worker zygotes' idle time (below). Under pytest-xdist, the test processes share the cores: each keeps
    every core as threads (TL Studio's default ``TL_THREADS``), and OpenMP's waiting threads sleep instead of
    spinning (``OMP_WAIT_POLICY=PASSIVE``); so do the processes a test starts (servers, workers, commands inherit
    the environment). When both test processes compute, their threads share the cores as one thread each would;
    when one waits (for a browser, a worker, a timeout), the other's work uses both cores. A share of one thread each
    left ~9% of the cores idle over a `make test`; two fine-tunes at once, two threads each, took 3.1x as long as one
    alone on one thread with OpenMP's default spinning threads, 1.02x with sleeping ones (benchmarks/threads.py;
    docs/testing.md). OpenBLAS's threads spin whatever the policy: it gets a share of the cores.
    ``TL_TEST_PIN_CORES=threads`` gives each process its share of the cores as threads, ``=1`` pins each to its
    share, ``=0`` leaves the cores and threads alone."""
    # the worker zygotes the tests start (tl_core/storage/zygote.py; from the test processes, their servers and
    # commands) leave 2 minutes after their last worker, not the app's 10: a test run leaves none for long
    os.environ.setdefault("TL_ZYGOTE_IDLE_S", "120")
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    mode = os.environ.get("TL_TEST_PIN_CORES", "passive")
    if not worker or count < 2 or mode == "0" or not hasattr(os, "sched_getaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // count)
    if mode == "1":
        if len(cores) < count:
            return
        try:
            os.sched_setaffinity(0, cores[int(worker.removeprefix("gw")) % count::count])
        except OSError:  # a container that refuses: the processes share the cores as before
            return
    elif mode == "threads":
        for name in ("TL_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, str(share))
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(share))
        return
    if "torch" in sys.modules:  # imported already (a plugin): size its pool to the share
        sys.modules["torch"].set_num_threads(share)


def pytest_sessionstart(session):
    """A test process is a long run of forward passes and fine-tunes, as `tl-core train`/`evaluate`/`predict` are (and
    it became one the first time a test ran such a command in-process): freed activations stay in its heap. After
    pytest_configure, whose thread settings must precede the first import of numpy."""
    from tl_core.models.devices import reuse_heap_memory

    reuse_heap_memory()


def pytest_collection_finish(session):
    """Bytecode writing goes back to its setting (see :data:`_DONT_WRITE_BYTECODE`). A test process of the rest (not
    the fast tier, which starts no process) starts the worker zygote its tests' workers are forked from
    (tl_core/storage/zygote.py) at once: it loads for seconds, and a worker asked for while it loads starts the plain
    way (importing torch and timm itself, ~3 s of CPU). The tests' servers and workers share it (one environment),
    and so do the test processes of one session (tl_core.runs.workers.warm_zygote)."""
    sys.dont_write_bytecode = _DONT_WRITE_BYTECODE
    if any(not in_fast_tier(item) for item in session.items):
        from tl_core.runs.workers import warm_zygote

        warm_zygote()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the markers
def pytest_collection_modifyitems(config, items):
    """Give every fast-tier test the ``fast_tier`` marker: ``-m fast_tier`` is `make test-fast`, and
    ``-m "not fast_tier"`` the rest (the tiers are derived from the markers here, in one place).
    Then collect the files of :data:`LONGEST_FIRST` first, in that order (every file keeps its own order)."""
    for item in items:
        if in_fast_tier(item):
            item.add_marker(pytest.mark.fast_tier)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: the rest keep their order


class SubprocessInFastTier(AssertionError):
    """A fast-tier test (or a fixture it set up) started a process."""


#: Callers whose processes are a library's look-up at import, not the test's work: ctypes.util.find_library
#: runs ``ldconfig -p`` (CUDA's path finder calls it when torch first loads), platform probes run ``uname``,
#: and matplotlib's font manager runs ``fc-list`` when it builds its font cache, at its first import on a fresh
#: machine (captum imports matplotlib: the first Grad-CAM of a fresh clone's test run failed on it in a task
#: thread, 2026-12-07).
_LOOKUPS = (os.path.join("ctypes", "util.py"), os.sep + "platform.py", os.path.join("matplotlib", "font_manager.py"))


def _refuse(real, what: str):
    def refuse(*a, **k):
        f = sys._getframe(1)
        while f is not None:
            if f.f_code.co_filename.endswith(_LOOKUPS):
                return real(*a, **k)
            f = f.f_back
        raise SubprocessInFastTier(
            f"this test started a process ({what}); the fast tier starts none. Mark the test "
            "@pytest.mark.processes (or browser / finetune / slow: docs/testing.md), or run the work in-process.")
    return refuse


_SPAWNERS = [(subprocess.Popen, "_execute_child", "subprocess"),
             (multiprocessing.process.BaseProcess, "start", "multiprocessing"),
             (os, "fork", "os.fork"), (os, "forkpty", "os.forkpty"), (os, "system", "os.system"),
             (os, "posix_spawn", "os.posix_spawn"), (os, "posix_spawnp", "os.posix_spawnp")]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """In the fast tier, starting a process (subprocess, multiprocessing, fork, spawn) fails the test, from its
    fixtures' setup to their teardown; ``TL_TEST_ALLOW_PROCESSES=1`` turns the guard off (to find what to mark)."""
    if not in_fast_tier(item) or os.environ.get("TL_TEST_ALLOW_PROCESSES") == "1":
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        for owner, name, what in _SPAWNERS:
            if hasattr(owner, name):
                mp.setattr(owner, name, _refuse(getattr(owner, name), what))
        yield


# --------------------------------------------------------------------------------------------------
# one session, one or several test processes (pytest-xdist: `make test` runs the suite with -n 2)
# --------------------------------------------------------------------------------------------------
def _session_root(tmp_path_factory) -> Path:
    """The folder the whole run shares: ``$TL_TEST_SESSION_DIR`` when set (`make test` sets it to one fresh
    folder, removed at the end; pytest runs given the same folder share the fixture runs and the cache), else the
    base temporary folder, or under pytest-xdist the folder above each test process's own
    (``.../pytest-N/popen-gw0`` -> ``.../pytest-N``), so the processes share what is built once per run."""
    shared = os.environ.get("TL_TEST_SESSION_DIR")
    if shared:
        root = Path(shared).resolve()
        root.mkdir(parents=True, exist_ok=True)
        return root
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build):
    """``build(folder)`` run once per test run, its picklable result returned to every test process: the first
    process to get here builds in ``<session root>/<name>`` under a file lock; the others wait and read the
    result it left. Without xdist, just ``build(folder)``."""
    import pickle

    from filelock import FileLock  # a dependency of torch

    root = _session_root(tmp_path_factory)
    folder, done = root / name, root / f"{name}.pickle"
    with FileLock(str(root / f"{name}.lock")):
        if done.exists():
            return pickle.loads(done.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another test process
        folder.mkdir()
        value = build(folder)
        done.write_bytes(pickle.dumps(value))
        return value


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory) -> Path:
    """One content-keyed cache (``$TL_CACHE_DIR``) for the whole session: every workspace a test makes, whatever
    its ``TL_HOME``, decodes each image and extracts each feature vector once. Caches are keyed by content
    (pixels, backbone, weights, preprocessing), so sharing them changes no result, only the time.
    ``TL_TEST_SHARED_CACHE=0`` leaves every workspace its own cache (to measure what sharing saves). Under
    pytest-xdist the test processes share it too (the caches are written atomically, for concurrent workers)."""
    d = _session_root(tmp_path_factory) / "tl_cache"
    d.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        # interactive and compute workers that tests start leave a few seconds after their last task
        mp.setenv("TL_INTERACTIVE_IDLE_S", os.environ.get("TL_INTERACTIVE_IDLE_S", "5"))
        mp.setenv("TL_COMPUTE_IDLE_S", os.environ.get("TL_COMPUTE_IDLE_S", "5"))
        if os.environ.get("TL_TEST_SHARED_CACHE", "1") == "0":
            yield None
            return
        mp.setenv("TL_CACHE_DIR", str(d))
        yield d


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path_factory):
    """``@pytest.mark.private_cache``: this test gets an empty cache of its own instead of the session's."""
    if request.node.get_closest_marker("private_cache") is None:
        yield None
        return
    d = tmp_path_factory.mktemp("private_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TL_CACHE_DIR", str(d))
        yield d


@pytest.fixture(autouse=True)
def _main_module_kept():
    """Put back the ``__main__`` module a test replaced. Streamlit's script runner (every AppTest run) makes the page
    script ``__main__`` and leaves it there, and multiprocessing's "spawn" re-imports the parent's ``__main__`` by its
    path in each child: the store and queue tests' 10 spawned processes, run after page tests in the same test
    process, each imported app.py, Streamlit and the pages again (their two tests took 9.4 s of CPU instead of 5.1 s
    idle; 39 s under py-spy in the slow tier)."""
    main = sys.modules.get("__main__")
    yield
    if main is not None and sys.modules.get("__main__") is not main:
        sys.modules["__main__"] = main


@pytest.fixture
def tl_home(tmp_path, monkeypatch) -> Path:
    """A fresh, private TL_HOME for one test (the caches stay the session's: ``$TL_CACHE_DIR``)."""
    home = tmp_path / "tl_home"
    monkeypatch.setenv("TL_HOME", str(home))
    return home


@pytest.fixture
def workspace(tl_home):
    from tl_core.storage.workspace import Workspace

    return Workspace(tl_home)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """A folder shared by the whole session: the insight tests' workspace and their sample subsets."""
    return tmp_path_factory.mktemp("shared_cache")


@pytest.fixture(scope="session")
def emoji_run(tmp_path_factory):
    """One linear-probe run on the emoji sample (Lite0, packaged weights, refitted head), trained once per
    session. With seed 0 its validation-fit head misclassifies 2 of the 40 validation images. It uses the
    classic recipe's features (``last``: the plain timm model, whose tensor names the tampering tests edit);
    the default ``auto`` and its wrapper are tested in test_feature_variants.py."""
    from tl_core.config import TrainConfig
    from tl_core.runs.training import run_training
    from tl_core.storage.workspace import Workspace

    def build(home: Path):
        res = run_training(Workspace(home), EMOJI, TrainConfig(strategy="linear", features="last"))
        assert res.status == "done", res.error
        return home, res

    home, res = built_once(tmp_path_factory, "emoji_run_home", build)
    return Workspace(home), res


@pytest.fixture(scope="module")
def emoji_run_dir(emoji_run):
    """The session's emoji run directory, with TL_HOME pointing at its workspace (run ids resolve)."""
    ws, res = emoji_run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TL_HOME", str(ws.home))
        yield Path(res.run_dir)


def make_class_folder(root: Path, spec: dict[str, int], source: Path = EMOJI) -> Path:
    """Copy ``n`` real sample images per class into ``root/<class>/`` (classes reuse emoji classes in order)."""
    src_classes = sorted(p for p in source.iterdir() if p.is_dir())
    for (name, n), src in zip(spec.items(), src_classes):
        dst = root / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir())[:n]:
            shutil.copy(f, dst / f.name)
    return root


def cli_json(capsys, *argv):
    """Run ``tl-core *argv`` in this process; it must succeed, and its stdout is JSON (returned, parsed)."""
    from tl_core.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def cli_fail(capsys, *argv) -> str:
    """Run ``tl-core *argv``; it must fail with exit code 2 and one ``error: ...`` line on stderr (returned); on
    stdout nothing, or with ``--json`` exactly one JSON document ``{"error": <that message>, "exit_status": 2}``."""
    from tl_core.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 2, (code, out.err)
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    if "--json" in argv:
        doc = json.loads(out.out)
        assert doc["exit_status"] == 2 and doc["error"] in lines[0], (doc, lines[0])
    else:
        assert out.out == "", out.out
    return lines[0]


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    """Poll ``pred`` until it returns something true (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="session")
def cli_trained_home(tmp_path_factory) -> tuple[Path, str]:
    """A workspace holding one finished linear probe on the emoji sample, made once per run (shared by
    pytest-xdist's test processes) by ``tl-core train`` (run in this process: a subprocess would prove nothing
    more here, and test_cli.py runs the command in one of its own). The page tests copy it
    (tests/page_harness.py ``home``)."""
    import contextlib
    import io

    from tl_core.cli import main

    def build(home: Path) -> tuple[Path, str]:
        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            mp.setenv("TL_HOME", str(home))
            # 30 solver rounds: the probe has converged by then on this sample (the default 100 stops at ~90);
            # the last layer, whose two validation mistakes the Evaluate fix-in-place tests act on (auto's makes one)
            code = main(["train", str(EMOJI), "--strategy", "linear", "--features", "last", "--epochs", "30",
                         "--json"])
        assert code == 0, err.getvalue()[-2000:]
        doc = json.loads(out.getvalue())
        assert doc["status"] == "done"
        assert doc["val_accuracy"] >= 0.85  # a real pretrained probe, not a stub
        return home, doc["run_id"]

    return built_once(tmp_path_factory, "trained_home", build)
