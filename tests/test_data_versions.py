"""Managed datasets and their versions (tl_core/data/versions.py) through the `tl-core data` commands: import,
versions, exclude, relabel, restore, delete; training on NAME@VERSION; the user's files never change."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from conftest import EMOJI, FASHION, make_class_folder, cli_fail as fail, cli_json as run_json


def digest_tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) with the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def three_classes(tmp_path) -> Path:
    """A copy of real emoji images: 12 animal, 12 face, 12 flag (the user's own folder)."""
    return make_class_folder(tmp_path / "mine", {"animal": 12, "face": 12, "flag": 12})


def test_import_exclude_relabel_restore_delete(capsys, tl_home, three_classes):
    before = digest_tree(three_classes)
    imp = run_json(capsys, "data", "import", str(three_classes), "--name", "pets", "--json")
    assert imp["name"] == "pets" and imp["counts"]["images"] == 36
    assert imp["counts"]["classes"] == {"animal": 12, "face": 12, "flag": 12}
    v1 = imp["version"]
    hist = run_json(capsys, "data", "versions", "pets", "--json")
    assert hist[-1]["change"] == "imported (copy of folder mine)"  # no server path in the app's table
    # the same images imported again make the same version id (content-addressed)
    again = run_json(capsys, "data", "import", str(three_classes), "--name", "pets2", "--json")
    assert again["version"] == v1

    animals = sorted(p.name for p in (three_classes / "animal").iterdir())
    ex = run_json(capsys, "data", "exclude", "pets", f"animal/{animals[0]}", f"animal/{animals[1]}", "--json")
    assert ex["version"] != v1 and ex["counts"]["images"] == 34 and ex["counts"]["excluded"] == 2
    assert ex["counts"]["classes"]["animal"] == 10 and "excluded 2 images" in ex["change"]
    # excluding it again changes nothing and makes no version
    same = run_json(capsys, "data", "exclude", "pets", f"animal/{animals[0]}", "--json")
    assert same["unchanged"] and same["version"] == ex["version"]

    rel = run_json(capsys, "data", "relabel", "pets", f"animal/{animals[2]}", "--to", "face", "--json")
    assert rel["counts"]["classes"] == {"animal": 9, "face": 13, "flag": 12}
    new_cls = run_json(capsys, "data", "relabel", "pets", f"animal/{animals[3]}", f"animal/{animals[4]}",
                       "--to", "bird", "--json")
    assert new_cls["counts"]["classes"]["bird"] == 2

    hist = run_json(capsys, "data", "versions", "pets", "--json")
    assert [h["version"] for h in hist] == [new_cls["version"], rel["version"], ex["version"], v1]  # newest first
    assert all(set(h) >= {"version", "when", "change", "counts"} for h in hist)
    assert hist[0]["when"] >= hist[-1]["when"]

    # the engine opens the current version and any earlier one by name
    from tl_core.data.library import open_data

    cur = open_data("pets")
    assert cur.version == f"pets@{new_cls['version']}" and cur.counts() == {"animal": 7, "bird": 2, "face": 13, "flag": 12}
    moved = next(i for i in cur.items if i.path.name == animals[2])
    assert moved.label == "face"  # relabelled, the file where it was
    assert all(i.path.name not in animals[:2] for i in cur.items)
    old = open_data(f"pets@{v1[:6]}")  # a prefix will do
    assert old.version == f"pets@{v1}" and old.counts() == {"animal": 12, "face": 12, "flag": 12}

    res = run_json(capsys, "data", "restore", "pets", v1, "--json")
    assert res["version"] == v1 and res["counts"]["images"] == 36 and v1 in res["change"]
    assert [h["version"] for h in run_json(capsys, "data", "versions", "pets", "--json")][:2] == [v1, new_cls["version"]]
    assert open_data("pets").counts() == {"animal": 12, "face": 12, "flag": 12}

    listed = {d["name"]: d for d in run_json(capsys, "data", "list", "--json")}
    assert set(listed) == {"pets", "pets2"} and listed["pets"]["version"] == v1

    gone = run_json(capsys, "data", "delete", "pets2", "--json")
    assert gone["deleted"] and "pets2" not in {d["name"] for d in run_json(capsys, "data", "list", "--json")}
    assert "No dataset called 'pets2'" in fail(capsys, "data", "versions", "pets2")

    assert digest_tree(three_classes) == before  # the user's files, byte for byte


def test_clear_errors(capsys, tl_home, three_classes):
    run_json(capsys, "data", "import", str(three_classes), "--name", "pets", "--json")
    assert "exists already" in fail(capsys, "data", "import", str(three_classes), "--name", "pets")
    assert "No dataset called 'nope'" in fail(capsys, "data", "exclude", "nope", "animal/x.png")
    assert "has no image 'animal/missing.png'" in fail(capsys, "data", "exclude", "pets", "animal/missing.png")
    assert "has no version 'ffffff'" in fail(capsys, "data", "restore", "pets", "ffffff")
    first = sorted(p.name for p in (three_classes / "face").iterdir())[0]
    assert "not a valid class name" in fail(capsys, "data", "relabel", "pets", f"face/{first}", "--to", "../up")
    assert "does not exist" in fail(capsys, "data", "import", str(three_classes / "absent"))
    # a change that would make the dataset untrainable is refused, and the history is unchanged
    flags = sorted(f"flag/{p.name}" for p in (three_classes / "flag").iterdir())
    assert "leave class 'flag' with 1 image" in fail(capsys, "data", "exclude", "pets", *flags[:-1])
    assert "fewer than two classes" in fail(capsys, "data", "relabel", "pets", *flags,
                                            *[f"face/{p.name}" for p in (three_classes / "face").iterdir()],
                                            "--to", "animal")
    assert len(run_json(capsys, "data", "versions", "pets", "--json")) == 1
    # dropping a class whole is allowed
    dropped = run_json(capsys, "data", "exclude", "pets", *flags, "--json")
    assert dropped["counts"]["classes"] == {"animal": 12, "face": 12}
    assert "No dataset called 'ghost'" in fail(capsys, "check", "ghost@1234")


def test_split_layout_and_csv_import(capsys, tl_home, tmp_path):
    fm = run_json(capsys, "data", "import", str(FASHION), "--name", "fm", "--json")
    assert fm["counts"]["images"] == 500
    from tl_core.data.library import open_data

    ds = open_data("fm")  # train/ and test/ kept: test stays held out
    assert sum(ds.counts("test").values()) == 200 and sum(ds.counts("train").values()) == 300
    # a CSV of path,label: the images are sorted into class folders of the managed copy
    rows = ["path,label"] + [f"{p.relative_to(EMOJI)},{'a' if p.parent.name == 'animal' else 'b'}"
                             for p in sorted(EMOJI.glob("animal/*.png"))[:4] + sorted(EMOJI.glob("food/*.png"))[:4]]
    (EMOJI_CSV := tmp_path / "labels.csv").write_text("\n".join(rows))
    csv_copy = tmp_path / "csvdata"
    csv_copy.mkdir()
    import shutil

    shutil.copytree(EMOJI / "animal", csv_copy / "animal")
    shutil.copytree(EMOJI / "food", csv_copy / "food")
    shutil.copy(EMOJI_CSV, csv_copy / "labels.csv")
    imp = run_json(capsys, "data", "import", str(csv_copy / "labels.csv"), "--name", "fromcsv", "--json")
    assert imp["counts"]["classes"] == {"a": 4, "b": 4}
    from tl_core.storage.workspace import Workspace

    assert sorted(p.name for p in (Workspace.default().datasets_dir / "fromcsv").iterdir()
                  if not p.name.startswith(".")) == ["a", "b"]


def test_an_uploaded_dataset_is_versioned_and_added_images_make_versions(tl_home, tmp_path):
    from tl_core.data import versions
    from tl_core.data.library import add_class_images, open_data
    from tl_core.storage.workspace import Workspace

    ws = Workspace.default()
    # a dataset uploaded before versions existed: a plain folder in datasets/
    make_class_folder(ws.datasets_dir / "legacy", {"animal": 4, "face": 4})
    assert not versions.is_managed(ws, "legacy")
    assert open_data(str(ws.datasets_dir / "legacy")).counts() == {"animal": 4, "face": 4}
    first = sorted(p.name for p in (ws.datasets_dir / "legacy" / "animal").iterdir())[0]
    entry = versions.exclude_images(ws, "legacy", [f"animal/{first}"])  # the first change records version 1
    hist = versions.history(ws, "legacy")
    assert len(hist) == 2 and hist[-1]["counts"]["images"] == 8 and entry["counts"]["images"] == 7
    # images added class by class (uploads, the camera) make a new version holding them
    png = next(EMOJI.glob("flag/*.png")).read_bytes()
    add_class_images(ws, "legacy", "flag", [("cam1.png", png), ("cam2.png", png)])
    hist = versions.history(ws, "legacy")
    assert len(hist) == 3 and "added 2 image(s) to 'flag'" in hist[0]["change"]
    ds = open_data(str(ws.datasets_dir / "legacy"))  # the folder opens as its current version
    assert ds.counts() == {"animal": 3, "face": 4, "flag": 2} and ds.version.startswith("legacy@")


@pytest.mark.slow
def test_train_on_name_at_version_records_it(capsys, tl_home, three_classes):
    v1 = run_json(capsys, "data", "import", str(three_classes), "--name", "pets", "--json")["version"]
    animals = sorted(f"animal/{p.name}" for p in (three_classes / "animal").iterdir())
    v2 = run_json(capsys, "data", "exclude", "pets", *animals[:4], "--json")["version"]
    common = ["--strategy", "linear", "--quiet", "--json"]

    old = run_json(capsys, "train", f"pets@{v1}", *common)
    assert old["status"] == "done" and old["dataset_version"] == f"pets@{v1}"
    assert old["counts"] == {"animal": 12, "face": 12, "flag": 12}
    cur = run_json(capsys, "train", "pets", *common)  # NAME: the current version, pinned
    assert cur["dataset_version"] == f"pets@{v2}" and cur["counts"]["animal"] == 8

    from tl_core.storage.files import RunFiles
    from tl_core.storage.workspace import Workspace

    ws = Workspace.default()
    rec = ws.store().get(cur["run_id"])
    assert rec["data"] == f"pets@{v2}"  # the run refers to the version, not to a folder that changes
    assert RunFiles(cur["run_dir"]).meta().dataset["version"] == f"pets@{v2}"
    runs = run_json(capsys, "runs", "--json")
    assert {r["data"] for r in runs} == {f"pets@{v1}", f"pets@{v2}"}
    # a later change leaves the recorded version as it was: the old run's data opens to the same images
    run_json(capsys, "data", "restore", "pets", v1, "--json")
    from tl_core.data.library import open_data

    assert open_data(rec["data"]).counts()["animal"] == 8
    # the predictions point at files of the managed copy, which still exist
    val = RunFiles(cur["run_dir"]).predictions().splits["val"]
    assert val.paths and all(Path(p).is_file() and "datasets/pets" in p for p in val.paths)
    # renaming the dataset: its runs follow it to the new name, and their versions still open
    from tl_core.runs.datasets import rename_dataset

    rename_dataset(ws, "pets", "animals")
    rec = ws.store().get(cur["run_id"])
    assert rec["data"] == f"animals@{v2}" and rec["summary"]["dataset_version"] == f"animals@{v2}"
    assert open_data(rec["data"]).counts()["animal"] == 8
    moved = RunFiles(cur["run_dir"]).predictions().splits["val"].paths
    assert len(moved) == len(val.paths) and all(Path(p).is_file() and "datasets/animals/" in p for p in moved)


def test_images_added_to_a_train_test_dataset_go_into_its_train_folder(tl_home):
    from tl_core.data import versions
    from tl_core.data.library import add_class_images, open_data
    from tl_core.storage.workspace import Workspace

    ws = Workspace.default()
    root = ws.datasets_dir / "split"
    make_class_folder(root / "train", {"animal": 4, "face": 4})
    for cls in ("animal", "face"):  # two other images of each class held out for testing
        (root / "test" / cls).mkdir(parents=True)
        for f in sorted((EMOJI / cls).iterdir())[10:12]:
            (root / "test" / cls / f.name).write_bytes(f.read_bytes())
    flags = [(f.name, f.read_bytes()) for f in sorted((EMOJI / "flag").iterdir())[:2]]
    # not versioned yet: a new class lands in train/, next to the other class folders
    _, saved, _ = add_class_images(ws, "split", "flag", flags)
    assert sorted(p.name for p in (root / "train" / "flag").iterdir()) == sorted(saved) and len(saved) == 2
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]
    assert versions.class_counts(ws, "split") == {"animal": 6, "face": 6, "flag": 2}
    # versioned: the added image is a training image of the new version
    versions.ensure_versions(ws, "split")
    more = sorted((EMOJI / "animal").iterdir())[20]
    add_class_images(ws, "split", "animal", [(more.name, more.read_bytes())])
    assert (root / "train" / "animal" / more.name).is_file() and not (root / "animal").exists()
    row = {r["file"]: r for r in versions.version_rows(ws, "split")}[f"train/animal/{more.name}"]
    assert row["split"] == "train" and row["label"] == "animal"
    ds = open_data("split")
    assert ds.counts("train") == {"animal": 5, "face": 4, "flag": 2} 
    assert ds.counts("test") == {"animal": 2, "face": 2, "flag": 0}


def test_an_uploaded_folder_is_checked_like_a_zip(tl_home):
    from tl_core.data.library import save_uploaded_folder
    from tl_core.errors import DatasetError
    from tl_core.storage.workspace import Workspace

    ws = Workspace.default()
    png = next(EMOJI.glob("animal/*.png")).read_bytes()
    for files, why in (([("pets/cat/../../escape.png", png), ("pets/dog/1.png", png)], "not a file inside"),
                       ([], "The folder is empty"),
                       ([("pets/cat/1.png", png), ("pets/cat/2.png", png)], "Only one class ('cat')")):
        with pytest.raises(DatasetError, match=re.escape(why)):
            save_uploaded_folder(ws, files)
    assert not ws.datasets_dir.exists() or not [p for p in ws.datasets_dir.iterdir() if not p.name.startswith(".")]
    # a train/ and test/ layout keeps its splits
    files = [(f"fm/{p.relative_to(FASHION).as_posix()}", p.read_bytes()) for p in sorted(FASHION.rglob("*.png"))]
    folder = save_uploaded_folder(ws, files)
    assert folder == ws.datasets_dir / "fm" and sorted(p.name for p in folder.iterdir() if p.name[0] != ".") == [
        "test", "train"]
    from tl_core.data.library import open_data

    ds = open_data("fm")
    assert sum(ds.counts("test").values()) == 200 and sum(ds.counts("train").values()) == 300
