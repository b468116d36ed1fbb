"""The SQLite run store (WAL, lifecycle, epochs, tasks claimed once, dead workers), the workspace's caches, and
what Home and Runs say about a recorded run."""

import sqlite3
import subprocess
import sys

import pytest

from tl_core.errors import RunError
from tl_core.storage.store import RunStore
from tl_core.storage.workspace import Workspace


def test_store_lifecycle_and_wal(tmp_path):
    ws = Workspace(tmp_path / "home")
    store = ws.store()
    rid = store.create_run("data/x", {"strategy": "linear"})
    assert store.get(rid)["status"] == "queued"
    # a queued run is executed by a worker that claims its task: exactly one claim succeeds
    tid, shared = store.create_task("train", f"train:{rid}", "train", {"run_id": rid}, run_id=rid)
    assert not shared and store.create_task("train", f"train:{rid}", "train", {}) == (tid, True)
    assert store.claim_task(tid, 123, None) and not store.claim_task(tid, 456, None)
    assert store.task(tid)["status"] == "running" and store.task(tid)["pid"] == 123
    store.update(rid, status="running", pid=123)
    store.add_epoch(rid, 1, {"val_loss": 0.5})
    store.add_epoch(rid, 2, {"val_loss": 0.4})
    store.update(rid, status="done", summary={"val_accuracy": 0.9})
    run = store.get(rid)
    assert run["status"] == "done" and run["summary"] == {"val_accuracy": 0.9} and run["pid"] == 123
    assert [e["val_loss"] for e in store.epochs(rid)] == [0.5, 0.4]
    mode = sqlite3.connect(ws.db_path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    store.delete(rid, ws.runs_dir)
    with pytest.raises(RunError, match="No run with id"):
        store.get(rid)


def test_many_openers_of_a_new_store_at_once_all_get_it(tmp_path):
    """Six connections (threads, as a class's sessions or a server and its workers would be processes) open each of
    60 new stores at the same moment: all of them get a working store. SQLite fails one side of the lock race at once
    when switching a new database to WAL or creating its tables (it cannot wait without deadlocking); the old code
    lost 2-5 of 360 opens here with "database is locked"."""
    import threading

    errors: list[str] = []
    for k in range(60):
        db = tmp_path / f"store{k}" / "runs.sqlite"
        start = threading.Barrier(6)

        def open_and_write(db=db, start=start) -> None:
            start.wait()
            try:
                RunStore(db).create_task("audit", "key", "compute", {})
            except sqlite3.OperationalError as e:
                errors.append(str(e))

        threads = [threading.Thread(target=open_and_write) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert errors == []


def test_cancel_of_a_queued_run_is_immediate(tmp_path):
    store = RunStore(tmp_path / "r.sqlite")
    rid = store.create_run("d", {})
    store.request_cancel(rid)
    assert store.get(rid)["status"] == "cancelled" and store.cancel_requested(rid)


@pytest.mark.processes
def test_runs_of_dead_workers_become_interrupted(tmp_path):
    store = RunStore(tmp_path / "r.sqlite")
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    rid = store.create_run("d", {}, status="running")
    store.update(rid, pid=p.pid)
    assert store.mark_dead_workers() == [rid]
    run = store.get(rid)
    assert run["status"] == "interrupted" and "stopped unexpectedly" in run["error"]


def test_cache_dir_is_tl_cache_dir_when_set_else_under_the_top_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "fast_disk"))
    ws = Workspace(tmp_path / "home")
    assert ws.cache_dir == tmp_path / "fast_disk" and ws.cache_dir.is_dir()
    assert ws.project("demo-12345678", create=True).cache_dir == ws.cache_dir
    monkeypatch.delenv("TL_CACHE_DIR")
    ws = Workspace(tmp_path / "home")
    assert ws.cache_dir == ws.home / "cache"
    assert ws.project("demo-12345678").cache_dir == ws.home / "cache"  # projects share the top one


def test_cache_limit_evicts_least_recently_used_and_clear_empties(tmp_path):
    import os

    import numpy as np

    from tl_core.cache import cache_usage, clear_cache, enforce_cache_limit

    cache = tmp_path / "cache"  # a cache of its own: never the session's shared one
    d = cache / "decoded" / "256-bicubic" / "ab"
    d.mkdir(parents=True)
    for i in range(5):
        f = d / f"{i}.npy"
        np.save(f, np.zeros(1000, np.uint8))
        os.utime(f, (1000 + i, 1000 + i))  # 0 is the least recently used
    os.utime(d / "0.npy", (5000, 5000))  # ... until it is used again
    size = (d / "1.npy").stat().st_size
    freed = enforce_cache_limit(cache, max_bytes=3 * size)
    assert freed == 2 * size
    assert sorted(p.name for p in d.iterdir()) == ["0.npy", "3.npy", "4.npy"]
    assert cache_usage(cache)["decoded"] == 3 * size
    assert clear_cache(cache) == 3 * size and not any(cache_usage(cache).values())
    # the results recorded beside the features (auto's choice, the cross-validated estimate) count and clear too
    rec = cache / "features" / "abc" / "choices" / "k.json"
    rec.parent.mkdir(parents=True)
    rec.write_text('{"variant": "last"}')
    n = rec.stat().st_size
    assert cache_usage(cache)["choices"] == n
    assert clear_cache(cache) == n and not rec.exists()


# --------------------------------------------------------------------------------------------------
# what Home and Runs say about a run (page tests on a run recorded in the store: no training, no worker)
# --------------------------------------------------------------------------------------------------
from page_harness import app, assert_clean, empty_home, goto  # noqa: E402,F401  (fixtures are used by name)


def _lite1_run(ws: Workspace) -> str:
    from tl_core.config import TrainConfig

    store = ws.store()
    rid = store.create_run("/data/pets", TrainConfig(backbone="efficientnet_lite1").to_dict(), status="done")
    store.update(rid, summary={"val_accuracy": 0.9, "seconds": 21.7, "classes": ["a", "b"]})
    return rid


def test_home_says_which_backbone_the_run_used_and_which_the_next_run_uses(empty_home):
    rid = _lite1_run(empty_home)
    at = app()
    assert_clean(at)
    text = " ".join(m.value for m in at.markdown)
    # never "not chosen: efficientnet_lite0" alone beside a run that used Lite1
    assert f"Run {rid} used efficientnet_lite1" in text
    assert "the next run uses the default efficientnet_lite0" in text
    at = app({"backbone": "efficientnet_lite1", "run": rid})  # chosen now, the same as the run's: said once
    assert_clean(at)
    text = " ".join(m.value for m in at.markdown)
    assert "efficientnet_lite1 for the next run" in text and f"Run {rid} used" not in text


def test_runs_table_says_its_seconds_are_the_training_time_not_the_train_pages_clock(empty_home):
    _lite1_run(empty_home)
    at = app()
    goto(at, "runs")
    assert_clean(at)
    table = at.dataframe[0].value
    assert "Seconds" not in table.columns and list(table["Training s"]) == [21.7]
    cfg = at.dataframe[0].proto.columns  # the column's help names the other clock
    assert "from the click" in cfg and "queue" in cfg


@pytest.mark.parametrize("installed", [False, True])
def test_runs_page_offers_tflite_only_with_the_edge_extra(empty_home, monkeypatch, installed):
    """Without the .[edge] extra the TFLite column shows the command that installs it, not a button whose task
    could only fail; with it, the button (the other formats are offered either way)."""
    import importlib.util

    from tl_core.share.tflite import EDGE_INSTALL

    rid = _lite1_run(empty_home)
    real = importlib.util.find_spec
    edge = {"tensorflow", "ai_edge_litert"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: (
        (importlib.util.spec_from_loader(name, loader=None) if installed else None) if name in edge
        else real(name, *a, **k)))
    at = app({"run": rid})
    goto(at, "runs")
    assert_clean(at)
    keys = {b.key for b in at.button}
    assert f"exp-onnx-{rid}-start" in keys
    assert (f"exp-tflite-{rid}-start" in keys) is installed
    assert any(c.value == EDGE_INSTALL for c in at.code) is not installed


def test_runs_page_measures_the_cache_once_not_on_every_rerun(empty_home, monkeypatch):
    """The Cache panel's figures stat every cached file: measured once per 30 s, not on each click of the page."""
    import streamlit as st

    import tl_core.cache

    _lite1_run(empty_home)
    st.cache_data.clear()  # a page test before this one may have measured the same (session-shared) cache folder
    calls = []
    real = tl_core.cache.cache_summary
    monkeypatch.setattr(tl_core.cache, "cache_summary", lambda d: calls.append(d) or real(d))
    at = app()
    goto(at, "runs")
    at.run()
    at.run()
    assert_clean(at)
    assert calls == [str(empty_home.cache_dir)]
