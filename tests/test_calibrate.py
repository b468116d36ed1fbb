"""Temperature scaling and reliability diagrams on a real over-confident run (Fashion-MNIST, weak L2)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from insight_support import fashion_small, insight_home, insight_workspace
from tl_core.insight.calibrate import (calibrate_run, fit_temperature, negative_log_likelihood, out_of_fold_probs,
                                      validation_logits)
from tl_core.metrics import reliability_diagram
from tl_core.cli import main
from tl_core.config import TrainConfig
from tl_core.errors import RunError
from tl_core.metrics import softmax
from tl_core.storage.files import SAVED, RunFiles
from tl_core.share.loading import load_model
from tl_core.share.predict import predict_paths

#: every test here runs real networks on real images (module fixtures train or export): the slow tier
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def overconfident_run(shared_cache):
    """A linear probe with almost no regularisation (C = 10^4) on 60 Fashion-MNIST images: fits its
    training images perfectly and is far too sure of itself on the 20 validation images."""
    from tl_core.runs.training import run_training

    ws = insight_workspace(shared_cache)
    # refit=False: the saved model is the one that made the validation predictions, as with partial/full runs
    # (the refit path, where a validation-fit head made them, is tested in test_train.py)
    res = run_training(ws, fashion_small(shared_cache), TrainConfig(strategy="linear", linear_c=1e4, refit=False, features="last"))
    assert res.status == "done", res.error
    return ws, res


@pytest.fixture
def run_copy(overconfident_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(overconfident_run[1].run_dir, dst)
    return dst


def test_fit_temperature_recovers_a_known_over_confidence():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 5)) * 2
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p])  # labels drawn from the calibrated model
    t = fit_temperature(z * 4, y)  # a model 4x too sure
    assert t == pytest.approx(4.0, rel=0.1)
    assert negative_log_likelihood(z * 4, y, t) < negative_log_likelihood(z * 4, y)
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0


def test_reliability_diagram_bins_and_gaps():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.42, 0.58]])
    y = np.array([0, 1, 0, 0])
    rel = reliability_diagram(probs, y, bins=10)
    assert sum(b["count"] for b in rel["bins"]) == 4 and rel["count"] == 4
    top = rel["bins"][-1]
    assert top["count"] == 2 and top["accuracy"] == 0.5 and top["gap"] == pytest.approx(0.45)
    mid = rel["bins"][5]  # (0.5, 0.6]: confidences 0.55 (right) and 0.58 (wrong)
    assert mid["count"] == 2 and mid["confidence"] == pytest.approx(0.565) and mid["gap"] == pytest.approx(0.065)
    assert rel["ece"] == pytest.approx((2 * 0.45 + 2 * 0.065) / 4)
    assert rel["mce"] == pytest.approx(0.45) and rel["accuracy"] == 0.5
    assert all(b["gap"] is None for b in rel["bins"] if b["count"] == 0)


def test_out_of_fold_probabilities_never_use_the_image_they_score():
    """Each image is scored with the temperature fitted on the other folds' images: the in-sample "ECE after"
    is optimistic, and this is the figure that is not."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 40)
    logits = rng.normal(size=(40, 4)) + 6.0 * np.eye(4)[np.where(rng.uniform(size=40) < 0.7, y, (y + 1) % 4)]
    probs = out_of_fold_probs(logits, y, folds=5, seed=0)
    assert probs.shape == (40, 4) and np.allclose(probs.sum(1), 1.0)
    parts = np.array_split(np.random.default_rng(0).permutation(40), 5)
    for part in parts:  # the very folds: each one's temperature was fitted without it
        rest = np.setdiff1d(np.arange(40), part)
        np.testing.assert_allclose(probs[part], softmax(logits[part], fit_temperature(logits[rest], y[rest])),
                                   rtol=1e-9)
    # and that is not the temperature fitted on every image (over-confident logits: it softens them more or less)
    assert not np.allclose(probs, softmax(logits, fit_temperature(logits, y)))
    # the sign of a real difference, not of chance: the in-sample T fits these 40 images better than the folds' Ts
    assert negative_log_likelihood(logits, y, fit_temperature(logits, y)) < float(
        -np.log(probs[np.arange(40), y]).mean())


def test_reliability_chart_joins_only_bins_with_enough_images():
    from tl_core.share.figures import RELIABILITY_MIN_BIN, reliability

    rng = np.random.default_rng(0)
    conf = np.concatenate([rng.uniform(0.9, 1.0, 40), rng.uniform(0.6, 0.7, 20), [0.45]])  # one lone image
    probs = np.stack([conf, (1 - conf) / 2, (1 - conf) / 2], 1)
    y = (rng.uniform(size=len(conf)) > conf).astype(int)  # calibrated on average
    rel = reliability_diagram(probs, y, bins=10)
    fig = reliability(rel)
    line = [t for t in fig.data if t.mode == "lines+markers"]
    lone = [t for t in fig.data if t.mode == "markers"]
    counts = {round(b["confidence"], 6): b["count"] for b in rel["bins"] if b["count"]}
    assert len(line) == 1 and all(counts[round(x, 6)] >= RELIABILITY_MIN_BIN for x in line[0].x)
    assert len(lone) == 1 and list(lone[0].x) == [0.45] and lone[0].showlegend is False
    # one legend entry per curve, also when every bin is small
    tiny = reliability(reliability_diagram(probs[-3:], y[-3:], bins=10))
    assert [t.showlegend for t in tiny.data if t.mode == "markers"] == [True]


def _val_paths(run) -> list[str]:
    return RunFiles(run).predictions().get("val").paths


def test_temperature_scaling_lowers_ece_of_the_over_confident_run(run_copy, overconfident_run):
    ws = overconfident_run[0]
    before_rows, _ = predict_paths(load_model(run_copy), _val_paths(run_copy))
    res = calibrate_run(run_copy, ws)
    assert res["model"] == SAVED and res["count"] == 20 and res["applied"]
    assert res["temperature"] > 1.5, res  # over-confident: softened
    assert res["ece_after"] < res["ece_before"] - 0.05, res
    assert res["nll_after"] < res["nll_before"]
    # every ECE shown carries its interval; out of fold (each image scored with a T fitted on the other 16), the
    # scaled model is still better calibrated than the raw one here
    lo, hi = res["ece_before_ci"]
    assert lo <= res["ece_before"] <= hi and hi - lo > 0.05  # 20 images: a wide interval
    lo, hi = res["ece_after_oof_ci"]
    assert lo <= res["ece_after_oof"] <= hi and res["ece_after_oof"] < res["ece_before"] - 0.05, res
    assert res["helps_out_of_fold"] is (hi < res["ece_before"]), res
    assert 0.2 < res["accuracy"] < 1.0  # it does make mistakes, that is why confidence matters
    assert res["reliability_before"]["mean_confidence"] > res["accuracy"] + 0.1  # it was over-confident
    # saved with the run through its files: meta.json for every prediction path, metrics.json for the record
    files = RunFiles(run_copy)
    assert files.meta().temperature == pytest.approx(res["temperature"])
    assert files.metrics().calibration["ece_before"] == res["ece_before"]
    assert files.metrics().calibration["ece_after"] == res["ece_after"]
    assert files.metrics().calibration["ece_after_oof_ci"] == res["ece_after_oof_ci"]
    tm = load_model(run_copy)
    assert tm.temperature == pytest.approx(res["temperature"])
    after_rows, _ = predict_paths(tm, [r["path"] for r in before_rows])
    assert [r["label"] for r in after_rows] == [r["label"] for r in before_rows]  # same predictions
    assert np.mean([r["confidence"] for r in after_rows]) < np.mean([r["confidence"] for r in before_rows])
    # the saved predictions' view follows: the same temperature, the same (softer) confidences
    rows = files.predictions().get("val").rows(files.meta().classes, files.meta().temperature)
    np.testing.assert_allclose([r["confidence"] for r in rows], [r["confidence"] for r in after_rows], atol=1e-4)
    # calibrating again fits the raw logits again: the same temperature, not a compounded one
    assert calibrate_run(run_copy, ws)["temperature"] == pytest.approx(res["temperature"], rel=1e-4)


def test_validation_logits_are_the_saved_ones_and_dry_run_writes_nothing(run_copy, overconfident_run):
    v = validation_logits(run_copy, overconfident_run[0])
    assert v["logits"].shape == (20, 10) and v["labels"].shape == (20,) and v["model"] == SAVED
    split = RunFiles(run_copy).predictions().get("val")
    np.testing.assert_array_equal(v["logits"], split.logits)  # read, not recomputed
    assert v["paths"] == split.paths and v["temperature"] == 1.0
    # and they are what the saved model gives on those images
    rows, _ = predict_paths(load_model(run_copy), split.paths, top_k=10)
    classes = v["classes"]
    probs = np.array([[{t["label"]: t["confidence"] for t in r["top_k"]}[c] for c in classes] for r in rows])
    np.testing.assert_allclose(probs, softmax(v["logits"]), atol=1e-4)
    meta_before = (run_copy / "meta.json").read_text()
    metrics_before = (run_copy / "metrics.json").read_text()
    res = calibrate_run(run_copy, overconfident_run[0], apply=False)
    assert not res["applied"] and res["temperature"] > 1.5
    assert (run_copy / "meta.json").read_text() == meta_before and (run_copy / "metrics.json").read_text() == metrics_before
    with pytest.raises(RunError):
        calibrate_run(run_copy.parent / "nope", overconfident_run[0])


def test_cli_calibrate(run_copy, shared_cache, monkeypatch, capsys):
    monkeypatch.setenv("TL_HOME", str(insight_home(shared_cache)))
    assert main(["calibrate", str(run_copy), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["applied"] and doc["ece_after"] < doc["ece_before"]
    assert json.loads((run_copy / "meta.json").read_text())["temperature"] == doc["temperature"]
    assert main(["calibrate", str(run_copy), "--dry-run"]) == 0
    assert "not saved" in capsys.readouterr().out
    assert main(["calibrate", "no-such-run"]) == 2
    assert capsys.readouterr().err.startswith("error:")
