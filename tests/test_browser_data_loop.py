"""The data loop in a real browser (Chromium with its fake camera, driven by Playwright): take 3 pictures of each
of 2 classes on the Data page, add a duplicate picture, train a linear probe on them, exclude the duplicate from
the data check (one new version), restore the first version, and see the version on Runs & export. Screenshots
go to ``test-artifacts/screenshots/`` (``10-*``)."""

from __future__ import annotations

import re
import shutil

import pytest

from test_browser import (  # noqa: F401  (the server fixture is used by name)
    CHROMIUM,
    CHROMIUM_ARGS,
    EMOJI,
    TRAIN_TIMEOUT_MS,
    metric_value,
    nav,
    server,
    settle,
    shot,
)

pytestmark = pytest.mark.browser

FAKE_CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


@pytest.mark.skip(reason="flaky: Chromium's fake-camera 'Take Photo' click sometimes never registers (the per-class "
                         "counter waited 180 s in 1 of 3 quiet full runs); the capture flow is covered by "
                         "tests/test_data_loop_pages.py until this is made reliable")
def test_capture_train_fix_and_restore_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    base, home = server.base, server.home
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + FAKE_CAMERA)
        ctx = b.new_context(viewport={"width": 1400, "height": 950}, permissions=["camera"])
        page = ctx.new_page()
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        page.goto(base)
        page.get_by_text("Four steps").wait_for()
        nav(page, "Data")

        def camera_tab():
            tab = page.get_by_role("tab", name="Take pictures")
            if tab.get_attribute("aria-selected") != "true":
                tab.click()
            return page.get_by_role("tabpanel", name="Take pictures")

        panel = camera_tab()
        name = panel.get_by_role("textbox", name="Dataset name")
        name.fill("webcam")
        name.press("Enter")
        settle(page)
        for cls in ("thumbs_up", "wave"):
            box = camera_tab().get_by_role("textbox", name="Class name")
            box.fill(cls)
            box.press("Enter")
            settle(page)
            for n in range(3):
                # the camera is live (its video plays) before the click
                page.wait_for_function("() => [...document.querySelectorAll('video')].some(v => v.readyState >= 2)")
                camera_tab().get_by_role("button", name="Take Photo").click()
                page.wait_for_function(
                    "([label, want]) => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some(m => "
                    "m.querySelector('[data-testid=\"stMetricLabel\"]')?.innerText.trim() === label && "
                    "m.querySelector('[data-testid=\"stMetricValue\"]')?.innerText.trim() === want)",
                    arg=[cls, str(n + 1)], timeout=180_000)
                settle(page)  # the page has rerun with a new camera for the next picture
            if cls == "thumbs_up":
                shot(page, "10a-capture")
        folder = home / "datasets" / "webcam"
        assert sorted(d.name for d in folder.iterdir() if not d.name.startswith(".")) == ["thumbs_up", "wave"]
        assert [len(list((folder / c).iterdir())) for c in ("thumbs_up", "wave")] == [3, 3]
        page.get_by_role("heading", name="Report: webcam").wait_for()
        assert metric_value(page, "Images") == "6"

        # one picture added twice (class by class): an exact duplicate for the data check to find
        dup = tmp_path / "dup"
        dup.mkdir()
        src = sorted((EMOJI / "face").iterdir())[0]
        for n in (1, 2):
            shutil.copy(src, dup / f"again_{n}.png")
        page.get_by_role("tab", name="Add images class by class").click()
        panel = page.get_by_role("tabpanel", name="Add images class by class")
        for label, value in (("Dataset name", "webcam"), ("Class name", "wave")):
            box = panel.get_by_role("textbox", name=label)
            box.fill(value)
            box.press("Enter")
            settle(page)
        panel.locator("input[type=file]").set_input_files([str(dup / "again_1.png"), str(dup / "again_2.png")])
        settle(page)
        panel.get_by_role("button", name="Add to dataset").click()
        page.get_by_text("Added 2 image(s) to class 'wave' of 'webcam'").wait_for()

        # train a linear probe on them
        nav(page, "Train")
        page.get_by_role("button", name="Start training").click()
        page.get_by_text("Status: done").wait_for(timeout=TRAIN_TIMEOUT_MS)
        run_version = (home / "datasets" / "webcam" / ".tl" / "history.jsonl").read_text().splitlines()
        assert len(run_version) == 1  # the training recorded the first version

        # the data check finds the duplicate; one click keeps one of it: a new version, said so
        nav(page, "Data")
        page.get_by_role("heading", name="Report: webcam").wait_for()
        assert metric_value(page, "Images") == "8"
        page.get_by_role("button", name="Check the data").click()
        keep = page.get_by_role("button", name=re.compile(r"^Keep one of each group"))
        keep.wait_for(timeout=TRAIN_TIMEOUT_MS)
        shot(page, "10b-data-check")
        copies = int(re.search(r"exclude (\d+) cop", keep.inner_text()).group(1))
        # the picture added twice; the fake camera's clock restarts with each new camera widget, so two of its
        # pictures can be identical too
        assert copies >= 1
        keep.click()
        page.get_by_text(re.compile(r"new version \w+ of 'webcam'")).wait_for()
        page.get_by_text("Excluded from the current version.").first.wait_for()
        assert metric_value(page, "Images") == str(8 - copies)
        shot(page, "10c-fixed")

        # restore the first version from the Data page
        page.get_by_text("Versions of 'webcam'").click()
        page.get_by_role("button", name="Restore", exact=True).click()
        page.get_by_text(re.compile(r"Restored version \w+ of 'webcam'")).wait_for()
        page.get_by_role("heading", name="Report: webcam").wait_for()
        assert metric_value(page, "Images") == "8"
        shot(page, "10d-restored")

        # Runs & export: the run names the version it trained on
        nav(page, "Runs & export")
        page.get_by_text(re.compile(r"Trained on dataset version webcam@[0-9a-f]{10}")).first.wait_for()
        assert not page.get_by_test_id("stException").count()
        assert not errors, errors
        ctx.close()
        b.close()
