"""Hostile input: archives that try to escape or explode, images that lie, datasets that make no sense,
weights files that try to run code. Every file is generated here (tests/hostile.py); every case checks
the message a user would see and that nothing was written where it should not be.
"""

from __future__ import annotations

import csv
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hostile as H
from conftest import EMOJI
from tl_core.data.images import MAX_IMAGE_PIXELS, image_from_bytes, load_image
from tl_core.data.intake import ZipLimits, open_dataset, safe_extract_zip
from tl_core.data.report import dataset_report
from tl_core.data.splits import split_dataset
from tl_core.errors import DatasetError, RunError, WeightsError

IMG = H.png_bytes((24, 24), seed=1)


def _ok_entries(n: int = 2) -> list[tuple[str, bytes]]:
    return [(f"pets/{c}/{i}.png", H.png_bytes((24, 24), seed=10 * k + i)) for k, c in enumerate(("cats", "dogs"))
            for i in range(n)]


@pytest.fixture
def box(tmp_path):
    """A folder holding the archive and its extraction target, plus a bystander file next to them:
    the test checks that the folder's content is exactly as before (nothing escaped the destination)."""
    d = tmp_path / "box"
    d.mkdir()
    (d / "bystander.txt").write_text("untouched")
    return d


# ==================================================================================================
# archives: path traversal and links
# ==================================================================================================
@pytest.mark.parametrize("evil", ["../x.png", "../../etc/x.png", "/abs.png", "/tmp/abs.png", "C:\\x.png",
                                  "C:/x.png", "..\\x.png", "pets/cats/../../../x.png", "pets/../../x.png",
                                  "../"])
def test_zip_path_traversal_is_refused_and_nothing_is_written(box, evil):
    z = H.write_zip(box / "evil.zip", [*_ok_entries(), (evil, IMG)])
    before = H.snapshot(box.parent)
    with pytest.raises(DatasetError) as e:
        safe_extract_zip(z, box / "out")
    msg = str(e.value)
    assert "evil.zip contains the unsafe path" in msg and "refused" in msg and repr(evil) in msg
    with pytest.raises(DatasetError, match="unsafe path"):
        open_dataset(z)  # the same through the dataset entry point (extracts next to the zip)
    assert H.snapshot(box.parent) == before  # not even the good entries were unpacked


def test_zip_symlink_entry_is_refused(box):
    z = H.zip_with_symlink(box / "link.zip", "pets/cats/passwd.png", "/etc/passwd", extra=_ok_entries())
    before = H.snapshot(box.parent)
    with pytest.raises(DatasetError) as e:
        safe_extract_zip(z, box / "out")
    assert "link.zip contains a symbolic link ('pets/cats/passwd.png'); refused" in str(e.value)
    with pytest.raises(DatasetError, match="symbolic link"):
        open_dataset(z, extract_dir=box / "out2")
    assert H.snapshot(box.parent) == before
    # a symlink to a directory (the classic "link, then write through it" pair) is refused as well
    z2 = H.zip_with_symlink(box / "dirlink.zip", "pets/cats", str(box.parent), extra=[("pets/dogs/1.png", IMG)])
    with pytest.raises(DatasetError, match="symbolic link"):
        safe_extract_zip(z2, box / "out3")
    assert not (box / "out3").exists()


def test_entry_names_that_clash_or_are_too_long_are_skipped_not_fatal(box):
    long_name = "pets/cats/" + "a" * 300 + ".png"
    z = H.write_zip(box / "odd.zip", [*_ok_entries(), ("pets/cats/x.png", IMG), ("pets/cats/x.png/y.png", IMG),
                                      (long_name, IMG)])
    dest, skipped, _ = safe_extract_zip(z, box / "out")
    reasons = {s.path: s.reason for s in skipped}
    assert reasons["pets/cats/x.png/y.png"].startswith("could not be unpacked (")
    assert reasons[long_name] == "could not be unpacked (File name too long)"
    assert sorted(p.name for p in (dest / "pets" / "cats").iterdir()) == ["0.png", "1.png", "x.png"]
    assert all(str(p.resolve()).startswith(str(box.resolve())) for p in dest.rglob("*"))


# ==================================================================================================
# archives: bombs
# ==================================================================================================
def _quick(fn):
    t0 = time.perf_counter()
    with pytest.raises(DatasetError) as e:
        fn()
    took = time.perf_counter() - t0
    assert took < 5, f"refusing took {took:.1f}s"
    return str(e.value)


def test_zip_entry_count_cap(box):
    z = H.write_zip(box / "many.zip", [(f"pets/cats/{i}.png", b"x") for i in range(40)])
    msg = _quick(lambda: safe_extract_zip(z, box / "out", ZipLimits(max_entries=30)))
    assert msg == "many.zip has 40 entries, above the limit of 30; split the dataset."
    assert not (box / "out").exists()


def test_zip_declared_total_size_cap(box):
    entries = [(f"pets/cats/{i}.png", np.random.default_rng(i).bytes(400_000)) for i in range(3)]
    z = H.write_zip(box / "big.zip", entries, compression=zipfile.ZIP_STORED)
    msg = _quick(lambda: safe_extract_zip(z, box / "out", ZipLimits(max_total_bytes=1_000_000)))
    assert msg.startswith("big.zip would unpack to 1.2 MB, above the 1.0 MB limit")
    assert not (box / "out").exists()


def test_zip_single_entry_size_cap(box):
    z = H.write_zip(box / "one.zip", [("pets/cats/huge.png", bytes(3_000_000))])
    msg = _quick(lambda: safe_extract_zip(z, box / "out", ZipLimits(max_entry_bytes=2_000_000, max_ratio=1e9)))
    assert "pets/cats/huge.png unpacks to 3 MB, above the per-file limit of 2 MB" in msg


def test_zip_compression_ratio_bomb_with_default_limits(box):
    # 5 MB of zeros squeezed into ~5 kB: refused from the header, before a byte is unpacked
    z = H.write_zip(box / "bomb.zip", [*_ok_entries(), ("pets/cats/bomb.png", bytes(5_000_000))])
    msg = _quick(lambda: open_dataset(z, extract_dir=box / "out"))
    assert msg.startswith("bomb.zip: pets/cats/bomb.png expands ") and msg.endswith("x, which looks like a zip bomb; refused.")
    assert not (box / "out").exists()
    # 50 MB in ~50 kB: the whole archive's ratio gives it away first
    z = H.write_zip(box / "bigbomb.zip", [*_ok_entries(), ("pets/cats/bomb.png", bytes(50_000_000))])
    assert z.stat().st_size < 200_000
    msg = _quick(lambda: open_dataset(z, extract_dir=box / "out"))
    assert msg.startswith("bigbomb.zip expands ") and "x overall (" in msg and "to 50.0 MB), which looks like a zip bomb" in msg
    assert not (box / "out").exists()


def test_zip_of_many_small_highly_compressed_entries_is_refused_overall(box):
    # each entry stays under the per-entry check (< 1 MB), together they are a 24 MB bomb
    z = H.write_zip(box / "swarm.zip", [(f"pets/cats/{i}.bmp", bytes(800_000)) for i in range(30)])
    msg = _quick(lambda: safe_extract_zip(z, box / "out"))
    assert "swarm.zip expands" in msg and "overall" in msg and "zip bomb" in msg
    assert not (box / "out").exists()


def test_zip_lying_header_is_refused_without_writing_the_real_size(box):
    # the header says 1 kB; the data inflates to 20 MB
    z = H.write_zip(box / "liar.zip", [*_ok_entries(), ("pets/cats/liar.png", bytes(20_000_000))])
    H.lie_about_sizes(z, 1000)
    with zipfile.ZipFile(z) as zf:
        assert {i.file_size for i in zf.infolist()} == {1000}
    before = H.snapshot(box.parent)
    msg = _quick(lambda: open_dataset(z, extract_dir=box / "out"))
    assert "liar.zip: pets/cats/" in msg and "holds more data than its header declares (1.0 kB)" in msg
    assert "zip bombs" in msg and "refused" in msg
    after = H.snapshot(box.parent)
    assert after == before  # the partial extraction was removed; nothing bigger than the header was written


def test_encrypted_zip_is_refused(box):
    z = H.write_zip(box / "secret.zip", _ok_entries())
    H.set_zip_flag_bits(z, 0x1)
    with zipfile.ZipFile(z) as zf:
        assert all(i.flag_bits & 0x1 for i in zf.infolist())
    with pytest.raises(DatasetError) as e:
        open_dataset(z, extract_dir=box / "out")
    assert str(e.value) == "secret.zip is encrypted (password-protected); upload an unencrypted zip."
    assert not (box / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "flipped"])
def test_corrupt_zip(box, damage):
    good = H.write_zip(box / "good.zip", _ok_entries(3), compression=zipfile.ZIP_STORED).read_bytes()
    z = box / "bad.zip"
    if damage == "truncated":
        z.write_bytes(H.truncate(good, 0.6))
    elif damage == "garbage":
        z.write_bytes(b"PK\x03\x04" + b"\x00garbage" * 200)
    elif damage == "empty":
        z.write_bytes(b"")
    else:  # central directory intact, one entry's data damaged
        data = bytearray(good)
        with zipfile.ZipFile(box / "good.zip") as zf:
            info = zf.getinfo("pets/cats/1.png")
        at = info.header_offset + 30 + len(info.filename) + 40
        data[at:at + 8] = b"\xff" * 8
        z.write_bytes(bytes(data))
    if damage == "flipped":
        ds = open_dataset(z, extract_dir=box / "out")  # one bad entry: skipped with its reason, rest usable
        assert [(s.path, s.reason) for s in ds.skipped] == [
            ("pets/cats/1.png", "damaged inside the zip (Bad CRC-32 for file 'pets/cats/1.png')")]
        assert ds.counts() == {"cats": 2, "dogs": 3}
        return
    with pytest.raises(DatasetError) as e:
        open_dataset(z, extract_dir=box / "out")
    msg = str(e.value)
    if damage == "empty":
        assert "bad.zip is neither a folder, a .zip nor a .csv" in msg or "not a readable zip archive" in msg
    else:
        assert msg.startswith("bad.zip is not a readable zip archive (")
        assert "re-create it with your system's 'compress' tool" in msg
    assert not (box / "out").exists()


def test_nested_archives_and_non_images_are_skipped_with_reasons(box):
    inner = H.write_zip(box / "inner.zip", _ok_entries()).read_bytes()
    z = H.write_zip(box / "outer.zip", [*_ok_entries(3), ("pets/cats/more.zip", inner), ("pets/dogs/x.tar.gz", b"x"),
                                        ("pets/readme.pdf", b"%PDF"), ("__MACOSX/pets/._1.png", b"junk")])
    ds = open_dataset(z, extract_dir=box / "out")
    reasons = {s.path: s.reason for s in ds.skipped}
    assert reasons["pets/cats/more.zip"] == "nested archive: not unpacked; unzip it and add its images directly"
    assert reasons["pets/dogs/x.tar.gz"] == "nested archive: not unpacked; unzip it and add its images directly"
    assert reasons["pets/readme.pdf"] == "not an image file (.pdf)"
    assert ds.ignored == 1 and ds.counts() == {"cats": 3, "dogs": 3}
    assert not list((box / "out").rglob("*.zip"))


def test_empty_zip_says_where_images_go(box):
    z = H.write_zip(box / "nothing.zip", [])
    with pytest.raises(DatasetError) as e:
        open_dataset(z, extract_dir=box / "out")
    assert str(e.value).startswith("No classes found in nothing.zip: put images in one sub-folder per class")


def test_a_different_zip_with_the_same_name_is_not_served_from_the_old_extraction(tmp_path):
    # two users upload "data.zip" with different content into the same workspace folder
    out = tmp_path / "datasets" / "data"
    a = H.write_zip((tmp_path / "a").mkdir() or tmp_path / "a" / "data.zip", _ok_entries(2))
    b = H.write_zip((tmp_path / "b").mkdir() or tmp_path / "b" / "data.zip",
                    [(f"zoo/{c}/{i}.png", H.png_bytes((20, 20), seed=100 + 7 * k + i))
                     for k, c in enumerate(("owls", "bats", "eels")) for i in range(2)])
    assert open_dataset(a, extract_dir=out).classes == ["cats", "dogs"]
    assert open_dataset(b, extract_dir=out).classes == ["bats", "eels", "owls"]
    assert open_dataset(a, extract_dir=out).classes == ["cats", "dogs"]  # a's extraction still intact
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]  # no temp folders left behind


# ==================================================================================================
# images
# ==================================================================================================
def _load(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return load_image(p)


def test_truncated_png_and_jpeg(tmp_path):
    for name, data in [("cut.png", H.truncate(H.png_bytes((200, 200)))), ("cut.jpg", H.truncate(H.jpeg_bytes((200, 200))))]:
        with pytest.raises(DatasetError) as e:
            _load(tmp_path, name, data)
        assert str(e.value).startswith(f"{name}: damaged or truncated image (image file is truncated")


@pytest.mark.parametrize("data", [b"I am a text file, not a JPEG.\n", b"", b"\xff\xd8\xff" + b"\x00" * 10,
                                  b"<svg xmlns='http://www.w3.org/2000/svg'/>"])
def test_not_an_image_with_an_image_extension(tmp_path, data):
    for load in (lambda: _load(tmp_path, "photo.jpg", data), lambda: image_from_bytes(data, "photo.jpg")):
        with pytest.raises(DatasetError) as e:  # from a file, and from an upload's bytes
            load()
        assert str(e.value) in ("photo.jpg: not a readable image (unknown or damaged format).",) or \
            str(e.value).startswith("photo.jpg: damaged or truncated image")


@pytest.mark.parametrize("w,h", [(8000, 8000), (100_000, 100_000), (2**31 - 1, 1)])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_header_is_refused_before_decoding(tmp_path, w, h):
    data = H.png_with_header_size(w, h)
    assert len(data) < 2000  # a few hundred bytes that claim billions of pixels
    t0 = time.perf_counter()
    with pytest.raises(DatasetError) as e:
        _load(tmp_path, "bomb.png", data)
    assert time.perf_counter() - t0 < 1
    msg = str(e.value)
    if w * h <= 2 * MAX_IMAGE_PIXELS:  # our own check, with the numbers
        assert msg == (f"bomb.png: {w}x{h} is {w * h / 1e6:.0f} megapixels, above the 50 MP limit; "
                       "downscale it before uploading.")
    else:  # Pillow's guard fires while reading the header
        assert msg == "bomb.png: the image is larger than the 50 MP limit."


def test_odd_modes_become_rgb(tmp_path):
    Image.new("L", (5, 5), 77).save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").getpixel((2, 2)) == (77, 77, 77)
    im = _load(tmp_path, "deep.png", H.png_16bit((40, 30)))
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    assert im.mode == "RGB" and im.size == (40, 30)
    assert im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((39, 0)) == (255, 255, 255)  # full range, not clipped
    assert 100 < im.getpixel((20, 0))[0] < 155
    im = _load(tmp_path, "print.jpg", H.cmyk_jpeg())
    assert Image.open(tmp_path / "print.jpg").mode == "CMYK"
    r, g, b = im.getpixel((5, 5))
    assert im.mode == "RGB" and r > 200 and g < 60 and b < 60
    im = _load(tmp_path, "pal.png", H.palette_png_transparent((32, 32)))
    assert im.getpixel((0, 0)) == (0, 0, 255) and im.getpixel((31, 0)) == (255, 255, 255)  # transparent → white
    assert _load(tmp_path, "la.png", H.la_png()).getpixel((3, 3)) == (255, 255, 255)
    assert _load(tmp_path, "rgba.png", H.rgba_png()).getpixel((3, 3)) == (255, 255, 255)


def test_animated_gif_gives_its_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    p.write_bytes(H.animated_gif(frames=4))
    assert Image.open(p).n_frames == 4
    im = load_image(p)
    assert im.mode == "RGB" and im.getpixel((5, 5)) == (255, 0, 0)


def test_exif_rotation_is_applied(tmp_path):
    p = tmp_path / "phone.jpg"
    p.write_bytes(H.exif_rotated_jpeg((60, 40), orientation=6))
    with Image.open(p) as raw:
        assert raw.size == (60, 40) and raw.getexif()[0x0112] == 6
        expected = np.asarray(raw.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    im = load_image(p)
    assert im.size == (40, 60)  # width and height swapped
    assert np.array_equal(np.asarray(im), expected)  # and really rotated clockwise, not mirrored


def test_one_pixel_and_huge_but_allowed(tmp_path):
    assert _load(tmp_path, "dot.png", H.png_bytes((1, 1))).size == (1, 1)
    big = Image.linear_gradient("L").resize((6000, 4000)).convert("RGB")
    big.save(tmp_path / "big.jpg", quality=70)
    im = load_image(tmp_path / "big.jpg")
    assert im.size == (6000, 4000) and im.mode == "RGB"


def _mixed_dataset(root: Path) -> dict[str, str]:
    """Three emoji classes (6 real images each) with hostile files mixed in; returns {rel path: reason}."""
    for cls in ("animal", "face", "food"):
        (root / cls).mkdir(parents=True)
        for f in sorted((EMOJI / cls).iterdir())[:6]:
            shutil.copy(f, root / cls / f.name)
    bad = {
        "animal/cut.png": (H.truncate((EMOJI / "animal" / sorted((EMOJI / "animal").iterdir())[7].name).read_bytes()),
                           "damaged or truncated image"),
        "animal/holiday.jpg": (b"this is a text file", "not a readable image (unknown or damaged format)."),
        "face/bomb.png": (H.png_with_header_size(9000, 9000), "9000x9000 is 81 megapixels, above the 50 MP limit"),
        "face/notes.txt": (b"hello", "not an image file (.txt)"),
        "food/nested.zip": (b"PK\x05\x06" + b"\0" * 18, "nested archive: not unpacked"),
        "loose.png": (IMG, "not inside a class folder"),
    }
    good = {
        "animal/ünïcödé 名前 😀.png": H.png_bytes((30, 30), seed=2),
        "animal/  spaces  in name .png": H.png_bytes((30, 30), seed=3),
        "face/dup.png": H.png_bytes((30, 30), seed=4),
        "food/dup.png": H.png_bytes((30, 30), seed=5),  # same file name in another class, other content
        "face/deep.png": H.png_16bit(),
        "food/print.jpg": H.cmyk_jpeg(),
        "food/pal.png": H.palette_png_transparent(),
        "animal/la.png": H.la_png(),
        "face/anim.gif": H.animated_gif(),
        "animal/phone.jpg": H.exif_rotated_jpeg(),
        "food/dot.png": H.png_bytes((1, 1)),
    }
    for rel, (data, _) in bad.items():
        (root / rel).write_bytes(data)
    for rel, data in good.items():
        (root / rel).write_bytes(data)
    Image.linear_gradient("L").resize((6000, 4000)).convert("RGB").save(root / "face" / "big.jpg", quality=60)
    return {rel: reason for rel, (_, reason) in bad.items()}


@pytest.mark.slow
def test_hostile_files_are_skipped_and_the_rest_trains(tmp_path, workspace):
    from tl_core.config import TrainConfig
    from tl_core.runs.training import run_training

    root = tmp_path / "mixed"
    expected = _mixed_dataset(root)
    before = H.snapshot(tmp_path, exclude="tl_home")
    ds = open_dataset(root)
    got = {s.path: s.reason for s in ds.skipped}
    assert set(got) == set(expected)
    for rel, reason in expected.items():
        assert reason in got[rel], (rel, got[rel])
    assert ds.counts() == {"animal": 6 + 4, "face": 6 + 4, "food": 6 + 4}
    names = {p.path.name for p in ds.items}
    assert {"ünïcödé 名前 😀.png", "  spaces  in name .png", "dup.png", "big.jpg", "phone.jpg"} <= names
    phone = next(i for i in ds.items if i.path.name == "phone.jpg")
    assert (phone.width, phone.height) == (40, 60)
    rep = dataset_report(ds)
    assert "6 file(s) were skipped; see the list for reasons." in rep["warnings"]
    assert any(w.startswith("Some images are tiny (smallest 1x1 px)") for w in rep["warnings"])
    assert rep["image_size"]["max_width"] == 6000

    res = run_training(workspace, root, TrainConfig(strategy="linear", epochs=5))
    assert res.status == "done", res.error
    assert res.counts == {"animal": 10, "face": 10, "food": 10} and 0 <= res.val_accuracy <= 1
    meta = __import__("json").loads((Path(res.run_dir) / "meta.json").read_text())
    assert {s["path"] for s in meta["dataset"]["skipped"]} == set(expected)
    assert H.snapshot(tmp_path, exclude="tl_home") == before  # training wrote only into the workspace


# ==================================================================================================
# datasets that make no sense
# ==================================================================================================
def _classes(root: Path, spec: dict[str, int], size=(16, 16)) -> Path:
    for k, (cls, n) in enumerate(spec.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / cls / f"{i}.png").write_bytes(H.png_bytes(size, seed=1000 * k + i))
    return root


def test_one_class(tmp_path):
    with pytest.raises(DatasetError) as e:
        open_dataset(_classes(tmp_path / "solo", {"cats": 5}))
    assert str(e.value) == "Only one class ('cats') found in solo; a classifier needs at least two classes."


def test_empty_class_folder_and_class_with_one_image(tmp_path):
    root = _classes(tmp_path / "d", {"cats": 5, "dogs": 1})
    (root / "birds").mkdir()
    with pytest.raises(DatasetError) as e:
        open_dataset(root)
    msg = str(e.value)
    assert msg.startswith("Too few usable images: 'birds' has 0, 'dogs' has 1; every class needs at least 2")
    assert "Add images or remove those classes." in msg


def test_class_whose_only_images_are_broken_counts_zero(tmp_path):
    root = _classes(tmp_path / "d", {"cats": 3, "dogs": 0})
    (root / "dogs" / "a.jpg").write_bytes(b"not a jpeg")
    (root / "dogs" / "b.png").write_bytes(H.truncate(H.png_bytes((64, 64))))
    with pytest.raises(DatasetError, match=r"'dogs' has 0; every class needs at least 2"):
        open_dataset(root)


def test_two_hundred_classes(tmp_path):
    root = _classes(tmp_path / "many", {f"class_{i:03d}": 2 for i in range(200)}, size=(8, 8))
    ds = open_dataset(root)
    assert len(ds.classes) == 200 and len(ds.items) == 400
    sp = split_dataset(ds, 0.2, seed=0)
    assert len(sp.train) == 200 and len(sp.val) == 200  # every class keeps one of each
    assert {i.label for i in sp.train} == {i.label for i in sp.val} == set(ds.classes)
    rep = dataset_report(ds, sp)
    assert rep["num_classes"] == 200
    assert any(w.startswith("200 class(es) have fewer than 10 images") for w in rep["warnings"])


def test_wildly_imbalanced_classes_warn(tmp_path):
    ds = open_dataset(_classes(tmp_path / "skew", {"common": 40, "rare": 2}, size=(8, 8)))
    rep = dataset_report(ds)
    assert rep["imbalance_ratio"] == 20.0
    assert ("Classes are imbalanced (20.0x: 'common' has 40, 'rare' has 2); consider class balancing or adding "
            "images.") in rep["warnings"]


def test_csv_with_missing_files(tmp_path):
    _classes(tmp_path / "imgs", {"a": 3, "b": 3})
    rows = [("path", "label")] + [(f"imgs/{c}/{i}.png", c) for c in "ab" for i in range(3)]
    rows += [("imgs/a/gone.png", "a"), ("/nowhere/x.png", "b"), ("", "a"), ("imgs/b/notes.txt", "b")]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    (tmp_path / "imgs" / "b" / "notes.txt").write_text("x")
    ds = open_dataset(tmp_path / "labels.csv")
    assert ds.counts() == {"a": 3, "b": 3}
    got = {s.path: s.reason for s in ds.skipped}
    assert got == {"imgs/a/gone.png": "listed in the CSV but the file was not found",
                   "/nowhere/x.png": "listed in the CSV but the file was not found",
                   "labels.csv line 10": "empty path or label",
                   "imgs/b/notes.txt": "not an image file (.txt)"}


def test_csv_with_unknown_columns_names_the_needed_ones(tmp_path):
    (tmp_path / "x.csv").write_text("file_name,species,notes\na.png,cat,x\n")
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "x.csv")
    assert str(e.value) == ("x.csv has columns ['file_name', 'species', 'notes']; it needs a 'path' column and a "
                            "'label' column (header row 'path,label', or 'path,labels' with labels joined by ';' for "
                            "several per image).")
    (tmp_path / "latin1.csv").write_bytes("path,label\ncafé.png,chat\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="latin1.csv is not UTF-8 text; save the CSV as UTF-8."):
        open_dataset(tmp_path / "latin1.csv")


# ==================================================================================================
# weights
# ==================================================================================================
@pytest.mark.processes
@pytest.mark.parametrize("torch_format", [True, False], ids=["torch-zip", "raw-pickle"])
@pytest.mark.parametrize("ext", [".pth", ".bin"])
def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, torch_format, ext):
    from tl_core.models.backbones import build_model, load_state_dict_file

    marker = tmp_path / "pwned"
    evil = H.write_evil_pickle(tmp_path / f"evil{ext}", marker, torch_format=torch_format)
    assert not marker.exists()
    for load in (lambda: load_state_dict_file(evil), lambda: build_model("efficientnet_lite0", 3, weights=str(evil))):
        with pytest.raises(WeightsError) as e:
            load()
        msg = str(e.value)
        assert msg.startswith(f"evil{ext} cannot be loaded safely: it contains Python objects beyond plain tensors")
        assert "Convert it to .safetensors, or save only the state_dict." in msg
    assert not marker.exists()  # the payload never ran


def test_weights_for_another_architecture_name_the_mismatch(tmp_path):
    import timm
    from safetensors.torch import save_file

    from tl_core.models.backbones import build_model

    # resnet18's tensors: a few names overlap (bn1.*) with other shapes; that mismatch is named
    r18 = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}, str(r18))
    with pytest.raises(WeightsError) as e:
        build_model("efficientnet_lite0", 3, weights=str(r18))
    assert str(e.value) == ("resnet18.safetensors: 4 tensor(s) have the wrong shape, e.g. bn1.bias is (64,) but the "
                            "model needs (32,); these weights are for a different architecture or size.")

    # no name in common: a missing and an unknown tensor are named, with their shapes
    other = tmp_path / "other.safetensors"
    save_file({"encoder.patch.weight": torch.zeros(192, 3, 16, 16), "encoder.norm.bias": torch.zeros(192)}, str(other))
    with pytest.raises(WeightsError) as e:
        build_model("efficientnet_lite0", 3, weights=str(other))
    msg = str(e.value)
    assert msg.startswith("other.safetensors: ") and "tensors are missing (e.g. conv_stem.weight (32, 3, 3, 3))" in msg
    assert "2 are unknown (e.g. encoder.norm.bias (192,))" in msg and "different architecture" in msg

    # same names, other widths: the first mismatching tensor and both shapes are named
    lite2 = tmp_path / "lite2.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("tf_efficientnet_lite2").state_dict().items()}, str(lite2))
    with pytest.raises(WeightsError) as e:
        build_model("efficientnet_lite0", 3, weights=str(lite2))
    msg = str(e.value)
    assert msg.startswith("lite2.safetensors: ") and "tensor(s) have the wrong shape, e.g. " in msg
    import re

    m = re.search(r"e\.g\. (\S+) is \(([\d, ]+)\) but the model needs \(([\d, ]+)\)", msg)
    assert m and m.group(2) != m.group(3), msg
    assert "these weights are for a different architecture or size" in msg


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, (2**62).to_bytes(8, "little") + b"{}",
                                     (20).to_bytes(8, "little") + b'{"a": not json }xx'])
def test_garbage_safetensors(tmp_path, content):
    from tl_core.models.backbones import build_model, load_state_dict_file

    p = tmp_path / "junk.safetensors"
    p.write_bytes(content)
    for load in (lambda: load_state_dict_file(p), lambda: build_model("efficientnet_lite0", 3, weights=str(p))):
        with pytest.raises(WeightsError) as e:
            load()
        assert str(e.value).startswith("junk.safetensors is not a readable weights file (")


def test_truncated_safetensors_and_non_state_dict_pth(tmp_path):
    from safetensors.torch import save_file

    from tl_core.models.backbones import load_state_dict_file

    full = tmp_path / "full.safetensors"
    save_file({"w": torch.zeros(1000)}, str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(H.truncate(full.read_bytes(), 0.5))
    with pytest.raises(WeightsError, match=r"^cut.safetensors is not a readable weights file \("):
        load_state_dict_file(cut)
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], str(lst))
    with pytest.raises(WeightsError) as e:
        load_state_dict_file(lst)
    assert str(e.value) == "list.pth does not hold a state dict (a mapping of names to tensors)."
    with pytest.raises(WeightsError, match=r"model.onnx: unsupported weights format '.onnx'; use .safetensors or .pth."):
        (tmp_path / "model.onnx").write_bytes(b"x")
        load_state_dict_file(tmp_path / "model.onnx")


# ==================================================================================================
# isolation: names a user controls never become paths outside the workspace
# ==================================================================================================
EVIL_NAMES = ["../../escape", "/etc/passwd", "..", ".", "", "C:\\Windows\\x", "a/../../b", "\x00nul", "~root",
              ".hidden", "ünï 名前 😀", " " * 5, "x" * 500, "con", "../" * 20 + "tmp"]


def test_run_ids_cannot_leave_the_runs_folder(workspace):
    for bad in ["../x", "..", "a/b", "a\\b", ".hidden", ""]:
        with pytest.raises(RunError, match="is not a valid run id"):
            workspace.run_dir(bad)


def test_uploaded_names_stay_inside_the_workspace(tmp_path, workspace):
    from tl_core.data import library
    zip_bytes = H.write_zip(tmp_path / "u.zip", _ok_entries(2)).read_bytes()
    (tmp_path / "u.zip").unlink()
    before = H.snapshot(tmp_path, exclude="tl_home")
    home = workspace.home
    for name in EVIL_NAMES:
        folder = library.save_uploaded_zip(workspace, name + ".zip", zip_bytes)
        assert folder.resolve().parent == workspace.datasets_dir, (name, folder)
        if not name.strip():
            with pytest.raises(DatasetError, match="Give the class a name"):
                library.add_class_images(workspace, name, name, [(name + ".png", IMG)])
            continue
        ds_dir, saved, _ = library.add_class_images(workspace, name, name, [(name + ".png", IMG)])
        assert ds_dir.resolve().parent == workspace.datasets_dir, (name, ds_dir)
        for s in saved:
            assert "/" not in s and s not in (".", "..")
        kept = library.save_upload(workspace, name + ".png", IMG)  # a picture kept for a task to read
        assert kept.parent == workspace.home / "uploads" and kept.read_bytes() == IMG
    for p in home.rglob("*"):
        assert p.resolve().is_relative_to(home)
    assert H.snapshot(tmp_path, exclude="tl_home") == before
    # an upload that is a traversal zip is refused and leaves no trace in the workspace
    evil = H.write_zip(tmp_path / "e.zip", [*_ok_entries(), ("../../x.png", IMG)]).read_bytes()
    (tmp_path / "e.zip").unlink()
    ws_before = H.snapshot(workspace.datasets_dir)
    with pytest.raises(DatasetError, match="unsafe path"):
        library.save_uploaded_zip(workspace, "e.zip", evil)
    assert H.snapshot(workspace.datasets_dir) == ws_before
