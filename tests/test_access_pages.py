"""The app's gate and ownership on the pages (issue 27), with AppTest (no browser, no process): with a class password a
fresh session gets only the password form; a wrong password is one sentence; the right one opens the app as a
student, who cannot delete the shared workspace's dataset, until the teacher signs in; a class code joins a project.
Without passwords nothing changes. The same in a real browser: tests/test_browser_access.py."""

from __future__ import annotations

import shutil

from page_harness import EMOJI, app, assert_clean, button, goto  # noqa: F401
from page_harness import empty_home  # noqa: F401  (a fixture, used by name)
from tl_core.access import class_code


def _sign_in(at, password: str):
    at.text_input(key="_access_password").set_value(password)
    return button(at, "Open TL Studio").click().run()


def test_without_passwords_nothing_changes(empty_home, monkeypatch):
    monkeypatch.delenv("TL_PASSWORD", raising=False)
    monkeypatch.delenv("TL_TEACHER_PASSWORD", raising=False)
    at = app()
    assert_clean(at)
    assert at.session_state["tl_role"] == "teacher"
    assert not [t for t in at.text_input if t.key == "_access_password"]
    assert any("Shared workspace" in m.value for m in at.sidebar.markdown)


def test_a_class_password_gates_the_app_and_students_own_only_their_project(empty_home, monkeypatch):
    monkeypatch.setenv("TL_PASSWORD", "tulip-42")
    monkeypatch.setenv("TL_TEACHER_PASSWORD", "oak-7")
    ws = empty_home
    shutil.copytree(EMOJI, ws.datasets_dir / "pets")
    at = app({"data": "workspace/pets"})
    # a fresh session: only the password form
    assert [t.label for t in at.text_input] == ["Class password", "Class code of your group's project (optional)"]
    assert [b.label for b in at.button] == ["Open TL Studio"] and not at.sidebar.markdown
    assert "tl_role" not in at.session_state
    _sign_in(at, "tulip-4")
    assert [e.value for e in at.error] == ["That password is not right; ask your teacher for it."]
    assert "tl_role" not in at.session_state and [b.label for b in at.button] == ["Open TL Studio"]
    _sign_in(at, "tulip-42")
    assert_clean(at)
    assert at.session_state["tl_role"] == "student"
    # the student, in the shared workspace, cannot delete its dataset: the engine refuses with one sentence
    goto(at, "data")
    at.checkbox(key="confirm_delete_dataset").check().run()
    at.button(key="delete_dataset").click().run()
    assert [e.value for e in at.error] == ["You cannot delete the dataset 'pets': it belongs to the shared workspace, "
                                           "not to your project; only the teacher can."]
    assert (ws.datasets_dir / "pets").is_dir()
    # the teacher signs in from the sidebar and may
    at.text_input(key="_access_teacher").set_value("oak-7")
    button(at, "Sign in").click().run()
    assert at.session_state["tl_role"] == "teacher"
    at.checkbox(key="confirm_delete_dataset").check().run()
    at.button(key="delete_dataset").click().run()
    assert_clean(at)
    assert not (ws.datasets_dir / "pets").exists()


def test_the_teacher_password_opens_the_gate_as_teacher_and_a_class_code_joins_a_project(empty_home, monkeypatch):
    monkeypatch.setenv("TL_PASSWORD", "tulip-42")
    monkeypatch.setenv("TL_TEACHER_PASSWORD", "oak-7")
    slug = empty_home.project("birds-1a2b3c4d", create=True).name
    at = app()
    at.text_input(key="_access_code").set_value(class_code(slug).lower())
    _sign_in(at, "oak-7")
    assert_clean(at)
    assert at.session_state["tl_role"] == "teacher" and at.session_state["project"] == slug
    assert any(f"Class code: **{class_code(slug)}**" in c.value for c in at.sidebar.caption)
    # a wrong code in the sidebar is one sentence; the session stays where it was
    at.text_input(key="_access_join").set_value("ZZZZZZ")
    button(at, "Join").click().run()
    assert [e.value for e in at.error] == ["No project has the class code ZZZZZZ; check it with your group."]
    assert at.session_state["project"] == slug


def test_only_a_teacher_password_makes_everyone_else_a_student(empty_home, monkeypatch):
    monkeypatch.delenv("TL_PASSWORD", raising=False)
    monkeypatch.setenv("TL_TEACHER_PASSWORD", "oak-7")
    at = app()
    assert_clean(at)
    assert at.session_state["tl_role"] == "student"
    assert any(b.label == "Sign in" for b in at.button)
