"""The task queue: every long computation runs in a bounded pool of worker processes.

Real tasks in real worker processes: identical requests share one task, the pool never runs more than
``TL_MAX_WORKERS`` compute tasks (training included), a full queue is refused, cancel is real, a dead worker
is recognised by its pid *and* start time, workers leave no defunct process, a task outlives the process
that asked for it and is found again by its key, and the interactive lane keeps its model warm.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import EMOJI, ROOT, wait_for
from queue_support import audit_params
from tl_core.config import TrainConfig
from tl_core.data.library import dataset_signature
from tl_core.errors import ConfigError, RunError
from tl_core.runs import tasks
from tl_core.storage.processes import alive, identity, kill_workers, start_time
from tl_core.storage.store import RunStore
from tl_core.runs.training import run_training
from tl_core.runs.workers import recover
from tl_core.storage.workspace import Workspace, new_project_slug

pytestmark = pytest.mark.usefixtures("quiet_workers")


@pytest.fixture
def quiet_workers(monkeypatch):
    """Workers started by these tests leave soon after their last task (interactive ones too)."""
    monkeypatch.setenv("TL_INTERACTIVE_IDLE_S", "3")
    monkeypatch.setenv("TL_MAX_WORKERS", "1")


def _subset(root: Path, per_class: int, classes=("animal", "face", "food"), offset: int = 0) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((EMOJI / c).iterdir())[offset:offset + per_class]:
            shutil.copy(f, root / c / f.name)
    return root


def _audit(data: Path) -> dict:
    return audit_params(str(data), dataset_signature(data))


def _done(ws: Workspace, task_id: str, timeout: float = 180) -> tasks.Task:
    return wait_for(lambda: (t := tasks.get(ws, task_id)) and not t.active and t, timeout, f"task {task_id}", 0.1)


def _children_zombies() -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                rest = (p / "stat").read_bytes().rsplit(b") ", 1)[1].split()
            except OSError:
                continue
            if int(rest[1]) == os.getpid() and rest[0] == b"Z":
                out.append(int(p.name))
    return out


# ==================================================================================================
# one task per request
# ==================================================================================================
@pytest.mark.processes
def test_identical_requests_share_one_task_and_its_result(workspace, tmp_path):
    data = _subset(tmp_path / "d", 4)
    ids: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def student() -> None:  # six sessions press "Check the data" at the same moment
        t = tasks.submit(workspace, "audit", _audit(data))
        with lock:
            ids.append((t.id, t.shared))

    threads = [threading.Thread(target=student) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len({i for i, _ in ids}) == 1 and sum(not shared for _, shared in ids) == 1
    task = _done(workspace, ids[0][0])
    assert task.status == "done", task.error
    res = tasks.result(workspace, task)
    assert res["images"] == 12 and res["classes"] == ["animal", "face", "food"]
    again = tasks.submit(workspace, "audit", _audit(data))  # later: the stored result, at once
    assert again.id == task.id and again.shared and again.status == "done"
    assert len(workspace.store().tasks(kind="audit")) == 1
    # another request (a changed file changes the dataset's signature) is another task
    (data / "food" / sorted(os.listdir(data / "food"))[0]).unlink()
    other = tasks.submit(workspace, "audit", _audit(data))
    assert other.id != task.id and not other.shared
    assert _done(workspace, other.id).status == "done"
    assert tasks.result(workspace, other.id)["images"] == 11
    # the page's way back to its task after a refresh: the same inputs give the same key
    assert tasks.find(workspace, "audit", _audit(data)).id == other.id


@pytest.mark.processes
def test_a_task_outlives_the_process_that_asked_and_is_found_again(workspace, tmp_path):
    """A server that submits a task and dies (or restarts): the task runs on in its worker, and the page
    finds it again from its own inputs."""
    data = _subset(tmp_path / "d", 3)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from queue_support import submit_and_vanish; "
            "print(submit_and_vanish(sys.argv[2], sys.argv[3], sys.argv[4]))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests"), str(workspace.home), str(data),
                          dataset_signature(data)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    submitted = out.stdout.strip().splitlines()[-1]
    found = tasks.find(workspace, "audit", _audit(data))
    assert found is not None and found.id == submitted
    task = _done(workspace, found.id)
    assert task.status == "done", task.error
    assert tasks.result(workspace, task)["images"] == 9
    assert task.total_s >= task.ran_s > 0 and task.waited_s >= 0


@pytest.mark.processes
def test_a_failing_task_says_why_and_an_unknown_kind_is_refused(workspace, tmp_path):
    t = tasks.submit(workspace, "audit", audit_params(str(tmp_path / "missing"), "none"))
    t = _done(workspace, t.id)
    assert t.status == "failed" and "does not exist" in t.error
    with pytest.raises(RunError, match="failed"):
        tasks.result(workspace, t)
    with pytest.raises(ConfigError, match="Unknown task kind"):
        tasks.submit(workspace, "rm -rf", {})
    # a failed request may be made again: a new task, not the stored failure
    again = tasks.submit(workspace, "audit", audit_params(str(tmp_path / "missing"), "none"))
    assert again.id != t.id


# ==================================================================================================
# the pool's bound
# ==================================================================================================
def _peak_running(ws: Workspace, ids: list[str], timeout: float) -> int:
    peak = 0

    def all_done() -> bool:
        nonlocal peak
        rows = [ws.store().task(i) for i in ids]
        peak = max(peak, sum(r["status"] == "running" for r in rows))
        return all(r["status"] not in ("queued", "running") for r in rows)

    wait_for(all_done, timeout, "every task to finish")
    return peak


@pytest.mark.slow
def test_training_and_other_tasks_share_the_worker_limit(workspace, tmp_path, monkeypatch):
    datasets = [_subset(tmp_path / f"d{i}", 3, offset=i) for i in range(3)]
    run_id = tasks.submit_training(workspace, datasets[0], TrainConfig(strategy="linear", epochs=5))
    train_task = workspace.store().tasks(kind="train")[0]["id"]
    audits = [tasks.submit(workspace, "audit", _audit(d)).id for d in datasets[1:]]
    peak = _peak_running(workspace, [train_task, *audits], 300)
    assert peak == 1  # TL_MAX_WORKERS=1: the training and the audits never ran at the same time
    assert workspace.store().get(run_id)["status"] == "done"
    assert [tasks.get(workspace, a).status for a in audits] == ["done", "done"]
    starts = sorted((tasks.get(workspace, i).started, tasks.get(workspace, i).finished)
                    for i in [train_task, *audits])
    assert all(a[1] <= b[0] + 0.05 for a, b in zip(starts, starts[1:]))  # one after the other

    monkeypatch.setenv("TL_MAX_WORKERS", "2")
    more = [tasks.submit(workspace, "audit", _audit(_subset(tmp_path / f"e{i}", 2, offset=i + 5))).id
            for i in range(3)]
    _peak_running(workspace, more, 300)
    # how many ran at once, from the store's clocks (a warm worker runs a small audit faster than a poll sees it)
    spans = [(tasks.get(workspace, i).started, tasks.get(workspace, i).finished) for i in more]
    assert max(sum(s <= start < f for s, f in spans) for start, _ in spans) <= 2
    print(f"\n[pool] TL_MAX_WORKERS=2: at most {peak} of 3 tasks ran at once")


def test_a_worker_keeps_the_heap_for_tasks_of_forward_passes_and_probe_trainings_only(workspace, tmp_path,
                                                                                       monkeypatch):
    """What a worker runs with freed activations kept in its heap (tl_core.models.devices.heap_reused; the effect is
    measured in test_linear_cache.py): the data check, the maps, exports, and a training that is a linear probe or
    auto's, as `tl-core train` decides; not a fine-tune, the lab, timing, a torchrun group or an unreadable run."""
    from tl_core.runs.kinds import KINDS

    def kept(row: dict) -> bool:
        return KINDS[row["kind"]].runs_forward_passes(workspace, row["params"])

    runs = {s: tasks.submit_training(workspace, EMOJI, TrainConfig(strategy=s), start_worker=False)
            for s in ("linear", "auto", "partial", "full")}
    rows = {s: next(t for t in workspace.store().tasks(kind="train") if t["run_id"] == r) for s, r in runs.items()}
    assert {s: kept(r) for s, r in rows.items()} == {"linear": True, "auto": True, "partial": False, "full": False}
    monkeypatch.setenv("TL_TRAIN_PROCS", "2")  # the group's ranks are processes of their own; this one waits
    assert not kept(rows["linear"])
    monkeypatch.delenv("TL_TRAIN_PROCS")
    assert not kept({"kind": "train", "params": {"run_id": "no-such-run"}})
    audit = tasks.submit(workspace, "audit", audit_params(str(tmp_path / "x"), "s"), start_worker=False)
    assert kept(workspace.store().task(audit.id))
    assert {k for k, spec in KINDS.items() if spec.forward_passes is True} >= {"audit", "embedding_map", "domain_gap",
                                                                                "export"}
    assert not any(KINDS[k].runs_forward_passes(workspace, {}) for k in ("lab", "time_backbone", "gradcam"))


def test_a_full_queue_is_refused_with_a_clear_message(workspace, tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "MAX_QUEUED", 3)
    for i in range(3):
        tasks.submit(workspace, "audit", audit_params(str(tmp_path / f"x{i}"), "s"), start_worker=False)
    with pytest.raises(tasks.QueueFullError, match=r"queue is full \(3 tasks waiting\)"):
        tasks.submit(workspace, "audit", audit_params(str(tmp_path / "one-more"), "s"), start_worker=False)
    with pytest.raises(tasks.QueueFullError):
        tasks.submit_training(workspace, EMOJI, TrainConfig(), start_worker=False)
    assert workspace.store().list() == []  # the refused run left no row behind
    # joining an identical queued request is not a new task: never refused
    assert tasks.submit(workspace, "audit", audit_params(str(tmp_path / "x0"), "s"), start_worker=False).shared
    # the position a user sees
    queued = workspace.store().tasks(status="queued")
    last = tasks.Task.from_row(queued[-1])
    assert tasks.queue_position(workspace, last) == {"ahead": 2, "groups": 0, "running": 0, "slots": 1}
    assert tasks.describe_wait(workspace, last).startswith("Waiting in the queue: number 3 in line")


@pytest.mark.processes
def test_each_queued_task_is_claimed_by_exactly_one_worker(tmp_path):
    from queue_support import claim_tasks_until_empty

    db = tmp_path / "runs.sqlite"
    store = RunStore(db)
    queued = [store.create_task("audit", f"k{n}", "compute", {"n": n})[0] for n in range(40)]
    with multiprocessing.get_context("spawn").Pool(5) as pool:
        got = pool.starmap(claim_tasks_until_empty, [(str(db),)] * 5)
    claimed = [t for g in got for t in g]
    assert sorted(claimed) == sorted(queued)  # none lost, none run twice
    assert all(t["status"] == "done" for t in store.tasks())


# ==================================================================================================
# cancel, dead workers, defunct processes
# ==================================================================================================
@pytest.mark.processes
def test_cancel_a_queued_task_at_once_and_a_running_one_within_seconds(workspace, tmp_path):
    data = _subset(tmp_path / "d", 6)
    lab = {"data": str(data), "signature": dataset_signature(data), "backbone": "efficientnet_lite0",
           "sizes": [2, 4, None], "epochs": 50, "image_size": 64, "arms": ["scratch"], "val_split": 0.3, "seed": 0}
    queued = tasks.submit(workspace, "lab", {**lab, "seed": 1}, start_worker=False)
    tasks.cancel(workspace, queued.id)
    t = tasks.get(workspace, queued.id)
    assert t.status == "cancelled" and t.error == "Cancelled before it started."

    running = tasks.submit(workspace, "lab", lab)
    wait_for(lambda: tasks.get(workspace, running.id).status == "running", 120, "the lab to start", 0.1)
    wait_for(lambda: tasks.get(workspace, running.id).progress.get("arm") == "scratch", 120, "training steps", 0.1)
    pid = workspace.store().task(running.id)["pid"]
    t0 = time.monotonic()
    tasks.cancel(workspace, running.id, wait=True)
    t = _done(workspace, running.id, 15)
    took = time.monotonic() - t0
    assert t.status == "cancelled" and took < 5.0 + 1.5
    assert t.error.startswith("Cancelled")  # at the next step, or the worker was stopped
    wait_for(lambda: not tasks.get(workspace, running.id).active, 5, "the status")
    print(f"\n[cancel] a running lab stopped in {took:.2f}s ({t.error}); worker {pid}")


@pytest.mark.processes
def test_a_dead_worker_is_recognised_by_pid_and_start_time(workspace):
    store = workspace.store()
    me, started = identity()
    assert started is not None and start_time(me) == started and alive(me, started)
    assert not alive(me, started + 1)  # the same pid, another process: not the worker that claimed it
    live, _ = store.create_task("audit", "a", "compute", {})
    reused, _ = store.create_task("audit", "b", "compute", {})
    gone, _ = store.create_task("audit", "c", "compute", {})
    assert store.claim_task(live, me, started)
    assert store.claim_task(reused, me, started + 1)  # a pid the system gave to another process since
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert store.claim_task(gone, proc.pid, None)
    run_id = store.create_run("data", {}, status="running")
    store.update(run_id, pid=me, pid_start=started + 1)
    dead = recover(workspace)
    assert sorted(dead) == sorted([reused, gone, run_id])
    assert store.task(live)["status"] == "running"
    assert store.task(reused)["status"] == store.task(gone)["status"] == "interrupted"
    assert "stopped unexpectedly" in store.task(gone)["error"]
    assert store.get(run_id)["status"] == "interrupted"
    assert recover(workspace) == []  # idempotent


@pytest.mark.processes
def test_workers_leave_no_defunct_process_behind(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("TL_COMPUTE_IDLE_S", "1")  # its one task's worker leaves a second after it, not five
    before = _children_zombies()
    t = tasks.submit(workspace, "audit", _audit(_subset(tmp_path / "d", 2)))
    assert _done(workspace, t.id).status == "done"
    pid = workspace.store().task(t.id)["pid"]
    assert pid != os.getpid()
    wait_for(lambda: not alive(pid), 30, "the worker to leave when the queue is empty", 0.2)
    assert _children_zombies() == before == []  # the worker was never this process's child


@pytest.mark.processes
def test_kill_workers_kills_only_that_workspaces_workers(tmp_path):
    """What every page and browser test's teardown relies on: the workers of one TL_HOME go, others stay."""
    sleeper = "import sys, time; time.sleep(60)"
    mine = subprocess.Popen([sys.executable, "-c", sleeper, "tl_core.runs.workers"],
                            env={**os.environ, "TL_HOME": str(tmp_path / "a")})
    other = subprocess.Popen([sys.executable, "-c", sleeper, "tl_core.runs.workers"],
                             env={**os.environ, "TL_HOME": str(tmp_path / "b")})
    try:
        assert kill_workers(tmp_path / "a") == 1
        assert mine.wait(10) == -9
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


# ==================================================================================================
# projects and the interactive lane
# ==================================================================================================
@pytest.mark.processes
def test_projects_keep_their_tasks_apart_and_share_the_workers(tmp_path):
    top = Workspace(tmp_path / "home")
    slug_a, slug_b = new_project_slug("Class 7B: birds"), new_project_slug("demo")
    assert slug_a.startswith("class-7b-birds-") and len(slug_a) == len("class-7b-birds-") + 8
    a, b = top.project(slug_a, create=True), top.project(slug_b, create=True)
    data = _subset(tmp_path / "d", 3)
    ta, tb = tasks.submit(a, "audit", _audit(data)), tasks.submit(b, "audit", _audit(data))
    assert ta.id != tb.id  # a project never sees another's tasks, even identical ones
    assert _done(a, ta.id).status == "done" and _done(b, tb.id).status == "done"
    assert [t["id"] for t in a.store().tasks()] == [ta.id] and [t["id"] for t in b.store().tasks()] == [tb.id]
    assert top.store().tasks() == []
    assert a.cache_dir == b.cache_dir == top.cache_dir  # content-keyed caches are shared
    assert (tmp_path / "home" / "workers").is_dir() and not (a.home / "workers").exists()
    assert top.project(slug_a).home == a.home and Workspace.at(a.home).root == top.home
    with pytest.raises(RunError, match="No project"):
        top.project("demo-00000000")
    with pytest.raises(RunError, match="not a valid project id"):
        top.project("../../etc")


@pytest.mark.slow
def test_the_interactive_lane_answers_from_a_warm_model(workspace, tmp_path):
    from tl_core.data.library import save_upload
    from tl_core.storage.files import RunFiles

    res = run_training(workspace, _subset(tmp_path / "d", 6), TrainConfig(strategy="linear"))
    run_dir = workspace.run_dir(res.run_id)
    stamp = list(RunFiles(run_dir).stamp())
    pictures = sorted((EMOJI / "vehicle").iterdir())[:2] + sorted((EMOJI / "food").iterdir())[10:11]
    times, pids, labels = [], [], []
    for pic in pictures:
        path = save_upload(workspace, pic.name, pic.read_bytes())
        t0 = time.monotonic()
        t = tasks.submit(workspace, "predict", {"run": str(run_dir), "stamp": stamp, "images": [str(path)],
                                               "names": [pic.name], "top_k": 2})
        t = _done(workspace, t.id, 120)
        times.append(time.monotonic() - t0)
        assert t.status == "done" and t.lane == "interactive", t.error
        pids.append(workspace.store().task(t.id)["pid"])
        row = tasks.result(workspace, t)["rows"][0]
        labels.append(row["label"])
        assert row["path"] == pic.name and len(row["top_k"]) == 2 and 0 < row["confidence"] <= 1
    assert len(set(pids)) == 1  # one warm worker answered them all
    assert labels[2] == "food"
    assert max(times[1:]) < times[0]  # the first paid for starting the worker and loading the model
    wait_for(lambda: not alive(pids[0]), 30, "the idle interactive worker to leave", 0.2)
    print(f"\n[interactive] first answer {times[0]:.2f}s (worker start + model load), then "
          f"{', '.join(f'{x:.2f}s' for x in times[1:])}")


def test_deleting_a_run_deletes_its_tasks_and_old_results_are_pruned(workspace, tmp_path):
    store = workspace.store()
    run_id = store.create_run("data", {}, status="done")
    run_dir = workspace.run_dir(run_id)
    run_dir.mkdir(parents=True)
    export, _ = store.create_task("export", "e", "compute", {"run": str(run_dir), "format": "bundle"})
    other, _ = store.create_task("audit", "a", "compute", {"data": "x"})
    for t in (export, other):
        store.finish_task(t, "done")
        tasks.task_dir(workspace, t).mkdir(parents=True)
    running = tasks.submit_training(workspace, EMOJI, TrainConfig(), start_worker=False)
    with pytest.raises(RunError, match="cancel it before deleting it"):
        tasks.delete_run(workspace, running)
    tasks.delete_run(workspace, run_id)
    assert not run_dir.exists() and not store.exists(run_id)
    assert [t["id"] for t in store.tasks(status="done")] == [other]  # the run's export went with it
    assert not tasks.task_dir(workspace, export).exists() and tasks.task_dir(workspace, other).exists()
    assert tasks.prune(workspace, keep_days=1) == 0  # a fresh result stays
    store.update_task(other, finished=time.time() - 2 * 86400)
    assert tasks.prune(workspace, keep_days=1) == 1
    assert store.tasks(status="done") == [] and not tasks.task_dir(workspace, other).exists()
    assert [t["status"] for t in store.tasks()] == ["queued"]  # a queued training is never pruned
