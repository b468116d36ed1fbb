"""The page-test harness: fixtures and helpers for tests of the Streamlit app with ``streamlit.testing.v1.AppTest``
(no browser), used by test_app_pages.py, test_app_insights.py and test_data_loop_pages.py.

One real linear-probe run on the emoji sample is trained once per session with the ``tl-core`` command
(tests/conftest.py ``cli_trained_home``); every test gets its own copy of that workspace (``TL_HOME``), so tests
never see each other's runs or tasks.
Long computations are tasks that real worker processes run (``tl_core.runs.workers``): a test clicks,
then reruns the page until the result is drawn (:func:`until`). Where a test looks at the queue itself,
``no_workers`` keeps tasks queued; with ``task_threads`` short tasks run in threads of the test process
instead (no process starts). Workers a test started are killed when it ends.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"
EMOJI = ROOT / "sample_data" / "emoji"
#: Seconds one script run may take (Try it waits for the interactive worker, which starts on first use).
TIMEOUT = 180
#: Seconds a test waits for a task to finish.
TASK_TIMEOUT = 240

pytest.importorskip("streamlit.testing.v1")
from streamlit.testing.v1 import AppTest  # noqa: E402

from tl_core.runs import workers  # noqa: E402
from tl_core.storage.processes import kill_workers  # noqa: E402
from tl_core.storage.workspace import Workspace  # noqa: E402

__all__ = ["ROOT", "APP", "EMOJI", "TIMEOUT", "TASK_TIMEOUT", "trained_home", "home", "empty_home", "no_workers",
           "TaskThreads", "task_threads",
           "app", "goto", "until", "progress_texts", "assert_clean", "plotly_specs", "metric", "has_metric", "button",
           "has_button", "png_bytes", "sample_zip"]


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def trained_home(cli_trained_home) -> tuple[Path, str]:
    """A workspace holding one finished linear probe on the emoji sample, made by the CLI (once per session):
    copy it before changing it (``home`` does)."""
    return cli_trained_home


def _own_home(monkeypatch, home: Path) -> None:
    monkeypatch.setenv("TL_HOME", str(home))
    monkeypatch.setenv("TL_INTERACTIVE_IDLE_S", "30")  # interactive workers of a test do not linger


@pytest.fixture
def home(tmp_path, monkeypatch, trained_home):
    """This test's own copy of the trained workspace, as TL_HOME; its workers are killed at the end."""
    src, run_id = trained_home
    dst = tmp_path / "tl_home"
    shutil.copytree(src, dst)
    _own_home(monkeypatch, dst)
    yield Workspace(dst), run_id
    kill_workers(dst.resolve())


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    dst = tmp_path / "empty_home"
    _own_home(monkeypatch, dst)
    yield Workspace(dst)
    kill_workers(dst.resolve())


@pytest.fixture
def no_workers(monkeypatch) -> None:
    """Queue tasks without starting worker processes (to look at the queue)."""
    monkeypatch.setattr(workers, "ensure_workers", lambda ws, lane="compute": 0)


class TaskThreads:
    """Tasks run by threads of the test process instead of worker processes: one thread per lane at a time,
    which claims and runs queued tasks (every project's, in the workers' order) until none is left, with the
    workers' own code (``workers._claim``, ``workers.run_task``). Nothing is imported again and no process
    starts; the worker processes themselves are tested in test_tasks.py, test_faults.py and the browser tests.
    """

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._threads: dict[tuple[str, str], threading.Thread] = {}
        self._models = workers.WarmModels()
        self.started = 0  # threads started (each stands for a worker process that was not started)

    def ensure(self, ws: Workspace, lane: str = "compute") -> int:
        """``workers.ensure_workers``' stand-in: start this lane's thread if tasks wait and none runs."""
        import threading

        key = (str(ws.top), lane)
        with self._lock:
            running = self._threads.get(key)
            if (running is not None and running.is_alive()) or not workers._queued(ws, lane):
                return 0
            t = threading.Thread(target=self._loop, args=(Workspace(ws.top), lane, key), daemon=True,
                                 name=f"tasks-{lane}")
            self._threads[key] = t
            self.started += 1
            t.start()
            return 1

    def _loop(self, ws: Workspace, lane: str, key: tuple[str, str]) -> None:
        while True:
            with self._lock:  # "nothing left" and "this thread is gone" in one step: ensure() never misses a task
                claimed = workers._claim(ws, lane)
                if claimed is None:
                    del self._threads[key]
                    return
            workers.run_task(*claimed, self._models if lane == "interactive" else None)

    def stop(self, timeout: float = 60) -> None:
        """Cancel what is still queued or running (cooperatively: a thread cannot be killed) and wait for it."""
        with self._lock:
            homes = {top for top, _ in self._threads}
            threads = list(self._threads.values())
        for top in homes:
            for ws in Workspace(Path(top)).all_workspaces():
                store = ws.store()
                for t in store.tasks():
                    if t["status"] in ("queued", "running"):
                        store.request_task_cancel(t["id"])
                        if t.get("run_id"):
                            store.request_cancel(t["run_id"])
        for t in threads:
            t.join(timeout)
        assert not [t for t in threads if t.is_alive()], "a task thread did not stop within a minute of its cancel"


def _run_pages_as_a_server_does() -> None:
    """Make every ``AppTest`` of this test process do once what a Streamlit server does once at its start, instead
    of at every run (an AppTest is a new runtime each time). Installed when this module is imported, for the
    whole process; measured on the whole suite (py-spy): ~55 s of CPU, and the page tests' scripts run unchanged.

    - The app's scripts are compiled once (a ``ScriptCache`` per runtime compiled each page again, with Streamlit's
      "magic" AST rewrite: ~20 s). Keyed by path, size and modification time, so a script a test writes is
      compiled as it is. With every page compiled up front, page runs convert no AST at all: Python 3.11.7's
      ``ast`` keeps its recursion depth in a global, and two threads converting ASTs at once fail with
      "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905), which a page rerun beside a
      task thread using ``ast`` (the audit, the lab, TorchScript; :func:`task_threads`) once did.
    - The installed packages are scanned for Streamlit components once (each run read every distribution's
      metadata: ~20 s); they do not change during a test run.
    - After a script run Streamlit clears Keras's session when ``keras`` is imported, a full garbage collection
      each time (~15 s). The server process never imports Keras (the TFLite conversion runs in a worker), but a
      test process that ran test_tflite.py holds it; matplotlib's figures are still closed, as Streamlit does.
    """
    import importlib.util
    import sys

    from streamlit.runtime.scriptrunner import script_runner
    from streamlit.runtime.scriptrunner.script_cache import ScriptCache

    compile_script, bytecode = ScriptCache.get_bytecode, {}

    def get_bytecode(self, script_path: str):
        path = Path(script_path).resolve()
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in bytecode:
            bytecode[key] = compile_script(self, str(path))
        return bytecode[key]

    scanned = []

    def scan_once():
        if not scanned:
            scanned.append(scan())
        return scanned[0]

    def close_figures():
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            plt.close("all")

    ScriptCache.get_bytecode = get_bytecode
    if importlib.util.find_spec("streamlit.components.v2.manifest_scanner"):  # (Streamlit 1.67 has it)
        from streamlit.components.v2 import manifest_scanner

        scan = manifest_scanner.scan_component_manifests
        manifest_scanner.scan_component_manifests = scan_once
    if hasattr(script_runner, "_clean_problem_modules"):
        script_runner._clean_problem_modules = close_figures
    for script in [APP, *sorted(p for p in (ROOT / "pages").glob("*.py") if not p.name.startswith("_"))]:
        get_bytecode(ScriptCache(), str(script))


_run_pages_as_a_server_does()


@pytest.fixture
def task_threads(monkeypatch) -> TaskThreads:
    """Tasks run in threads of this process, not in worker processes (:class:`TaskThreads`): for page tests
    about what a page shows of a task's progress and result, where a worker process would prove nothing more
    and costs a Python start and the torch and timm imports (seconds of CPU) for every task. For short tasks
    only: a thread cannot be killed, so a task that runs on past its test (one that does not check its cancel,
    like the audit's t-SNE) would slow the next tests, and the fixture fails the test when a thread has not
    stopped a minute after the cancel at its end."""
    from conftest import _SPAWNERS, _refuse

    threads = TaskThreads()
    monkeypatch.setattr(workers, "ensure_workers", threads.ensure)
    # Cancel's watchdog would kill the worker process that ignores a cancel: here that is this process
    monkeypatch.setattr(workers, "spawn_detached", lambda cmd, *a, **k: None)
    # and nothing else starts one either: the fast tier's guard (tests/conftest.py) fails the test if it does
    for owner, name, what in _SPAWNERS:
        if hasattr(owner, name):
            monkeypatch.setattr(owner, name, _refuse(getattr(owner, name), what))
    yield threads
    threads.stop()


def app(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if query:
        at.query_params.update(query)
    return at.run()


def goto(at: AppTest, page: str) -> AppTest:
    return at.switch_page(f"pages/{page}.py").run()


def until(at: AppTest, done, timeout: float = TASK_TIMEOUT, what: str = "the task") -> AppTest:
    """Rerun the page (as its polling fragment would) until ``done(at)``; fail on an exception or a timeout."""
    deadline = time.monotonic() + timeout
    while not done(at):
        assert not at.exception, [e.value for e in at.exception]
        # a task that failed on a bug says so at once: no reason to wait out the timeout
        assert not [e for e in at.error if e.value.startswith("Internal error")], [e.value for e in at.error]
        assert time.monotonic() < deadline, f"{what} did not get there in {timeout:.0f} s; errors: " + str(
            [e.value for e in at.error])
        time.sleep(0.5)
        at.run()
    return at


def progress_texts(at: AppTest) -> list[str]:
    return [p.proto.text for p in at.get("progress")]


def assert_clean(at: AppTest) -> None:
    """No exception element and no error box on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def plotly_specs(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; have {[m.label for m in at.metric]}"
    return found[0]


def has_metric(at: AppTest, label: str) -> bool:
    return any(m.label == label for m in at.metric)


def button(at: AppTest, label: str):
    found = [b for b in at.button if b.label == label]
    assert found, f"no button {label!r}; have {[b.label for b in at.button]}"
    return found[0]


def has_button(at: AppTest, label: str) -> bool:
    return any(b.label == label for b in at.button)


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def sample_zip(extra: dict[str, bytes] | None = None) -> bytes:
    """A dataset zip: 3 animal and 3 flag emoji in a wrapper folder, plus optional extra entries."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cls in ("animal", "flag"):
            for f in sorted((EMOJI / cls).iterdir())[:3]:
                zf.write(f, f"pets/{cls}/{f.name}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


