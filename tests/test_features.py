"""The feature cache is keyed by content, backbone, weights and preprocessing, and never trusts bad files."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import EMOJI, make_class_folder
from tl_core.models.backbones import build_model
from tl_core.models.preprocess import data_config_for
from tl_core.cache import DecodedImageCache
from tl_core.data.images import file_sha256
from tl_core.data.intake import ImageItem, open_dataset
from tl_core.cache import FeatureCache
from tl_core.models.features import extract_features, feature_key
from tl_core.models.preprocess import Preprocess

#: every test here runs real networks on real images (module fixtures train or export): the slow tier
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite0():
    model, info = build_model("efficientnet_lite0", 5)
    return model, info, Preprocess.from_data_config(data_config_for(model))


def test_second_extraction_hits_and_adding_images_extracts_only_those(tmp_path, lite0):
    model, info, pre = lite0
    root = make_class_folder(tmp_path / "d", {"a": 4, "b": 4})
    items = open_dataset(root).items
    dec = DecodedImageCache(tmp_path / "dec")
    key = feature_key("efficientnet_lite0", info.fingerprint, pre)
    c1 = FeatureCache(tmp_path / "f", key)
    f1 = extract_features(model, items, pre, dec, c1)
    assert f1.shape == (8, 1280) and c1.misses == 8 and c1.hits == 0
    c2 = FeatureCache(tmp_path / "f", key)
    f2 = extract_features(model, items, pre, dec, c2)
    assert c2.hits == 8 and c2.misses == 0 and np.array_equal(f1, f2)
    # add two images: only those two go through the model
    for f in sorted((EMOJI / "flag").iterdir())[:2]:
        shutil.copy(f, root / "b" / f.name)
    more = open_dataset(root).items
    c3 = FeatureCache(tmp_path / "f", key)
    extract_features(model, more, pre, dec, c3)
    assert (c3.hits, c3.misses) == (8, 2)
    # extraction sees each image once: it keeps the features, not ~200 KB of decoded pixels per image ...
    assert dec.misses == 10 and not list((tmp_path / "dec").rglob("*.npy"))
    # ... while what fine-tuning decoded (kept) serves it, giving the same features
    for it in more:
        dec.get(it, pre.resize, pre.interpolation)
    assert len(list((tmp_path / "dec").rglob("*.npy"))) == 10
    again = extract_features(model, more, pre, dec, None)
    assert dec.hits == 10 and np.abs(again[:8] - f1).max() <= 1e-5
    # the crop the engines take is the same square whichever way the pixels came: decoded for the call (cut
    # before it becomes an array), from memory, or from disk
    odd = tmp_path / "odd.png"
    Image.new("RGB", (301, 97), (10, 200, 30)).save(odd)
    for it in more[:3] + [ImageItem(odd, "b", sha256=file_sha256(odd))]:
        full = DecodedImageCache(None).get(it, pre.resize, pre.interpolation)
        want = pre.center_crop(full)
        fresh = DecodedImageCache(None).get(it, pre.resize, pre.interpolation, keep=False, crop=pre.input_size)
        assert fresh.shape == (pre.input_size, pre.input_size, 3) and np.array_equal(fresh, want)
        assert np.array_equal(dec.get(it, pre.resize, pre.interpolation, crop=pre.input_size), want)


def test_changed_pixels_backbone_weights_or_preprocessing_miss(tmp_path, lite0):
    model, info, pre = lite0
    root = make_class_folder(tmp_path / "d", {"a": 2, "b": 2})
    items = open_dataset(root).items
    dec = DecodedImageCache(None)
    key = feature_key("efficientnet_lite0", info.fingerprint, pre)
    extract_features(model, items, pre, dec, FeatureCache(tmp_path / "f", key))
    # one pixel changed -> a new content hash -> a miss for that image only
    from PIL import Image

    p = items[0].path
    im = Image.open(p).convert("RGBA")
    im.putpixel((0, 0), (1, 2, 3, 255))
    im.save(p)
    changed = open_dataset(root).items
    c = FeatureCache(tmp_path / "f", key)
    extract_features(model, changed, pre, DecodedImageCache(None), c)
    assert (c.hits, c.misses) == (3, 1)
    other_keys = {
        feature_key("efficientnet_lite1", info.fingerprint, pre),
        feature_key("efficientnet_lite0", "another-weights", pre),
        feature_key("efficientnet_lite0", info.fingerprint, dataclasses.replace(pre, input_size=240)),
        feature_key("efficientnet_lite0", info.fingerprint, dataclasses.replace(pre, interpolation="bilinear")),
    }
    assert key not in other_keys and len(other_keys) == 4
    for k in other_keys:
        assert FeatureCache(tmp_path / "f", k).get(changed[1].sha256) is None


def test_corrupt_or_wrong_shape_cache_file_is_recomputed(tmp_path, lite0):
    model, info, pre = lite0
    root = make_class_folder(tmp_path / "d", {"a": 2, "b": 2})
    items = open_dataset(root).items
    key = feature_key("efficientnet_lite0", info.fingerprint, pre)
    good = extract_features(model, items, pre, DecodedImageCache(None), FeatureCache(tmp_path / "f", key))
    files = sorted((tmp_path / "f" / key).rglob("*.npy"))
    files[0].write_bytes(b"\x93NUMPY garbage")
    np.save(files[1], np.zeros(7, np.float32))
    c = FeatureCache(tmp_path / "f", key)
    again = extract_features(model, items, pre, DecodedImageCache(None), c)
    assert c.misses == 2 and c.hits == 2
    assert np.allclose(good, again, atol=1e-5)


def test_decoding_on_threads_gives_the_same_features_and_logits_as_in_turn(tmp_path, lite0, monkeypatch):
    """tl_core.models.pipeline decodes the next batch while the model runs: same tensors, same order, and a
    cancel between batches still stops it (the decoding threads are shut down, nothing is left running)."""
    import threading

    from tl_core.errors import CancelledError
    from tl_core.models.inference import logits_of_items

    model, _, pre = lite0
    root = make_class_folder(tmp_path / "d", {"a": 9, "b": 8})  # 17 images: batches of 4 end with a short one
    items = open_dataset(root).items
    out = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("TL_DECODE_THREADS", threads)
        dec = DecodedImageCache(tmp_path / f"dec{threads}")  # cold: every image decoded on the threads
        out[threads] = (extract_features(model, items, pre, dec, batch_size=4),
                        logits_of_items(model, items, pre, DecodedImageCache(None), batch_size=4))
        assert dec.misses == len(items) and dec.hits == 0
    assert np.array_equal(out["1"][0], out["3"][0]) and np.array_equal(out["1"][1], out["3"][1])
    calls = []
    with pytest.raises(CancelledError):
        extract_features(model, items, pre, DecodedImageCache(None), batch_size=4,
                         should_cancel=lambda: calls.append(1) or len(calls) > 2)
    assert not [t for t in threading.enumerate() if t.name.startswith("tl-decode")]
