"""Dataset intake (folder, zip, CSV), image loading rules, splits, report, decoded-image cache.

Odd image modes, EXIF rotation, unreadable images, CSV errors and class-count errors are tested once, with
their exact messages, in test_hostile_files.py."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import EMOJI, FASHION, make_class_folder
from tl_core.cache import DecodedImageCache
from tl_core.data.report import dataset_report
from tl_core.data.images import load_image
from tl_core.data.intake import open_dataset
from tl_core.data.splits import split_dataset
from tl_core.errors import DatasetError


# -- image loading rules ---------------------------------------------------------------------------
def test_transparent_png_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((0, 0), (0, 0, 255, 255))
    im.save(tmp_path / "t.png")
    rgb = load_image(tmp_path / "t.png")
    assert rgb.mode == "RGB"
    assert rgb.getpixel((5, 5)) == (255, 255, 255)  # not black, not red
    assert rgb.getpixel((0, 0)) == (0, 0, 255)


# -- intake ----------------------------------------------------------------------------------------
def test_sample_folder_opens_with_counts_and_report():
    ds = open_dataset(EMOJI)
    assert ds.classes == ["animal", "face", "flag", "food", "vehicle"]
    assert ds.counts() == {c: 40 for c in ds.classes}
    rep = dataset_report(ds, split_dataset(ds, 0.2, 0))
    assert rep["num_images"] == 200 and rep["imbalance_ratio"] == 1.0
    assert rep["split"] == {"train": 160, "val": 40, "test": 0}
    assert rep["image_size"]["min_width"] == 64 and rep["skipped"] == []


def test_train_test_layout_keeps_the_test_folder_held_out():
    ds = open_dataset(FASHION)
    assert len(ds.classes) == 10
    sp = split_dataset(ds, 0.2, 0)
    assert len(sp.test) == 200 and all(i.split == "test" for i in sp.test)
    assert len(sp.train) + len(sp.val) == 300
    assert not {i.sha256 for i in sp.test} & {i.sha256 for i in sp.train + sp.val}


def test_split_is_stratified_seeded_and_deterministic():
    ds = open_dataset(EMOJI)
    a = split_dataset(ds, 0.25, seed=1)
    b = split_dataset(ds, 0.25, seed=1)
    c = split_dataset(ds, 0.25, seed=2)
    assert [i.path for i in a.val] == [i.path for i in b.val]
    assert [i.path for i in a.val] != [i.path for i in c.val]
    for cls in ds.classes:
        assert sum(i.label == cls for i in a.val) == 10
    capped = split_dataset(ds, 0.25, seed=1, max_per_class=5)
    assert len(capped.train) == 25 and len(capped.val) == 50


def test_zip_with_wrapper_folder_macosx_dotfiles_and_non_images(tmp_path):
    src = make_class_folder(tmp_path / "pets", {"cats": 4, "dogs": 3})
    z = tmp_path / "pets.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(src.rglob("*.png")):
            zf.write(f, f"pets/{f.relative_to(src)}")
        zf.writestr("__MACOSX/pets/cats/._a.png", b"junk")
        zf.writestr("pets/.DS_Store", b"junk")
        zf.writestr("pets/cats/notes.txt", b"hello")
    ds = open_dataset(z, extract_dir=tmp_path / "unzipped")
    assert ds.classes == ["cats", "dogs"]
    assert ds.counts() == {"cats": 4, "dogs": 3}
    assert ds.ignored == 2
    assert [(s.path, s.reason) for s in ds.skipped] == [("pets/cats/notes.txt", "not an image file (.txt)")]


def test_unreadable_files_are_skipped_not_fatal(tmp_path):
    root = make_class_folder(tmp_path / "d", {"a": 3, "b": 3})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "b" / "readme.md").write_text("hi")
    ds = open_dataset(root)
    assert ds.counts() == {"a": 3, "b": 3}
    reasons = {s.path: s.reason for s in ds.skipped}
    assert "readable" in reasons["a/broken.png"] or "damaged" in reasons["a/broken.png"]
    assert reasons["b/readme.md"] == "not an image file (.md)"


def test_no_classes_and_missing_path(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="one sub-folder per class"):
        open_dataset(tmp_path / "flat")
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope")



# -- decoded-image cache ---------------------------------------------------------------------------
def test_decoded_cache_hits_and_rebuilds_corrupt_entries(tmp_path):
    ds = open_dataset(EMOJI)
    item = ds.items[0]
    c1 = DecodedImageCache(tmp_path / "dec")
    a = c1.get(item, 256)
    assert a.shape[:2] == (256, 256) and c1.misses == 1
    c2 = DecodedImageCache(tmp_path / "dec")
    b = c2.get(item, 256)
    assert c2.hits == 1 and c2.misses == 0 and np.array_equal(a, b)
    f = next((tmp_path / "dec").rglob("*.npy"))
    f.write_bytes(b"garbage")
    c3 = DecodedImageCache(tmp_path / "dec")
    c = c3.get(item, 256)
    assert c3.misses == 1 and np.array_equal(a, c)
    assert c3.get(item, 240).shape[0] == 240  # another size is another entry


# -- duplicates stay together; the locked test carve --------------------------------------------------
def _with_duplicates(root):
    """Two classes of 10 real images, plus copies: one image of class a three more times in a (one group of
    four), two more pairs in a, and an image of a copied into b (a group whose labels conflict)."""
    import shutil

    src = make_class_folder(root, {"a": 10, "b": 10})
    a = sorted((src / "a").iterdir())
    for n in range(3):
        shutil.copy(a[0], src / "a" / f"copy{n}_{a[0].name}")
    shutil.copy(a[1], src / "a" / f"copy_{a[1].name}")
    shutil.copy(a[2], src / "a" / f"copy_{a[2].name}")
    shutil.copy(a[3], src / "b" / f"from_a_{a[3].name}")
    return open_dataset(src)


@pytest.mark.parametrize("test_split", [0.0, 0.25])
def test_split_never_puts_copies_of_one_image_on_two_sides(tmp_path, test_split):
    ds = _with_duplicates(tmp_path / "dups")
    groups = {}
    for it in ds.items:
        groups.setdefault(it.sha256, []).append(it)
    assert sorted(len(g) for g in groups.values() if len(g) > 1) == [2, 2, 2, 4]
    for seed in range(12):
        sp = split_dataset(ds, 0.3, seed, test_split=test_split)
        side = {id(i): name for name, part in (("train", sp.train), ("val", sp.val), ("test", sp.test))
                for i in part}
        assert len(side) == len(ds.items)  # every image once
        for g in groups.values():
            assert len({side[id(i)] for i in g}) == 1, (seed, [str(i.path) for i in g])
        for cls in ds.classes:  # still stratified: every class on each side
            for part in (sp.train, sp.val) + ((sp.test,) if test_split else ()):
                assert any(i.label == cls for i in part), (seed, cls)
        assert 0.2 <= len(sp.val) / (len(ds.items) - len(sp.test)) <= 0.4
        assert 0.15 <= len(sp.test) / len(ds.items) <= 0.35 if test_split else not sp.test


def test_split_without_duplicates_is_unchanged_by_grouping():
    """Grouping changes nothing where there are no copies: the sample's split is the plain per-class shuffle."""
    import random

    ds = open_dataset(EMOJI)
    sp = split_dataset(ds, 0.2, 3)
    rng = random.Random(3)
    expected_val = []
    for cls in ds.classes:
        group = sorted((i for i in ds.items if i.label == cls), key=lambda i: (i.label, i.sha256, str(i.path)))
        rng.shuffle(group)
        expected_val += group[:8]
    assert [i.path for i in sp.val] == [i.path for i in expected_val]


def test_test_split_carves_a_stratified_seeded_disjoint_test_part():
    ds = open_dataset(EMOJI)
    sp = split_dataset(ds, 0.2, 0, test_split=0.2)
    parts = [{i.path for i in p} for p in (sp.train, sp.val, sp.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(map(len, parts)) == 200
    for cls in ds.classes:
        assert sum(i.label == cls for i in sp.test) == 8  # 20% of 40
        assert sum(i.label == cls for i in sp.val) == 6  # 20% of the 32 left
    again = split_dataset(ds, 0.2, 0, test_split=0.2)
    assert [i.path for i in again.test] == [i.path for i in sp.test]
    assert [i.path for i in split_dataset(ds, 0.2, 1, test_split=0.2).test] != [i.path for i in sp.test]
    # a data set with its own test folder keeps it: nothing is carved
    fashion = open_dataset(FASHION)
    own = split_dataset(fashion, 0.2, 0, test_split=0.3)
    assert len(own.test) == 200 and all(i.split == "test" for i in own.test)
