"""Try it → Live's server side (pages/_live.py): "Add this picture" makes a new dataset version, and the
component's folder is the exported page's files plus its own index.html. The browser side (frames classified
in the browser, predictions a second) is measured by benchmarks/live_tryit.py."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from conftest import EMOJI
from page_harness import home, trained_home  # noqa: F401  (fixtures are used by name)


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), colour, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_add_picture_makes_a_new_version_in_a_managed_copy(workspace):
    from pages._live import add_picture
    from tl_core.data import versions

    before = sorted(p.name for p in (EMOJI / "animal").iterdir())
    name, entry, copied = add_picture(workspace, str(EMOJI), "animal", _png((10, 200, 30)))
    assert copied and "animal" in entry["change"]
    first = entry["version"]
    assert versions.class_counts(workspace, name)["animal"] == len(before) + 1
    assert sorted(p.name for p in (EMOJI / "animal").iterdir()) == before  # the sample is never changed
    # a second picture: the same managed copy, one more version, one more image
    name2, entry2, copied2 = add_picture(workspace, str(EMOJI), "face", _png((200, 10, 30)))
    assert name2 == name and not copied2 and entry2["version"] != first
    assert [h["version"] for h in versions.history(workspace, name)][:2] == [entry2["version"], first]
    assert versions.class_counts(workspace, name)["face"] == len(list((EMOJI / "face").iterdir())) + 1


def test_component_folder_links_the_page_files(tmp_path):
    from pages._live import COMPONENT_HTML, PAGE_FILES, SHARED_JS, component_folder

    page = tmp_path / "task" / "page"
    (page / "ort").mkdir(parents=True)
    for n, name in enumerate(PAGE_FILES):
        (page / name).write_text(f"// {n}")
    live = component_folder(page)
    assert live == tmp_path / "task" / "live"
    assert (live / "index.html").read_bytes() == COMPONENT_HTML.read_bytes()
    for name in PAGE_FILES:
        # the drawing code is this version's (an export made earlier keeps its own copy), the model the page's
        src = SHARED_JS if name == "tlstudio.js" else page / name
        assert (live / name).read_text() == src.read_text()
        if src != SHARED_JS:
            assert os.stat(live / name).st_ino == os.stat(src).st_ino  # a link, not a 20 MB copy
    made = (live / "index.html").stat().st_mtime_ns
    assert component_folder(page) == live and (live / "index.html").stat().st_mtime_ns == made  # made once


def test_live_draws_with_the_exported_pages_own_script():
    """pages/_live.py names the web page's tlstudio.js by its place (importing tl_core.share.webpage would load torch
    into the server): it is the very file the web-page export writes."""
    from pages._live import SHARED_JS
    from tl_core.share.webpage import WEB_DIR

    assert SHARED_JS == (WEB_DIR / "tlstudio.js").resolve() and SHARED_JS.is_file()


def test_try_it_live_toggle_offers_to_start_live(home):
    """Turning Live on shows its start button (the web-page export is a worker task, started by the click)."""
    from page_harness import app, assert_clean, goto, has_button

    at = app()
    goto(at, "try_it")
    [t for t in at.toggle if t.label.startswith("Live: classify the camera")][0].set_value(True).run()
    assert_clean(at)
    assert has_button(at, "Start live")
