"""Per-user selections of the app (dataset, backbone, weights, current run) and the page error boundary.

A selection lives in ``st.session_state`` and is mirrored in ``st.query_params``, so that a browser
refresh or the page link opened in another tab finds the same dataset, backbone and run again
(session state alone does not survive a refresh). Values coming from the URL are checked: a dataset
must be a sample dataset or one uploaded into the workspace, a run must exist in the store.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import streamlit as st

from tl_core.data.library import SAMPLE_DATA_DIR, dataset_signature, safe_name, sample_datasets, workspace_datasets
from tl_core.errors import RunError, TLError
from tl_core.models.catalogue import CATALOGUE, weights_dir
from tl_core.runs.workers import recover
from tl_core.storage.workspace import Workspace, new_project_slug

log = logging.getLogger(__name__)

#: session_state key -> query parameter name (the project first: the others are looked up inside it)
URL_KEYS = {"project": "project", "dataset": "data", "backbone": "backbone", "weights": "weights", "run": "run"}
#: Selections that belong to one workspace: entering another project drops them.
PROJECT_BOUND = ("run", "weights")
DEFAULT_BACKBONE = "efficientnet_lite0"

PAGES = {
    "home": "pages/home.py",
    "data": "pages/data.py",
    "backbone": "pages/backbone.py",
    "train": "pages/train.py",
    "evaluate": "pages/evaluate.py",
    "try": "pages/try_it.py",
    "runs": "pages/runs.py",
    "lab": "pages/lab.py",
    "teacher": "pages/teacher.py",
}


def ensure_router() -> None:
    """Make sure this page runs inside ``app.py``'s router. Call it first thing on every page.

    Streamlit treats a ``pages/`` folder as an old-style multipage app until some session has run
    ``st.navigation``: when the first request after a server start is a deep link (``/train?run=…``, a
    shared link after a restart), it runs the page file alone, without ``app.py`` (no URL sync, no
    recovery). Then run ``app.py`` here instead (its ``st.navigation`` ends the old mode and runs this
    same page, with this run's widget events) and stop the stray run.
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without the old mode
        return
    if not getattr(PagesManager, "uses_pages_directory", False):
        return
    import runpy

    runpy.run_path(str(Path(__file__).resolve().parent.parent / "app.py"), run_name="__main__")
    st.stop()


def workspace() -> Workspace:
    """The workspace of this session: the selected project's (``?project=<slug>``), else the shared one.

    Every page reads and writes runs, uploads and weights through this, so a project never sees another's.

    Raises:
        RunError: the selected project no longer exists (its folder was removed).
    """
    top = Workspace.default()
    slug = st.session_state.get("project")
    return top.project(slug) if slug else top


def create_project(name: str) -> str:
    """Create a project workspace for a display name and enter it; returns its slug (the key in its link)."""
    slug = new_project_slug(name)
    Workspace.default().project(slug, create=True)
    enter_project(slug)
    return slug


def enter_project(slug: str | None) -> None:
    """Switch this session to project ``slug`` (None: the shared workspace), dropping the selections that
    belonged to the previous workspace (its runs, uploaded datasets and weights)."""
    if st.session_state.get("project") == (slug or None):
        return
    for key in PROJECT_BOUND:
        st.session_state.pop(key, None)
    if str(st.session_state.get("dataset", "")).startswith("workspace/"):
        st.session_state.pop("dataset", None)
    st.session_state.pop("runs_selected", None)
    select("project", slug)


def project_link(slug: str) -> str:
    """The address that reopens project ``slug`` (this server's URL when known, else a relative link)."""
    from urllib.parse import urlsplit

    try:
        url = urlsplit(st.context.url or "")
    except Exception:  # no browser context (tests): a relative link still works when pasted after the address
        return f"?project={slug}"
    if not url.netloc:
        return f"?project={slug}"
    prefix = str(st.get_option("server.baseUrlPath") or "").strip("/")
    return f"{url.scheme}://{url.netloc}/{prefix + '/' if prefix else ''}?project={slug}"


@st.cache_resource(show_spinner=False)
def _recover_once(home: str) -> list[str]:
    # once per server process: runs whose worker died while the server was down (every project under home)
    return recover(Workspace(Path(home)))


#: Seconds between checks for dead workers while a page polls a run.
RECOVER_EVERY_S = 10.0


def recover_now(ws: Workspace) -> list[str]:
    """:func:`tl_core.runs.workers.recover`, at most once every :data:`RECOVER_EVERY_S` seconds per session.

    Called from every poll of a run or task, so that a worker killed while the server is up (out of memory,
    ``kill -9``) is noticed within seconds, not at the next server start.
    """
    now = time.monotonic()
    if now - st.session_state.get("_last_recover", -RECOVER_EVERY_S) < RECOVER_EVERY_S:
        return []
    st.session_state["_last_recover"] = now
    return recover(ws)


def startup() -> None:
    """Mark runs and tasks of dead workers as interrupted (once per process) and restart workers for queued
    ones."""
    try:
        interrupted = _recover_once(str(Workspace.default().home))
    except TLError as e:
        st.error(str(e))
        return
    if interrupted and not st.session_state.get("_told_interrupted"):
        st.session_state["_told_interrupted"] = True
        st.toast(f"{len(interrupted)} training(s) or task(s) lost their worker process (killed, out of memory, or "
                 "the machine restarted); they are marked 'interrupted'.")


# --------------------------------------------------------------------------------------------------
# datasets: a reference ("sample/emoji", "workspace/my_photos") instead of a raw path in the URL
# --------------------------------------------------------------------------------------------------
def dataset_options(ws: Workspace) -> dict[str, str]:
    """Every dataset the app may use: reference -> label."""
    opts = {f"sample/{d['name']}": f"{d['name']} (sample data)" for d in sample_datasets()}
    opts.update({f"workspace/{d['name']}": f"{d['name']} ({d['origin']})" for d in workspace_datasets(ws)})
    return opts


def dataset_path(ref: str | None, ws: Workspace | None = None) -> Path | None:
    """The folder of a dataset reference, or None when it is not a known dataset."""
    if not ref or "/" not in ref:
        return None
    kind, name = ref.split("/", 1)
    if name != safe_name(name, fallback="") or not name:
        return None
    if kind == "sample":
        p = SAMPLE_DATA_DIR / name
    elif kind == "workspace":
        p = (ws or workspace()).datasets_dir / name
    else:
        return None
    return p if p.is_dir() else None


def dataset_ref_for_path(path: str | Path, ws: Workspace | None = None) -> str | None:
    """The reference of a dataset folder (inverse of :func:`dataset_path`)."""
    p = Path(path).resolve()
    ws = ws or workspace()
    if p.parent == SAMPLE_DATA_DIR.resolve():
        return f"sample/{p.name}"
    if p.parent == ws.datasets_dir.resolve():
        return f"workspace/{p.name}"
    return None


def weights_path(name: str | None, ws: Workspace | None = None) -> str:
    """``auto`` or the path of an uploaded weights file (by file name, inside the workspace)."""
    if not name or name == "auto":
        return "auto"
    p = weights_dir(ws or workspace()) / Path(name).name
    return str(p) if p.is_file() else "auto"


# --------------------------------------------------------------------------------------------------
# selections <-> URL
# --------------------------------------------------------------------------------------------------
def _valid(key: str, value: str, ws: Workspace) -> bool:
    if key == "project":
        return False  # checked by sync_from_url itself
    if key == "dataset":
        return dataset_path(value, ws) is not None
    if key == "backbone":
        return value in CATALOGUE
    if key == "weights":
        return value == "auto" or weights_path(value, ws) != "auto"
    if key == "run":
        try:
            return ws.store().exists(value)
        except Exception:  # a malformed id is simply not a run
            return False
    return False


def sync_from_url() -> str | None:
    """Take selections from the URL for keys this session has not set (a refresh, a new tab).

    Returns:
        None, or one sentence when the URL names a project that does not exist: the app then shows the
        sentence instead of the page (never another workspace in its place).
    """
    if "project" not in st.session_state and st.query_params.get("project"):
        slug = st.query_params["project"]
        try:
            Workspace.default().project(slug)
        except RunError as e:
            return str(e)
        st.session_state["project"] = slug
    try:
        ws = workspace()
    except RunError as e:  # the session's project was deleted meanwhile
        st.session_state.pop("project", None)
        return str(e)
    for key, param in URL_KEYS.items():
        if key in st.session_state or key == "project":
            continue
        value = st.query_params.get(param)
        if value and _valid(key, value, ws):
            st.session_state[key] = value
    return None


def publish_to_url() -> None:
    """Write the current selections into the URL (page switches clear it; this puts them back)."""
    for key, param in URL_KEYS.items():
        value = st.session_state.get(key)
        if value:
            if st.query_params.get(param) != value:
                st.query_params[param] = value
        elif param in st.query_params:
            del st.query_params[param]


def select(key: str, value: str | None) -> None:
    """Set a selection in session state and in the URL."""
    assert key in URL_KEYS, key
    if value:
        st.session_state[key] = value
    else:
        st.session_state.pop(key, None)
    publish_to_url()


def url_params() -> dict[str, str]:
    """The selections as query parameters (for links and page switches, which otherwise drop them)."""
    return {param: st.session_state[key] for key, param in URL_KEYS.items() if st.session_state.get(key)}


def link(page: str, label: str, icon: str | None = None, where: Any = None) -> None:
    """A link to one of the app's pages that keeps the selections in its address."""
    (where or st).page_link(PAGES[page], label=label, icon=icon, query_params=url_params())


def switch_to(page: str) -> None:
    """Go to one of the app's pages, keeping the selections in the address."""
    st.switch_page(PAGES[page], query_params=url_params())


def get(key: str, default: Any = None) -> Any:
    return st.session_state.get(key, default)


def owner() -> str:
    """An id of this browser session, recorded with the tasks and runs it asks for (who asked, for display)."""
    if "_owner" not in st.session_state:
        st.session_state["_owner"] = uuid.uuid4().hex[:12]
    return st.session_state["_owner"]


def bind(key: str, options: Any, default: Any = None) -> str:
    """Widget key of a picker for the selection ``key`` (use with ``on_change=picked, args=(key,)``).

    The widget is given the selection before it is drawn, so a change made elsewhere (the Home button, a
    link) shows; the user's own change is stored by :func:`picked` before the page runs. A fixed key
    keeps the widget's identity, so a second change is never lost to a re-created widget.
    """
    wkey = f"pick_{key}"
    want = st.session_state.get(key, default)
    if want not in list(options):
        want = default if default in list(options) else None
    if wkey not in st.session_state or st.session_state[wkey] != want:
        st.session_state[wkey] = want  # None shows the placeholder (not silently the first option)
    return wkey


def picked(key: str) -> None:
    """``on_change`` of a :func:`bind` picker: store the picked value as the selection."""
    select(key, st.session_state.get(f"pick_{key}"))


def remember(key: str, default: Any) -> str:
    """Widget key for a setting that must survive page switches (Streamlit drops the state of widgets
    that a page does not draw): seeds the widget from the stored value; call :func:`keep` after it."""
    wkey = f"w_{key}"
    if wkey not in st.session_state:
        st.session_state[wkey] = st.session_state.get(key, default)
    return wkey


def keep(key: str, value: Any) -> Any:
    st.session_state[key] = value
    return value


def setting(key: str, default: Any) -> Any:
    """A remembered setting's current value (its widget's, when drawn in this run or the last)."""
    return st.session_state.get(f"w_{key}", st.session_state.get(key, default))


def short_label(name: str, max_chars: int = 14) -> str:
    """A file name that fits under a small thumbnail on one line: ``a_very_long_na….png`` (the extension kept).

    Streamlit wraps a long image caption over several lines and breaks the grid's alignment; the full name goes
    in a tooltip or a caption elsewhere.
    """
    if len(name) <= max_chars:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or len(ext) > 5 or not stem:
        return name[:max_chars - 1] + "…"
    return stem[:max(1, max_chars - len(ext) - 2)] + "…." + ext


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
@contextmanager
def page_errors() -> Iterator[None]:
    """Show a user error as one ``st.error`` sentence; a bug as a short message (logged), never a traceback.

    Streamlit's own control flow (rerun, stop, switch_page) derives from BaseException and passes through.
    """
    try:
        yield
    except TLError as e:
        st.error(str(e))
    except Exception as e:  # a bug: keep the page usable, put the details in the server log
        log.exception("page error")
        st.error(f"Something went wrong ({type(e).__name__}: {str(e)[:200]}). The details are in the server log; "
                 "try again, or report it with what you did.")


# --------------------------------------------------------------------------------------------------
# dataset report (cached by the files' names, sizes and times: a changed folder is re-read)
# --------------------------------------------------------------------------------------------------
@st.cache_data(show_spinner="Checking the images…", max_entries=16)
def _report(path: str, signature: str, val_split: float, seed: int, _ws: Workspace) -> dict[str, Any]:
    # cheap (image headers, through the workspace's check cache) and keyed by the files' signature; the
    # workspace only says where that check cache is
    from tl_core.data.report import dataset_overview

    return dataset_overview(path, _ws, val_split, seed)


def dataset_report(path: str | Path, val_split: float = 0.2, seed: int = 0, ws: Workspace | None = None
                   ) -> dict[str, Any]:
    """:func:`tl_core.data.report.dataset_overview`, cached until a file of the dataset changes.

    Raises:
        DatasetError: the folder cannot be used as a dataset.
    """
    return _report(str(path), dataset_signature(path), float(val_split), int(seed), ws or workspace())


# --------------------------------------------------------------------------------------------------
# uploads
# --------------------------------------------------------------------------------------------------
def finished_runs(ws: Workspace) -> dict[str, dict[str, Any]]:
    """The workspace's finished runs by id, newest first; without any, say so, link to Train and stop."""
    runs = ws.store().list(status="done")
    if not runs:
        st.info("No finished run yet: train one first.")
        link("train", "Go to Train", ":material/model_training:")
        st.stop()
    return {r["id"]: r for r in runs}


def upload_limit_mb() -> int:
    """The largest upload the server accepts, in MB (``server.maxUploadSize``; Streamlit refuses larger files)."""
    return int(st.get_option("server.maxUploadSize"))


def upload_note(what: str = "each file") -> str:
    """One sentence stating the upload limit, for the ``help=`` or caption next to an uploader."""
    return (f"Up to {upload_limit_mb()} MB for {what} (this server's limit, `server.maxUploadSize`); "
            "larger files are refused.")
