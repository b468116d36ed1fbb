"""The gate: with a class password set, nothing but a password form is served until it is given; the teacher
password makes the session the teacher's. Rules and checks live in :mod:`tl_core.access`; this draws them.

The contract other pages rely on: after :func:`gate`, ``st.session_state["tl_role"]`` is ``"teacher"`` (the
teacher password was given, or no password is configured at all: everyone may do everything, as before) or
``"student"`` (the class password was given, or only a teacher password is configured and was not given).
:func:`actor` is who the engine's delete, rename and cancel functions check.

The passwords come from ``TL_PASSWORD`` / ``TL_TEACHER_PASSWORD``, else from ``password`` /
``teacher_password`` under ``[tl]`` in ``.streamlit/secrets.toml`` (``st.secrets``) or in
``.streamlit/config.toml`` (docs/classroom.md, Access).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import streamlit as st

from pages import _session as session
from tl_core.access import (STUDENT, TEACHER, AccessError, Actor, Throttle, check_password, class_code, passwords,
                            project_for_code, remember_token, role_for_token)
from tl_core.storage.workspace import Workspace

ROLE_KEY = "tl_role"
#: The cookie that remembers a given password in this browser (a refresh, a new tab, a link): see
#: :func:`tl_core.access.remember_token`.
COOKIE = "tl_access"
_APP_DIR = Path(__file__).resolve().parent.parent


def _from_files() -> tuple[str | None, str | None]:
    """``[tl] password`` and ``teacher_password`` from the secrets, else from ``.streamlit/config.toml`` (the
    working folder's, the app's, then the user's)."""
    found: dict[str, str] = {}
    try:
        if st.secrets.load_if_toml_exists():  # reading st.secrets without a secrets file raises
            found = {k: str(v) for k, v in dict(st.secrets.get("tl") or {}).items() if v}
    except Exception:  # a damaged secrets file: the environment and config.toml still count
        found = {}
    for cfg in (Path.cwd() / ".streamlit" / "config.toml", _APP_DIR / ".streamlit" / "config.toml",
                Path.home() / ".streamlit" / "config.toml"):
        try:
            section = tomllib.loads(cfg.read_text(encoding="utf-8")).get("tl") or {}
        except (OSError, tomllib.TOMLDecodeError):
            continue
        for k, v in section.items():
            if v and k not in found:
                found[k] = str(v)
    return found.get("password"), found.get("teacher_password")


def configured() -> tuple[str, str]:
    """(class password, teacher password) as configured; "" where none is."""
    return passwords(*_from_files())


@st.cache_resource(show_spinner=False)
def _throttles() -> dict[str, Throttle]:
    # server-wide, so that a new tab or a refresh does not start afresh
    return {}


def _throttle() -> Throttle:
    """The throttle of this client: its address when known, else this browser session."""
    try:
        client = st.context.ip_address
    except Exception:
        client = None
    key = client or f"session:{session.owner()}"
    return _throttles().setdefault(key, Throttle())


def role() -> str:
    """This session's role (:func:`gate` sets it)."""
    return st.session_state.get(ROLE_KEY, TEACHER)


def actor() -> Actor:
    """Who this session is, for the engine's ownership checks (:mod:`tl_core.access`)."""
    return Actor(role(), project=st.session_state.get("project"), session=session.owner())


def _try(given: str, class_pw: str, teacher_pw: str) -> str | None:
    """Check a password; returns the role it grants, or None. Slowed down after repeated wrong guesses."""
    throttle = _throttle()
    refusal = throttle.refusal()
    if refusal:
        st.session_state["_access_error"] = refusal
        return None
    if check_password(given, teacher_pw):
        throttle.succeeded()
        return TEACHER
    if check_password(given, class_pw):
        throttle.succeeded()
        return STUDENT
    wait = throttle.failed()
    st.session_state["_access_error"] = ("That password is not right; ask your teacher for it." if not wait else
                                         f"That password is not right; wait {wait:.0f} s before trying again.")
    return None


def _join_code(code: str) -> bool:
    """Enter the project of a class code; False (and an error to show) when no project has it."""
    try:
        slug = project_for_code(Workspace.default(), code)
    except AccessError as e:
        st.session_state["_access_error"] = str(e)
        return False
    session.enter_project(slug)
    return True


def gate(pages: list | None = None) -> str:
    """Set this session's role, serving only the password form until the class password is given.

    Call it in ``app.py`` before ``st.navigation``. Stops the script while the form is all there is to see.

    Args:
        pages: the app's ``st.Page`` list: registered with the navigation hidden while the form is shown, so
            that the page a link names opens once the password is given, and no page's name shows before.

    Returns:
        The role: ``"teacher"`` or ``"student"``.
    """
    class_pw, teacher_pw = configured()
    if not class_pw and not teacher_pw:  # open mode: nothing changes
        st.session_state[ROLE_KEY] = TEACHER
        return TEACHER
    _write_cookie()  # a password just given (remember it) or a sign-out (forget it)
    if ROLE_KEY in st.session_state:
        return st.session_state[ROLE_KEY]
    remembered = None
    if not st.session_state.get("_access_signed_out"):
        try:
            remembered = role_for_token(st.context.cookies.get(COOKIE), class_pw, teacher_pw)
        except Exception:  # no browser context (tests without one)
            remembered = None
    if remembered:
        st.session_state[ROLE_KEY] = remembered
        return remembered
    if not class_pw:  # only a teacher password: everyone else is a student, with nothing to type
        st.session_state[ROLE_KEY] = STUDENT
        return STUDENT
    if pages:
        st.navigation(pages, position="hidden")  # ends Streamlit's pages/-folder mode, which lists every page
    st.title("TL Studio")
    with st.form("tl_password_form"):
        given = st.text_input("Class password", type="password", key="_access_password",
                              help="Your teacher gives it to the class; the teacher's own password works here too.")
        code = st.text_input("Class code of your group's project (optional)", key="_access_code", max_chars=6,
                             placeholder="e.g. 2B3C4D",
                             help="Shown in your project's sidebar; or open your project's link instead.")
        sent = st.form_submit_button("Open TL Studio", type="primary")
    if sent:
        granted = _try(given, class_pw, teacher_pw)
        if granted and (not code.strip() or _join_code(code)):
            _grant(granted, teacher_pw if granted == TEACHER else class_pw)
            st.session_state.pop("_access_password", None)
            st.rerun()
    if "_access_error" in st.session_state:
        st.error(st.session_state.pop("_access_error"))
    st.stop()
    return STUDENT  # not reached


def _grant(granted: str, password: str) -> None:
    """Give this session ``granted``, and have the browser remember it (written on the next run)."""
    st.session_state[ROLE_KEY] = granted
    st.session_state["_access_cookie"] = remember_token(granted, password)
    st.session_state.pop("_access_signed_out", None)


def _write_cookie() -> None:
    """Store the token of a password just given in a cookie (a script in an invisible frame of this origin)."""
    token = st.session_state.pop("_access_cookie", None)
    if token is not None:
        import streamlit.components.v1 as components

        age = 43200 if token else 0  # 12 hours: a school day; 0 deletes it
        components.html(f"<script>parent.document.cookie = '{COOKIE}={token}; path=/; max-age={age}; "
                        "SameSite=Strict';</script>", height=0)


def _sign_out() -> None:
    st.session_state.pop(ROLE_KEY, None)
    st.session_state["_access_signed_out"] = True  # the cookie this session came with no longer counts
    st.session_state["_access_cookie"] = ""


def _teacher_sign_in() -> None:
    # a form callback: runs before the page is drawn, so the whole page shows the new role
    class_pw, teacher_pw = configured()
    if _try(st.session_state.get("_access_teacher", ""), "", teacher_pw) == TEACHER:
        _grant(TEACHER, teacher_pw)
    st.session_state["_access_teacher"] = ""


def _join() -> None:
    if _join_code(st.session_state.get("_access_join", "")):
        st.session_state["_access_join"] = ""


def sidebar(ws: Workspace) -> None:
    """The project's class code, joining a project by its code, and the teacher's sign-in."""
    if ws.is_project:
        st.caption(f"Class code: **{class_code(ws.name)}**: your group joins this project with it.")
    elif role() == STUDENT:
        st.caption("In class, work in your group's project: here only the teacher may delete, rename or cancel "
                   "what others made.")
    class_pw, teacher_pw = configured()
    if "_access_error" in st.session_state:
        st.error(st.session_state.pop("_access_error"))
    with st.popover("Join a project by its class code", icon=":material/group_add:", width="stretch"):
        st.text_input("Class code", key="_access_join", max_chars=6, placeholder="e.g. 2B3C4D")
        st.button("Join", key="_access_join_button", on_click=_join)
    if teacher_pw and role() == STUDENT:
        with st.popover("I am the teacher", icon=":material/school:", width="stretch"):
            with st.form("tl_teacher_form", border=False):
                st.text_input("Teacher password", type="password", key="_access_teacher")
                st.form_submit_button("Sign in", on_click=_teacher_sign_in)
    elif class_pw or teacher_pw:
        st.caption(f"Signed in as the {role()}.")
    if class_pw or (teacher_pw and role() == TEACHER):
        st.button("Sign out", key="_access_sign_out", on_click=_sign_out, icon=":material/logout:",
                  help="This browser forgets the password (it remembers it for 12 hours otherwise).")
