"""Uploads are under the per-project queue cap (``TL_QUEUE_PER_PROJECT``), counted in their own lane: a project
with 10 uploads waiting is refused an 11th with the message a training gets, keeps nothing of the refused one on
the server (the Data page keeps the file in its uploader and sends it again), and loses none of the 10."""

from __future__ import annotations

from pathlib import Path

import pytest
from page_harness import app, empty_home, goto, no_workers, sample_zip  # noqa: F401

from tl_core.config import TrainConfig
from tl_core.runs import datasets, tasks, workers

ROOT = Path(__file__).resolve().parent.parent
EMOJI = ROOT / "sample_data" / "emoji"
CAP_MESSAGE = (r"^This project has 10 tasks waiting already, the most one project may queue; try again when one has "
               r"started\.$")


def _incoming(ws) -> list[Path]:
    return sorted(ws.incoming_dir.iterdir()) if ws.incoming_dir.is_dir() else []


def test_an_eleventh_upload_is_refused_like_an_eleventh_training_and_nothing_queued_is_lost(workspace, no_workers):
    a = workspace.project("group-a-1a2b3c4d", create=True)
    b = workspace.project("group-b-5e6f7a8b", create=True)
    data = sample_zip()
    queued = [datasets.receive_zip(a, f"pets{i}.zip", data) for i in range(10)]
    assert all(t.status == "queued" and t.lane == "intake" for t in queued)
    with pytest.raises(tasks.QueueFullError, match=CAP_MESSAGE):
        datasets.receive_zip(a, "pets10.zip", data)
    with pytest.raises(tasks.QueueFullError, match=CAP_MESSAGE):
        datasets.receive_folder(a, [("pets/animal/a.png", b"x"), ("pets/flag/b.png", b"y")])
    # the ten waiting uploads are all there, byte for byte; the refused ones left no file and no task
    assert _incoming(a) == sorted(Path(t.params["upload"]) for t in queued)
    assert all(Path(t.params["upload"]).read_bytes() == data for t in queued)
    assert len(a.store().tasks(kind="intake")) == 10
    # the cap is per project and per lane: another group uploads, and the same group still trains
    assert datasets.receive_zip(b, "pets.zip", data).status == "queued"
    tasks.submit_training(a, str(EMOJI), TrainConfig(strategy="linear"), start_worker=False)
    # one upload started: room again
    assert a.store().claim_task(queued[0].id, *workers.identity())
    assert datasets.receive_zip(a, "pets10.zip", data).status == "queued"


def test_the_shared_workspace_is_capped_too(workspace, no_workers, monkeypatch):
    monkeypatch.setenv("TL_QUEUE_PER_PROJECT", "2")
    for i in range(2):
        datasets.receive_zip(workspace, f"pets{i}.zip", sample_zip())
    with pytest.raises(tasks.QueueFullError, match=r"^The shared workspace has 2 tasks waiting already"):
        datasets.receive_zip(workspace, "pets2.zip", sample_zip())
    assert len(_incoming(workspace)) == 2


def test_the_data_page_keeps_an_upload_the_project_cap_refused_and_sends_it_when_there_is_room(empty_home,
                                                                                               no_workers):
    ws = empty_home
    queued = [datasets.receive_zip(ws, f"pets{i}.zip", sample_zip()) for i in range(10)]
    at = goto(app(), "data")
    at.file_uploader(key="zip_upload").set_value(("mine.zip", sample_zip(), "application/zip")).run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "The shared workspace has 10 tasks waiting already, the most one project may queue; try again when one has "
        "started. Your file stays here and is sent again when you press the button."]
    assert len(ws.store().tasks(kind="intake")) == 10
    assert ws.store().claim_task(queued[0].id, *workers.identity())  # one started: room again
    [b for b in at.button if b.label == "Send it again"][0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    mine = [t for t in ws.store().tasks(kind="intake") if t["params"]["name"] == "mine.zip"]
    assert len(mine) == 1 and mine[0]["status"] == "queued" and at.query_params["intake"] == mine[0]["id"]
