"""The class challenge: a locked test set the teacher holds back, every group's submitted run scored on it,
and a leaderboard that says when groups are tied within noise.

::

    <TL_HOME>/challenge/
        challenge.json        its name, classes, images per class, when it was set up, its id
        test/<class>/<sha>.*  the locked images (renamed by content: a name says nothing about a picture)
        submissions/<project>.json   one group's latest scored submission (accuracy, counts, per-image right/wrong)
        incoming/             uploads waiting for the set-up task

The locked set lives outside every project and every dataset list: no page shows its images, no audit,
advisor, threshold or early stop reads it. A run is scored with its saved model and temperature as they are
(nothing is fitted on the locked images), in a worker (task kinds ``challenge_setup`` and ``challenge_score``).
A new challenge replaces the old one and its submissions.

Ranks are honest about noise: a group's rank is 1 + the number of groups whose accuracy is higher *beyond
noise* (a paired bootstrap on the same locked images, :func:`tl_core.metrics.compare_figures`), so
groups the locked set cannot tell apart share a rank, and the leaderboard says so in a sentence.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import secrets
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DatasetError, RunError, TLError
from ..fileio import write_atomic, write_json_atomic
from ..metrics import compare_figures, format_figure, wilson_interval
from ..share.progress import kept_model
from ..storage.workspace import Workspace
from .projects import label as _project_label

__all__ = ["challenge_dir", "challenge_info", "save_challenge_upload", "setup_challenge", "remove_challenge",
           "submission_params", "submissions_made", "check_submission_cap", "locked_images_in",
           "MAX_SUBMISSIONS", "score_run", "leaderboard", "leaderboard_csv", "LEADERBOARD_COLUMNS"]

log = logging.getLogger(__name__)

_INFO = "challenge.json"
#: Fewest locked images per class: fewer makes every figure a coin toss.
MIN_LOCKED_PER_CLASS = 2
#: Scored submissions one project may make to one challenge: more would let a group pick its best run on the
#: locked images (choosing on the test set, by many submissions).
MAX_SUBMISSIONS = 5


def challenge_dir(top: Workspace) -> Path:
    """``<TL_HOME>/challenge``: outside every project and every dataset list."""
    return Workspace(top.top).home / "challenge"


def challenge_info(top: Workspace) -> dict[str, Any] | None:
    """The current challenge as anyone may see it (no paths, no images), or None when there is none:
    {"id", "name", "classes", "per_class", "count", "created", "source"}."""
    try:
        return json.loads((challenge_dir(top) / _INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def save_challenge_upload(top: Workspace, filename: str, data: bytes) -> Path:
    """Keep a teacher's uploaded zip where no dataset list looks (``challenge/incoming/``) for the set-up task.

    Raises:
        DatasetError: empty, or not a zip.
    """
    if not data:
        raise DatasetError(f"{filename} is empty; upload a .zip with one folder per class.")
    d = challenge_dir(top) / "incoming"
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"{secrets.token_hex(6)}.zip"
    write_atomic(out, data)
    if not zipfile.is_zipfile(out):
        out.unlink(missing_ok=True)
        raise DatasetError(f"{filename} is not a zip archive; upload a .zip with one folder per class.")
    return out


def _safe_dataset_name(top: Workspace, name: str) -> Path:
    from ..data.library import safe_name

    base = safe_name(name)
    target, n = top.datasets_dir / base, 2
    while target.exists():
        target, n = top.datasets_dir / f"{base}-{n}", n + 1
    return target


def _copy_items(items: list, dest: Path, by_content: bool) -> None:
    for it in items:
        d = dest / it.label
        d.mkdir(parents=True, exist_ok=True)
        name = f"{it.sha256[:16]}{it.path.suffix.lower()}" if by_content else it.path.name
        if not (d / name).exists():
            shutil.copyfile(it.path, d / name)


def setup_challenge(top: Workspace, data: str | os.PathLike, carve: float | None = None, seed: int = 0,
                    name: str = "Class challenge", remainder_name: str | None = None,
                    remainder_zip: str | os.PathLike | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Set up the class challenge from a labelled image set (a folder or a zip with one folder per class).

    Args:
        top: any workspace of the server (the challenge lives at its TL_HOME).
        data: the images.
        carve: None: every image is locked (a test set of its own). A share (0-0.9): that share of each class
            is carved as the locked set (seeded, stratified, exact duplicates kept together, as the locked test
            share of training is), and the rest becomes a dataset of the shared workspace for the groups.
        seed: which images are carved.
        name: the challenge's name, shown on the leaderboard.
        remainder_name: the name of the dataset the rest becomes (default: the challenge's name).
        remainder_zip: also write the rest as a zip here (to hand to groups working in projects).
        progress: (done, total) while images are checked.
    Returns:
        The public info (:func:`challenge_info`) plus ``remainder`` (the dataset's name, or None) and
        ``remainder_images``.
    Raises:
        DatasetError: unusable images, a multi-label set, fewer than two classes, or fewer than
            :data:`MIN_LOCKED_PER_CLASS` locked images in a class.
    """
    from ..data.intake import open_dataset
    from ..data.splits import split_dataset

    top = Workspace(top.top)
    cdir = challenge_dir(top)
    cdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(6)
    ds = open_dataset(data, extract_dir=cdir / "incoming" / f"unpacked-{token}", progress=progress,
                      min_per_class=1, check_cache=top.cache_dir / "checked.sqlite")
    if ds.multi_label:
        raise DatasetError("The challenge takes single-label images (one folder per class); this set is multi-label.")
    if len(ds.classes) < 2:
        raise DatasetError("The challenge needs two classes or more (one folder per class).")
    rest: list = []
    if carve:
        if not 0 < carve < 0.9:
            raise DatasetError(f"The locked share must be between 0 and 0.9 (got {carve}).")
        split = split_dataset(ds, val_split=0.0, seed=seed, test_split=carve)
        locked, rest = split.test, split.train + split.val
    else:
        locked = list(ds.items)
    per_class = {c: sum(i.label == c for i in locked) for c in ds.classes}
    thin = {c: n for c, n in per_class.items() if n < MIN_LOCKED_PER_CLASS}
    if thin:
        raise DatasetError("Too few locked images in " + ", ".join(f"{c} ({n})" for c, n in thin.items())
                           + f"; the challenge needs {MIN_LOCKED_PER_CLASS} or more per class"
                           + (": carve a larger share, or upload more images." if carve else "."))
    staging = cdir / f".new-{token}"
    _copy_items(locked, staging / "test", by_content=True)
    info = {"id": token, "name": name.strip() or "Class challenge", "classes": list(ds.classes),
            "per_class": per_class, "count": len(locked), "created": time.time(),
            "source": f"{int(round(carve * 100))}% of each class carved from {Path(str(data)).name}" if carve
            else f"uploaded as a locked set ({Path(str(data)).name})"}
    write_json_atomic(staging / _INFO, info)
    # the new challenge replaces the old one and its submissions (scored on other images)
    for old in ("test", "submissions", _INFO):
        p = cdir / old
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    os.replace(staging / "test", cdir / "test")
    os.replace(staging / _INFO, cdir / _INFO)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(cdir / "incoming" / f"unpacked-{token}", ignore_errors=True)
    out = dict(info, remainder=None, remainder_images=len(rest))
    if rest:
        from ..data.versions import ensure_versions

        target = _safe_dataset_name(top, remainder_name or info["name"])
        tmp = top.datasets_dir / f".carve-{token}"
        _copy_items(rest, tmp, by_content=False)
        os.replace(tmp, target)
        ensure_versions(top, target.name, change=f"the rest of {Path(str(data)).name} after the challenge's "
                                                  "locked images were carved out")
        out["remainder"] = target.name
        if remainder_zip:
            with zipfile.ZipFile(remainder_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(target.rglob("*")):
                    if f.is_file() and not f.name.startswith("."):
                        zf.write(f, f"{target.name}/{f.relative_to(target)}")
    log.info("challenge %s: %d locked images, %d for the groups", token, len(locked), len(rest))
    return out


def remove_challenge(top: Workspace) -> None:
    """End the challenge: its locked images and submissions are removed."""
    shutil.rmtree(challenge_dir(top), ignore_errors=True)


def submission_params(ws: Workspace, run_id: str) -> dict[str, Any]:
    """The ``challenge_score`` task's parameters for a run (they key it: the run's files and the challenge);
    ``tl_core.runs.tasks.submit_challenge_run`` queues it.

    Raises:
        RunError: no challenge is set up, or the run is not finished.
    """
    from ..storage.files import RunFiles

    info = challenge_info(ws)
    if info is None:
        raise RunError("There is no class challenge on this server yet; the teacher sets it up.")
    run = ws.store().get(run_id)
    if run["status"] != "done":
        raise RunError(f"Run {run_id} is {run['status']}; submit a finished run.")
    files = RunFiles(ws.run_dir(run_id))
    return {"run": str(files.dir), "stamp": files.stamp(), "challenge": info["id"], "project": _project_label(ws)}


def _submission_file(top: Workspace, project: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", project).strip("._") or "shared"
    return challenge_dir(top) / "submissions" / f"{safe}.json"


def submissions_made(ws: Workspace, info: dict[str, Any] | None = None) -> int:
    """How many scored submissions this workspace's project has made to the current challenge."""
    info = info or challenge_info(ws)
    if info is None:
        return 0
    try:
        sub = json.loads(_submission_file(ws, _project_label(ws)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    return int(sub.get("submissions", 1)) if sub.get("challenge") == info["id"] else 0


def check_submission_cap(ws: Workspace, info: dict[str, Any] | None = None) -> int:
    """How many submissions this workspace's project has made, when it may make one more.

    Raises:
        RunError: it has made :data:`MAX_SUBMISSIONS` already.
    """
    made = submissions_made(ws, info)
    if made >= MAX_SUBMISSIONS:
        raise RunError(f"Your group has made its {MAX_SUBMISSIONS} submissions to this challenge, the most one group "
                       "may make (more would pick the best run on the locked images); your last one stays on the "
                       "leaderboard.")
    return made


def locked_images_in(ws: Workspace, data: str | os.PathLike | None, locked: set[str]) -> int | None:
    """How many images of the dataset a run learned from (``data``: its folder, zip or ``NAME@VERSION``) are, by
    their content, locked test images; None when that data is gone (nothing to compare)."""
    from ..data.library import open_data

    if not data:
        return None
    try:
        ds = open_data(data, ws, min_per_class=1)
    except TLError:
        return None
    return sum(1 for i in ds.items if i.sha256 in locked)


def score_run(ws: Workspace, run_dir: str | os.PathLike, challenge_id: str | None = None,
              progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Score a finished run on the locked set and record it as its project's submission (replacing the project's
    earlier one). The run's saved model and temperature are used as they are: nothing is chosen on these images.

    Args:
        ws: the run's workspace (project).
        run_dir: the run's folder.
        challenge_id: the challenge it was submitted to (a run submitted to an older challenge is refused).
        progress: unused (kept for the task's signature).
    Returns:
        The submission without the per-image answers: {"project", "run", "accuracy", "accuracy_ci", "correct",
        "count", "text", "strategy", "backbone", "training_s", "scoring_s", "submitted", "submissions" (this
        project's count so far), "leak_checked" (False when the run's data is gone and could not be compared)}.
    Raises:
        RunError: no challenge, another challenge than the one submitted to, or the project has made its
        :data:`MAX_SUBMISSIONS`. DatasetError: the run learned from locked images (found by content in its
        data), does not know the challenge's classes, or is multi-label.
    """
    from ..data.intake import open_dataset
    from ..metrics import softmax
    from ..share.loading import load_model
    from ..share.predict import logits_of_dataset_items

    t0 = time.monotonic()
    info = challenge_info(ws)
    if info is None:
        raise RunError("The class challenge was removed; nothing to score against.")
    if challenge_id and challenge_id != info["id"]:
        raise RunError("The teacher set up a new challenge since this run was submitted; submit it again.")
    made = check_submission_cap(ws, info)
    run_id = Path(run_dir).name
    try:
        row = ws.store().get(run_id)
    except RunError:
        row = {}
    ds = open_dataset(challenge_dir(ws) / "test", min_per_class=1, check_cache=ws.cache_dir / "checked.sqlite")
    leaked = locked_images_in(ws, row.get("data"), {i.sha256 for i in ds.items})
    if leaked:
        raise DatasetError(f"This run learned from {leaked} of the challenge's locked test images (the same pictures, "
                           "found by their content in its training data), so its score would say nothing; train on "
                           "data without them (the teacher's set for the groups) and submit that run.")
    tm = load_model(run_dir, device="auto")
    if tm.meta.multi_label:
        raise DatasetError("A multi-label model cannot enter a single-label challenge.")
    unknown = sorted(set(info["classes"]) - set(tm.classes))
    if unknown:
        raise DatasetError(f"This run does not know the challenge's class(es) {', '.join(unknown)}; the challenge "
                           f"has {', '.join(info['classes'])}. Train on data with the same class folders.")
    items = sorted(ds.items, key=lambda i: i.sha256)  # a fixed order: per-image answers line up across groups
    cidx = {c: k for k, c in enumerate(tm.classes)}
    out = logits_of_dataset_items(tm, items, ws)
    logits = out[0] if isinstance(out, tuple) else out
    pred = softmax(np.asarray(logits), tm.temperature).argmax(1)
    right = (pred == np.asarray([cidx[i.label] for i in items])).astype(int)
    correct, n = int(right.sum()), len(items)
    summary = row.get("summary") or {}
    # the model that was scored: an auto run's kept try (its backbone and strategy), not the one it started from
    backbone, strategy = kept_model({"config": row.get("config") or tm.config or {}, "summary": summary})
    sub = {"challenge": info["id"], "project": _project_label(ws), "run": run_id, "run_name": row.get("name"),
           "backbone": backbone, "strategy": strategy, "training_s": summary.get("seconds"),
           "accuracy": round(correct / n, 6) if n else None, "accuracy_ci": wilson_interval(correct, n),
           "correct": correct, "count": n, "submitted": time.time(),
           "scoring_s": round(time.monotonic() - t0, 2), "submissions": made + 1,
           "leak_checked": leaked is not None, "images": [i.sha256[:16] for i in items],
           "right": right.tolist()}
    write_json_atomic(_submission_file(ws, sub["project"]), sub)
    public = {k: v for k, v in sub.items() if k not in ("images", "right")}
    public["text"] = format_figure(sub["accuracy"], sub["accuracy_ci"], correct, n)
    return public


#: The leaderboard CSV's columns, in order.
LEADERBOARD_COLUMNS = ["rank", "project", "run", "strategy", "backbone", "accuracy", "ci_low", "ci_high", "correct",
                       "images", "training_s", "vs_leader"]


def _submissions(top: Workspace, challenge_id: str) -> list[dict[str, Any]]:
    d = challenge_dir(top) / "submissions"
    out = []
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            s = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if s.get("challenge") == challenge_id:
            out.append(s)
    return out


def leaderboard(top: Workspace) -> dict[str, Any]:
    """The challenge's leaderboard: every group's latest submission, best first.

    Returns:
        {"challenge": :func:`challenge_info` or None, "rows": [{"rank", "tied" (shares its rank), "project",
        "run", "strategy", "backbone", "accuracy", "accuracy_ci", "correct", "count", "text", "training_s",
        "vs_leader" (a sentence: the difference from the leader, within noise or beyond it)}],
        "note": one sentence on ties (or None)}. No image and no per-image answer is in it.
    """
    info = challenge_info(top)
    if info is None:
        return {"challenge": None, "rows": [], "note": None}
    subs = sorted(_submissions(top, info["id"]), key=lambda s: (-(s.get("accuracy") or 0), s.get("training_s") or 0,
                                                                s["project"]))
    figs = [{"correct": s["correct"], "count": s["count"], "paths": s.get("images"), "right": s.get("right")}
            for s in subs]
    # rank = 1 + how many groups are better beyond noise (paired on the same locked images)
    better = [[j for j in range(i) if subs[j]["accuracy"] > subs[i]["accuracy"]
               and not (compare_figures(figs[i], figs[j]) or {"within_noise": True})["within_noise"]]
              for i in range(len(subs))]
    ranks = [1 + len(b) for b in better]
    rows = []
    for i, s in enumerate(subs):
        s["accuracy_ci"] = wilson_interval(s["correct"], s["count"])  # from the counts, whatever the file says
        vs = "(leader)" if i == 0 else (compare_figures(figs[0], figs[i]) or {}).get("text", "")
        rows.append({"rank": ranks[i], "tied": ranks.count(ranks[i]) > 1, "project": s["project"], "run": s["run"],
                     "strategy": s.get("strategy"), "backbone": s.get("backbone"), "accuracy": s["accuracy"],
                     "accuracy_ci": s["accuracy_ci"], "correct": s["correct"], "count": s["count"],
                     "text": format_figure(s["accuracy"], s["accuracy_ci"], s["correct"], s["count"]),
                     "training_s": s.get("training_s"), "vs_leader": vs})
    top_tied = ranks.count(1)
    if len(rows) < 2:
        note = None
    elif top_tied == len(rows):
        note = (f"All {len(rows)} groups are tied within noise: on {info['count']} locked images the differences "
                "between them could be chance. More locked images would tell them apart.")
    elif top_tied > 1:
        note = (f"{top_tied} groups share first place: on {info['count']} locked images their differences are "
                "within noise.")
    else:
        note = f"{rows[0]['project']} leads beyond noise (on {info['count']} locked images)."
    return {"challenge": info, "rows": rows, "note": note}


def leaderboard_csv(board: dict[str, Any]) -> str:
    """The leaderboard's rows as CSV text (:data:`LEADERBOARD_COLUMNS`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LEADERBOARD_COLUMNS)
    for r in board["rows"]:
        ci = r["accuracy_ci"] or [None, None]
        w.writerow([f"{r['rank']} (tied)" if r["tied"] else r["rank"], r["project"], r["run"], r["strategy"],
                    r["backbone"], r["accuracy"], ci[0], ci[1], r["correct"], r["count"], r["training_s"],
                    r["vs_leader"]])
    return buf.getvalue()
