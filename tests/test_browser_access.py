"""A class on one server, in a real browser (issue 27): one server with a class and a teacher password. A fresh
session sees only the password form; a wrong password is refused with one sentence; the right one opens the app.
A student cannot delete the shared workspace's dataset (it belongs to no group of theirs); the teacher can.
(The same rules for another project's things are checked in process: tests/test_access.py.)"""

from __future__ import annotations

import shutil

import pytest

from test_browser import CHROMIUM, EMOJI, Server, settle, shot, tick
from test_browser import browser  # noqa: F401  (a fixture, used by name)
from tl_core.storage.processes import kill_workers

pytestmark = pytest.mark.browser

CLASS_PW, TEACHER_PW = "tulip-42", "oak-7"


@pytest.fixture(scope="module")
def class_server(tmp_path_factory):
    """A server with both passwords set and an uploaded dataset 'pets' in its shared workspace."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package to run the browser test")
    pytest.importorskip("playwright.sync_api")
    home = tmp_path_factory.mktemp("class_home")
    shutil.copytree(EMOJI, home / "datasets" / "pets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TL_PASSWORD", CLASS_PW)
        mp.setenv("TL_TEACHER_PASSWORD", TEACHER_PW)
        srv = Server(home)
        srv.start()
    yield srv
    srv.stop()
    srv.log.close()
    kill_workers(srv.home)


def _open(browser, url: str):  # noqa: F811
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(url)
    page.get_by_role("textbox", name="Class password").wait_for()
    return page


def _sign_in(page, password: str) -> None:
    page.get_by_role("textbox", name="Class password").fill(password)
    page.get_by_role("button", name="Open TL Studio").click()
    settle(page)


def _delete_pets(page) -> None:
    from playwright.sync_api import expect

    page.get_by_text("Manage 'pets': rename or delete").click()
    tick(page, "Yes, delete 'pets' and its images from this server")
    delete = page.get_by_role("button", name="Delete dataset")
    expect(delete).to_be_enabled()
    delete.click()


def test_the_class_password_gate_and_who_may_delete(class_server, browser):  # noqa: F811
    from playwright.sync_api import expect

    base, pets = class_server.base, class_server.home / "datasets" / "pets"
    page = _open(browser, f"{base}/data?data=workspace%2Fpets")
    # only the password form: no navigation, no sidebar, no page
    assert page.get_by_test_id("stSidebarNav").count() == 0 and page.get_by_text("Current selection").count() == 0
    _sign_in(page, "tulip")
    alert = page.get_by_test_id("stAlert")
    expect(alert).to_have_text("That password is not right; ask your teacher for it.")
    shot(page, "access-01-wrong-password")
    assert page.get_by_test_id("stSidebarNav").count() == 0
    _sign_in(page, CLASS_PW)
    page.get_by_role("heading", name="Report: pets").wait_for()  # the app, on the page the link named
    assert page.get_by_test_id("stSidebarNav").count() == 1
    settle(page)
    page.reload()  # a refresh is a new session: the browser remembers the password (a cookie)
    page.get_by_role("heading", name="Report: pets").wait_for()
    assert page.get_by_role("textbox", name="Class password").count() == 0
    # the student may not delete the shared workspace's dataset
    _delete_pets(page)
    expect(page.get_by_text("You cannot delete the dataset 'pets': it belongs to the shared workspace, not to your "
                            "project; only the teacher can.")).to_be_visible()
    assert pets.is_dir()
    shot(page, "access-02-student-refused")
    # signing out forgets it: the next visit asks again
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("textbox", name="Class password").wait_for()
    # the frame that deletes the cookie has run (the reload must not bring it along)
    page.wait_for_function("() => !document.cookie.split('; ').some(c => c.startsWith('tl_access='))")
    page.reload()
    page.get_by_role("textbox", name="Class password").wait_for()
    page.close()
    # the teacher (their password in the same form) may
    page = _open(browser, f"{base}/data?data=workspace%2Fpets")
    _sign_in(page, TEACHER_PW)
    page.get_by_role("heading", name="Report: pets").wait_for()
    _delete_pets(page)
    expect(page.get_by_text("Deleted dataset 'pets' and its images.")).to_be_visible()
    assert not pets.exists()
    page.close()
