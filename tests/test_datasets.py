"""Uploaded datasets as things a user manages (tl_core.data.library, tl_core.runs.datasets): rename, delete,
refusal while a run or task reads one, and zips that cannot make a dataset refused before anything is saved."""

from __future__ import annotations

import io
import zipfile

import pytest

from conftest import EMOJI, make_class_folder
from tl_core.data import library
from tl_core.runs import datasets
from tl_core.errors import DatasetError


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _images(cls: str, n: int, folder: str = "pets") -> dict[str, bytes]:
    return {f"{folder}/{cls}/{f.name}": f.read_bytes() for f in sorted((EMOJI / cls).iterdir())[:n]}


def _listed(ws) -> list[str]:
    return [d["name"] for d in library.workspace_datasets(ws)]


def _nothing_saved(ws) -> bool:
    """No dataset in the list, and no temporary folder or file left behind in datasets/."""
    return list(ws.datasets_dir.iterdir()) == []


@pytest.fixture
def uploaded(workspace):
    """An uploaded dataset 'pets' (3 animal, 3 flag images)."""
    make_class_folder(workspace.datasets_dir / "pets", {"animal": 3, "flag": 3})
    return workspace


# --------------------------------------------------------------------------------------------------
# a zip that cannot make a dataset is refused before anything is saved
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entries, says", [
    (_images("animal", 4), "Only one class ('animal') found in cats.zip"),
    ({"pets/readme.txt": b"no images here"}, "holds no images"),
    ({**_images("animal", 3), "pets/flag/broken.png": b"\x89PNG garbage"}, "'flag' has 0"),
])
def test_a_zip_that_cannot_make_a_dataset_is_refused_and_nothing_is_saved(workspace, entries, says):
    with pytest.raises(DatasetError) as e:
        library.save_uploaded_zip(workspace, "cats.zip", _zip(entries))
    assert says in str(e.value), str(e.value)
    assert ".unpack-" not in str(e.value) and ".sorted-" not in str(e.value)  # names the upload, not a temp folder
    assert _listed(workspace) == [] and _nothing_saved(workspace)


def test_not_a_zip_is_refused_and_nothing_is_saved(workspace):
    with pytest.raises(DatasetError, match="not a zip archive"):
        library.save_uploaded_zip(workspace, "photo.zip", b"this is not a zip")
    assert _nothing_saved(workspace)


def test_a_good_zip_still_makes_a_dataset(workspace):
    folder = library.save_uploaded_zip(workspace, "pets.zip", _zip({**_images("animal", 3), **_images("flag", 3)}))
    assert _listed(workspace) == ["pets"] and folder == workspace.datasets_dir / "pets"


# --------------------------------------------------------------------------------------------------
# rename
# --------------------------------------------------------------------------------------------------
def test_rename_moves_the_dataset_and_sanitises_the_new_name(uploaded):
    ws = uploaded
    before = sorted(p.relative_to(ws.datasets_dir / "pets") for p in (ws.datasets_dir / "pets").rglob("*"))
    new = datasets.rename_dataset(ws, "pets", "My pets 2025!")
    assert new == ws.datasets_dir / "My_pets_2025"
    assert _listed(ws) == ["My_pets_2025"]
    assert sorted(p.relative_to(new) for p in new.rglob("*")) == before
    assert datasets.rename_dataset(ws, "My_pets_2025", "My_pets_2025") == new  # same name: nothing to do


def test_rename_refuses_clashes_empty_names_and_unknown_datasets(uploaded):
    ws = uploaded
    make_class_folder(ws.datasets_dir / "other", {"animal": 2, "flag": 2})
    with pytest.raises(DatasetError, match="'other' exists already"):
        datasets.rename_dataset(ws, "pets", "other")
    with pytest.raises(DatasetError, match="new name"):
        datasets.rename_dataset(ws, "pets", "   ")
    with pytest.raises(DatasetError, match="no letter or digit"):
        datasets.rename_dataset(ws, "pets", "../..")
    with pytest.raises(DatasetError, match="No uploaded dataset called 'emoji'"):
        datasets.rename_dataset(ws, "emoji", "mine")  # a sample dataset is not in the workspace
    for hostile in ("../pets", ".", "", "pets/animal"):
        with pytest.raises(DatasetError):
            datasets.rename_dataset(ws, hostile, "x")
    assert sorted(_listed(ws)) == ["other", "pets"]


# --------------------------------------------------------------------------------------------------
# delete
# --------------------------------------------------------------------------------------------------
def test_delete_removes_the_dataset_and_keeps_finished_runs(uploaded):
    ws = uploaded
    store = ws.store()
    done = store.create_run(str(ws.datasets_dir / "pets"), {"strategy": "linear"}, status="done")
    other = store.create_run(str(EMOJI), {"strategy": "linear"}, status="running")  # another dataset: no matter
    assert [r["id"] for r in datasets.dataset_runs(ws, "pets")] == [done]
    assert datasets.delete_dataset(ws, "pets") == 1
    assert _listed(ws) == [] and _nothing_saved(ws)
    assert store.exists(done) and store.exists(other)  # runs are kept with their results
    with pytest.raises(DatasetError, match="No uploaded dataset called 'pets'"):
        datasets.delete_dataset(ws, "pets")


@pytest.mark.parametrize("status", ["queued", "running"])
def test_a_dataset_a_run_in_progress_reads_cannot_be_deleted_or_renamed(uploaded, status):
    ws = uploaded
    store = ws.store()
    run = store.create_run(str(ws.datasets_dir / "pets"), {"strategy": "linear"}, status=status)
    assert datasets.dataset_users(ws, "pets") == [f"run {run} ({status})"]
    with pytest.raises(DatasetError) as e:
        datasets.delete_dataset(ws, "pets")
    assert f"cannot be deleted while it is in use by run {run} ({status})" in str(e.value)
    assert "cancel" in str(e.value)
    with pytest.raises(DatasetError, match="cannot be renamed while"):
        datasets.rename_dataset(ws, "pets", "elsewhere")
    assert _listed(ws) == ["pets"] and len(list((ws.datasets_dir / "pets").rglob("*.png"))) == 6
    # once the run has ended, the dataset can go
    store.set_status(run, "cancelled", "Cancelled before it started.")
    assert datasets.dataset_users(ws, "pets") == []
    assert datasets.delete_dataset(ws, "pets") == 1
    assert _listed(ws) == []


def test_a_task_in_progress_on_the_dataset_also_blocks_deletion(uploaded):
    ws = uploaded
    store = ws.store()
    folder = ws.datasets_dir / "pets"
    tid, _ = store.create_task("audit", "k1", "compute", {"data": str(folder), "signature": "x"})
    # a task that names single images of the dataset (the augmentation preview) counts too
    store.create_task("augment_preview", "k2", "interactive", {"paths": [str(next(folder.rglob("*.png")))]})
    users = datasets.dataset_users(ws, "pets")
    assert users == ["a task checking the data (queued)", "a task drawing augmented images (queued)"]
    with pytest.raises(DatasetError, match="in use by a task checking the data"):
        datasets.delete_dataset(ws, "pets")
    for t in store.tasks():
        store.finish_task(t["id"], "done")
    assert datasets.dataset_users(ws, "pets") == []
    datasets.delete_dataset(ws, "pets")
    assert _listed(ws) == []


def test_a_run_on_a_zip_counts_for_the_folder_the_zip_unpacks_into(uploaded, tmp_path):
    ws = uploaded
    z = tmp_path / "pets.zip"
    z.write_bytes(b"PK")  # only its name matters: open_data unpacks pets.zip into datasets/pets
    run = ws.store().create_run(str(z), {"strategy": "linear"}, status="running")
    assert datasets.dataset_users(ws, "pets") == [f"run {run} (running)"]
