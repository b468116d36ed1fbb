"""Dataset intake (folder, zip, CSV), image loading rules, splits, report, decoded-image cache."""

from __future__ import annotations

import csv
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import EMOJI, FASHION, make_class_folder
from tl_core.cache import DecodedImageCache
from tl_core.data.report import dataset_report
from tl_core.data.images import image_from_bytes, load_image
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


def test_palette_with_transparency_and_la(tmp_path):
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.info["transparency"] = 0
    p.putpixel((1, 1), 1)
    p.save(tmp_path / "p.png", transparency=0)
    rgb = load_image(tmp_path / "p.png")
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (10, 200, 30)
    Image.new("LA", (3, 3), (0, 0)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((1, 1)) == (255, 255, 255)


def test_gray_cmyk_and_16bit_become_rgb(tmp_path):
    Image.new("L", (5, 5), 77).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png").getpixel((2, 2)) == (77, 77, 77)
    Image.new("CMYK", (5, 5), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((2, 2))
    assert r > 200 and g < 60 and b < 60  # CMYK (0,255,255,0) is red
    arr = np.full((6, 6), 65535 // 2, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    v = load_image(tmp_path / "d.png").getpixel((3, 3))
    assert v[0] == v[1] == v[2] and 120 <= v[0] <= 135  # mid-gray, not clipped white


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_unreadable_image_says_why(tmp_path):
    (tmp_path / "x.jpg").write_text("not really a jpeg")
    with pytest.raises(DatasetError, match="not a readable image"):
        load_image(tmp_path / "x.jpg")
    with pytest.raises(DatasetError, match="not a readable image"):
        image_from_bytes(b"\x00\x01garbage", "cam.png")


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


def test_csv_of_path_label_with_missing_file(tmp_path):
    make_class_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    rows = [("path", "label")] + [(str(p.relative_to(tmp_path)), p.parent.name) for p in sorted(tmp_path.rglob("*.png"))]
    rows.append(("imgs/a/missing.png", "a"))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    ds = open_dataset(tmp_path / "labels.csv")
    assert ds.counts() == {"a": 3, "b": 3}
    assert ds.skipped[0].path == "imgs/a/missing.png"
    assert "not found" in ds.skipped[0].reason


def test_csv_with_unknown_columns_names_the_needed_ones(tmp_path):
    (tmp_path / "x.csv").write_text("file_name,kind,extra\na.png,cat,1\n")
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "x.csv")
    assert "'path' column" in str(e.value) and "'label' column" in str(e.value)


def test_unreadable_files_are_skipped_not_fatal(tmp_path):
    root = make_class_folder(tmp_path / "d", {"a": 3, "b": 3})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "b" / "readme.md").write_text("hi")
    ds = open_dataset(root)
    assert ds.counts() == {"a": 3, "b": 3}
    reasons = {s.path: s.reason for s in ds.skipped}
    assert "readable" in reasons["a/broken.png"] or "damaged" in reasons["a/broken.png"]
    assert reasons["b/readme.md"] == "not an image file (.md)"


@pytest.mark.parametrize("spec, words", [
    ({"only": 5}, ["Only one class", "'only'", "at least two"]),
    ({"a": 5, "b": 1}, ["'b' has 1", "at least 2"]),
])
def test_class_count_errors_give_the_numbers(tmp_path, spec, words):
    root = make_class_folder(tmp_path / "d", spec)
    with pytest.raises(DatasetError) as e:
        open_dataset(root)
    for w in words:
        assert w in str(e.value)


def test_empty_class_folder_is_an_error_with_the_count(tmp_path):
    root = make_class_folder(tmp_path / "d", {"a": 3, "b": 3})
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match="'empty' has 0"):
        open_dataset(root)


def test_no_classes_and_missing_path(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="one sub-folder per class"):
        open_dataset(tmp_path / "flat")
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope")


def test_imbalance_is_reported(tmp_path):
    root = make_class_folder(tmp_path / "d", {"many": 30, "few": 3})
    rep = dataset_report(open_dataset(root))
    assert rep["imbalance_ratio"] == 10.0
    assert any("imbalanced" in w for w in rep["warnings"])


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
