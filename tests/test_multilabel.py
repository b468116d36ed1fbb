"""Multi-label classification end to end: CSV intake and its bad-input sentences, the iterative split, the
one-vs-rest probe against scikit-learn, metrics against sklearn.metrics, thresholds, CLI JSON, bundle."""

from __future__ import annotations

import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tl_core.data.intake import open_dataset
from tl_core.data.splits import split_dataset
from tl_core.errors import DatasetError

ROOT = Path(__file__).resolve().parent.parent
ML = ROOT / "sample_data" / "emoji_multilabel"
IMAGES = sorted((ML / "images").glob("*.png"))


def _csv(tmp_path: Path, rows: list[str], header: str = "path,labels") -> Path:
    """A CSV beside copies of real sample images (rows name them as img0.png, img1.png, ...)."""
    for n in range(12):
        shutil.copy(IMAGES[n], tmp_path / f"img{n}.png")
    f = tmp_path / "labels.csv"
    f.write_text("\n".join([header, *rows]) + "\n")
    return f


# -- data ------------------------------------------------------------------------------------------
def test_sample_is_multi_label_with_label_sets():
    ds = open_dataset(ML)
    assert ds.multi_label
    assert ds.classes == ["animal", "face", "food", "hand", "heart", "person", "smile", "sport"]
    assert 150 <= len(ds.items) <= 300
    multi = [i for i in ds.items if len(i.labels) > 1]
    assert len(multi) >= 100
    dog = next(i for i in ds.items if i.path.name == "dog.png")
    assert dog.labels == ("animal", "face") and dog.label == "animal;face"
    # counts are images per label, from the CSV itself
    rows = [ln.split(",")[1] for ln in (ML / "labels.csv").read_text().splitlines()[1:]]
    want = Counter(lab for cell in rows for lab in cell.split(";"))
    assert ds.counts() == {k: want[k] for k in ds.classes}


def test_csv_label_sets_trimmed_sorted_and_deduplicated(tmp_path):
    rows = [f"img{n}.png,{cell}" for n, cell in enumerate(
        ["dog; ball", "ball;dog;dog", "dog;", "ball", "cat;dog", "cat"])]
    ds = open_dataset(_csv(tmp_path, rows))
    assert ds.multi_label and ds.classes == ["ball", "cat", "dog"]
    by = {i.path.name: i.labels for i in ds.items}
    assert by["img0.png"] == ("ball", "dog") and by["img1.png"] == ("ball", "dog") and by["img2.png"] == ("dog",)
    assert by["img3.png"] == ("ball",)
    # mixing one-label and several-label cells: read as multi-label, and said so
    assert any("read as multi-label" in n and "3 row(s) with one label" in n for n in ds.notes)


def test_single_label_csv_unchanged(tmp_path):
    ds = open_dataset(_csv(tmp_path, [f"img{n}.png,{'ab'[n % 2]}" for n in range(6)], header="path,label"))
    assert not ds.multi_label and ds.items[0].labels == () and ds.items[0].label_set == (ds.items[0].label,)


def test_empty_label_set_is_skipped_with_reason(tmp_path):
    rows = ["img0.png,a;b", "img1.png,a;b", "img2.png, ; ", "img3.png,a", "img4.png,b"]
    ds = open_dataset(_csv(tmp_path, rows))
    assert len(ds.items) == 4
    assert [s.reason for s in ds.skipped] == ["img2.png has an empty label set; give it at least one label"]


def test_label_on_one_image_is_named(tmp_path):
    rows = ["img0.png,a;b", "img1.png,a;b", "img2.png,a;rare", "img3.png,b"]
    with pytest.raises(DatasetError) as e:
        open_dataset(_csv(tmp_path, rows))
    msg = str(e.value)
    assert "'rare' is on 1 usable image(s) (only on img2.png)" in msg and "\n" not in msg


def test_unknown_columns_refused_in_one_sentence(tmp_path):
    with pytest.raises(DatasetError, match=r"has columns \['file_name', 'tags_here'\].*'path,labels'"):
        open_dataset(_csv(tmp_path, ["img0.png,a;b"], header="file_name,tags_here"))


def test_folder_and_zip_holding_a_multi_label_csv(tmp_path):
    assert open_dataset(ML).multi_label  # the sample is such a folder
    z = tmp_path / "ml.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(ML / "labels.csv", "emoji_multilabel/labels.csv")
        for f in IMAGES:
            zf.write(f, f"emoji_multilabel/images/{f.name}")
    ds = open_dataset(z, extract_dir=tmp_path / "x")
    assert ds.multi_label and len(ds.items) == len(IMAGES) and ds.counts() == open_dataset(ML).counts()
    # a class-folder zip with a stray single-label labels.csv stays a class-folder dataset
    z2 = tmp_path / "folders.zip"
    with zipfile.ZipFile(z2, "w") as zf:
        zf.writestr("labels.csv", "path,label\na/x.png,a\n")
        for n, f in enumerate(IMAGES[:6]):
            zf.write(f, f"{'ab'[n % 2]}/{f.name}")
    ds2 = open_dataset(z2, extract_dir=tmp_path / "y")
    assert not ds2.multi_label and ds2.classes == ["a", "b"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iterative_split_keeps_every_label_in_train_and_val(seed):
    ds = open_dataset(ML)
    sp = split_dataset(ds, 0.2, seed)
    assert sorted(i.path for i in sp.train + sp.val) == sorted(i.path for i in ds.items)
    tr = Counter(lab for i in sp.train for lab in i.labels)
    va = Counter(lab for i in sp.val for lab in i.labels)
    total = ds.counts()
    for lab in ds.classes:
        assert tr[lab] >= 1 and va[lab] >= 1
        # stratified: each label's validation share within 5 points of 20%
        assert abs(va[lab] / total[lab] - 0.2) <= 0.05, (lab, va[lab], total[lab])
    assert abs(len(sp.val) / len(ds.items) - 0.2) <= 0.03
    assert split_dataset(ds, 0.2, seed).val == sp.val  # seeded


def test_iterative_split_rare_label_stays_in_train(tmp_path):
    rows = ["img0.png,a;r", "img1.png,a;r", "img2.png,a", "img3.png,b", "img4.png,b", "img5.png,a;b"]
    ds = open_dataset(_csv(tmp_path, rows))
    for seed in range(5):
        sp = split_dataset(ds, 0.5, seed)
        for lab in ds.classes:
            assert any(lab in i.labels for i in sp.train), (seed, lab)
