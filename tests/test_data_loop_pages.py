"""Page tests of the data loop (issue 15) with ``AppTest``: fixing the data in place from the data check and from
Evaluate's mistakes (each fix a new version, said so), restoring a version on the Data page, the version a run
trained on on Runs & export, and class-by-class capture with the camera. The data checks here are of a planted
dataset of 45 images: short tasks, run in threads of the test process (page_harness ``task_threads``)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from test_app_insights import _planted_dataset, fresh_caches  # noqa: F401  (autouse: each test computes its own)
from page_harness import (  # noqa: F401  (fixtures are used by name)
    EMOJI,
    app,
    assert_clean,
    button,
    empty_home,
    goto,
    has_metric,
    home,
    metric,
    task_threads,
    trained_home,
    until,
)

from pages._fix import _key
from test_uploads import tasks_in_process  # noqa: F401  (uploads are intake tasks: run here, in the fast tier)
from tl_core.data import versions
from tl_core.storage.files import RunFiles


def _successes(at) -> str:
    return " ".join(s.value for s in at.success)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_data_check_fixes_in_place_each_fix_a_version_then_restore(home, task_threads):
    ws, _ = home
    root = _planted_dataset(ws)
    at = app({"data": "workspace/planted"})
    goto(at, "data")
    button(at, "Check the data").click().run()
    until(at, lambda a: has_metric(a, "Exact duplicates"), what="the audit")
    assert_clean(at)
    copies = int(metric(at, "Exact duplicates"))
    assert copies >= 2

    until(at, lambda a: not ws.store().tasks(status="queued") and not ws.store().tasks(status="running"),
          what="the embedding map and domain-gap hint of the check")
    checked = len(ws.store().tasks())

    # the first image of the first exact-duplicate group excluded by hand: the bulk fix then keeps another one
    keys = {f"exc-{_key('exact-0', str(p))}": p for p in root.rglob("*.png")}
    first = next(b for b in at.button if b.key in keys)
    first.click().run()
    assert_clean(at)
    # bulk: keep one of each exact-duplicate group, one click, one new version
    bulk = [b for b in at.button if b.label.startswith("Keep one of each group")][0]
    assert f"exclude {copies - 1} cop" in bulk.label
    bulk.click().run()
    assert_clean(at)
    assert "new version" in _successes(at) and "exact duplicates" in _successes(at)
    group = [p for p in keys.values() if p.read_bytes() == keys[first.key].read_bytes()]
    rows = {r["file"]: r for r in versions.version_rows(ws, "planted")}
    assert len(group) >= 2 and sum(not rows[str(p.relative_to(root))]["excluded"] for p in group) == 1
    # the check stays in view; its bulk button is gone, since every copy is out of the current version
    assert not [b for b in at.button if b.label.startswith("Keep one of each group")]
    assert any(c.value == "The current version keeps one image of each group." for c in at.caption)
    hist = versions.history(ws, "planted")
    assert len(hist) == 3 and hist[0]["counts"]["excluded"] == copies
    # the check made before stays in view, its copies marked as excluded, with a way back
    assert any("before your last change" in c.value for c in at.caption)
    assert sum("Excluded from the current version." == c.value for c in at.caption) >= copies
    # ... and so do its embedding map and domain-gap hint: a fix starts no task (their ends would redraw the page
    # while the user clicks on; a click made right then was lost, a flake of the browser test)
    assert len(ws.store().tasks()) == checked

    # one click on the blank image's Exclude
    blank = str(root / "train" / "face" / "blank_red.png")
    at.button(key=f"exc-{_key('odd', blank)}").click().run()
    assert_clean(at)
    assert "Excluded train/face/blank_red.png" in _successes(at)
    rows = {r["file"]: r for r in versions.version_rows(ws, "planted")}
    assert rows["train/face/blank_red.png"]["excluded"]
    # move an image to another class from the popover (the leak pair's image still in the current version)
    pair = [str(root / "val" / "animal" / "leaked_copy.png"), str(sorted((root / "train" / "animal").iterdir())[0])]
    rows = {r["file"]: r for r in versions.version_rows(ws, "planted")}
    moved = next(p for p in pair if not rows[str(Path(p).relative_to(root))]["excluded"])
    rel = str(Path(moved).relative_to(root))
    at.button(key=f"mv-{_key('leak', moved)}-flag").click().run()
    assert_clean(at)
    assert f"Moved {rel} to 'flag'" in _successes(at)
    assert {r["file"]: r for r in versions.version_rows(ws, "planted")}[rel]["label"] == "flag"
    assert Path(moved).is_file()  # the file stays where it was
    assert any(c.value == "Moved to **flag** in the current version." for c in at.caption)
    assert len(versions.history(ws, "planted")) == 5

    # the Data page lists the versions and restores the first one
    first = versions.history(ws, "planted")[-1]["version"]
    table = [d.value for d in at.dataframe if "change" in d.value.columns][0]
    assert list(table["version"])[-1] == first and len(table) == 5
    at.selectbox(key="restore_pick_planted").set_value(first).run()
    button(at, "Restore").click().run()
    assert_clean(at)
    assert f"Restored version {first}" in _successes(at)
    assert versions.current_version(ws, "planted") == first
    assert metric(at, "Images") == str(hist[-1]["counts"]["images"])


def test_evaluate_mistake_moved_to_the_predicted_class_in_a_copy_of_the_sample(home):
    ws, run_id = home
    before = _digest(EMOJI)
    at = app()
    goto(at, "evaluate")
    assert_clean(at)
    files = RunFiles(ws.run_dir(run_id))
    wrong = files.predictions().get("val").mistakes(files.meta().classes, files.meta().temperature)
    first = wrong[0]
    button(at, f"Move to {first['predicted']}").click().run()
    assert_clean(at)
    text = _successes(at)
    assert "new version" in text and "managed copy" in text and "original files are unchanged" in text
    # a copy of the sample in the workspace holds the change; the sample itself is untouched
    name = versions.managed_copy(ws, str(EMOJI))
    assert name == "emoji" and len(versions.history(ws, name)) == 2
    rel = str(Path(first["path"]).relative_to(EMOJI))
    assert {r["file"]: r for r in versions.version_rows(ws, name)}[rel]["label"] == first["predicted"]
    assert _digest(EMOJI) == before
    # the view says what the current version does with the image; exclude another one: the same copy
    assert any(c.value == f"Moved to **{first['predicted']}** in the current version." for c in at.caption)
    second = wrong[1]
    at.button(key=f"exc-{_key('mistake', second['path'])}").click().run()
    assert_clean(at)
    assert len(versions.history(ws, name)) == 3 and versions.managed_copy(ws, str(EMOJI)) == "emoji"
    assert [d for d in ws.datasets_dir.iterdir() if not d.name.startswith(".")] == [ws.datasets_dir / "emoji"]
    # the dataset picker says what the copy is
    goto(at, "data")
    assert_clean(at)
    picker = at.selectbox(key="pick_dataset")
    assert picker.format_func("workspace/emoji") == "emoji (copy of sample emoji)"


def _runs_page(run_id: str):
    """Runs & export with ``run_id`` chosen, drawn without errors, and its runs table (with the Data column)."""
    at = app({"run": run_id})
    goto(at, "runs")
    assert_clean(at)
    return at, [d.value for d in at.dataframe if "Data" in d.value.columns][0]


@pytest.mark.slow
def test_runs_page_shows_the_dataset_version_a_run_trained_on(home, tmp_path):
    from tl_core.config import TrainConfig
    from tl_core.runs.training import run_training
    from conftest import make_class_folder

    ws, _ = home
    imp = versions.import_dataset(ws, make_class_folder(tmp_path / "mine", {"animal": 6, "face": 6}), "pets")
    res = run_training(ws, "pets", TrainConfig(strategy="linear", epochs=5))
    assert res.status == "done" and res.dataset_version == f"pets@{imp['version']}"
    at, table = _runs_page(res.run_id)
    assert f"pets@{imp['version']}" in list(table["Data"])
    at.multiselect(key="runs_selected").set_value([res.run_id]).run()
    assert any(f"Trained on dataset version **pets@{imp['version']}**" in c.value for c in at.caption)

    # a second run on a new version: the two compare, each with its version
    first = sorted(p.name for p in (ws.datasets_dir / "pets" / "animal").iterdir())[0]
    v2 = versions.exclude_images(ws, "pets", [f"animal/{first}"])["version"]
    res2 = run_training(ws, "pets", TrainConfig(strategy="linear", epochs=5))
    assert res2.status == "done" and res2.dataset_version == f"pets@{v2}"
    at, table = _runs_page(res2.run_id)
    assert {f"pets@{imp['version']}", f"pets@{v2}"} <= set(table["Data"])
    at.multiselect(key="runs_selected").set_value([res.run_id, res2.run_id]).run()
    assert_clean(at)
    compared = at.table[0].value
    assert list(compared.loc["Data"]) == [f"pets@{imp['version']}", f"pets@{v2}"]
    assert any("different versions of the same dataset" in c.value for c in at.caption)

    # the dataset deleted: the runs stay, and say so in one sentence; Evaluate still draws
    from tl_core.runs.datasets import delete_dataset

    assert delete_dataset(ws, "pets") == 2
    at = app({"run": res2.run_id})
    goto(at, "runs")
    at.multiselect(key="runs_selected").set_value([res2.run_id]).run()
    assert_clean(at)
    assert [c.value for c in at.caption if "has been deleted" in c.value] == [
        f"Run {res2.run_id}: its dataset 'pets' has been deleted from this server; its results and model are kept, "
        "but views of its images (mistakes, Grad-CAM) cannot show them."]
    goto(at, "evaluate")
    assert_clean(at)
    assert has_metric(at, "Validation accuracy")
    assert [i.value for i in at.info if "deleted" in i.value] == [
        "The dataset 'pets' this run trained on has been deleted from this server: its figures below are kept, but its "
        "images (mistakes, Grad-CAM, the map) cannot be shown."]


def _camera_shot(path: Path) -> tuple[str, bytes, str]:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "JPEG")
    return ("shot.jpg", buf.getvalue(), "image/jpeg")


def test_capture_class_by_class_with_the_camera_and_a_counter_per_class(empty_home):
    ws = empty_home
    at = app()
    goto(at, "data")
    assert_clean(at)
    at.text_input(key="cap_name").set_value("webcam").run()
    assert at.camera_input == [] or not any(c.key and c.key.startswith("cap_cam") for c in at.camera_input)
    for cls, src in (("thumbs_up", "animal"), ("wave", "face")):
        at.text_input(key="cap_class").set_value(cls).run()
        for n in range(3):
            cam = [c for c in at.camera_input if c.label == f"Take a picture of '{cls}'"][0]
            cam.set_value(_camera_shot(sorted((EMOJI / src).iterdir())[n])).run()
            assert not at.exception, [e.value for e in at.exception]
            assert any(f"Saved a picture of '{cls}' in 'webcam'" in s.value for s in at.success)
            assert metric(at, cls) == str(n + 1)
        if cls == "thumbs_up":  # one class so far: the next step, not an error
            assert not at.error and any("Add a second class above" in i.value for i in at.info), at.error
    folder = ws.datasets_dir / "webcam"
    assert sorted(d.name for d in folder.iterdir()) == ["thumbs_up", "wave"]
    assert all(len(list((folder / c).iterdir())) == 3 for c in ("thumbs_up", "wave"))
    assert at.session_state["dataset"] == "workspace/webcam"
    assert_clean(at)
    assert metric(at, "Classes") == "2" and metric(at, "Images") == "6"
    # once versioned (trained on, or changed), each picture is a new version
    versions.ensure_versions(ws, "webcam")
    at.text_input(key="cap_class").set_value("wave").run()
    cam = [c for c in at.camera_input if c.label == "Take a picture of 'wave'"][0]
    cam.set_value(_camera_shot(sorted((EMOJI / "face").iterdir())[5])).run()
    assert_clean(at)
    hist = versions.history(ws, "webcam")
    assert len(hist) == 2 and hist[0]["counts"]["classes"] == {"thumbs_up": 3, "wave": 4}
    assert metric(at, "wave") == "4"


def _folder_files(top: str, spec: dict[str, tuple[str, int]]) -> list[tuple[str, bytes, str]]:
    """What the browser uploads for a folder: every file, named by its path from the folder chosen."""
    return [(f"{top}/{cls}/{f.name}", f.read_bytes(), "image/png")
            for cls, (src, n) in spec.items() for f in sorted((EMOJI / src).iterdir())[:n]]


def test_a_folder_of_class_folders_uploads_as_a_dataset_and_a_one_class_folder_is_refused(empty_home, tasks_in_process):
    ws = empty_home
    at = app()
    goto(at, "data")
    assert_clean(at)
    up = at.file_uploader(key="folder_upload_0")
    assert up.accept_directory
    # one class only: refused with one message, nothing saved
    up.set_value(_folder_files("cats", {"cat": ("animal", 5)})).run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "Only one class ('cat')" in errors[0] and "Nothing was saved" in errors[0], errors
    assert not ws.datasets_dir.exists() or not [d for d in ws.datasets_dir.iterdir() if not d.name.startswith(".")]
    # two classes: a new dataset, chosen
    at.file_uploader(key="folder_upload_0").set_value(
        _folder_files("pets", {"cat": ("animal", 6), "smiley": ("face", 7)})).run()
    assert_clean(at)
    assert any("as dataset 'pets'" in s.value for s in at.success), [s.value for s in at.success]
    assert at.session_state["dataset"] == "workspace/pets"
    assert metric(at, "Classes") == "2" and metric(at, "Images") == "13"
    assert sorted(p.name for p in (ws.datasets_dir / "pets").iterdir() if not p.name.startswith(".")) == ["cat", "smiley"]
    assert versions.history(ws, "pets")[0]["counts"]["classes"] == {"cat": 6, "smiley": 7}
    assert at.file_uploader(key="folder_upload_1").value in (None, [])  # an empty uploader for the next folder
    assert at.selectbox(key="pick_dataset").format_func("workspace/pets") == "pets (uploaded)"


@pytest.mark.slow
def test_a_training_image_that_leaks_twice_gets_buttons_under_each_listing(home, task_threads):
    import shutil

    ws, _ = home
    root = _planted_dataset(ws)
    src = sorted((root / "train" / "animal").iterdir())[0]
    shutil.copy(src, root / "val" / "animal" / "leaked_again.png")  # the same training image, a second leak
    at = app({"data": "workspace/planted"})
    goto(at, "data")
    button(at, "Check the data").click().run()
    until(at, lambda a: has_metric(a, "Leaks into validation"), what="the audit")
    assert_clean(at)  # no duplicate widget keys
    assert int(metric(at, "Leaks into validation")) >= 2
    at.button(key=f"exc-{_key('leak', str(src))}")  # the first listing keeps its buttons (raises if not)
    at.button(key=f"exc-{_key('leak#2', str(src))}").click().run()
    assert_clean(at)
    assert f"Excluded train/animal/{src.name}" in _successes(at)
    assert {r["file"]: r for r in versions.version_rows(ws, "planted")}[f"train/animal/{src.name}"]["excluded"]
