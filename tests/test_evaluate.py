"""Metrics, confusion matrix, per-class report, top losses, calibration."""

import numpy as np
import pytest

from tl_core.metrics import calibration, compute_metrics, confusion_matrix, expected_calibration_error, top_losses


def test_metrics_from_known_predictions():
    classes = ["a", "b", "c"]
    y = [0, 0, 1, 1, 2, 2]
    probs = np.array([[.9, .05, .05], [.2, .7, .1], [.1, .8, .1], [.1, .8, .1], [.1, .1, .8], [.6, .2, .2]])
    m = compute_metrics(y, probs, classes)
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert np.array(m["confusion"]).sum() == m["count"] == 6
    assert m["per_class"]["b"] == {"precision": pytest.approx(2 / 3, abs=1e-4), "recall": 1.0,
                                   "f1": pytest.approx(0.8, abs=1e-4), "support": 2}
    assert m["per_class"]["a"]["recall"] == 0.5


def test_top_losses_are_the_most_confidently_wrong_first():
    probs = np.array([[.6, .4], [.05, .95], [.9, .1], [.3, .7]])
    rows = top_losses(["w1", "w2", "ok", "w3"], [1, 0, 0, 0], probs, ["x", "y"])
    assert [r["path"] for r in rows] == ["w2", "w3", "w1"]
    assert rows[0]["true"] == "x" and rows[0]["predicted"] == "y" and rows[0]["confidence"] == pytest.approx(.95)


def test_calibration_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    correct = rng.random(500) < 0.6  # 60% accurate ...
    pred = np.where(correct, y, 1 - y)
    probs = np.zeros((500, 2))
    probs[np.arange(500), pred] = 0.99  # ... but 99% sure
    probs[np.arange(500), 1 - pred] = 0.01
    assert expected_calibration_error(probs, y) == pytest.approx(0.39, abs=0.05)
    cal = calibration(probs, y)
    assert sum(b["count"] for b in cal["bins"]) == 500


def test_confusion_matrix_shape():
    assert confusion_matrix([0, 1], [1, 1], 3).tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 0]]
