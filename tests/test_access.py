"""A class on one server (issue 27): the passwords' compare and the throttle on wrong guesses, the ownership rules
the engine enforces (a student modifies only their own project's things, the teacher all), the class code, and
fair turns in the queue (projects take turns; a cap per project). In process: the store and the claim function,
no worker is started."""

from __future__ import annotations

import shutil

import pytest

from conftest import EMOJI
from tl_core.access import (STUDENT, TEACHER, AccessError, Actor, Throttle, check_password, class_code, may_modify,
                            passwords, project_for_code, remember_token, role_for_token)
from tl_core.config import TrainConfig
from tl_core.data.library import workspace_datasets
from tl_core.runs.datasets import delete_dataset, rename_dataset
from tl_core.runs import tasks
from tl_core.runs.workers import _claim, queue_order
from tl_core.settings import describe


def test_passwords_compare_exactly_and_unset_ones_never_match(monkeypatch):
    assert check_password("tulip-42", "tulip-42") and check_password(" tulip-42 ", "tulip-42")
    assert not check_password("tulip-4", "tulip-42") and not check_password("Tulip-42", "tulip-42")
    assert not check_password("", "") and not check_password(None, "")  # no password set: nothing opens
    monkeypatch.setenv("TL_PASSWORD", "class-pw")
    monkeypatch.delenv("TL_TEACHER_PASSWORD", raising=False)
    assert passwords(None, "from-secrets") == ("class-pw", "from-secrets")  # the environment wins, then the file
    monkeypatch.setenv("TL_TEACHER_PASSWORD", "teach")
    shown = {r["name"]: r["value"] for r in describe()}
    assert shown["TL_PASSWORD"] == "(set)" and shown["TL_TEACHER_PASSWORD"] == "(set)"  # never the secret itself


def test_a_remembered_token_grants_the_role_of_its_password_only():
    student, teacher = remember_token(STUDENT, "tulip-42"), remember_token(TEACHER, "oak-7")
    assert role_for_token(student, "tulip-42", "oak-7") == STUDENT
    assert role_for_token(teacher, "tulip-42", "oak-7") == TEACHER
    assert role_for_token(student, "tulip-43", "oak-7") is None  # the password changed: the token is worthless
    assert role_for_token("teacher." + student.split(".")[1], "tulip-42", "oak-7") is None  # no promoting oneself
    assert role_for_token(None, "tulip-42", "oak-7") is None and "tulip" not in student


def test_wrong_guesses_are_slowed_down_more_and_more():
    now = [100.0]
    t = Throttle(free=3, base_s=1.0, max_s=8.0, clock=lambda: now[0])
    assert [t.failed() for _ in range(3)] == [0.0, 0.0, 0.0] and t.refusal() is None
    assert t.failed() == 1.0 and "wait 1 s" in t.refusal()
    now[0] += 1.0
    assert t.refusal() is None
    assert [t.failed() for _ in range(4)] == [2.0, 4.0, 8.0, 8.0]  # doubles, up to the cap
    t.succeeded()
    assert t.refusal() is None and t.failed() == 0.0


def _upload(ws, name: str) -> None:
    shutil.copytree(EMOJI, ws.datasets_dir / name)


def _names(ws) -> list[str]:
    return [d["name"] for d in workspace_datasets(ws)]


def test_a_student_modifies_only_their_own_project_and_the_teacher_all(workspace):
    a, b = workspace.project("group-a-1a2b3c4d", create=True), workspace.project("group-b-5e6f7a8b", create=True)
    for ws in (workspace, a, b):
        _upload(ws, "shapes")
    student_a = Actor(STUDENT, project=a.name, session="s-a")
    with pytest.raises(AccessError, match=r"^You cannot delete the dataset 'shapes': it belongs to project "
                                          r"'group-b-5e6f7a8b', not to your project; only the teacher can\.$"):
        delete_dataset(b, "shapes", actor=student_a)
    with pytest.raises(AccessError, match="the shared workspace"):
        rename_dataset(workspace, "shapes", "mine", actor=student_a)
    assert "shapes" in _names(b) and "shapes" in _names(workspace)  # nothing changed
    rename_dataset(a, "shapes", "ours", actor=student_a)  # their own project: allowed
    assert _names(a) == ["ours"]
    delete_dataset(b, "shapes", actor=Actor(TEACHER))  # the teacher may
    assert _names(b) == []

    # runs: a student cancels their own run in the shared workspace, never another's
    mine = tasks.submit_training(workspace, EMOJI, TrainConfig(), owner="s-a", start_worker=False)
    theirs = tasks.submit_training(workspace, EMOJI, TrainConfig(), owner="s-other", start_worker=False)
    with pytest.raises(AccessError, match=f"cancel run {theirs}"):
        tasks.cancel_run(workspace, theirs, actor=student_a)
    assert workspace.store().get(theirs)["status"] == "queued"
    tasks.cancel_run(workspace, mine, actor=student_a)
    assert workspace.store().get(mine)["status"] == "cancelled"
    with pytest.raises(AccessError):
        tasks.delete_run(workspace, mine, actor=Actor(STUDENT, project=None, session="s-other"))
    tasks.delete_run(workspace, mine, actor=student_a)
    assert not workspace.store().exists(mine)
    tasks.cancel_run(workspace, theirs, actor=Actor(TEACHER))
    assert may_modify(None, b) and not may_modify(Actor(STUDENT), workspace, owner=None)


def test_class_codes_find_their_project(workspace):
    a = workspace.project("birds-1a2b3c4d", create=True)
    workspace.project("cats-99aa77bb", create=True)
    assert class_code(a.name) == "2B3C4D"
    assert project_for_code(workspace, " 2b3c4d ") == a.name
    with pytest.raises(AccessError, match="No project has the class code ZZZZZZ"):
        project_for_code(workspace, "zzzzzz")
    with pytest.raises(AccessError, match="6 characters"):
        project_for_code(workspace, "2b3")


def _finish_next(ws) -> str:
    """What a worker does, in process: claim the next task and mark it done; returns the run it trained."""
    w, task_id = _claim(ws, "compute")
    w.store().finish_task(task_id, "done")
    return w.store().task(task_id)["run_id"]


def test_projects_take_turns_b_starts_before_a_third(workspace):
    """Issue 27: project A queues 10 trainings, project B then queues 1: B's run starts before A's third."""
    a, b = workspace.project("group-a-1a2b3c4d", create=True), workspace.project("group-b-5e6f7a8b", create=True)
    a_runs = [tasks.submit_training(a, EMOJI, TrainConfig(), owner="sa", start_worker=False) for _ in range(10)]
    (b_run,) = [tasks.submit_training(b, EMOJI, TrainConfig(), owner="sb", start_worker=False)]
    # every user's place is the place the workers give them, and says why
    b_task = tasks.Task.from_row(b.store().tasks(status="queued")[0])
    assert b_task.run_id == b_run
    pos = tasks.queue_position(b, b_task)
    assert (pos["ahead"], pos["groups"]) == (1, 1)
    assert "1 other group ahead of you takes turns with yours" in tasks.describe_wait(b, b_task)
    predicted = [row["run_id"] for _, row in queue_order(workspace, "compute")]
    started = [_finish_next(workspace) for _ in range(11)]
    assert started == predicted
    assert started.index(b_run) < started.index(a_runs[2])
    assert started[:3] == [a_runs[0], b_run, a_runs[1]] and started[3:] == a_runs[2:]  # A's own order is kept


def test_a_project_that_has_served_waits_for_one_that_has_not(workspace):
    a, b = workspace.project("group-a-1a2b3c4d", create=True), workspace.project("group-b-5e6f7a8b", create=True)
    first = tasks.submit_training(a, EMOJI, TrainConfig(), start_worker=False)
    assert _finish_next(workspace) == first
    later_a = [tasks.submit_training(a, EMOJI, TrainConfig(), start_worker=False) for _ in range(2)]
    b_run = tasks.submit_training(b, EMOJI, TrainConfig(), start_worker=False)  # asked last, but A just had its turn
    assert [_finish_next(workspace) for _ in range(3)] == [b_run, *later_a]


def test_one_project_cannot_fill_the_queue_alone(workspace, monkeypatch):
    monkeypatch.setenv("TL_QUEUE_PER_PROJECT", "3")
    a, b = workspace.project("group-a-1a2b3c4d", create=True), workspace.project("group-b-5e6f7a8b", create=True)
    for _ in range(3):
        tasks.submit_training(a, EMOJI, TrainConfig(), start_worker=False)
    with pytest.raises(tasks.QueueFullError, match=r"^This project has 3 tasks waiting already, the most one "
                                                   r"project may queue; try again when one has started\.$"):
        tasks.submit_training(a, EMOJI, TrainConfig(), start_worker=False)
    assert len(a.store().list()) == 3  # the refused run left no row
    tasks.submit_training(b, EMOJI, TrainConfig(), start_worker=False)  # another group still gets in
    _finish_next(workspace)
    tasks.submit_training(a, EMOJI, TrainConfig(), start_worker=False)  # one started: room again
