"""The linear probe's feature variants (tl_core/models/feature_variants.py): the wrapper computes what it says,
a depths run saves, loads and exports to the same logits, ``auto`` records its choice, and on real sample data
``auto`` is at least as good as the classic recipe."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EMOJI, FASHION

#: every test here runs real networks on real images (module fixtures train or export): the slow tier
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def lite0():
    from tl_core.models.backbones import build_model

    model, _ = build_model("efficientnet_lite0", 5)
    return model.eval()


def _images(n: int = 3) -> torch.Tensor:
    from tl_core.data.images import load_image
    from tl_core.models.preprocess import Preprocess, data_config_for
    from tl_core.models.backbones import build_model

    paths = sorted((EMOJI / "face").glob("*.png"))[:n]
    import timm

    m, _ = build_model("efficientnet_lite0", 2)
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(m))
    return torch.stack([tf(load_image(p)) for p in paths])


def test_wrapper_equals_manual_computation(lite0):
    import copy

    from tl_core.models.feature_variants import VariantModel
    from tl_core.models.features import pooled_features

    x = _images()
    with torch.no_grad():
        final, inter = lite0.forward_intermediates(x)
        f = lite0.forward_head(final, pre_logits=True)
        w = VariantModel(copy.deepcopy(lite0), "depths", 5).eval()
        assert w.block_dims == [16, 24, 40, 112, 320] and w.num_features == 1280 + 512
        w.scales.copy_(torch.tensor([2.0, 3.0, 0.5, 1.5, 0.25]))
        manual = torch.cat([f] + [t.mean((2, 3)) * k for t, k in zip(inter, w.scales)], 1)
        got = pooled_features(w, x)
        assert torch.allclose(got, manual, atol=1e-5)
        assert torch.allclose(w(x), w.get_classifier()(manual), atol=1e-4)
        flip = VariantModel(copy.deepcopy(lite0), "flip", 5).eval()
        g = lite0.forward_head(lite0.forward_features(torch.flip(x, dims=[3])), pre_logits=True)
        assert torch.allclose(pooled_features(flip, x), (f + g) / 2, atol=1e-5)
        assert not torch.allclose(f, g, atol=1e-3)  # the mirror image is another input


def test_block_scales_equalise_mean_norms():
    from tl_core.models.feature_variants import apply_variant, block_scales

    rng = np.random.default_rng(0)
    raw = np.concatenate([rng.normal(size=(20, 8)) * 5, rng.normal(size=(20, 3)), rng.normal(size=(20, 4)) * 0.1], 1)
    s = block_scales(raw, 8, [3, 4])
    x = apply_variant(raw, "depths", 8, [3, 4], s)
    norms = [np.linalg.norm(x[:, a:b], axis=1).mean() for a, b in ((0, 8), (8, 11), (11, 15))]
    assert np.allclose(norms, norms[0], rtol=1e-4)
    assert np.array_equal(apply_variant(raw, "last", 8, [3, 4], s), raw[:, :8])


@pytest.fixture(scope="module")
def depths_run(tmp_path_factory):
    from tl_core.config import TrainConfig
    from tl_core.runs.training import run_training
    from tl_core.storage.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("depths_home"))
    res = run_training(ws, EMOJI, TrainConfig(strategy="linear", features="depths"))
    assert res.status == "done", res.error
    return ws, res


def test_depths_run_saves_loads_and_predicts_the_same_logits(depths_run):
    from tl_core.storage.files import RunFiles
    from tl_core.share.loading import load_model

    ws, res = depths_run
    assert res.features == "depths" and res.cv is None
    meta = json.loads((Path(res.run_dir) / "meta.json").read_text())
    assert meta["features"]["variant"] == "depths" and len(meta["features"]["scales"]) == 5
    tm = load_model(res.run_dir)
    assert type(tm.model).__name__ == "VariantModel"
    assert np.allclose(tm.model.scales.numpy(), meta["features"]["scales"], rtol=1e-6)
    # the test logits saved at training time (features from the cache) equal the loaded model on the images
    preds = RunFiles(Path(res.run_dir)).predictions()
    val = preds.splits["val"]
    tmv = load_model(res.run_dir, head="validation-fit")
    from tl_core.data.images import load_image
    from tl_core.models.inference import logits_of_images

    got = logits_of_images(tmv.model, [load_image(p) for p in val.paths[:8]], tmv.pre, runtime=tmv.runtime)
    assert np.abs(got - val.logits[:8]).max() < 1e-3
    assert (got.argmax(1) == val.logits[:8].argmax(1)).all()


def test_depths_run_exports_to_onnx_that_matches_pytorch(depths_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from tl_core.share.export import export_run

    _, res = depths_run
    out = export_run(res.run_dir, "onnx", tmp_path / "m.onnx")
    v = out["verification"]
    assert v["passed"] and v["max_prob_diff"] <= 1e-4 and v["top1_agree"] == v["images"] > 0


def test_depths_run_grad_cam_targets_the_last_feature_map(depths_run):
    from tl_core.insight.explain import explain_image
    from tl_core.share.loading import load_model

    _, res = depths_run
    tm = load_model(res.run_dir)
    cam = explain_image(tm, sorted((EMOJI / "food").glob("*.png"))[0])
    assert cam["layer"] == "backbone.bn2" and cam["heatmap"].max() > 0


def test_auto_records_its_choice(workspace):
    from tl_core.config import TrainConfig
    from tl_core.models.feature_variants import CANDIDATES
    from tl_core.share.progress import features_text
    from tl_core.runs.training import run_training

    res = run_training(workspace, EMOJI, TrainConfig(strategy="linear", features="auto"))
    assert res.status == "done", res.error
    assert set(res.cv) == {f"{v}@{c:g}" for v, c in CANDIDATES}
    best = max(res.cv.values())
    assert res.cv[f"{res.features}@{res.linear_c:g}"] == best  # the chosen one scored best (ties: depths@1)
    meta = json.loads((Path(res.run_dir) / "meta.json").read_text())
    rec = meta["features"]
    assert rec["chosen_by"] == "cross-validation" and rec["folds"] == 5 and rec["seconds"] < 30
    line = features_text(rec)
    assert line.startswith("Features: ") and "5-fold cross-validation" in line
    # the model card and the HTML report say the same
    from tl_core.storage.files import RunFiles
    from tl_core.share.card import model_card
    from tl_core.share.report import build_report

    assert line in model_card(RunFiles(Path(res.run_dir)))
    assert html.escape(line) in build_report(res.run_dir)
    # the depths extraction also left the last-layer features where the audit and embedding map look for them
    from tl_core.cache import DecodedImageCache, FeatureCache
    from tl_core.data.library import open_data
    from tl_core.models.backbones import build_model
    from tl_core.models.features import extract_features, feature_key
    from tl_core.models.preprocess import Preprocess, data_config_for

    model, winfo = build_model("efficientnet_lite0", 5)
    pre = Preprocess.from_data_config(data_config_for(model))
    last = FeatureCache(workspace.cache_dir / "features", feature_key("efficientnet_lite0", winfo.fingerprint, pre))
    items = open_data(EMOJI, workspace).items[:10]
    got = extract_features(model, items, pre, DecodedImageCache(workspace.cache_dir / "decoded"), last)
    assert got.shape == (10, 1280) and last.misses == 0 and last.hits == 10


@pytest.mark.slow
def test_auto_beats_or_equals_the_classic_recipe_on_fashion(workspace):
    """Fashion-MNIST sample: default ``auto`` vs scikit-learn LogisticRegression(C=1) on last-layer features,
    both on every training image, scored on the sample's test split."""
    from sklearn.linear_model import LogisticRegression

    from tl_core.config import TrainConfig
    from tl_core.runs.training import run_training

    res = run_training(workspace, FASHION / "train", TrainConfig(strategy="linear", features="auto"), test_data=FASHION / "test")
    assert res.status == "done", res.error
    # the classic recipe on the same cached features: the first 1280 columns of the depths extraction
    from tl_core.cache import FeatureCache
    from tl_core.data.library import open_data
    from tl_core.models.backbones import build_model
    from tl_core.models.feature_variants import extractor
    from tl_core.models.features import extract_features, feature_key
    from tl_core.models.preprocess import Preprocess, data_config_for
    from tl_core.cache import DecodedImageCache

    model, winfo = build_model("efficientnet_lite0", 10)
    pre = Preprocess.from_data_config(data_config_for(model))
    ds, ts = open_data(FASHION / "train", workspace), open_data(FASHION / "test", workspace, min_per_class=1)
    key = feature_key("efficientnet_lite0", winfo.fingerprint, pre, "depths")
    fc = FeatureCache(workspace.cache_dir / "features", key)
    dec = DecodedImageCache(workspace.cache_dir / "decoded")
    ex = extractor(model, "depths")
    xtr = extract_features(ex, ds.items, pre, dec, fc)[:, :1280]
    xte = extract_features(ex, ts.items, pre, dec, fc)[:, :1280]
    assert fc.misses == 0  # the run cached them
    classes = ds.classes
    ytr = [classes.index(i.label) for i in ds.items]
    yte = [classes.index(i.label) for i in ts.items]
    classic = LogisticRegression(C=1.0, max_iter=2000).fit(xtr, ytr).score(xte, yte)
    assert res.test_accuracy >= classic - 1e-9, (res.test_accuracy, classic, res.features, res.cv)


def test_auto_respects_the_users_c_and_uses_fewer_folds_for_a_small_class():
    from tl_core.config import TrainConfig
    from tl_core.models.feature_variants import choose_features
    from tl_core.models.probe import fit_linear_head

    rng = np.random.default_rng(0)
    y = np.array([0] * 12 + [1] * 12 + [2] * 3)
    raw = rng.normal(size=(len(y), 14)).astype(np.float32) + y[:, None]  # last layer 8 columns, blocks 2 + 4
    ch = choose_features(raw, y, 3, TrainConfig(features="auto", linear_c=0.5).resolved(), 8, [2, 4], fit_linear_head)
    assert set(ch.cv) == {"last@0.5", "depths@0.5", "depths@0.15"} and ch.folds == 3
    assert ch.cv[f"{ch.variant}@{ch.linear_c:g}"] == max(ch.cv.values()) and len(ch.scales) == (2 if ch.variant == "depths" else 0)
    fixed = choose_features(raw, y, 3, TrainConfig(features="last", linear_c=0.5).resolved(), 8, [2, 4], fit_linear_head)
    assert (fixed.variant, fixed.linear_c, fixed.chosen_by, fixed.cv) == ("last", 0.5, "setting", {})


def test_a_config_saved_before_the_features_setting_repeats_with_the_last_layer(tmp_path):
    from tl_core.config import TrainConfig, saved_config_dict
    from tl_core.storage.files import RunFiles

    saved = TrainConfig().to_dict()
    assert saved["features"] == "auto" and TrainConfig.from_dict({}).features == "auto"  # flags alone: auto
    old = {k: v for k, v in saved.items() if k != "features"}
    assert TrainConfig.from_dict(saved_config_dict(old)).features == "last"
    assert TrainConfig.from_dict(saved_config_dict(saved)).features == "auto"
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert RunFiles(tmp_path).config().features == "last"


def test_flip_run_grad_cam_is_mirror_equivariant(workspace):
    """A flipped-views model sees an image and its mirror alike, so its Grad-CAM of the mirror is the mirrored map."""
    from PIL import ImageOps

    from tl_core.config import TrainConfig
    from tl_core.insight.explain import grad_cam
    from tl_core.runs.training import run_training
    from tl_core.share.loading import load_model

    from tl_core.data.images import load_image

    res = run_training(workspace, EMOJI, TrainConfig(strategy="linear", features="flip", epochs=20))
    assert res.status == "done" and res.features == "flip"
    tm = load_model(res.run_dir)
    img = load_image(sorted((EMOJI / "vehicle").glob("*.png"))[0])
    a = grad_cam(tm.model, tm.pre, img)
    b = grad_cam(tm.model, tm.pre, ImageOps.mirror(img), target=a["target"])
    assert np.allclose(a["logits"], b["logits"], atol=1e-4) and not a["flat"]
    assert np.abs(a["heatmap_input"] - b["heatmap_input"][:, ::-1]).max() < 0.05
