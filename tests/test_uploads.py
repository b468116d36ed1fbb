"""Uploads as tasks (issue 26): the server only receives an uploaded zip or folder (written into the workspace's
``uploads/incoming/``) and queues an ``intake`` task; a worker unpacks, hashes and checks it, registers the dataset
with its first version and writes the first report. A refused upload fails the task with the engine's one sentence
and leaves nothing behind.

``tasks_in_process`` runs the queued ``intake`` tasks in the test's own process (the fast tier starts no
process); the page test marked ``processes`` waits for a real worker.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from page_harness import app, assert_clean, empty_home, goto, metric, progress_texts, sample_zip, until  # noqa: F401

from tl_core.data import intake, library, versions
from tl_core.errors import DatasetError
from tl_core.runs import datasets, tasks, workers
from tl_core.storage.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent
EMOJI = ROOT / "sample_data" / "emoji"


def _zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _images(cls: str, n: int, top: str = "pets") -> dict[str, bytes]:
    return {f"{top}/{cls}/{f.name}": f.read_bytes() for f in sorted((EMOJI / cls).iterdir())[:n]}


def _pets() -> bytes:
    return _zip({**_images("animal", 3), **_images("flag", 3), "pets/notes.txt": b"not an image"})


def _left_behind(ws: Workspace) -> list[str]:
    """Everything in the datasets and incoming folders (temporary folders included)."""
    return sorted(p.name for d in (ws.datasets_dir, ws.incoming_dir) if d.is_dir() for p in d.iterdir())


def run_queued_intake(ws: Workspace) -> list[str]:
    """Run every queued ``intake`` task of ``ws`` here, as a worker would; returns their final statuses."""
    out = []
    for t in ws.store().tasks(status="queued"):
        if t["kind"] == "intake" and ws.store().claim_task(t["id"], *workers.identity()):
            out.append(workers.run_task(ws, t["id"]))
    return out


@pytest.fixture
def tasks_in_process(monkeypatch):
    """Queued ``intake`` tasks run at once in this process (where a page test would start a worker process);
    other kinds start no worker. For page tests of uploads in the fast tier."""
    real = workers.ensure_workers

    def ensure(ws, lane="compute"):
        run_queued_intake(ws)
        return 0

    monkeypatch.setattr(workers, "ensure_workers", ensure)
    yield real


@pytest.fixture
def queued_only(monkeypatch):
    """Tasks stay queued: no worker starts."""
    monkeypatch.setattr(workers, "ensure_workers", lambda ws, lane="compute": 0)


# --------------------------------------------------------------------------------------------------
# the server side: bytes in, a task queued, nothing unpacked
# --------------------------------------------------------------------------------------------------
def test_receiving_a_zip_only_writes_it_and_queues_the_intake_task(workspace, queued_only, monkeypatch):
    def no_unpacking(*a, **k):
        raise AssertionError("the server unpacked the upload")

    monkeypatch.setattr(intake, "safe_extract_zip", no_unpacking)
    monkeypatch.setattr(library, "safe_extract_zip", no_unpacking)
    monkeypatch.setattr(intake, "load_image", no_unpacking)
    data = _pets()
    task = datasets.receive_zip(workspace, "pets.zip", data, labels_csv=b"path,label\n", val_split=0.3, seed=4)
    assert task.kind == "intake" and task.status == "queued" and task.lane == "intake"
    # nothing in the dataset list yet: the upload waits in the incoming folder, byte for byte
    assert sorted(p.name for p in workspace.datasets_dir.iterdir()) == []
    upload, labels = Path(task.params["upload"]), Path(task.params["labels"])
    assert upload.parent == workspace.incoming_dir and upload.read_bytes() == data
    assert labels.read_bytes() == b"path,label\n"
    assert task.params["name"] == "pets.zip" and task.params["val_split"] == 0.3 and task.params["seed"] == 4
    # a second upload of the same bytes is a second task (the token in the file name keys it)
    again = datasets.receive_zip(workspace, "pets.zip", data)
    assert again.id != task.id and again.params["upload"] != task.params["upload"]


def test_receiving_an_empty_upload_is_refused_at_once_and_keeps_nothing(workspace, queued_only):
    with pytest.raises(DatasetError, match="empty; upload a .zip"):
        datasets.receive_zip(workspace, "empty.zip", b"")
    with pytest.raises(DatasetError, match="folder is empty"):
        datasets.receive_folder(workspace, [])
    with pytest.raises(DatasetError, match="not a file inside the folder"):
        datasets.receive_folder(workspace, [("pets/../../etc/x.png", b"x")])
    assert workspace.store().tasks() == [] and _left_behind(workspace) == []


def test_a_full_queue_keeps_no_upload(workspace, queued_only, monkeypatch):
    def full(*a, **k):
        raise tasks.QueueFullError("The queue is full (64 tasks waiting); try again when some have finished.")

    monkeypatch.setattr(tasks, "submit", full)
    with pytest.raises(tasks.QueueFullError):
        datasets.receive_zip(workspace, "pets.zip", _pets(), labels_csv=b"a,b\n")
    assert _left_behind(workspace) == []


def test_an_upload_waits_neither_behind_trainings_nor_in_front_of_predictions(workspace, monkeypatch):
    """The intake has a lane of its own: queued trainings (every compute slot busy) are not ahead of it, and the
    worker it starts is an intake worker, so Try it's predictions never queue behind an upload either."""
    from tl_core.config import TrainConfig

    spawned: list[list[str]] = []
    monkeypatch.setattr(workers, "spawn_detached", lambda cmd, *a, **k: spawned.append(cmd))
    monkeypatch.setattr(workers, "_slot_busy", lambda lock: lock.name.startswith("compute-"))  # trainings run
    for seed in range(3):  # and more wait
        tasks.submit_training(workspace, str(EMOJI), TrainConfig(strategy="linear", seed=seed), start_worker=False)
    task = datasets.receive_zip(workspace, "pets.zip", _pets())
    assert tasks.queue_position(workspace, task)["ahead"] == 0
    [cmd] = spawned
    assert cmd[cmd.index("--lane") + 1] == "intake"
    assert workers.lane_slots("intake") == 1 and workers.WORKER_NICE["intake"] < workers.WORKER_NICE["compute"]


def test_uploads_no_task_will_read_are_removed_when_the_next_arrives(workspace, queued_only):
    import os
    import time

    waiting = datasets.receive_zip(workspace, "pets.zip", _pets())
    cancelled = datasets.receive_zip(workspace, "pets.zip", _pets())
    tasks.cancel(workspace, cancelled.id)  # a queued task is cancelled without running: its upload stays, for now
    fresh = workspace.incoming_dir / "fresh.zip"  # another session's, written but not yet queued
    fresh.write_bytes(b"y")
    old = time.time() - datasets.INCOMING_GRACE_S - 60
    for f in workspace.incoming_dir.iterdir():
        if f != fresh:
            os.utime(f, (old, old))
    datasets.receive_zip(workspace, "pets.zip", _pets())
    assert Path(waiting.params["upload"]).is_file() and fresh.is_file()
    assert not Path(cancelled.params["upload"]).exists()
    assert len(list(workspace.incoming_dir.iterdir())) == 3


# --------------------------------------------------------------------------------------------------
# the worker side: the intake task
# --------------------------------------------------------------------------------------------------
def test_the_intake_task_registers_the_dataset_its_version_and_report(workspace, queued_only):
    task = datasets.receive_zip(workspace, "My Pets!.zip", _pets())
    assert run_queued_intake(workspace) == ["done"]
    t = tasks.get(workspace, task.id)
    res = tasks.result(workspace, t)
    assert res["dataset"] == "My_Pets" and Path(res["path"]) == workspace.datasets_dir / "My_Pets"
    assert res["classes"] == 2 and res["images"] == 6 and res["skipped"] == 1
    assert versions.is_managed(workspace, "My_Pets")
    assert versions.history(workspace, "My_Pets")[0]["change"] == "uploaded My Pets!.zip"
    # progress went through its steps, and the upload's bytes are gone from the incoming folder
    assert "step 4 of 4" in t.progress["message"]
    assert list(workspace.incoming_dir.iterdir()) == []
    assert sorted(p.name for p in workspace.datasets_dir.iterdir()) == ["My_Pets"]


def test_the_intake_task_takes_a_folder_and_a_separate_labels_csv(workspace, queued_only):
    folder_task = datasets.receive_folder(workspace, list({**_images("animal", 3, "shots"),
                                                           **_images("flag", 3, "shots")}.items()))
    assert folder_task.params["name"] == "shots"
    files = [(f"flat/{name.split('/')[1]}_{name.rsplit('/', 1)[1]}", data)
             for name, data in {**_images("animal", 3), **_images("flag", 3)}.items()]
    labels = "path,label\n" + "\n".join(f"{n.split('/', 1)[1]},{n.split('/')[1].split('_')[0]}" for n, _ in files)
    flat = _zip(dict(files))
    zip_task = datasets.receive_zip(workspace, "flat.zip", flat, labels_csv=labels.encode())
    assert run_queued_intake(workspace) == ["done", "done"]
    assert tasks.result(workspace, folder_task.id)["dataset"] == "shots"
    assert tasks.result(workspace, zip_task.id)["classes"] == 2
    assert sorted(p.name for p in (workspace.datasets_dir / "flat").iterdir() if not p.name.startswith(".")) == [
        "animal", "flag"]
    assert list(workspace.incoming_dir.iterdir()) == []


@pytest.mark.parametrize("filename, data, says", [
    ("photo.zip", b"this is not a zip", "photo.zip is not a zip archive; upload a .zip with one folder per class."),
    ("evil.zip", _zip({"../escape.png": (EMOJI / "face" / sorted(p.name for p in (EMOJI / "face").iterdir())[0])
                       .read_bytes()}), "evil.zip contains the unsafe path '../escape.png'"),
    ("cats.zip", _zip(_images("animal", 4)), "Only one class ('animal') found in cats.zip"),
    ("notes.zip", _zip({"pets/readme.txt": b"no images here"}), "notes.zip holds no images"),
    ("bomb.zip", _zip({"pets/a/x.png": bytes(20_000_000)}, zipfile.ZIP_DEFLATED), "bomb.zip expands"),
])
def test_a_refused_upload_fails_its_task_with_one_sentence_and_leaves_nothing(workspace, queued_only, filename, data,
                                                                             says):
    task = datasets.receive_zip(workspace, filename, data)
    assert run_queued_intake(workspace) == ["failed"]
    t = tasks.get(workspace, task.id)
    assert t.error.startswith(says), t.error
    if filename == "bomb.zip":
        assert t.error.endswith("which looks like a zip bomb; refused."), t.error
    assert "\n" not in t.error and ".unpack-" not in t.error and "incoming" not in t.error
    assert _left_behind(workspace) == [] and not (workspace.home / "escape.png").exists()
    assert workspace.store().tasks(status="queued") == []


def test_an_intake_cancelled_while_it_runs_leaves_nothing(workspace, queued_only):
    task = datasets.receive_zip(workspace, "pets.zip", _pets())
    store = workspace.store()
    assert store.claim_task(task.id, *workers.identity())
    store.request_task_cancel(task.id)  # the worker sees the flag before the first entry
    assert workers.run_task(workspace, task.id) == "cancelled"
    assert "Cancelled while unpacking pets.zip" in tasks.get(workspace, task.id).error
    assert _left_behind(workspace) == []


def test_the_intake_task_refuses_a_file_outside_the_incoming_folder(workspace, queued_only, tmp_path):
    outside = tmp_path / "mine.zip"
    outside.write_bytes(_pets())
    task = tasks.submit(workspace, "intake", {"upload": str(outside), "labels": None, "name": "mine.zip"})
    assert run_queued_intake(workspace) == ["failed"]
    assert "incoming folder" in tasks.get(workspace, task.id).error
    assert outside.is_file()  # never removed: it was not the server's to remove


# --------------------------------------------------------------------------------------------------
# the Data page
# --------------------------------------------------------------------------------------------------
def test_the_data_page_returns_before_the_upload_is_unpacked(empty_home, queued_only):
    ws = empty_home
    at = goto(app(), "data")
    at.file_uploader(key="zip_upload").set_value(("pets.zip", sample_zip(), "application/zip")).run()
    assert_clean(at)
    # the page drew the queued task; nothing is unpacked: the bytes wait in the incoming folder
    [task] = ws.store().tasks(kind="intake")
    assert task["status"] == "queued" and at.query_params["intake"] == task["id"]
    assert any("Unpacking and checking pets.zip" in t for t in progress_texts(at)), progress_texts(at)
    assert not [p for p in ws.datasets_dir.iterdir()] and len(list(ws.incoming_dir.iterdir())) == 1
    assert "dataset" not in at.session_state
    # the next rerun does not send the same upload again
    at.run()
    assert len(ws.store().tasks(kind="intake")) == 1


@pytest.mark.processes
def test_the_data_page_shows_the_dataset_when_the_worker_has_checked_the_upload(empty_home):
    ws = empty_home
    at = goto(app(), "data")
    at.file_uploader(key="zip_upload").set_value(("pets.zip", sample_zip({"pets/notes.txt": b"x"}),
                                                  "application/zip")).run()
    assert not at.exception
    until(at, lambda a: a.session_state["dataset"] == "workspace/pets" if "dataset" in a.session_state else False,
          what="the intake task")
    assert_clean(at)
    assert any("Unpacked pets.zip as dataset 'pets'" in s.value for s in at.success)
    assert metric(at, "Classes") == "2" and metric(at, "Images") == "6" and metric(at, "Skipped files") == "1"
    assert "intake" not in at.query_params and list(ws.incoming_dir.iterdir()) == []
    [task] = ws.store().tasks(kind="intake")
    assert task["status"] == "done"


def test_a_refused_upload_stays_in_view_while_its_file_is_in_the_uploader(empty_home, tasks_in_process):
    ws = empty_home
    at = goto(app(), "data")
    at.file_uploader(key="zip_upload").set_value(("photo.zip", b"this is not a zip", "application/zip")).run()
    says = "photo.zip is not a zip archive; upload a .zip with one folder per class. Nothing was saved."
    assert not at.exception and [e.value for e in at.error] == [says]
    assert _left_behind(ws) == []
    at.run()  # a rerun neither sends it again nor loses the refusal
    assert [e.value for e in at.error] == [says] and len(ws.store().tasks(kind="intake")) == 1
    at.file_uploader(key="zip_upload").set_value(None).run()  # the user removes the file
    at.run()
    assert not at.error and "intake" not in at.query_params


def test_an_upload_refused_by_a_full_queue_is_sent_again_when_asked(empty_home, queued_only, monkeypatch):
    """A full queue refuses the upload before any task: the file stays in the uploader, and "Send it again" (or the
    page's next run) sends it once the queue has room; an upload that went through is never sent twice."""
    ws = empty_home
    real = tasks.submit
    full = [True]

    def submit(*a, **k):
        if full[0]:
            raise tasks.QueueFullError("The queue is full (50 tasks waiting); try again when some have finished.")
        return real(*a, **k)

    monkeypatch.setattr(tasks, "submit", submit)
    at = goto(app(), "data")
    at.file_uploader(key="zip_upload").set_value(("pets.zip", sample_zip(), "application/zip")).run()
    assert not at.exception
    assert [e.value for e in at.error] == ["The queue is full (50 tasks waiting); try again when some have finished. "
                                           "Your file stays here and is sent again when you press the button."]
    assert ws.store().tasks(kind="intake") == [] and _left_behind(ws) == []
    full[0] = False  # a task finished: room in the queue
    [b for b in at.button if b.label == "Send it again"][0].click().run()
    assert_clean(at)
    [task] = ws.store().tasks(kind="intake")
    assert task["status"] == "queued" and at.query_params["intake"] == task["id"]
    at.run()
    assert len(ws.store().tasks(kind="intake")) == 1
