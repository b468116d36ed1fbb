"""The data loop in a real browser (Chromium with its fake camera, driven by Playwright): take 3 pictures of each
of 2 classes on the Data page, add a duplicate picture, train a linear probe on them, exclude the duplicate from
the data check (one new version), restore the first version, and see the version on Runs & export. With
``TL_TEST_SCREENSHOTS=1``, screenshots go to ``test-artifacts/screenshots/`` (``11*``)."""

from __future__ import annotations

import re
import shutil

import pytest

from test_browser import (  # noqa: F401  (the server fixture is used by name)
    CHROMIUM,
    CHROMIUM_ARGS,
    EMOJI,
    SHOTS,
    TRAIN_TIMEOUT_MS,
    browser,
    metric_value,
    nav,
    start_button,
    server,
    settle,
    shot,
)

pytestmark = pytest.mark.browser

FAKE_CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


# The camera widget's video has been live (a frame of a size to copy) for 1.5 s. Streamlit enables "Take Photo" as
# soon as the browser hands over the camera stream, and asks for a new stream a second later (its width settles);
# a click while the video has no frame copies nothing and is dropped without a trace (a null screenshot). Hidden in
# a tab that is not selected, the video is paused: that was the flakiness (the tabs went back to the first one
# when the first picture made the dataset; the page now keeps the tab).
LIVE_VIDEO = """() => {
  const v = document.querySelector('[data-testid="stCameraInputWebcamComponent"] video');
  if (!v || v.readyState < 2 || !v.videoHeight || v.paused || !v.clientWidth) { if (v) v.tlLiveSince = 0; return false; }
  v.tlLiveSince = v.tlLiveSince || Date.now();
  return Date.now() - v.tlLiveSince > 1500;
}"""
COUNTER = ("([label, want]) => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some(m => "
           "m.querySelector('[data-testid=\"stMetricLabel\"]')?.innerText.trim() === label && "
           "m.querySelector('[data-testid=\"stMetricValue\"]')?.innerText.trim() === want)")
# the click registered: the counter moved, or the widget shows the picture it took (its video is gone) while
# it uploads it
TAKEN = ("([label, want]) => (" + COUNTER + ")([label, want]) || !document.querySelector("
         "'[data-testid=\"stCameraInputWebcamComponent\"] video')")


def open_data_page(page, base: str) -> list[str]:
    """Open the app at ``base`` and go to the Data page; the page's uncaught script errors collect in the list
    returned."""
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base)
    page.get_by_text("Four steps").wait_for()
    nav(page, "Data")
    return errors


def camera_panel(page):
    """The "Take pictures" tab's panel, which stays selected while pictures are taken."""
    assert page.get_by_role("tab", name="Take pictures").get_attribute("aria-selected") == "true"
    return page.get_by_role("tabpanel", name="Take pictures")


def take_photo(page, cls: str, want: int, pause_ms: int = 0, tries: int = 5) -> None:
    """One picture of class ``cls`` with the fake camera, until its counter shows ``want``: wait for a live video
    (and ``pause_ms`` more), click Take Photo, and click again when the click copied no frame (the video still
    shows, nothing moved). The fake camera's picture depends on the time since its stream started, which restarts
    with each new camera widget: different pauses make different pictures."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(tries):
        page.wait_for_function(LIVE_VIDEO, timeout=120_000, polling=100)
        page.wait_for_timeout(pause_ms)
        camera_panel(page).get_by_role("button", name="Take Photo").click()
        try:
            page.wait_for_function(TAKEN, arg=[cls, str(want)], timeout=8_000)
        except PlaywrightTimeout:
            continue  # nothing taken: the video had no frame yet
        page.wait_for_function(COUNTER, arg=[cls, str(want)], timeout=180_000)
        settle(page)  # the page has rerun with a new camera for the next picture
        return
    raise AssertionError(f"Take Photo did not take a picture of '{cls}' in {tries} clicks")


@pytest.mark.slow
def test_capture_train_fix_and_restore_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    base, home = server.base, server.home
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + FAKE_CAMERA)
        ctx = b.new_context(viewport={"width": 1400, "height": 950}, permissions=["camera"])
        page = ctx.new_page()
        errors = open_data_page(page, base)

        page.get_by_role("tab", name="Take pictures").click()
        panel = camera_panel(page)
        name = panel.get_by_role("textbox", name="Dataset name")
        name.fill("webcam")
        name.press("Enter")
        settle(page)
        for k, cls in enumerate(("thumbs_up", "wave")):
            box = camera_panel(page).get_by_role("textbox", name="Class name")
            box.fill(cls)
            box.press("Enter")
            settle(page)
            for n in range(3):
                take_photo(page, cls, n + 1, pause_ms=400 * (3 * k + n))
            if cls == "thumbs_up":
                shot(page, "11a-capture")
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
        start_button(page).click()
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
        shot(page, "11b-data-check")
        copies = int(re.search(r"exclude (\d+) cop", keep.inner_text()).group(1))
        # the picture added twice; the fake camera's clock restarts with each new camera widget, so two of its
        # pictures can be identical too
        assert copies >= 1
        # the check's embedding map and domain-gap hint (its own tasks, after the audit) redraw the whole page when
        # they end: a click landing on that redraw was lost (the outcome never came, 1 of 2 runs here, 2026-12-07),
        # as the Restore click below once was; click once they are drawn and the page has settled
        page.get_by_text(re.compile(r"^The domain gap is")).wait_for(timeout=TRAIN_TIMEOUT_MS)
        page.get_by_text(re.compile(r"^Each dot is an image")).wait_for(timeout=TRAIN_TIMEOUT_MS)
        settle(page)
        keep.click()
        outcome = page.get_by_test_id("stAlertContentSuccess").filter(has_text=re.compile(r"new version \w+ of 'webcam'"))
        outcome.or_(page.get_by_test_id("stAlertContentError")).first.wait_for()
        assert not page.get_by_test_id("stAlertContentError").count(), page.get_by_test_id(
            "stAlertContentError").all_inner_texts()
        page.get_by_text("Excluded from the current version.").first.wait_for()
        assert metric_value(page, "Images") == str(8 - copies)
        shot(page, "11c-fixed")

        # restore the first version from the Data page
        settle(page)
        page.get_by_text("Versions of 'webcam'").click()
        # a click right after the expander opens was lost (no rerun at all) whenever the embedding map was drawn
        # below; a second later it was not (2 of 2 here): let the page settle after the expander opens
        page.get_by_role("combobox", name=re.compile("Earlier version")).wait_for()
        settle(page)
        page.wait_for_timeout(1000)
        page.get_by_role("button", name="Restore", exact=True).click()
        try:
            page.get_by_text(re.compile(r"Restored version \w+ of 'webcam'")).wait_for()
        except Exception:  # say what the page showed instead (a CI run failed here once, with no trace)
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "11d-restore-failed.png"), full_page=True)
            raise AssertionError(f"no 'Restored version' message; the page's messages: "
                                 f"{page.locator('[data-testid^=stAlertContent]').all_inner_texts()}") from None
        page.get_by_role("heading", name="Report: webcam").wait_for()
        assert metric_value(page, "Images") == "8"
        shot(page, "11d-restored")

        # Runs & export: the run names the version it trained on
        nav(page, "Runs & export")
        page.get_by_text(re.compile(r"Trained on dataset version webcam@[0-9a-f]{10}")).first.wait_for()
        assert not page.get_by_test_id("stException").count()
        assert not errors, errors
        ctx.close()
        b.close()


@pytest.mark.slow
def test_folder_upload_fix_from_the_data_check_and_train_on_the_new_version(server, browser, tmp_path):
    """A folder of class folders uploaded from the browser; the data check flags a copy and an image filed under
    the wrong class: one click excludes the copy, one click moves the image to the class it shows; a run trained
    then records that new version."""
    from tl_core.data import versions
    from tl_core.storage.workspace import Workspace

    base, home = server.base, server.home
    pets = tmp_path / "pets"
    for cls in ("animal", "face", "flag"):
        (pets / cls).mkdir(parents=True)
        for f in sorted((EMOJI / cls).iterdir())[:10]:
            shutil.copy(f, pets / cls / f.name)
    shutil.copy(sorted((EMOJI / "flag").iterdir())[0], pets / "flag" / "again.png")  # an exact copy
    duck = sorted((EMOJI / "animal").iterdir())[15]
    shutil.copy(duck, pets / "face" / duck.name)  # an animal filed under face

    page = browser.new_page(viewport={"width": 1400, "height": 950})
    errors = open_data_page(page, base)
    page.get_by_role("tab", name="Upload a folder").click()
    panel = page.get_by_role("tabpanel", name="Upload a folder")
    panel.locator("input[type=file]").set_input_files(str(pets))
    page.get_by_text("Saved the uploaded folder (32 files) as dataset 'pets'").wait_for(timeout=120_000)
    page.get_by_role("heading", name="Report: pets").wait_for()
    assert metric_value(page, "Images") == "32" and metric_value(page, "Classes") == "3"
    ws = Workspace(home)
    first = versions.current_version(ws, "pets")

    page.get_by_role("button", name="Check the data").click()
    page.get_by_text(re.compile(r"^Likely label errors \(\d+\)")).wait_for(timeout=TRAIN_TIMEOUT_MS)
    shot(page, "11e-folder-data-check")
    # the check's follow-up tasks (the embedding map, the distance from ImageNet) redraw the page while they
    # poll: click once they are done, so the click lands on the buttons the page keeps
    for busy in ("Drawing the embedding map", "Measuring the distance from ImageNet"):
        page.get_by_text(busy).first.wait_for(state="hidden", timeout=TRAIN_TIMEOUT_MS)
    cell = page.get_by_test_id("stColumn")
    # exclude the copy, with the image in view
    cell.filter(has_text="flag: flag/again.png").get_by_role("button", name="Exclude", exact=True).first.click()
    page.get_by_text(re.compile(r"Excluded flag/again\.png.*new version \w+ of 'pets'")).wait_for()
    page.get_by_text("Excluded from the current version.").first.wait_for()
    settle(page)
    # move the animal filed under face to the class the check suggests
    cell.filter(has_text="labelled face, looks like animal").get_by_role("button", name="Move to animal").first.click()
    page.get_by_text(re.compile(rf"Moved face/{re.escape(duck.name)} to 'animal'.*new version")).wait_for()
    page.get_by_text("Moved to animal in the current version.").first.wait_for()
    shot(page, "11f-relabelled")
    rows = {r["file"]: r for r in versions.version_rows(ws, "pets")}
    assert rows["flag/again.png"]["excluded"] and rows[f"face/{duck.name}"]["label"] == "animal"
    assert len(versions.history(ws, "pets")) == 3
    fixed = versions.current_version(ws, "pets")
    assert fixed != first

    # a run trained now records the new version; Runs & export shows it
    nav(page, "Train")
    start_button(page).click()
    page.get_by_text("Status: done").wait_for(timeout=TRAIN_TIMEOUT_MS)
    trained = [(r.get("summary") or {}).get("dataset_version") for r in ws.store().list(status="done")]
    assert f"pets@{fixed}" in trained and f"pets@{first}" not in trained
    nav(page, "Runs & export")
    page.get_by_text(f"Trained on dataset version pets@{fixed}").first.wait_for()
    assert not page.get_by_test_id("stException").count()
    assert not errors, errors
    page.close()

