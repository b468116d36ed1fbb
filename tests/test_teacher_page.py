"""Page tests of the Teacher page and the students' challenge section on Runs & export (AppTest, no browser;
tests/page_harness.py). The fast ones start no process; scoring a submission in a worker is marked."""

from __future__ import annotations

import shutil

import pytest

from conftest import make_class_folder
from page_harness import (  # noqa: F401  (fixtures are used by name)
    app,
    assert_clean,
    button,
    goto,
    has_button,
    home,
    no_workers,
    trained_home,
    until,
)
from tl_core.classroom import challenge
from tl_core.runs import tasks
from tl_core.storage.workspace import Workspace


def _project_with_run(ws: Workspace, run_id: str, slug: str) -> Workspace:
    """A project holding a copy of the shared workspace's finished run (row and files)."""
    p = ws.project(slug, create=True)
    row = ws.store().get(run_id)
    new = p.store().create_run(row["data"], row["config"], status="done")
    p.store().update(new, summary=row["summary"])
    shutil.copytree(ws.run_dir(run_id), p.run_dir(new))
    return p


def _unseen(root, spec: dict[str, int]):
    """Locked images the session's run has not learned from: sample images mirrored (other bytes, the same
    classes), so the scoring worker's leak check lets the run through."""
    from PIL import Image, ImageOps

    make_class_folder(root, spec)
    for f in root.rglob("*.png"):
        with Image.open(f) as im:
            ImageOps.mirror(im.convert("RGBA")).save(f)
    return root


def _table(at) -> dict:
    df = at.dataframe[0].value
    return {r["Project"]: r for r in df.to_dict("records")}


def test_teacher_sees_every_project_and_resets_one(home, no_workers):
    ws, run_id = home
    p = _project_with_run(ws, run_id, "ants-0001")
    tasks.submit(p, "report", {"run": "x", "stamp": 1}, start_worker=False)  # work queued: reset cancels it first
    at = app()
    goto(at, "teacher")
    assert_clean(at)
    rows = _table(at)
    assert set(rows) == {"(shared workspace)", "ants-0001"}
    assert rows["ants-0001"]["Runs"] == "1 of 1 finished" and rows["ants-0001"]["Queued"] == 1
    assert "95% CI" in rows["ants-0001"]["Best accuracy"] and " of 40)" in rows["ants-0001"]["Best accuracy"]
    # reset needs the confirmation first
    at.selectbox(key="teacher_project").set_value("ants-0001").run()
    assert button(at, "Reset the project").disabled
    at.checkbox(key="teacher_confirm").check().run()
    button(at, "Reset the project").click().run()
    assert_clean(at)
    assert any("Emptied ants-0001" in s.value for s in at.success)
    assert p.store().list() == [] and p.store().tasks() == [] and _table(at)["ants-0001"]["Runs"] == "—"
    assert _table(at)["ants-0001"]["Queued"] == 0
    assert len(ws.store().list()) == 1  # the shared workspace's run is untouched


def test_students_do_not_get_the_teacher_page(home, monkeypatch):
    # with passwords set the gate keeps the role a session was given (without any, everyone is the teacher)
    monkeypatch.setenv("TL_PASSWORD", "class-secret")
    monkeypatch.setenv("TL_TEACHER_PASSWORD", "teacher-secret")
    at = app()
    at.session_state["tl_role"] = "student"
    at.run()
    assert_clean(at)
    with pytest.raises(ValueError, match="Could not find a navigation page"):  # not in the student's navigation
        goto(at, "teacher")
    at.session_state["tl_role"] = "teacher"
    at.run()
    goto(at, "teacher")
    assert_clean(at)
    assert at.dataframe  # the teacher gets it


def test_challenge_leaderboard_on_both_pages_without_images(home, tmp_path):
    ws, run_id = home
    challenge.setup_challenge(ws, make_class_folder(tmp_path / "locked", {"animal": 3, "face": 3}), name="Emoji cup")
    at = app()
    goto(at, "teacher")
    assert_clean(at)
    assert any("Emoji cup" in m.value and "6 locked images" in m.value for m in at.markdown)
    assert any("No group has submitted" in c.value for c in at.caption)
    goto(at, "runs")
    assert_clean(at)
    assert has_button(at, "Submit this run to the class challenge")
    assert not at.get("imgs")  # no locked image on the students' page


@pytest.mark.processes
def test_a_submitted_run_is_scored_in_a_worker_and_ranked(home, tmp_path):
    ws, run_id = home
    challenge.setup_challenge(ws, _unseen(tmp_path / "locked", {"animal": 3, "face": 3, "flag": 3}))
    at = app({"run": run_id})
    goto(at, "runs")
    button(at, "Submit this run to the class challenge").click().run()
    until(at, lambda a: any("on the locked test set" in s.value for s in a.success), what="scoring")
    assert_clean(at)
    board = challenge.leaderboard(ws)
    assert [(r["project"], r["run"], r["count"]) for r in board["rows"]] == [("(shared workspace)", run_id, 9)]
    df = next(d.value for d in at.dataframe if "Group" in d.value.columns)  # the leaderboard
    assert list(df["Group"]) == ["(shared workspace)"] and "of 9)" in df["Accuracy"][0]
