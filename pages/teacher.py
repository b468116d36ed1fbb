"""Teacher: the whole class on one page. Every project with its datasets, runs, best accuracy and what it is
running; cancel, reset or delete a project; clean up after the lesson; export the class's results; set up the
class challenge on a locked test set and follow its leaderboard.

Shown only to the teacher (``tl_role``, set by the access gate; an open server has no students). Everything
long (the export, setting up the challenge, scoring) runs in a worker.
"""

import time

import pandas as pd
import streamlit as st

from pages import _challenge as challenge_ui
from pages import _session as session
from pages import _tasks as task_ui
from tl_core.classroom import challenge, overview
from tl_core.runs import tasks
from tl_core.runs.kinds import KINDS
from tl_core.storage.workspace import Workspace

session.ensure_router()

st.title("Teacher")

if challenge_ui.role() != "teacher":
    st.error("This page is for the teacher; sign in with the teacher password to open it.")
    st.stop()

top = Workspace(Workspace.default().top)


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else time.strftime(
        "%Y-%m-%d %H:%M", time.localtime(t))


def _kind_label(kind: str) -> str:
    spec = KINDS.get(kind)
    return spec.label if spec else kind


def _act(what: str, project: str) -> None:
    # a button callback: runs before the page is drawn, so the table shows the result
    try:
        ws = overview.project_of(top, project)
        if what == "cancel":
            n = tasks.cancel_all(ws)
            msg = f"Cancelled {n} task(s) of {project}."
        elif what == "reset":
            tasks.cancel_all(ws)  # the engine refuses to empty a project that still has work queued
            got = overview.reset_project(top, project)
            msg = f"Emptied {project}: {got['runs']} run(s), {got['datasets']} dataset(s) removed; its link still works."
        else:
            if project != overview.SHARED:
                tasks.cancel_all(ws)
            got = overview.delete_project(top, project)
            msg = f"Deleted {project} and its {got['runs']} run(s); its link no longer opens."
        st.session_state["_teacher_flash"] = ("success", msg)
    except Exception as e:  # a task still stopping, or the project already gone: say it on the page
        st.session_state["_teacher_flash"] = ("error", str(e))
    st.session_state["teacher_confirm"] = False


def _clean_up() -> None:
    shared = st.session_state.get("teacher_cleanup_shared", True)
    for ws in top.all_workspaces():  # the engine leaves a project with work queued: cancel it all first
        if ws.is_project or shared:
            tasks.cancel_all(ws)
    res = overview.clean_up_class(top, include_shared=shared)
    msg = f"Deleted {len(res['projects'])} project(s) and {res['runs']} run(s); the caches are kept."
    if res["stopping"]:
        msg += f" Still stopping: {', '.join(res['stopping'])}; clean up again in a few seconds."
    st.session_state["_teacher_flash"] = ("warning" if res["stopping"] else "success", msg)
    st.session_state["teacher_cleanup_sure"] = False


def projects_section() -> None:
    rows = overview.project_rows(top)
    st.subheader("Projects")
    c1, c2 = st.columns([4, 1])
    c1.caption(f"{len(rows) - 1} project(s) on this server, plus the shared workspace (users without a project "
               "link). Best accuracy: the finished run with the highest validation accuracy, with its 95% interval.")
    c2.button("Refresh", icon=":material/refresh:", key="teacher_refresh")
    df = pd.DataFrame([{
        "Project": r["project"],
        "Datasets": ", ".join(r["datasets"]) or "—",
        "Runs": f"{r['done']} of {r['runs']} finished" if r["runs"] else "—",
        "Best accuracy": r["best_text"],
        "Best run": r["best_run"] or "—",
        "Running": ", ".join(f"{_kind_label(a['kind'])} ({a['seconds']:.0f} s)"
                             for a in r["activity"] if a["status"] == "running") or "—",
        "Queued": r["queued"],
        "Last activity": _ago(r["last_activity"]),
    } for r in rows])
    st.dataframe(df, hide_index=True, width="stretch")

    names = [r["project"] for r in rows]
    project = st.selectbox("Project", names, key="teacher_project",
                           help="The project to open, cancel, reset or delete.")
    if project != overview.SHARED:
        st.caption("Its link (opens the project as its group sees it):")
        st.code(session.project_link(project), language=None)
    sure = st.checkbox(f"Yes, I mean it: act on {project}", key="teacher_confirm",
                       help="Reset and delete cannot be undone.")
    b1, b2, b3 = st.columns(3)
    b1.button("Cancel its tasks", icon=":material/stop:", disabled=not sure, on_click=_act,
              args=("cancel", project), help="Stops its queued and running trainings and checks.")
    b2.button("Reset the project", icon=":material/restart_alt:", disabled=not sure, on_click=_act,
              args=("reset", project), help="Removes its runs, datasets, weights and tasks; the project and its "
                                            "link stay.")
    b3.button("Delete the project", icon=":material/delete:", disabled=not sure or project == overview.SHARED,
              on_click=_act, args=("delete", project), help="Removes the project and everything in it.")


def after_lesson_section() -> None:
    st.subheader("After the lesson")
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Export the class's results**")
        st.caption("One zip: results.csv (every run of every project, accuracies with their intervals), the "
                   "leaderboard when there is a challenge, and each finished run's HTML report.")
        params = {"stamp": overview.class_stamp(top), "reports": True}
        res = task_ui.task_view(top, "class_export", params, "Exporting the class's results",
                                button="Prepare the export", icon=":material/archive:", key="class-export")
        if res is not None:
            f = res["files"][0]
            path = task_ui.result_file(top, tasks.find(top, "class_export", params), f["file"])
            if res["failed"]:
                st.warning(f"{len(res['failed'])} report(s) could not be written: "
                           + "; ".join(f"{x['run']}: {x['error']}" for x in res["failed"][:3]))
            if path.is_file():
                st.download_button(f"Download {f['name']} ({f['bytes'] / 1e6:.1f} MB)",
                                   data=lambda p=path: p.read_bytes(), file_name=f["name"], mime=f["mime"],
                                   icon=":material/download:", on_click="ignore", key="class-export-dl")
    with c2:
        st.markdown("**Clean up the class**")
        st.caption("Deletes every project (cancelling what they run). The caches stay, so the next class's "
                   "first runs are as fast; the challenge stays until you end it.")
        st.checkbox("Also empty the shared workspace", value=True, key="teacher_cleanup_shared")
        sure = st.checkbox("Yes, delete every project", key="teacher_cleanup_sure")
        st.button("Clean up the class", icon=":material/delete_sweep:", disabled=not sure, on_click=_clean_up)


def _end_challenge() -> None:
    challenge.remove_challenge(top)
    st.session_state.pop("challenge_setup", None)
    st.session_state["_teacher_flash"] = ("success", "The challenge has ended; its locked images are deleted.")


def challenge_section() -> None:
    st.subheader("Class challenge")
    info = challenge.challenge_info(top)
    if info:
        st.markdown(challenge_ui.challenge_caption(info))
        st.caption(f"Locked set: {info['source']}. Groups submit a finished run on Runs & export.")
        challenge_ui.leaderboard_view(top)
        with st.expander("End the challenge", icon=":material/flag:"):
            sure = st.checkbox("Yes, delete the locked images and every submission", key="challenge_end_sure")
            st.button("End the challenge", disabled=not sure, on_click=_end_challenge)
    else:
        st.caption("Hold back a test set no group sees, let each group submit its best run, and compare them on "
                   "it: a leaderboard that says which differences are only noise.")
    pending = st.session_state.get("challenge_setup")
    if pending:
        res = task_ui.task_view(top, "challenge_setup", pending, "Setting up the challenge", key="challenge-setup")
        if res is not None:
            st.success(f"Challenge '{res['name']}' is set: {res['count']} locked images.")
            if res.get("remainder"):
                st.info(f"The other {res['remainder_images']} images are the dataset '{res['remainder']}' of the "
                        "shared workspace; give groups in projects the zip below (they upload it on Data).")
                for f in res["files"]:
                    path = task_ui.result_file(top, tasks.find(top, "challenge_setup", pending), f["file"])
                    if path.is_file():
                        st.download_button(f"Training images for the groups ({f['bytes'] / 1e6:.1f} MB)",
                                           data=lambda p=path: p.read_bytes(), file_name=f["name"], mime=f["mime"],
                                           icon=":material/download:", on_click="ignore", key="challenge-rest-dl")
            if st.button("Done", key="challenge-setup-done"):
                st.session_state.pop("challenge_setup", None)
                st.rerun()
        return
    with st.expander("Set up a challenge" if not info else "Set up a new challenge (replaces this one)",
                     icon=":material/emoji_events:", expanded=not info):
        name = st.text_input("Name", value="Class challenge", key="challenge_name")
        up = st.file_uploader("Labelled images (.zip, one folder per class)", type=["zip"], key="challenge_zip",
                              help=session.upload_note())
        mode = st.radio("The locked test set", ["carve", "locked"], key="challenge_mode", format_func={
            "carve": "Carve a share of each class; the rest becomes the groups' training data",
            "locked": "Every image of the zip is locked (a test set of its own)"}.get)
        share = st.slider("Locked share of each class", 0.1, 0.5, 0.25, 0.05, key="challenge_share",
                          disabled=mode != "carve")
        if st.button("Set up the challenge", type="primary", disabled=up is None, icon=":material/lock:"):
            path = challenge.save_challenge_upload(top, up.name, up.getvalue())
            params = {"data": str(path), "carve": share if mode == "carve" else None, "seed": 0,
                      "name": name, "uploaded": True}
            if task_ui.submit(top, "challenge_setup", params) is not None:
                st.session_state["challenge_setup"] = params
                st.rerun()


with session.page_errors():
    if "_teacher_flash" in st.session_state:
        kind, text = st.session_state.pop("_teacher_flash")
        getattr(st, kind)(text)
    projects_section()
    after_lesson_section()
    challenge_section()
