"""Fix the data in place, from the image in view: exclude it, move it to another class, or take it back. Each
action is one click and makes a new version of the dataset (:mod:`tl_core.data.versions`), and says so.

A change to a sample dataset (or any folder outside the workspace) goes to a managed copy in the workspace,
made on the first change: the sample's own files never change. Used by the Data page (the data check) and by
Evaluate (the mistakes).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import streamlit as st

from pages import _session as session
from tl_core.data import versions
from tl_core.errors import DatasetError

FLASH = "_fix_flash"
#: A fix's message shows on every run of the page for this long: a run can be cut short by the next one (a
#: task's progress finishing), and a message shown only once would then never reach the screen.
FLASH_SECONDS = 8.0


def _counts_text(c: dict[str, Any]) -> str:
    return f"{c['images']} images in {len(c['classes'])} classes" + (f", {c['excluded']} excluded" if c["excluded"] else "")


def apply(ws, data: str, action: str, paths: list[str], to: str | None = None, why: str | None = None,
          follow: bool = False) -> None:
    """A button callback: exclude (``exclude``), include again (``include``) or move (``move``, to class ``to``)
    the images ``paths`` of the dataset ``data``; the outcome is kept for :func:`show_flash`.

    Args:
        follow: select the managed copy as the page's dataset when one was made (the Data page).
    """
    try:
        name, copied = versions.dataset_for_changes(ws, data)
        if action == "move":
            entry = versions.relabel_images(ws, name, paths, to)
        else:
            entry = versions.exclude_images(ws, name, paths, excluded=action == "exclude", why=why)
    except DatasetError as e:
        st.session_state[FLASH] = ("error", str(e), time.monotonic())
        return
    if entry.get("unchanged"):
        msg = f"Nothing to change: the current version of '{name}' ({entry['version']}) is already like that."
    else:
        msg = (f"{entry['change'][:1].upper()}{entry['change'][1:]}: new version **{entry['version']}** of "
               f"'{name}' ({_counts_text(entry['counts'])}). Restore an earlier version on the Data page.")
    if copied:
        msg += (f" Your first change made '{name}', a managed copy in the workspace: the original files are "
                "unchanged.")
    st.session_state[FLASH] = ("success", msg, time.monotonic())
    if follow and copied:
        old = session.get("dataset")
        session.select("dataset", f"workspace/{name}")
        if old and f"_audit_{old}" in st.session_state:  # the check's images map to the copy's files
            st.session_state[f"_audit_workspace/{name}"] = st.session_state[f"_audit_{old}"]


def show_flash() -> None:
    """The outcome of the last fix, on every run for FLASH_SECONDS after it (then dropped)."""
    if FLASH in st.session_state:
        kind, msg, when = st.session_state[FLASH]
        if time.monotonic() - when > FLASH_SECONDS:
            del st.session_state[FLASH]
            return
        (st.error if kind == "error" else st.success)(msg)


def current_rows(ws, data: str) -> dict[str, dict[str, Any]] | None:
    """The rows of the current version of the dataset changes to ``data`` go to, by file (plus ``_name``); None
    while there is none (a sample not changed yet, a dataset not versioned yet)."""
    try:
        name = versions.managed_copy(ws, data)
        if name is None or not versions.is_managed(ws, name):
            return None
        return {"_name": name, **{r["file"]: r for r in versions.version_rows(ws, name)}}
    except DatasetError:
        return None


def is_excluded(ws, rows: dict[str, dict[str, Any]] | None, path: str) -> bool:
    """Whether the current version (``rows`` of :func:`current_rows`) leaves the image ``path`` out."""
    if rows is None:
        return False
    row = rows.get(versions.file_in_dataset(ws, rows["_name"], path))
    return bool(row and row["excluded"])


def _key(*parts: str) -> str:
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def image_actions(ws, data: str, path: str, label: str, classes: list[str], where: str,
                  rows: dict[str, dict[str, Any]] | None, suggested: str | None = None,
                  why: str | None = None, follow: bool = False) -> None:
    """Under an image: what the current version says of it, and one-click Exclude / Move to … buttons."""
    row = None
    if rows is not None:
        row = rows.get(versions.file_in_dataset(ws, rows["_name"], path))
    k = _key(where, path)
    if row is not None and row["excluded"]:
        st.caption("Excluded from the current version.")
        st.button("Include again", key=f"inc-{k}", on_click=apply, args=(ws, data, "include", [path]),
                  kwargs={"follow": follow}, icon=":material/undo:")
        return
    now = row["label"] if row is not None else label
    if now != label:
        st.caption(f"Moved to **{now}** in the current version.")
    st.button("Exclude", key=f"exc-{k}", on_click=apply, args=(ws, data, "exclude", [path]),
              kwargs={"why": why, "follow": follow}, icon=":material/block:",
              help="Leave this image out: a new version of the dataset without it (nothing is deleted; restore "
                   "an earlier version to bring it back).")
    if suggested and suggested != now:
        st.button(f"Move to {suggested}", key=f"sug-{k}", on_click=apply, args=(ws, data, "move", [path]),
                  kwargs={"to": suggested, "follow": follow}, icon=":material/drive_file_move:",
                  help=f"Label this image '{suggested}' in a new version of the dataset.")
    others = [c for c in classes if c not in (now, suggested)]
    if others:
        with st.popover("Move to…", icon=":material/label:"):
            for c in others:
                st.button(c, key=f"mv-{k}-{c}", on_click=apply, args=(ws, data, "move", [path]),
                          kwargs={"to": c, "follow": follow}, width="stretch")


def fixable_images(ws, data: str, items: list[dict[str, Any]], classes: list[str], where: str, width: int = 96,
                   per_row: int = 6, follow: bool = False) -> None:
    """A grid of images, each with its caption and actions. ``items``: [{path, caption, label, suggested?, why?}]."""
    shown = [i for i in items if Path(i["path"]).is_file()]
    if not shown:
        return
    rows = current_rows(ws, data)
    seen: dict[str, int] = {}
    for start in range(0, len(shown), per_row):
        cols = st.columns(per_row)
        for col, it in zip(cols, shown[start:start + per_row]):
            # an image can be listed twice (a training image that two validation images copy): its second
            # listing gets buttons of its own
            n = seen[it["path"]] = seen.get(it["path"], 0) + 1
            with col:
                st.image(it["path"], width=width, caption=it["caption"])
                image_actions(ws, data, it["path"], it["label"], classes, where if n == 1 else f"{where}#{n}", rows,
                              it.get("suggested"), it.get("why"), follow)


def history_rows(hist: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The versions table of a dataset (``versions.history``, newest first), one row per change.

    A version id is a fingerprint of the images and labels, so a restore brings an earlier id back: the newest row
    is marked "current", and an older row with the same id "same as current" (the same images, not a copy).
    """
    now = hist[0]["version"] if hist else None
    return [{"state": ("current" if i == 0 else "same as current" if h["version"] == now else ""),
             "version": h["version"], "when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["when"])),
             "change": h["change"], "images": h["counts"]["images"], "excluded": h["counts"]["excluded"],
             "classes": len(h["counts"]["classes"])} for i, h in enumerate(hist)]


def keep_versions_open(name: str) -> None:
    """Remember that the versions of ``name`` were used (a Restore): their expander stays open on the reruns."""
    st.session_state[f"_versions_open_{name}"] = True


def versions_open(name: str) -> bool:
    """Whether the versions expander of ``name`` opens expanded (it was used in this session)."""
    return bool(st.session_state.get(f"_versions_open_{name}"))
