"""The class challenge's leaderboard and the "submit this run" control, shared by the Teacher page and Runs &
export. Shows figures only: no locked image ever reaches a page."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from pages import _session as session
from pages import _tasks as task_ui
from tl_core.classroom.challenge import MAX_SUBMISSIONS, leaderboard, submission_params, submissions_made
from tl_core.errors import TLError
from tl_core.runs import tasks
from tl_core.share.progress import MISSING, setting_text
from tl_core.storage.workspace import Workspace

__all__ = ["role", "leaderboard_view", "submit_view", "challenge_caption"]


def role() -> str:
    """"teacher" or "student": the access gate's ``tl_role``; without a gate (an open server) everyone is the
    teacher, as everyone could do everything before."""
    return st.session_state.get("tl_role", "teacher")


def challenge_caption(info: dict) -> str:
    per = ", ".join(f"{c} {n}" for c, n in info["per_class"].items())
    return (f"**{info['name']}** · {info['count']} locked images ({per}) · set up "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(info['created']))}. The images are never shown, and "
            "nothing is chosen on them: each run is scored once with its model as it is.")


def leaderboard_view(ws: Workspace) -> None:
    """The leaderboard table and its sentence on ties (nothing when no group has submitted)."""
    board = leaderboard(ws)
    if not board["rows"]:
        st.caption("No group has submitted a run yet.")
        return
    df = pd.DataFrame([{
        "Rank": f"{r['rank']} (tied)" if r["tied"] else str(r["rank"]),
        "Group": r["project"], "Run": r["run"],
        "Accuracy": r["text"],
        "Strategy": setting_text("strategy", r["strategy"]) or MISSING,
        "Backbone": r["backbone"] or MISSING,
        "Training s": r["training_s"],
        "Vs the leader": r["vs_leader"],
    } for r in board["rows"]])
    st.dataframe(df, hide_index=True, width="stretch", column_config={
        "Rank": st.column_config.TextColumn(help="1 + the number of groups better beyond noise: groups the locked "
                                                 "images cannot tell apart share a rank."),
        "Accuracy": st.column_config.TextColumn(help="On the locked test images, with its Wilson 95% interval."),
        "Training s": st.column_config.NumberColumn(format="%.1f", help="Seconds the run trained."),
        "Vs the leader": st.column_config.TextColumn(help="The difference from the first row, image by image on "
                                                          "the same locked images (paired bootstrap)."),
    })
    if board["note"]:
        st.info(board["note"])


def submit_view(ws: Workspace, run_id: str) -> None:
    """The "Submit this run to the class challenge" button for a finished run, then its score."""
    try:
        params = submission_params(ws, run_id)
    except TLError as e:
        st.caption(str(e))
        return
    res = task_ui.task_view(ws, "challenge_score", params, "Scoring on the locked test set",
                            button="Submit this run to the class challenge", icon=":material/emoji_events:",
                            key=f"challenge-{run_id}",
                            button_help=f"Scores this run on the teacher's locked test images in a worker; it "
                                        "replaces your group's earlier submission on the leaderboard. A group may "
                                        f"submit {MAX_SUBMISSIONS} times (used: {submissions_made(ws)}).",
                            start=lambda: tasks.submit_challenge_run(ws, run_id, owner=session.owner()))
    if res is not None:
        st.success(f"Run {run_id} scored {res['text']} on the locked test set (submission {res.get('submissions', 1)} "
                   f"of {MAX_SUBMISSIONS} of your group).")

