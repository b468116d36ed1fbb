"""The open-set evaluation set builder's pure parts (scripts/build_openset_sets.py): no package is installed here."""

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import build_openset_sets as b  # noqa: E402


def _pattern(w: int, h: int, bpp: int, pixels: bytes, magic: bytes = b"GPAT") -> bytes:
    name = b"test\0"
    header_size = 24 + len(name)
    return struct.pack(">5I", header_size, 1, w, h, bpp) + magic + name + pixels


def test_gimp_pattern_decodes_rgb_and_gray():
    rgb = bytes(range(3 * 2 * 3))
    im = b.read_gimp_pattern(_pattern(3, 2, 3, rgb))
    assert im.mode == "RGB" and im.size == (3, 2)
    assert np.array_equal(np.asarray(im).reshape(-1), np.frombuffer(rgb, np.uint8))
    gray = b.read_gimp_pattern(_pattern(2, 2, 1, bytes([0, 50, 100, 150])))
    assert gray.mode == "L" and gray.getpixel((1, 1)) == 150


def test_gimp_pattern_rejects_other_files():
    with pytest.raises(ValueError):
        b.read_gimp_pattern(_pattern(2, 2, 3, bytes(12), magic=b"GIMP"))


def test_random_crops_stay_inside_and_are_reproducible():
    img = Image.new("RGB", (200, 120))
    a = b.random_crops(img, 20, seed=1)
    assert [c.size for c in a] == [c.size for c in b.random_crops(img, 20, seed=1)]
    assert all(24 <= min(c.size) and c.size[0] <= 200 and c.size[1] <= 120 for c in a)
    assert len({c.size for c in a}) > 1  # odd, varied sizes


def test_pick_evenly_takes_at_most_n_distinct_items():
    got = b.pick_evenly(list(range(10)), 4, seed=0)
    assert len(got) == len(set(got)) == 4 and set(got) <= set(range(10))
    assert sorted(b.pick_evenly([1, 2], 5, seed=0)) == [1, 2]


def test_text_line_is_dark_text_on_white():
    font = next(Path("/usr/share/fonts/truetype").rglob("DejaVuSans.ttf"), None)
    if font is None:
        pytest.skip("DejaVu fonts not installed")
    im = b.render_text_line("open set", str(font), 20)
    a = np.asarray(im)
    assert im.mode == "L" and im.width > im.height
    assert a[0].min() == 255 and a.min() < 60  # white margin, dark ink


def test_icon_classes():
    assert b.icon_class("devices", "camera-photo") == "devices"
    assert b.icon_class("legacy", "face-smile") == "faces"
    assert b.icon_class("legacy", "media-playback-start") == "actions"
    assert b.icon_class("legacy", "battery-low") is None
    assert b.icon_class("status", "dialog-warning") is None
