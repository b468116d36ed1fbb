"""Faults: a worker killed mid-epoch, cancel at every stage, a full disk, out of memory, many jobs and
many processes on one run store. Nothing may crash the server, lose a run, or leave the store
inconsistent. Timings measured here are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import hostile as H
from conftest import EMOJI, wait_for
from tl_core.config import TrainConfig
from tl_core.runs import tasks, workers
from tl_core.storage.processes import alive as _pid_alive
from tl_core.storage.store import ACTIVE_STATUSES, RunStore
from tl_core.runs.training import run_training
from tl_core.runs.workers import CANCEL_GRACE_S, recover
from tl_core.storage.workspace import Workspace

LINEAR = TrainConfig(strategy="linear", epochs=5)
#: long enough to be caught mid-epoch: tiny batches, many epochs, no early stop
LONG_FULL = TrainConfig(strategy="full", epochs=200, batch_size=4, augment="none", patience=0)


def _subset(root: Path, per_class: int, classes=("animal", "face", "food")) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((EMOJI / c).iterdir())[:per_class]:
            shutil.copy(f, root / c / f.name)
    return root


def _stage(store: RunStore, run_id: str) -> str | None:
    return (store.get(run_id).get("progress") or {}).get("stage")


def _integrity(ws: Workspace) -> None:
    con = sqlite3.connect(ws.db_path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        orphans = con.execute("SELECT COUNT(*) FROM epochs WHERE run_id NOT IN (SELECT id FROM runs)").fetchone()[0]
        assert orphans == 0
    finally:
        con.close()


@pytest.fixture
def queue_ws(workspace, monkeypatch):
    """A workspace whose background workers are all stopped when the test ends, pass or fail."""
    monkeypatch.setenv("TL_MAX_WORKERS", "1")
    yield workspace
    store = workspace.store()
    for t in store.tasks(status="queued"):
        store.request_task_cancel(t["id"])
    for t in store.tasks(status="running"):
        if t.get("pid") and t["pid"] != os.getpid() and _pid_alive(t["pid"], t.get("pid_start")):
            os.kill(int(t["pid"]), signal.SIGKILL)
    recover(workspace)


# ==================================================================================================
# a worker killed mid-epoch
# ==================================================================================================
@pytest.mark.slow
def test_worker_killed_mid_epoch_is_recovered_and_nothing_else_is_touched(tmp_path, queue_ws):
    ws, store = queue_ws, queue_ws.store()
    data = _subset(tmp_path / "data", 4)
    done_id = tasks.submit_training(ws, data, LINEAR, name="finishes first")
    victim = tasks.submit_training(ws, data, LONG_FULL, name="killed")
    after = tasks.submit_training(ws, data, LINEAR, name="queued behind the victim")
    wait_for(lambda: store.get(done_id)["status"] == "done", 120, "the first run to finish")
    t0 = time.monotonic()
    wait_for(lambda: _stage(store, victim) == "train", 120, "the victim to be in an epoch")
    row = store.get(victim)
    assert row["status"] == "running" and row["progress"]["step"] >= 1
    done_before, done_epochs = store.get(done_id), store.epochs(done_id)
    assert store.get(after)["status"] == "queued"

    pid = int(row["pid"])
    os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    wait_for(lambda: not _pid_alive(pid), 10, "the killed worker to die")
    assert store.get(victim)["status"] == "running"  # nobody has noticed yet: that is recover()'s job
    dead = recover(ws)
    t_recovered = time.monotonic()
    victim_task = next(t["id"] for t in store.tasks(kind="train") if t["run_id"] == victim)
    assert sorted(dead) == sorted([victim_task])  # the task's worker died; its run follows it
    assert store.task(victim_task)["status"] == "interrupted"
    row = store.get(victim)
    assert row["status"] == "interrupted"
    assert row["error"] == ("The training process stopped unexpectedly (killed, out of memory, or the server "
                            "restarted); start the run again.")
    assert store.get(done_id) == done_before and store.epochs(done_id) == done_epochs  # untouched
    assert not (ws.run_dir(victim) / "model.safetensors").exists()
    # recover() also restarted a worker for the run that was waiting behind the victim
    wait_for(lambda: store.get(after)["status"] == "done", 120, "the queued run to finish after recovery")
    assert recover(ws) == []  # idempotent
    assert [r for r in store.list() if r["status"] in ACTIVE_STATUSES] == []
    _integrity(ws)
    print(f"\n[kill] reached an epoch {t_kill - t0:.1f}s after the first run finished; kill→recovered "
          f"{t_recovered - t_kill:.2f}s (incl. waiting for the process to die)")


@pytest.mark.processes
def test_restart_marks_runs_of_vanished_processes_interrupted(workspace):
    store = workspace.store()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lost = store.create_run("data", {}, status="running")
    store.update(lost, pid=gone.pid)
    alive = store.create_run("data", {}, status="running")
    store.update(alive, pid=os.getpid())  # still alive: must not be touched
    nopid = store.create_run("data", {}, status="running")  # crashed before it recorded a pid
    finished = store.create_run("data", {}, status="done")
    assert sorted(recover(workspace)) == sorted([lost, nopid])
    assert store.get(lost)["status"] == store.get(nopid)["status"] == "interrupted"
    assert "stopped unexpectedly" in store.get(lost)["error"]
    assert store.get(alive)["status"] == "running" and store.get(finished)["status"] == "done"


# ==================================================================================================
# cancel
# ==================================================================================================
KILLED = "Cancelled (the worker was stopped)."


def _cancel(ws: Workspace, run_id: str, cooperative_msg: str) -> tuple[float, str]:
    """Cancel a running run as the Stop button does; returns (seconds until stopped, how it stopped).

    The loop normally stops at its next check point with ``cooperative_msg``; on a machine so loaded that
    one forward pass outlasts the grace period the watchdog kills the worker instead (also a stop)."""
    pid = int(ws.store().get(run_id)["pid"])
    t0 = time.monotonic()
    tasks.cancel_run(ws, run_id, wait=True)
    wait_for(lambda: ws.store().get(run_id)["status"] != "running", 10, "the run to stop")
    latency = time.monotonic() - t0
    row = ws.store().get(run_id)
    assert row["status"] == "cancelled"
    assert row["error"] in (cooperative_msg, KILLED)
    assert latency < CANCEL_GRACE_S + 1.5
    if row["error"] == KILLED:
        wait_for(lambda: not _pid_alive(pid), 10, "the killed worker to die")
    return latency, "cooperative" if row["error"] == cooperative_msg else "killed after the grace period"


@pytest.mark.slow
@pytest.mark.private_cache  # with the session's cache warm, the features would come from the cache and never be extracted
def test_cancel_during_feature_extraction_stops_within_seconds(queue_ws):
    ws, store = queue_ws, queue_ws.store()
    run_id = tasks.submit_training(ws, EMOJI, TrainConfig(strategy="linear"))  # 200 images: several seconds of extraction
    wait_for(lambda: _stage(store, run_id) == "extract", 120, "feature extraction to start")
    latency, how = _cancel(ws, run_id, "Cancelled during feature extraction.")
    assert store.epochs(run_id) == [] and store.get(run_id)["pid"] is None
    assert not (ws.run_dir(run_id) / "model.safetensors").exists()
    print(f"\n[cancel] during feature extraction: {latency:.2f}s ({how})")


@pytest.mark.slow
def test_cancel_during_an_epoch_stops_within_seconds(tmp_path, queue_ws):
    ws, store = queue_ws, queue_ws.store()
    run_id = tasks.submit_training(ws, _subset(tmp_path / "data", 4), LONG_FULL)
    wait_for(lambda: _stage(store, run_id) == "train", 120, "an epoch to start")
    latency, how = _cancel(ws, run_id, "Cancelled during an epoch.")
    assert store.get(run_id)["pid"] is None
    print(f"\n[cancel] during an epoch (full fine-tuning, batch 4): {latency:.2f}s ({how})")


def test_cancel_of_a_queued_run_is_immediate(workspace, tmp_path):
    store = workspace.store()
    run_id = tasks.submit_training(workspace, _subset(tmp_path / "d", 2), LINEAR, start_worker=False)
    tasks.cancel_run(workspace, run_id)
    row = store.get(run_id)
    assert row["status"] == "cancelled" and row["error"] == "Cancelled before it started."
    assert store.oldest_queued("compute") is None  # a worker will never pick it up


# ==================================================================================================
# disk full, out of memory
# ==================================================================================================
DISK_FULL_MSG = "Could not write the run's files (No space left on device); free disk space and try again."
OOM_MSG = "Ran out of memory; lower the batch size or use a smaller backbone."


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return _subset(tmp_path_factory.mktemp("small") / "data", 5)


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_the_model(workspace, small_data, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):  # exactly what safetensors raises when the disk is full (checked on a 6 MB tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    res = run_training(workspace, small_data, LINEAR, raise_errors=False)
    row = workspace.store().get(res.run_id)
    assert res.status == row["status"] == "failed"
    assert res.error == row["error"] == DISK_FULL_MSG
    assert row["pid"] is None


def test_disk_full_while_writing_run_metadata(workspace, small_data, monkeypatch):
    real = Path.write_text

    def write_text(self, *a, **k):
        if "meta.json" in self.name:  # written atomically through a temporary file next to it
            _enospc()
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    res = run_training(workspace, small_data, LINEAR, raise_errors=False)
    assert res.status == "failed" and res.error == DISK_FULL_MSG
    assert workspace.store().get(res.run_id)["error"] == DISK_FULL_MSG


@pytest.mark.private_cache
def test_full_disk_for_the_caches_does_not_fail_the_run(workspace, small_data, monkeypatch):
    import numpy as np

    real = np.save

    def save(file, *a, **k):  # write a little, then fail: a half-written cache file
        if hasattr(file, "write"):
            file.write(b"\x93NUMPY partial")
        _enospc()

    monkeypatch.setattr(np, "save", save)
    res = run_training(workspace, small_data, LINEAR, raise_errors=False)
    monkeypatch.setattr(np, "save", real)
    assert res.status == "done", res.error
    leftovers = [p for p in (workspace.cache_dir / "decoded").rglob("*") if p.is_file()]
    assert leftovers == []  # no half-written files keep the disk full


@pytest.mark.processes
@pytest.mark.private_cache
def test_a_really_full_disk(tmp_path, small_data):
    """The workspace on a 6 MB tmpfs (needs root and mount; skipped otherwise): real ENOSPC everywhere."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        ws = Workspace(mnt / "ws")
        res = run_training(ws, small_data, LINEAR, raise_errors=False)
        assert res.status == "failed" and res.error == DISK_FULL_MSG
        assert ws.store().get(res.run_id)["error"] == DISK_FULL_MSG
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.private_cache  # with the session's cache warm, no feature would be computed and nothing would fail
@pytest.mark.parametrize("error", [
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. "
                 "Error code 12 (Cannot allocate memory)"),
    "cuda",
    MemoryError(),
])
def test_out_of_memory_fails_the_run_with_a_clear_message(workspace, small_data, monkeypatch, error):
    import torch

    import tl_core.models.engines

    if error == "cuda":
        error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def boom(*a, **k):
        raise error

    # the frozen backbone runs on PyTorch or ONNX Runtime (tl_core.models.engines): both go through __call__
    monkeypatch.setattr(tl_core.models.engines.FeatureEngine, "__call__", boom)
    res = run_training(workspace, small_data, LINEAR, raise_errors=False)
    assert res.status == "failed" and res.error == OOM_MSG
    assert workspace.store().get(res.run_id)["error"] == OOM_MSG


# ==================================================================================================
# concurrency
# ==================================================================================================
@pytest.mark.slow
def test_many_simultaneous_jobs_are_queued_and_all_finish(tmp_path, queue_ws, monkeypatch):
    monkeypatch.setenv("TL_MAX_WORKERS", "2")
    ws, store = queue_ws, queue_ws.store()
    datasets = [_subset(tmp_path / f"d{i}", 3 + i % 2, classes=("animal", "face", "flag", "food")[i % 2:i % 2 + 3])
                for i in range(5)]
    ids: list[str] = []
    lock = threading.Lock()

    def user(i: int) -> None:  # five users press "Train" at the same moment
        rid = tasks.submit_training(ws, datasets[i], TrainConfig(strategy="linear", epochs=3, seed=i),
                                    owner=f"user{i}")
        with lock:
            ids.append(rid)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(5)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == len(set(ids)) == 5
    peak = 0

    def all_done() -> bool:
        nonlocal peak
        rows = [store.get(r) for r in ids]
        peak = max(peak, sum(r["status"] == "running" for r in rows))
        return all(r["status"] not in ACTIVE_STATUSES for r in rows)

    wait_for(all_done, 240, "all five runs to finish", interval=0.2)
    took = time.monotonic() - t0
    rows = [store.get(r) for r in ids]
    assert [r["status"] for r in rows] == ["done"] * 5, [(r["status"], r["error"]) for r in rows]
    assert 1 <= peak <= 2  # never more workers than TL_MAX_WORKERS
    for r in rows:
        assert (ws.run_dir(r["id"]) / "model.safetensors").is_file()
        assert r["summary"]["val_accuracy"] is not None and len(store.epochs(r["id"])) >= 1
        assert r["owner"].startswith("user")
    # a late arrival after the workers have gone idle still gets a worker
    late = tasks.submit_training(ws, datasets[0], LINEAR)
    wait_for(lambda: store.get(late)["status"] == "done", 120, "a run submitted after the queue drained")
    _integrity(ws)
    print(f"\n[concurrency] 5 simultaneous linear runs, 2 workers: all done in {took:.1f}s, peak running {peak}")


def test_a_run_queued_while_the_worker_is_leaving_is_not_lost(workspace, tmp_path, monkeypatch):
    """The race between a worker finding the queue empty and releasing its slot: a run submitted in that
    window sees the slot busy and starts no worker, so the leaving worker must take it."""
    from tl_core.runs import kinds

    monkeypatch.setenv("TL_MAX_WORKERS", "1")
    monkeypatch.setenv("TL_COMPUTE_IDLE_S", "0")  # it leaves as soon as the queue is empty
    data = _subset(tmp_path / "d", 2)
    ran: list[str] = []

    def fake_training(ws, params, ctx):  # the queue logic is under test, not training
        ran.append(params["run_id"])
        ws.store().update(params["run_id"], status="done", pid=None)
        return {"run_id": params["run_id"], "status": "done", "error": None}

    monkeypatch.setitem(kinds.KINDS, "train", kinds.TaskKind("train", "compute", "Training", fake_training))
    real_order = workers.queue_order
    injected: list[str] = []
    spawned: list[int] = []
    monkeypatch.setattr(workers, "spawn_detached", lambda *a, **k: spawned.append(1))

    def queue_order(ws, lane):  # what the worker reads before it leaves: the queue looks empty
        found = real_order(ws, lane)
        if not found and not injected:
            # someone presses "Train" right now: the slot lock is still held by this worker
            injected.append(tasks.submit_training(workspace, data, LINEAR))
        return found

    monkeypatch.setattr(workers, "queue_order", queue_order)
    first = tasks.submit_training(workspace, data, LINEAR, start_worker=False)
    assert workers.worker_main(str(workspace.home), "compute", 0) == 0
    assert spawned == []  # the submit saw the slot busy and started nobody ...
    assert ran == [first, injected[0]]  # ... so the leaving worker ran it
    assert workspace.store().get(injected[0])["status"] == "done"


@pytest.mark.processes
def test_run_store_survives_many_writer_processes(tmp_path):
    db = tmp_path / "store" / "runs.sqlite"
    ctx = multiprocessing.get_context("spawn")
    t0 = time.monotonic()
    with ctx.Pool(5) as pool:
        results = pool.starmap(H.hammer_store, [(str(db), w, 10, 3) for w in range(5)])
    took = time.monotonic() - t0
    store = RunStore(db)
    runs = store.list()
    assert len(runs) == 50 and {r["id"] for r in runs} == {i for ids in results for i in ids}
    for r in runs:
        assert r["status"] == "done" and r["pid"] is None
        assert r["summary"] == {"i": r["config"]["i"], "worker": r["config"]["worker"]}
        assert r["owner"] == f"w{r['config']['worker']}" and r["data"] == f"data-{r['config']['worker']}"
        assert [e["epoch"] for e in store.epochs(r["id"])] == [1, 2, 3]
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 150
    con.close()
    print(f"\n[store] 5 processes x 60 writes (+ reads): {took:.1f}s")
