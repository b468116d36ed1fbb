"""TL Studio: the Streamlit app. A router only: every page lives in pages/ and calls tl_core.

Run it with ``make app`` (or ``streamlit run app.py``); the workspace is ``$TL_HOME``.
"""

import sys
from pathlib import Path

# `streamlit run` puts this folder on sys.path; the page test harness may not
_ROOT = str(Path(__file__).resolve().parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from pages import _session as session  # noqa: E402

st.set_page_config(page_title="TL Studio", page_icon="🧠", layout="wide")

session.startup()
session.sync_from_url()

pages = [
    st.Page(session.PAGES["home"], title="Home", icon=":material/home:", default=True),
    st.Page(session.PAGES["data"], title="Data", icon=":material/folder_open:"),
    st.Page(session.PAGES["backbone"], title="Backbone", icon=":material/layers:"),
    st.Page(session.PAGES["train"], title="Train", icon=":material/model_training:"),
    st.Page(session.PAGES["evaluate"], title="Evaluate", icon=":material/analytics:"),
    st.Page(session.PAGES["try"], title="Try it", icon=":material/image_search:"),
    st.Page(session.PAGES["runs"], title="Runs & export", icon=":material/inventory_2:"),
]
page = st.navigation(pages)
session.publish_to_url()

with st.sidebar:
    st.caption("Current selection")
    ws = session.workspace()
    options = session.dataset_options(ws)
    st.markdown(
        f"**Data:** {options.get(session.get('dataset'), '—')}  \n"
        f"**Backbone:** {session.get('backbone', session.DEFAULT_BACKBONE)}  \n"
        f"**Run:** {session.get('run', '—')}"
    )
    st.caption(f"Workspace: `{ws.home}`")

page.run()
