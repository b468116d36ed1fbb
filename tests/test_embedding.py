"""Embeddings through the shared feature cache, and the 2-D embedding map."""

from __future__ import annotations

import json

import numpy as np
import pytest

from insight_support import emoji_small, insight_workspace
from tl_core.insight.embedding import embed_dataset, embedding_map, project_2d, thumbnail_data_uri
from tl_core.data.splits import sample_items
from tl_core.errors import ConfigError
from tl_core.storage.files import RunFiles, RunMeta

#: every test here runs real networks on real images (module fixtures train or export): the slow tier
pytestmark = pytest.mark.slow

COLUMNS = ["x", "y", "label", "path", "split", "predicted", "confidence", "misclassified"]


def test_embeddings_are_cached_and_keep_the_imagenet_head(shared_cache):
    ws = insight_workspace(shared_cache)
    a = embed_dataset(emoji_small(shared_cache), "efficientnet_lite0", ws)
    b = embed_dataset(emoji_small(shared_cache), "efficientnet_lite0", ws)
    assert a.features.shape == (60, 1280) and a.features.dtype == np.float32
    assert b.cache_misses == 0 and b.cache_hits == 60
    np.testing.assert_array_equal(a.features, b.features)
    assert a.has_imagenet_head
    p = a.imagenet_probs()
    assert p.shape == (60, 1000) and np.allclose(p.sum(1), 1, atol=1e-4)
    assert sorted(set(a.labels.tolist())) == [0, 1, 2, 3, 4]


def test_sample_items_is_stratified_seeded_and_order_keeping(shared_cache):
    ds = embed_dataset(emoji_small(shared_cache), "efficientnet_lite0", insight_workspace(shared_cache)).extra["dataset"]
    s1 = sample_items(ds.items, 4, seed=1)
    assert len(s1) == 20 and all(sum(i.label == c for i in s1) == 4 for c in ds.classes)
    assert s1 == sample_items(ds.items, 4, seed=1) and s1 != sample_items(ds.items, 4, seed=2)
    pos = [ds.items.index(i) for i in s1]
    assert pos == sorted(pos)
    assert sample_items(ds.items, None) == ds.items


def _separation(df) -> float:
    """Mean distance to other classes' centroids over mean distance to the own class's centroid."""
    cents = df.groupby("label")[["x", "y"]].mean()
    xy = df[["x", "y"]].to_numpy()
    own = np.linalg.norm(xy - cents.loc[df["label"]].to_numpy(), axis=1).mean()
    other = np.mean([np.linalg.norm(xy[i] - cents.drop(lab).to_numpy(), axis=1).mean()
                     for i, lab in enumerate(df["label"])])
    return other / own


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embedding_map_separates_the_classes(shared_cache, method):
    df = embedding_map(emoji_small(shared_cache), "efficientnet_lite0", method=method,
                       workspace=insight_workspace(shared_cache))
    assert list(df.columns) == COLUMNS and len(df) == 60
    assert set(df["label"]) == {"animal", "face", "flag", "food", "vehicle"}
    assert np.isfinite(df[["x", "y"]].to_numpy()).all() and df["x"].std() > 0 and df["y"].std() > 0
    assert not df["misclassified"].any() and df["predicted"].isna().all()
    # classes form clusters: points sit much closer to their own class's centre than to the others'
    assert _separation(df) > 1.5, _separation(df)


def test_embedding_map_flags_the_misclassified_images_of_a_run(shared_cache, tmp_path):
    data = emoji_small(shared_cache)
    files = sorted((data / "face").iterdir())[:2] + sorted((data / "flag").iterdir())[:1]
    classes = ["animal", "face", "flag", "food", "vehicle"]
    run = tmp_path / "run"
    RunFiles(run).write_meta(RunMeta(
        backbone="efficientnet_lite0", arch="tf_efficientnet_lite0", classes=classes, dataset={"source": str(data)},
        preprocess={"input_size": 224, "resize": 256, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}))
    # predictions in format 1 (probabilities per row, before logits were the record): still read
    (run / "predictions.json").write_text(json.dumps({"classes": classes, "val": [
        {"path": str(files[0]), "label": "face", "probs": [0.1, 0.6, 0.1, 0.1, 0.1]},
        {"path": str(files[1]), "label": "face", "probs": [0.7, 0.1, 0.1, 0.05, 0.05]},  # wrong: animal
        {"path": str(files[2]), "label": "flag", "probs": [0.0, 0.0, 1.0, 0.0, 0.0]},
    ]}))
    df = embedding_map(run=run, workspace=insight_workspace(shared_cache))
    assert len(df) == 60 and df.attrs["backbone"] == "efficientnet_lite0"
    wrong = df[df["misclassified"]]
    assert wrong["path"].tolist() == [str(files[1])] and wrong["predicted"].tolist() == ["animal"]
    assert df["predicted"].notna().sum() == 3
    assert df.loc[df["path"] == str(files[2]), "confidence"].item() == pytest.approx(1.0)
    assert df.loc[df["path"] == str(files[1]), "confidence"].item() == pytest.approx(0.7)


def test_projection_and_thumbnail_helpers(shared_cache):
    x = np.random.default_rng(0).normal(size=(10, 5))
    a, b = project_2d(x), project_2d(x)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (10, 2) and a[:, 0].var() >= a[:, 1].var()
    with pytest.raises(ConfigError):
        project_2d(x, "umap")
    with pytest.raises(ConfigError):
        project_2d(x[:2])
    with pytest.raises(ConfigError):
        embedding_map()
    uri = thumbnail_data_uri(next((emoji_small(shared_cache) / "food").iterdir()), 32)
    assert uri.startswith("data:image/png;base64,") and len(uri) > 100
