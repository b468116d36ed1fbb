"""Long computations of the pages, as tasks run by worker processes (``tl_core.runs.tasks``); never here.

A page names what it wants (a task kind and the parameters its result depends on) and :func:`task_view`
does the rest: it finds the task again (after a refresh, in another tab, after a restart of the server,
or one that another user asked for: identical requests share one task), offers the start button when
there is none (or the last one failed or was cancelled), shows the queue position while it waits and
the progress with the time left while it runs, with a Cancel button (a fragment that polls the run store),
the error when it failed, and returns the result when it is done.

Quick requests of the interactive lane (a prediction, a heat-map, checking a weights file) are waited for
in the script with a spinner instead (:func:`wait_for`): a warm interactive worker answers in well under
a second.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from pages import _access as access
from pages import _session as session
from tl_core.errors import TLError
from tl_core.runs import tasks
from tl_core.share.progress import task_progress, timing_text
from tl_core.runs.tasks import Task
from tl_core.storage.workspace import Workspace

__all__ = ["TaskFailed", "task_view", "wait_for", "submit", "result", "result_file", "POLL_S", "INTERACTIVE_TIMEOUT_S"]

#: How often a page looks at a queued or running task (seconds).
POLL_S = 1.0
#: How long a page waits for an interactive task (the first one starts a worker and loads a model).
INTERACTIVE_TIMEOUT_S = 120.0
#: Statuses of a task that ended without a result.
_FINAL = ("failed", "cancelled", "interrupted")


class TaskFailed(TLError):
    """A task ended without a result (its error says why)."""


@st.cache_data(show_spinner=False, max_entries=256)
def _result(task_id: str, home: str, _ws: Workspace) -> Any:
    # a done task's result never changes: read its file once per server process
    return tasks.result(_ws, task_id)


def result(ws: Workspace, task: Task) -> Any:
    """A done task's result (JSON data), read once per server process."""
    return _result(task.id, str(ws.home), ws)


def result_file(ws: Workspace, task: Task | str, name: str) -> Path:
    """A file a done task's result names (images, exports), in the task's folder."""
    return tasks.task_dir(ws, task if isinstance(task, str) else task.id) / Path(name).name


def submit(ws: Workspace, kind: str, params: dict[str, Any], share: bool = True) -> Task | None:
    """Submit a task for this session; a full queue is said in one sentence (returns None then)."""
    try:
        return tasks.submit(ws, kind, params, owner=session.owner(), share=share)
    except tasks.QueueFullError as e:
        st.error(str(e))
        return None


def _done_caption(task: Task) -> None:
    ago = time.time() - (task.finished or time.time())
    when = "" if ago < 120 else f" · computed at {time.strftime('%H:%M', time.localtime(task.finished))}"
    st.caption(f"Took {timing_text(task.total_s, task.waited_s, task.ran_s)}{when}.")


def task_view(ws: Workspace, kind: str, params: dict[str, Any], label: str, *, button: str | None = None,
              button_help: str | None = None, icon: str | None = None, auto: bool = False, key: str | None = None,
              poll_s: float = POLL_S, describe: Callable[[Task], tuple[float, str]] | None = None,
              show_timing: bool = True, compact: bool = False,
              start: Callable[[], Task | None] | None = None) -> Any | None:
    """The result of the task ``kind(params)``, or None while there is none (with what to do, drawn here).

    Args:
        ws: the workspace.
        kind: a task kind (``tl_core.runs.kinds``).
        params: everything the result depends on (a dataset's signature, a run's file stamp …).
        label: what the task does, in words ("Checking the data").
        button: the start button's label (default ``label``); not drawn when ``auto``.
        button_help: its help.
        icon: its icon.
        auto: start the task without a button (cheap views that follow from a click made earlier).
        key: widget key prefix (default the kind).
        poll_s: seconds between looks at the task while it waits or runs.
        describe: (fraction, text) of a running task, instead of its message, counts and time left.
        show_timing: say how long the result took from the click.
        compact: a progress bar only, without Cancel (quick previews).
        start: what the start button does instead of :func:`submit` (a tl_core function that checks more before
            it queues the task, e.g. ``tasks.submit_challenge_run``); its TLError is shown in one sentence.
    Returns:
        The task's result (JSON data) when it is done, else None.
    """
    key = key or f"task-{kind}"
    task = tasks.find(ws, kind, params)
    if task is not None and task.status == "done":
        try:
            res = result(ws, task)
        except TLError as e:  # the result files were removed: compute it again
            st.warning(str(e))
            if st.button(f"{button or label} again", key=f"{key}-again", icon=icon):
                if submit(ws, kind, params, share=False) is not None:
                    st.rerun()
            return None
        if show_timing:
            _done_caption(task)
        return res
    if task is None or task.status in _FINAL:
        if task is not None and task.status == "cancelled":
            st.caption(f"{label}: cancelled. Start it again when you like.")
        elif task is not None:
            st.error(task.error or f"{label} failed.")
        if auto and task is None:
            task = submit(ws, kind, params)
            if task is None:
                return None
            if task.status == "done":
                st.rerun()
        else:
            again = task is not None and task.status in ("failed", "interrupted")
            text = f"{button or label} again" if again else (button or label)
            if st.button(text, key=f"{key}-start", type="primary", icon=icon, help=button_help):
                if start is None:
                    started = submit(ws, kind, params)
                else:
                    try:
                        started = start()
                    except TLError as e:
                        st.error(str(e))
                        started = None
                if started is not None:
                    st.rerun()
            return None
    _live(ws, task.id, label, key, poll_s, describe, compact)
    return None


def _cancel(ws: Workspace, task_id: str, key: str) -> None:
    """Cancel button callback: ask the task to stop and remember it, so the page says "Cancelling…" at once."""
    try:
        tasks.cancel(ws, task_id, actor=access.actor())
        st.session_state[f"{key}-cancelling"] = task_id
    except TLError as e:  # another project's or another user's task (tl_core.access)
        st.session_state[f"{key}-cancel-error"] = str(e)


def _live(ws: Workspace, task_id: str, label: str, key: str, poll_s: float,
          describe: Callable[[Task], tuple[float, str]] | None, compact: bool = False) -> None:
    """Queue position or progress of an active task, with Cancel; polled until it ends, then the page redraws."""

    @st.fragment(run_every=poll_s)
    def live() -> None:
        session.recover_now(ws)  # a worker that died meanwhile: its task is marked and the queue moves on
        t = tasks.get(ws, task_id)
        if not t.active:
            st.rerun()  # ended: redraw the whole page with its result (or its error)
        with st.container(border=not compact):
            if t.status == "queued":
                st.progress(0.0, text=f"{label} · {tasks.describe_wait(ws, t)}")
            else:
                frac, text = describe(t) if describe else task_progress(t.progress, label)
                if st.session_state.get(f"{key}-cancelling") == t.id:  # asked: say so until it stops
                    text = f"Cancelling… (was: {text}); it stops at its next check point"
                st.progress(frac, text=f"{text} · {t.total_s:.0f} s since the click")
            if compact:
                return
            c1, c2 = st.columns([1, 4], vertical_alignment="center")
            # a callback: the click's own rerun already draws "Cancelling…" above
            c1.button("Cancel", key=f"{key}-cancel", icon=":material/stop:", on_click=_cancel, args=(ws, t.id, key),
                      disabled=st.session_state.get(f"{key}-cancelling") == t.id,
                      help="Stops it (for everyone who asked for the same result).")
            if f"{key}-cancel-error" in st.session_state:
                st.error(st.session_state.pop(f"{key}-cancel-error"))
            c2.caption("This runs on the server, not in your browser: you may switch pages or refresh and come "
                       "back to it.")

    live()


def wait_for(ws: Workspace, kind: str, params: dict[str, Any], label: str,
             timeout_s: float = INTERACTIVE_TIMEOUT_S) -> tuple[Task, Any]:
    """Submit an interactive task and wait for it here, under a spinner (polls every 0.1 s).

    Returns:
        (the task, its result).
    Raises:
        TaskFailed: it failed, was cancelled, or took longer than ``timeout_s`` (it stays queued: asking again
        finds it).
        QueueFullError: too many tasks are waiting.
    """
    task = tasks.submit(ws, kind, params, owner=session.owner())
    deadline = time.monotonic() + timeout_s
    with st.spinner(f"{label}…"):
        while task.active:
            if time.monotonic() > deadline:
                raise TaskFailed(f"{label} is taking more than {timeout_s:.0f} s (the server is busy, or still "
                                 "loading the model); try again in a moment.")
            time.sleep(0.1)
            task = tasks.get(ws, task.id)
            if task.active:
                session.recover_now(ws)  # a dead interactive worker: marked, and another one started
    if task.status != "done":
        raise TaskFailed(task.error or f"{label}: {task.status}.")
    return task, result(ws, task)
