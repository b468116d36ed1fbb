"""The domain gap per image and per class, in style and content, against the backbone's own ImageNet world.

Real images only: scikit-image's colour photos (what ImageNet is made of), the emoji sample (colour drawings) and
Fashion-MNIST (28-px gray clothes). Measured on the full sets (docs/openset-pages.md): style gap 0.283 ± 0.007
(photos, n=25), 0.372 ± 0.002 (emoji, n=200), 0.395 ± 0.001 (fashion, n=500); the margins below are a fraction of
those gaps, at n = 12-24 per set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insight_support import emoji_small, fashion_small, insight_workspace
from tl_core.insight.advisor import STYLE_LEVELS, domain_gap, style_layers

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def _photos(root: Path) -> Path:
    """Four scikit-image colour photos, each whole and as its four quarters (a class per photo)."""
    skdata = pytest.importorskip("skimage.data")
    for name in PHOTOS:
        (root / name).mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        w, h = im.size
        im.save(root / name / "whole.png")
        for n, (x, y) in enumerate([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)]):
            im.crop((x, y, x + w // 2, y + h // 2)).save(root / name / f"quarter{n}.png")
    return root


@pytest.fixture(scope="module")
def gaps(shared_cache, tmp_path_factory):
    ws = insight_workspace(shared_cache)
    photos = _photos(tmp_path_factory.mktemp("photos"))
    return {"photos": domain_gap(photos, workspace=ws),
            "emoji": domain_gap(emoji_small(shared_cache), workspace=ws),
            "fashion": domain_gap(fashion_small(shared_cache), workspace=ws, max_per_class=3)}


def _style(g: dict) -> np.ndarray:
    return np.array([r["style_gap"] for r in g["per_image"]])


@pytest.mark.slow
def test_photos_are_closest_to_imagenet_in_style_then_drawings_then_gray_clothes(gaps):
    photos, emoji, fashion = (_style(gaps[k]) for k in ("photos", "emoji", "fashion"))
    assert (len(photos), len(emoji), len(fashion)) == (20, 60, 30)
    # per set, with margins of a third of the measured distances (standard errors here are about 0.005)
    assert photos.mean() < emoji.mean() - 0.04
    assert photos.mean() < fashion.mean() - 0.06
    assert emoji.mean() < fashion.mean()
    # per image: nearly every photo is nearer than nearly every drawing
    assert np.mean(photos[:, None] < emoji[None, :]) > 0.9
    assert np.mean(photos[:, None] < fashion[None, :]) > 0.95
    # in words: the photos are near, the drawings and clothes far
    assert gaps["photos"]["style_level"] == "near" and gaps["fashion"]["style_level"] == "far"
    assert gaps["emoji"]["style_reading"] == STYLE_LEVELS[2][2]


@pytest.mark.slow
def test_the_gap_is_reported_per_class_and_per_image_with_the_extremes(gaps):
    g = gaps["emoji"]
    assert set(g["per_class"]) == {"animal", "face", "flag", "food", "vehicle"}
    ranks = sorted(v["rank"] for v in g["per_class"].values())
    assert ranks == [1, 2, 3, 4, 5]
    # the class style gap is the mean of its images'
    for c, v in g["per_class"].items():
        mine = [r["style_gap"] for r in g["per_image"] if r["class"] == c]
        assert v["style_gap"] == pytest.approx(np.mean(mine), abs=1e-3)
    # the most ImageNet-like images are surer (content) and nearer (style) than the least, on average
    most, least = g["most_imagenet_like"], g["least_imagenet_like"]
    assert len(most) == len(least) == 4 and not {r["path"] for r in most} & {r["path"] for r in least}
    assert np.mean([r["max_softmax"] for r in most]) > np.mean([r["max_softmax"] for r in least])
    assert np.mean([r["style_gap"] for r in most]) < np.mean([r["style_gap"] for r in least])
    assert all(Path(r["path"]).is_file() for r in most + least)
    # flags (flat colour fields) are the least ImageNet-like emoji class in both parts
    flag = g["per_class"]["flag"]
    assert flag["rank"] == 5
    assert flag["style_gap"] == max(v["style_gap"] for v in g["per_class"].values())


@pytest.mark.slow
def test_the_style_gap_is_cached_and_layers_are_the_middle_batchnorms(gaps, shared_cache, monkeypatch):
    from tl_core.insight.embedding import load_backbone
    from tl_core.models import features, pipeline

    model, _ = load_backbone("efficientnet_lite0")
    layers = style_layers(model)
    assert 15 <= len(layers) <= 35
    # asked again, every image's statistics and features come from the caches: no image is decoded or run

    def no_forward(items, batches, *a, **k):
        if any(len(b) for b in batches):
            raise AssertionError("an image went through the network again")
        yield from ()

    monkeypatch.setattr(pipeline, "eval_batches", no_forward)
    monkeypatch.setattr(features, "eval_batches", no_forward)
    again = domain_gap(emoji_small(shared_cache), workspace=insight_workspace(shared_cache))
    assert [r["style_gap"] for r in again["per_image"]] == [r["style_gap"] for r in gaps["emoji"]["per_image"]]
