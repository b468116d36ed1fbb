"""Grad-CAM with captum on a real trained run: shape, contrast, and where the heat is."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from insight_support import emoji_small, insight_home, insight_workspace
from tl_core.cli import main
from tl_core.config import TrainConfig
from tl_core.insight.embedding import embed_dataset
from tl_core.errors import ConfigError, DatasetError
from tl_core.insight.explain import colorize, explain_image, explain_misclassified, find_target_layer, grad_cam, overlay
from tl_core.metrics import softmax
from tl_core.storage.files import VALIDATION_FIT, Predictions, RunFiles
from tl_core.share.loading import load_model

#: every test here runs real networks on real images (module fixtures train or export): the slow tier
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emoji_small_run(shared_cache):
    """A linear-probe run on the small emoji subset, trained after its features were embedded."""
    from tl_core.runs.training import run_training

    ws = insight_workspace(shared_cache)
    data = emoji_small(shared_cache)
    embed_dataset(data, "efficientnet_lite0", ws)
    # the last layer: what the insight modules cached (auto would also need the earlier stages' features)
    res = run_training(ws, data, TrainConfig(strategy="linear", features="last"))
    assert res.status == "done", res.error
    return ws, res


def test_training_reuses_the_features_the_insight_modules_cached(emoji_small_run):
    ws, res = emoji_small_run
    summary = ws.store().get(res.run_id)["summary"]
    assert summary["feature_cache"]["misses"] == 0 and summary["feature_cache"]["hits"] == 60


def test_target_layer_is_the_last_activated_conv_map(emoji_small_run):
    tm = load_model(emoji_small_run[1].run_dir)
    name, layer = find_target_layer(tm.model, tm.pre.input_size)
    assert name == "bn2" and layer is tm.model.bn2


def _object_mask(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGBA"))[:, :, 3] > 0


def test_grad_cam_heat_sits_on_the_emoji_not_on_the_white_background(emoji_small_run, shared_cache):
    tm = load_model(emoji_small_run[1].run_dir)
    data = emoji_small(shared_cache)
    files = [sorted((data / c).iterdir())[0] for c in ("animal", "face", "food", "vehicle")]
    for f in files:
        img = Image.open(f).convert("RGBA")
        from tl_core.data.images import load_image

        cam = grad_cam(tm.model, tm.pre, load_image(f))
        heat = cam["heatmap"]
        assert heat.shape == (img.height, img.width) == (64, 64)
        assert heat.dtype == np.float32 and heat.min() >= 0 and heat.max() == pytest.approx(1.0, abs=1e-3)
        assert heat.std() > 0.05 and not cam["flat"]
        mask = _object_mask(f)
        assert heat[mask].mean() > 2 * heat[~mask].mean(), (f.name, heat[mask].mean(), heat[~mask].mean())
        assert cam["heatmap_input"].shape == (tm.pre.input_size, tm.pre.input_size)


def test_explain_image_overlay_target_and_errors(emoji_small_run, shared_cache, tmp_path):
    tm = load_model(emoji_small_run[1].run_dir)
    f = sorted((emoji_small(shared_cache) / "face").iterdir())[0]
    out = tmp_path / "sub" / "cam.png"
    res = explain_image(tm, f, out=out)
    assert res["label"] == "face" and res["target"] == "face" and 0.2 < res["confidence"] <= 1
    assert [t["label"] for t in res["top_k"]][0] == "face" and len(res["top_k"]) == 3
    with Image.open(out) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    assert res["overlay"].size == (64, 64)
    other = explain_image(tm, f, target="flag")
    assert other["target"] == "flag" and other["label"] == "face"
    assert not np.allclose(other["heatmap"], res["heatmap"])
    with pytest.raises(ConfigError):
        explain_image(tm, f, target="dinosaur")
    with pytest.raises(DatasetError):
        explain_image(tm, tmp_path / "missing.png")
    # a non-square photo: the heat-map covers the whole image, zero outside the centre crop the model saw
    wide = Image.new("RGB", (200, 100), "white")
    wide.paste(Image.open(f).convert("RGBA").resize((100, 100)), (50, 0), Image.open(f).convert("RGBA").resize((100, 100)))
    cam = explain_image(tm, wide)
    assert cam["heatmap"].shape == (100, 200) and cam["heatmap"][:, :5].max() == 0


def test_misclassified_grid(emoji_small_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(emoji_small_run[1].run_dir, run_dir)
    files = RunFiles(run_dir)
    preds = files.predictions()
    classes, val = preds.classes, preds.get("val")
    assert val.model == VALIDATION_FIT  # a refitted linear run: the training-only head made these predictions
    # forge one confident mistake into the saved logits
    wrong = (classes.index(val.labels[0]) + 1) % len(classes)
    logits = val.logits.copy()
    logits[0] = -3.0
    logits[0, wrong] = 5.0
    files.write_predictions(Predictions(classes, {**preds.splits, "val": dataclasses.replace(val, logits=logits)}))
    grid = explain_misclassified(run_dir, k=4)
    assert grid and grid[0]["path"] == val.paths[0] and grid[0]["predicted"] == classes[wrong]
    assert grid[0]["confidence"] == pytest.approx(float(softmax(logits[0])[wrong]))
    for g in grid:
        assert g["true"] != g["predicted"] and g["target"] == g["predicted"]
        assert g["heatmap"].shape == (64, 64) and g["overlay"].size == (64, 64)
        assert g["model"] == VALIDATION_FIT  # explained with the model that made the prediction
    assert explain_misclassified(run_dir, k=4, target="true")[0]["target"] == val.labels[0]
    with pytest.raises(ConfigError):
        explain_misclassified(run_dir, target="other")


def test_colour_map_and_overlay():
    rgb = colorize(np.array([[0.0, 0.5, 1.0]]))
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 2] > rgb[0, 0, 0] and rgb[0, 2, 0] > rgb[0, 2, 2]  # cold is blue, hot is red
    img = Image.new("RGB", (8, 4), (255, 255, 255))
    ov = overlay(img, np.zeros((2, 4)), alpha=0.5)  # any heat-map size is resized to the image
    assert ov.size == (8, 4)


def test_cli_explain(emoji_small_run, shared_cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TL_HOME", str(insight_home(shared_cache)))
    f = sorted((emoji_small(shared_cache) / "vehicle").iterdir())[0]
    out = tmp_path / "cam.png"
    assert main(["explain", emoji_small_run[1].run_id, str(f), "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["label"] == "vehicle" and doc["out"] == str(out) and out.is_file() and doc["layer"] == "bn2"
    assert main(["explain", emoji_small_run[1].run_dir, str(tmp_path / "nope.png"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert main(["explain", emoji_small_run[1].run_dir, str(f), "--out", str(out), "--target", "x"]) == 2
