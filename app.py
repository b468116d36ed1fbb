"""TL Studio: the Streamlit app. A router only: every page lives in pages/ and calls tl_core.

Run it with ``make app`` (or ``streamlit run app.py``); the workspace is ``$TL_HOME``, and
``?project=<slug>`` in the address selects a project's own workspace inside it.
"""

import sys
from pathlib import Path

# `streamlit run` puts this folder on sys.path; the page test harness may not
_ROOT = str(Path(__file__).resolve().parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from pages import _access as access  # noqa: E402
from pages import _session as session  # noqa: E402
from tl_core.errors import TLError  # noqa: E402

st.set_page_config(page_title="TL Studio", page_icon="🧠", layout="wide")
pages = [
    st.Page(session.PAGES["home"], title="Home", icon=":material/home:", default=True),
    st.Page(session.PAGES["data"], title="Data", icon=":material/folder_open:"),
    st.Page(session.PAGES["backbone"], title="Backbone", icon=":material/layers:"),
    st.Page(session.PAGES["train"], title="Train", icon=":material/model_training:"),
    st.Page(session.PAGES["evaluate"], title="Evaluate", icon=":material/analytics:"),
    st.Page(session.PAGES["try"], title="Try it", icon=":material/image_search:"),
    st.Page(session.PAGES["runs"], title="Runs & export", icon=":material/inventory_2:"),
    st.Page(session.PAGES["lab"], title="Lab", icon=":material/science:"),
]
# with a class password: only the password form until it is given (the pages' names hidden too); sets
# st.session_state["tl_role"]
role = access.gate(pages)
# the teacher's view of the class: only for the teacher (an open server has no students: there everyone is)
if role == "teacher":
    pages.append(st.Page(session.PAGES["teacher"], title="Teacher", icon=":material/school:"))

session.startup()
project_problem = session.sync_from_url()

page = st.navigation(pages)


def _new_project() -> None:
    # a button callback: runs before the page is drawn, so the sidebar and page show the new project
    name = st.session_state.get("new_project_name", "").strip()
    if not name:
        st.session_state["_project_flash"] = ("warning", "Give the project a name first.")
        return
    slug = session.create_project(name)
    st.session_state["new_project_name"] = ""
    st.session_state["_project_flash"] = ("success", f"Project '{name}' created. Bookmark its link to come back.")
    st.session_state["_new_project_slug"] = slug


def project_sidebar(ws) -> None:
    """Which workspace this is, its link, and starting a new project."""
    if "_project_flash" in st.session_state:
        kind, text = st.session_state.pop("_project_flash")
        getattr(st, kind)(text)
    if ws is not None and ws.is_project:
        st.markdown(f"**Project:** `{ws.name}`")
        st.caption("Runs, uploads and weights here are private to this project. Bookmark this link to come back "
                   "(anyone with the link can open the project):")
        st.code(session.project_link(ws.name), language=None, wrap_lines=True)
        access.sidebar(ws)
        if st.button("Leave the project", icon=":material/logout:", help="Back to the shared workspace."):
            session.enter_project(None)
            st.rerun()
    else:
        st.markdown("**Shared workspace**")
        st.caption("No project selected: you use the server's shared workspace, whose runs and uploads every "
                   "user without a project link sees. Start a project to keep yours apart.")
        if ws is not None:
            access.sidebar(ws)
    with st.popover("Start a new project", icon=":material/create_new_folder:", width="stretch"):
        st.text_input("Project name", key="new_project_name", placeholder="e.g. Birds of my garden",
                      help="A name for you; the link gets a random part, so only people you give it to find it.")
        st.button("Create project", on_click=_new_project, type="primary")


if project_problem:
    with st.sidebar:
        project_sidebar(None)
    st.error(project_problem)
    st.page_link(session.PAGES["home"], label="Open the shared workspace instead", icon=":material/home:",
                 query_params={})
    st.stop()

session.publish_to_url()

with st.sidebar:
    try:
        ws = session.workspace()
    except TLError as e:  # the project's folder was removed while this session used it
        st.error(str(e))
        session.enter_project(None)
        ws = session.workspace()
    st.caption("Current selection")
    options = session.dataset_options(ws)
    st.markdown(
        f"**Data:** {options.get(session.get('dataset'), '—')}  \n"
        f"**Backbone:** {session.get('backbone', session.DEFAULT_BACKBONE)}  \n"
        f"**Run:** {session.get('run', '—')}"
    )
    st.divider()
    project_sidebar(ws)
    st.caption(f"Workspace: `{ws.home}`")

page.run()
