"""The teacher's view and the class challenge (tl_core.classroom): every project listed with its best accuracy,
cancel / reset / delete / clean-up, the class export zip, the locked test set and the leaderboard's ranks and
tie wording. Fast tier: the session's emoji run is copied into projects; nothing starts a process."""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile

import pytest

from pathlib import Path

from conftest import EMOJI, make_class_folder
from tl_core.classroom import challenge, overview
from tl_core.errors import DatasetError, RunError
from tl_core.runs import tasks
from tl_core.storage.workspace import Workspace


def _copy_run(src_ws: Workspace, run_id: str, dst: Workspace, accuracy: float | None = None,
              strategy: str | None = None, data: str | None = None) -> str:
    """A copy of a finished run (its row and its files) in another workspace; ``accuracy`` overrides its
    recorded validation accuracy (what the teacher's table reads), ``data`` the data it says it learned from."""
    row = src_ws.store().get(run_id)
    cfg = dict(row["config"], **({"strategy": strategy} if strategy else {}))
    new = dst.store().create_run(data or row["data"], cfg, status="done", name=row.get("name"))
    summary = dict(row["summary"])
    if accuracy is not None:
        summary["val_accuracy"] = accuracy
        summary["val_accuracy_ci"] = None  # recomputed from the counts
    dst.store().update(new, summary=summary)
    shutil.copytree(src_ws.run_dir(run_id), dst.run_dir(new))
    return new


@pytest.fixture
def classroom(tl_home, emoji_run):
    """A class: the shared workspace and three projects, two with runs (one with two), one with a dataset."""
    src, res = emoji_run
    top = Workspace(tl_home)
    a, b, c = (top.project(s, create=True) for s in ("ants-0001", "bees-0002", "cats-0003"))
    runs = {"ants": [_copy_run(src, res.run_id, a, 0.80), _copy_run(src, res.run_id, a, 0.95)],
            "bees": [_copy_run(src, res.run_id, b, 0.90)]}
    make_class_folder(c.datasets_dir / "pets", {"cat": 2, "dog": 2})
    return top, {"ants": a, "bees": b, "cats": c}, runs


def test_project_rows_list_every_project_with_its_best_accuracy_and_interval(classroom):
    top, ps, runs = classroom
    rows = {r["project"]: r for r in overview.project_rows(top)}
    assert set(rows) == {overview.SHARED, "ants-0001", "bees-0002", "cats-0003"}
    ants = rows["ants-0001"]
    assert (ants["runs"], ants["done"], ants["best_run"]) == (2, 2, runs["ants"][1])
    assert ants["best_accuracy"] == 0.95
    lo, hi = ants["best_accuracy_ci"]
    assert lo < 0.95 < hi  # a Wilson interval from the run's validation count, not a bare figure
    assert ants["best_text"].startswith("95.0% (95% CI ") and " of 40)" in ants["best_text"]
    assert rows["cats-0003"]["datasets"] == ["pets"] and rows["cats-0003"]["best_text"] == "—"
    assert not any(r["running"] or r["queued"] for r in rows.values())


def test_cancel_all_stops_one_projects_queued_work_only(classroom):
    top, ps, _ = classroom
    t_a = tasks.submit(ps["ants"], "report", {"run": "x", "stamp": 1}, start_worker=False)
    t_b = tasks.submit(ps["bees"], "report", {"run": "y", "stamp": 1}, start_worker=False)
    rows = {r["project"]: r for r in overview.project_rows(top)}
    act = rows["ants-0001"]["activity"]
    assert rows["ants-0001"]["queued"] == 1 and [(a["id"], a["kind"]) for a in act] == [(t_a.id, "report")]
    assert 0 <= act[0]["seconds"] < 60  # waited since it was queued, from the task row
    assert tasks.cancel_all(ps["ants"]) == 1
    assert tasks.get(ps["ants"], t_a.id).status == "cancelled"
    assert tasks.get(ps["bees"], t_b.id).status == "queued"


def test_reset_empties_a_project_but_keeps_it_and_the_caches(classroom):
    top, ps, runs = classroom
    cache_marker = top.cache_dir / "marker"
    cache_marker.write_text("kept")
    tasks.submit(ps["ants"], "report", {"run": "x", "stamp": 1}, start_worker=False)
    with pytest.raises(RunError, match="queued or running; cancel its tasks first"):
        overview.reset_project(top, "ants-0001")  # work queued: nothing is removed under it
    assert len(ps["ants"].store().list()) == 2
    tasks.cancel_all(ps["ants"])
    got = overview.reset_project(top, "ants-0001")
    assert got["runs"] == 2 and got["tasks"] == 1
    ws = top.project("ants-0001")  # still there: its link keeps working
    assert ws.store().list() == [] and ws.store().tasks() == []
    assert not any(ws.runs_dir.iterdir())
    assert len(ps["bees"].store().list()) == 1  # other projects untouched
    assert cache_marker.read_text() == "kept"


def test_delete_project_and_clean_up_class(classroom):
    top, ps, _ = classroom
    with pytest.raises(RunError, match="shared workspace cannot be deleted"):
        overview.delete_project(top, overview.SHARED)
    overview.delete_project(top, "cats-0003")
    with pytest.raises(RunError, match="No project"):
        top.project("cats-0003")
    (top.cache_dir / "marker").write_text("kept")
    tasks.submit(ps["bees"], "report", {"run": "y", "stamp": 1}, start_worker=False)
    with pytest.raises(RunError, match="cancel its tasks first"):
        overview.delete_project(top, "bees-0002")
    done = overview.clean_up_class(top)  # a project with work queued is left, and said
    assert done["projects"] == ["ants-0001"] and done["stopping"] == ["bees-0002"] and done["runs"] == 2
    assert tasks.cancel_all(ps["bees"]) == 1
    done = overview.clean_up_class(top)
    assert done["projects"] == ["bees-0002"] and done["runs"] == 1 and not done["stopping"]
    assert [r["project"] for r in overview.project_rows(top)] == [overview.SHARED]
    assert (top.cache_dir / "marker").read_text() == "kept"


def test_export_zip_holds_every_run_and_a_report_per_finished_run(classroom, tmp_path):
    top, ps, runs = classroom
    ps["bees"].store().create_run("somewhere", {"backbone": "efficientnet_lite0"}, status="failed")
    res = overview.export_class(top, tmp_path / "class.zip")
    assert (res["runs"], res["reports"], res["failed"]) == (4, 3, [])
    with zipfile.ZipFile(tmp_path / "class.zip") as zf:
        names = set(zf.namelist())
        rows = list(csv.DictReader(io.StringIO(zf.read("results.csv").decode())))
        report = zf.read(f"reports/ants-0001/{runs['ants'][0]}.html").decode()
    assert {f"reports/ants-0001/{r}.html" for r in runs["ants"]} <= names
    assert list(rows[0]) == overview.RESULT_COLUMNS
    by_run = {r["run"]: r for r in rows}
    assert by_run[runs["bees"][0]]["val_accuracy"] == "0.9" and by_run[runs["bees"][0]]["project"] == "bees-0002"
    assert [r["status"] for r in rows if r["project"] == "bees-0002"].count("failed") == 1
    assert "<html" in report.lower()
    assert "leaderboard.csv" not in names  # no challenge yet


# --------------------------------------------------------------------------------------------------
# the class challenge
# --------------------------------------------------------------------------------------------------
def test_carving_a_challenge_locks_a_share_and_gives_the_rest_to_the_groups(tl_home, tmp_path):
    top = Workspace(tl_home)
    src = make_class_folder(tmp_path / "lesson", {"animal": 8, "face": 8, "flag": 8})
    info = challenge.setup_challenge(top, src, carve=0.25, name="Emoji cup", remainder_zip=tmp_path / "rest.zip")
    assert info["per_class"] == {"animal": 2, "face": 2, "flag": 2} and info["remainder_images"] == 18
    locked = {f.read_bytes() for f in (challenge.challenge_dir(top) / "test").rglob("*.png")}
    rest_dir = top.datasets_dir / info["remainder"]
    rest = {f.read_bytes() for f in rest_dir.rglob("*.png")}
    assert len(locked) == 6 and len(rest) == 18 and not locked & rest  # no locked image is in the groups' data
    # the locked set is in no dataset list, and its file names say nothing
    from tl_core.data.library import workspace_datasets

    assert [d["name"] for d in workspace_datasets(top)] == [info["remainder"]]
    assert all(len(f.stem) == 16 for f in (challenge.challenge_dir(top) / "test").rglob("*.png"))
    with zipfile.ZipFile(tmp_path / "rest.zip") as zf:
        assert len([n for n in zf.namelist() if n.endswith(".png")]) == 18
    assert challenge.challenge_info(top)["name"] == "Emoji cup"
    with pytest.raises(DatasetError, match="Too few locked images"):
        challenge.setup_challenge(top, src, carve=0.05)
    assert challenge.challenge_info(top)["id"] == info["id"]  # a refused set-up leaves the challenge as it was


def _submission(top: Workspace, project: str, right: list[int], strategy: str = "linear") -> None:
    info = challenge.challenge_info(top)
    n = len(right)
    sub = {"challenge": info["id"], "project": project, "run": f"run-{project}", "strategy": strategy,
           "backbone": "efficientnet_lite0", "training_s": 10.0, "accuracy": sum(right) / n,
           "accuracy_ci": None, "correct": sum(right), "count": n, "images": [f"{k:016x}" for k in range(n)],
           "right": right}
    path = challenge._submission_file(top, project)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sub))


@pytest.fixture
def small_challenge(tl_home, tmp_path):
    top = Workspace(tl_home)
    challenge.setup_challenge(top, make_class_folder(tmp_path / "locked", {"animal": 4, "face": 4, "flag": 4}))
    return top


def test_leaderboard_orders_by_accuracy_and_says_when_groups_are_tied(small_challenge):
    top = small_challenge
    n = 200  # a pretend locked set: 200 images
    _submission(top, "alpha", [1] * 190 + [0] * 10)   # 95%
    _submission(top, "beta", [1] * 188 + [0] * 12)    # 94%: within noise of alpha (paired, same images)
    _submission(top, "gamma", [1] * 120 + [0] * 80)   # 60%: beyond noise
    board = challenge.leaderboard(top)
    rows = board["rows"]
    assert [r["project"] for r in rows] == ["alpha", "beta", "gamma"]
    assert [r["rank"] for r in rows] == [1, 1, 3] and [r["tied"] for r in rows] == [True, True, False]
    assert "within noise" in rows[1]["vs_leader"] and "beyond noise" in rows[2]["vs_leader"]
    assert board["note"].startswith("2 groups share first place")
    assert rows[0]["text"] == "95.0% (95% CI 91.0–97.3%, 190 of 200)"
    text = json.dumps(board)
    assert "right" not in rows[0] and "images" not in rows[0] and ".png" not in text  # nothing of the images
    lines = challenge.leaderboard_csv(board).splitlines()
    assert lines[0].split(",") == challenge.LEADERBOARD_COLUMNS and lines[1].startswith("1 (tied),alpha")
    assert n == rows[0]["count"]


def test_leaderboard_all_tied_and_clear_leader_sentences(small_challenge):
    top = small_challenge
    _submission(top, "alpha", [1, 1, 1, 0, 1, 1, 0, 1, 1, 1])
    _submission(top, "beta", [1, 1, 0, 1, 1, 0, 1, 1, 1, 0])
    assert challenge.leaderboard(top)["note"].startswith("All 2 groups are tied within noise")
    _submission(top, "alpha", [1] * 300)
    _submission(top, "beta", [0] * 150 + [1] * 150)
    board = challenge.leaderboard(top)
    assert [r["rank"] for r in board["rows"]] == [1, 2] and board["note"].startswith("alpha leads beyond noise")


def _data_without_locked(top: Workspace, src: Path, dest: Path) -> str:
    """A copy of ``src`` without the challenge's locked images (by content): the set a group should train on."""
    locked = {f.read_bytes() for f in (challenge.challenge_dir(top) / "test").rglob("*.*")}
    shutil.copytree(src, dest)
    for f in list(dest.rglob("*.*")):
        if f.read_bytes() in locked:
            f.unlink()
    return str(dest)


def test_scoring_a_run_on_the_locked_set(small_challenge, emoji_run, tmp_path):
    top = small_challenge
    src, res = emoji_run
    ws = top.project("ants-0001", create=True)
    run_id = _copy_run(src, res.run_id, ws, data=_data_without_locked(top, EMOJI, tmp_path / "rest"))
    params = challenge.submission_params(ws, run_id)
    assert params["project"] == "ants-0001" and params["challenge"] == challenge.challenge_info(top)["id"]
    got = challenge.score_run(ws, params["run"], challenge_id=params["challenge"])
    assert got["count"] == 12 and 0.75 <= got["accuracy"] <= 1.0  # seen emoji classes, a real pretrained probe
    assert got["text"].endswith(f"{got['correct']} of 12)") and "right" not in got
    board = challenge.leaderboard(top)
    assert [(r["project"], r["run"], r["rank"]) for r in board["rows"]] == [("ants-0001", run_id, 1)]
    # a run that does not know the challenge's classes is refused with what to do
    (challenge.challenge_dir(top) / "challenge.json").write_text(json.dumps(
        dict(challenge.challenge_info(top), classes=["animal", "unicorn"])))
    with pytest.raises(DatasetError, match="does not know the challenge's class"):
        challenge.score_run(ws, params["run"])
    with pytest.raises(RunError, match="new challenge"):
        challenge.score_run(ws, params["run"], challenge_id="older")


def test_a_run_that_learned_from_the_locked_images_is_refused(small_challenge, emoji_run):
    # the session's run learned from the whole emoji sample, of which the 12 locked images are a part
    top = small_challenge
    src, res = emoji_run
    ws = top.project("cats-0003", create=True)
    run_id = _copy_run(src, res.run_id, ws)
    params = challenge.submission_params(ws, run_id)
    with pytest.raises(DatasetError, match="learned from 12 of the challenge's locked test images"):
        challenge.score_run(ws, params["run"], challenge_id=params["challenge"])
    assert challenge.leaderboard(top)["rows"] == [] and challenge.submissions_made(ws) == 0


def test_a_group_may_submit_a_few_times_only(small_challenge, emoji_run, tmp_path):
    top = small_challenge
    src, res = emoji_run
    ws = top.project("dogs-0004", create=True)
    rest = _data_without_locked(top, EMOJI, tmp_path / "rest")
    first, second = (_copy_run(src, res.run_id, ws, data=rest) for _ in range(2))
    t1 = tasks.submit_challenge_run(ws, first, start_worker=False)
    path = challenge._submission_file(top, "dogs-0004")  # the group has used every submission but one
    for made in range(1, challenge.MAX_SUBMISSIONS):
        got = challenge.score_run(ws, str(ws.run_dir(first)))
        assert got["submissions"] == made and got["leak_checked"]
    assert json.loads(path.read_text())["submissions"] == challenge.MAX_SUBMISSIONS - 1
    tasks.submit_challenge_run(ws, second, start_worker=False)  # the last one may be queued
    challenge.score_run(ws, str(ws.run_dir(second)))
    assert challenge.submissions_made(ws) == challenge.MAX_SUBMISSIONS
    with pytest.raises(RunError, match=f"made its {challenge.MAX_SUBMISSIONS} submissions"):
        challenge.score_run(ws, str(ws.run_dir(second)))  # the worker refuses one more too
    # asking again for a run already submitted finds its task (no new submission); a new run is refused
    assert tasks.submit_challenge_run(ws, first, start_worker=False).id == t1.id
    third = _copy_run(src, res.run_id, ws, data=rest)
    with pytest.raises(RunError, match=f"made its {challenge.MAX_SUBMISSIONS} submissions"):
        tasks.submit_challenge_run(ws, third, start_worker=False)
    assert [r["run"] for r in challenge.leaderboard(top)["rows"]] == [second]  # the last one stays


def test_submit_challenge_run_queues_one_scoring_task_per_run(small_challenge, emoji_run):
    top = small_challenge
    src, res = emoji_run
    ws = top.project("bees-0002", create=True)
    run_id = _copy_run(src, res.run_id, ws)
    t1 = tasks.submit_challenge_run(ws, run_id, start_worker=False)
    t2 = tasks.submit_challenge_run(ws, run_id, start_worker=False)
    assert t1.kind == "challenge_score" and t2.shared and t2.id == t1.id
    challenge.remove_challenge(top)
    with pytest.raises(RunError, match="no class challenge"):
        tasks.submit_challenge_run(ws, run_id, start_worker=False)


def test_export_includes_the_leaderboard(small_challenge, tmp_path):
    top = small_challenge
    _submission(top, "alpha", [1] * 10)
    overview.export_class(top, tmp_path / "c.zip", reports=False)
    with zipfile.ZipFile(tmp_path / "c.zip") as zf:
        assert zf.read("leaderboard.csv").decode().splitlines()[1].startswith("1,alpha")


# --------------------------------------------------------------------------------------------------
# a class at once: one group's training and its data check on the same folder
# --------------------------------------------------------------------------------------------------
def test_a_data_check_is_found_again_after_a_training_versions_the_same_folder(tl_home, tmp_path):
    """The stalled page of the 20-session benchmark: a session pressed "Check the data" on a plain folder while
    another session of its group started a training on it, which records the folder's first version. The page
    keys its check by the folder's signature; if recording the version changed it, the page found no check
    when the audit finished and showed the start button again, never the result."""
    from tl_core.data.library import dataset_signature
    from tl_core.data.versions import exclude_images, is_managed, pin

    ws = Workspace(tl_home).project("group-1", create=True)
    folder = make_class_folder(ws.datasets_dir / "lesson", {"animal": 5, "face": 5})
    params = {"data": str(folder), "signature": dataset_signature(folder), "backbone": "efficientnet_lite0",
              "val_split": 0.2, "seed": 0, "max_per_class": 200}
    asked = tasks.submit(ws, "audit", params, start_worker=False)
    assert pin(ws, folder).startswith("lesson@") and is_managed(ws, "lesson")  # what a training's start does
    found = tasks.find(ws, "audit", dict(params, signature=dataset_signature(folder)))  # the page's next run
    assert found is not None and found.id == asked.id
    # a real change (an image left out: a new version, the same files) is a new signature: checked again
    exclude_images(ws, "lesson", ["animal/" + sorted((folder / "animal").iterdir())[0].name])
    assert dataset_signature(folder) != params["signature"]
    assert tasks.find(ws, "audit", dict(params, signature=dataset_signature(folder))) is None


@pytest.mark.parametrize("lane", ["compute", "interactive", "intake"])
def test_workers_run_below_the_server(tl_home, monkeypatch, lane):
    """A worker process lowers its own CPU priority (trainings lowest), so the server answers while workers fill
    the cores; worker_main run inside another process (a test, this one) leaves that process's priority alone."""
    from tl_core.runs import workers

    asked = []
    monkeypatch.setattr(workers.os, "nice", asked.append)
    monkeypatch.setenv("TL_INTERACTIVE_IDLE_S", "0.01")
    monkeypatch.setenv("TL_COMPUTE_IDLE_S", "0")
    assert workers.worker_main(str(tl_home), lane) == 0  # nothing queued: it leaves at once
    assert asked == []  # in-process: the caller keeps its priority
    assert workers.main(["worker", "--home", str(tl_home), "--lane", lane]) == 0  # the worker process's entry
    assert asked == [workers.WORKER_NICE[lane]]
    assert 0 < workers.WORKER_NICE["interactive"] < workers.WORKER_NICE["compute"]
