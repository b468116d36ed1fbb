"""Try it → Live: the webcam classified continuously in the user's own browser, and "Wrong? Add this picture".

A worker exports the run as a web page once (the ``export`` task, format ``webpage``: the verified ONNX graph and
ONNX Runtime Web); the page's files are served to the browser as a Streamlit component, which runs the model
there on every frame. The server does no work per frame: it only saves a frame someone chose to add to the
dataset, as a new version (:mod:`tl_core.data.versions`), like the fix-in-place buttons.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import streamlit as st
import streamlit.components.v1 as components

from pages import _fix as fix
from pages import _tasks as task_ui
from tl_core import share
from tl_core.data import versions
from tl_core.data.library import add_class_images
from tl_core.errors import DatasetError

COMPONENT_HTML = Path(__file__).resolve().parent / "_live_component" / "index.html"
#: The page's files the component loads (hard links into the component's folder; tlstudio.js: SHARED_JS).
PAGE_FILES = ("tlstudio.js", "model.js", "ort/ort.wasm.min.js", "ort/ort-wasm.js")
#: The component draws with this code's tlstudio.js (tlstudio.drawBars), not the copy in an export made by an
#: earlier version (a done export task is reused): the exported page's own file, ``tl_core.share.webpage.WEB_DIR /
#: "tlstudio.js"``. Named here by its place in the package, not imported from there: tl_core.share.webpage imports
#: torch (through tl_core.share.export), which the server never loads; tests/test_live.py checks the two agree.
SHARED_JS = Path(share.__file__).resolve().parent / "web" / "tlstudio.js"
DONE = "_live_done"


def component_folder(page_dir: Path) -> Path:
    """``<task>/live/``: the component's index.html beside (hard links to) the exported page's files; made once,
    cheaply (links, no copies), next to the page the export task wrote."""
    live = page_dir.parent / "live"
    newest = max(COMPONENT_HTML.stat().st_mtime, SHARED_JS.stat().st_mtime)
    if (live / "index.html").is_file() and (live / "index.html").stat().st_mtime >= newest:
        return live
    stage = page_dir.parent / f".live-{os.getpid()}-{time.monotonic_ns()}"
    (stage / "ort").mkdir(parents=True)
    shutil.copy(SHARED_JS, stage / "tlstudio.js")  # small (~15 KB): a copy, not a link into the package
    for name in PAGE_FILES:
        if name == "tlstudio.js":
            continue
        try:
            os.link(page_dir / name, stage / name)
        except OSError:  # another file system: a copy
            shutil.copy2(page_dir / name, stage / name)
    shutil.copy(COMPONENT_HTML, stage / "index.html")  # dated now: newer than what it was made from
    if live.exists():
        shutil.rmtree(live, ignore_errors=True)
    try:
        os.replace(stage, live)
    except OSError:  # another session made it first
        shutil.rmtree(stage, ignore_errors=True)
    return live


def add_picture(ws, data: str, label: str, png: bytes) -> tuple[str, dict[str, Any], bool]:
    """Save a camera frame into the dataset ``data`` under class ``label`` as a new version (into a managed copy
    when ``data`` is a sample or a folder outside the workspace, as the fix-in-place buttons do).

    Returns:
        (dataset name, its new version entry, whether a managed copy was made just now)
    Raises:
        DatasetError: the dataset cannot take it (multi-label, unreadable picture).
    """
    name, copied = versions.dataset_for_changes(ws, data)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    add_class_images(ws, name, label, [(f"live-{stamp}.png", png)])
    return name, versions.history(ws, name)[0], copied  # newest first


def live_view(ws, run: dict[str, Any], data: str, classes: list[str]) -> None:
    """The Live panel of Try it for one run: the export task (once), then the in-browser component."""
    res = task_ui.task_view(ws, "export", {**run, "format": "webpage"}, "Preparing the model for this browser",
                            button="Start live", icon=":material/videocam:", key="live-export",
                            button_help="Exports the model once as a web page (verified ONNX + ONNX Runtime Web); "
                                        "then the camera is classified in your browser, frame after frame.")
    if res is None:
        return
    from tl_core.runs import tasks

    task = tasks.find(ws, "export", {**run, "format": "webpage"})
    folder = component_folder(task_ui.result_file(ws, task, res["page"]))
    name = "tl_live_" + hashlib.sha1(str(folder).encode()).hexdigest()[:12]
    live = components.declare_component(name, path=str(folder))
    value = live(classes=classes, key="live-component", default=None)
    fix.show_flash()
    if value and value.get("nonce") != st.session_state.get(DONE):
        st.session_state[DONE] = value["nonce"]
        try:
            png = base64.b64decode(str(value["image"]).split(",", 1)[1])
            ds, entry, copied = add_picture(ws, data, str(value["label"]), png)
        except (DatasetError, ValueError, IndexError, KeyError) as e:
            st.session_state[fix.FLASH] = ("error", f"The picture was not added: {e}", time.monotonic())
        else:
            msg = (f"Added the picture to '{value['label']}': new version **{entry['version']}** of '{ds}'"
                   f" ({entry['counts']['images']} images). Train again to use it.")
            if copied:
                msg += f" Your first change made '{ds}', a managed copy in the workspace: the original files are unchanged."
            st.session_state[fix.FLASH] = ("success", msg, time.monotonic())
        st.rerun()
