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
