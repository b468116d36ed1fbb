"""How sure the figures are: Wilson intervals, bootstrap intervals, the one figure format, and whether two
runs differ beyond noise (tl_core.metrics), plus the out-of-fold folds (tl_core.models.crossfit)."""

from __future__ import annotations

import numpy as np
import pytest

from tl_core.models.crossfit import multilabel_folds, stratified_folds
from tl_core.metrics import (bootstrap_interval, compare_figures, compute_metrics, figure_of, format_figure,
                                    macro_f1_interval, wilson_interval)
from tl_core.models.multilabel import multilabel_metrics


# -- Wilson ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, n, lo, hi", [
    (18, 20, 0.6990, 0.9721),   # the issue's "18 of 20": about 70-97%
    (0, 10, 0.0, 0.2775),       # no success: the interval still reaches 28%, not [0, 0]
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),
])
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx([lo, hi], abs=5e-4)


def test_wilson_interval_narrows_with_more_images_and_knows_nothing_of_none():
    small, large = wilson_interval(18, 20), wilson_interval(900, 1000)
    assert small[0] < 0.9 < small[1] and large[0] < 0.9 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 4
    assert wilson_interval(0, 0) == [0.0, 1.0]


# -- bootstrap -------------------------------------------------------------------------------------
def _noisy_predictions(n: int, classes: int, right: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return y, np.where(rng.random(n) < right, y, (y + 1) % classes)


def test_bootstrap_interval_holds_the_estimate_is_seeded_and_narrows():
    y, pred = _noisy_predictions(60, 4, 0.8, 0)
    probs = np.eye(4)[pred] * 0.7 + 0.075
    m = compute_metrics(y, probs, list("abcd"))
    assert m["macro_f1_ci"][0] <= m["macro_f1"] <= m["macro_f1_ci"][1]
    assert m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1]
    assert m["correct"] == int((pred == y).sum())
    assert macro_f1_interval(y, pred, 4) == m["macro_f1_ci"]  # the same predictions, the same interval
    y2, pred2 = _noisy_predictions(2000, 4, 0.8, 0)
    wide, narrow = m["macro_f1_ci"], macro_f1_interval(y2, pred2, 4)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3
    assert bootstrap_interval(lambda idx: idx.mean(1), 0) is None


def test_macro_f1_interval_resamples_agree_with_the_report_on_every_resample():
    y, pred = _noisy_predictions(40, 3, 0.7, 3)
    from tl_core.metrics import _macro_f1_rows, per_class_report, confusion_matrix

    idx = np.random.default_rng(1).integers(0, 40, size=(5, 40))
    fast = _macro_f1_rows(y, pred, 3, idx)
    for r, rows in enumerate(idx):
        rep = per_class_report(confusion_matrix(y[rows], pred[rows], 3), list("abc"))
        assert fast[r] == pytest.approx(np.mean([v["f1"] for v in rep.values()]), abs=1e-4)


def test_calibration_error_carries_a_bootstrap_interval_that_narrows_with_more_images():
    from tl_core.metrics import _ece_rows, _resample_indices, ece_interval, expected_calibration_error

    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.full(5, 0.5), size=40)
    y = np.where(rng.random(40) < 0.6, probs.argmax(1), rng.integers(0, 5, 40))
    m = compute_metrics(y, probs, list("abcde"))
    lo, hi = m["ece_ci"]
    assert lo <= m["ece"] <= hi and hi - lo > 0.05  # 40 images: the ECE is far from exact
    assert ece_interval(probs, y) == m["ece_ci"]  # seeded
    # every resample's ECE is the ECE of those images, binned as the point estimate is
    idx = _resample_indices(40, 20, 7)
    assert _ece_rows(probs.max(1), probs.argmax(1) == y, 10, idx) == pytest.approx(
        [expected_calibration_error(probs[r], y[r]) for r in idx], abs=1e-12)
    big = rng.dirichlet(np.full(5, 0.5), size=2000)
    y_big = np.where(rng.random(2000) < 0.6, big.argmax(1), rng.integers(0, 5, 2000))
    wide, narrow = m["ece_ci"], ece_interval(big, y_big)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3
    assert compute_metrics([], np.zeros((0, 5)), list("abcde"))["ece_ci"] is None


def test_multilabel_metrics_carry_intervals_around_their_figures():
    rng = np.random.default_rng(0)
    y = (rng.random((80, 4)) < 0.3).astype(int)
    p = np.clip(0.55 * y + 0.6 * rng.random((80, 4)), 0, 1)
    m = multilabel_metrics(y, p, list("abcd"))
    for key in ("micro_f1", "macro_f1", "mAP", "exact_match"):
        lo, hi = m[f"{key}_ci"]
        assert lo <= m[key] <= hi and hi - lo > 0.01, key
    assert m["accuracy_ci"] == m["exact_match_ci"] == wilson_interval(m["correct"], 80)


# -- the one format ----------------------------------------------------------------------------------
def test_format_figure_writes_the_issue_sentence():
    assert format_figure(0.9, wilson_interval(18, 20), 18, 20) == "90.0% (95% CI 69.9–97.2%, 18 of 20)"
    assert format_figure(0.936, [0.88, 0.97], percent=False) == "0.936 (95% CI 0.880–0.970)"
    assert format_figure(None) == "—" and format_figure(0.5) == "50.0%"
    assert figure_of({"accuracy": 0.9, "accuracy_ci": [0.699, 0.972], "correct": 18, "count": 20}) == \
        "90.0% (95% CI 69.9–97.2%, 18 of 20)"
    assert figure_of(None) == "—" and figure_of({"mAP": None}, "mAP") == "—"


# -- differences -----------------------------------------------------------------------------------
def test_compare_figures_unpaired_small_sets_are_within_noise():
    c = compare_figures({"correct": 18, "count": 20}, {"correct": 20, "count": 20})
    assert not c["paired"] and c["within_noise"] and c["ci"][0] < 0 < c["ci"][1]
    assert c["text"].startswith("+10.0 points, within noise (95% interval -")
    big = compare_figures({"correct": 500, "count": 1000}, {"correct": 700, "count": 1000})
    assert not big["within_noise"] and big["ci"][0] > 0.15


def test_compare_figures_pairs_the_same_images_and_sees_a_consistent_gain():
    paths = [f"img{i}.png" for i in range(200)]
    rng = np.random.default_rng(0)
    a = (rng.random(200) < 0.8).astype(int)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:12]] = 1  # b fixes 12 of a's mistakes and breaks none
    ra = {"correct": int(a.sum()), "count": 200, "paths": paths, "right": a.tolist()}
    rb = {"correct": int(b.sum()), "count": 200, "paths": paths[::-1], "right": b[::-1].tolist()}  # order differs
    paired = compare_figures(ra, rb)
    unpaired = compare_figures({k: ra[k] for k in ("correct", "count")}, {k: rb[k] for k in ("correct", "count")})
    assert paired["paired"] and paired["difference"] == pytest.approx(0.06)
    assert not paired["within_noise"]  # the same +6 points are beyond noise image by image ...
    assert unpaired["within_noise"]  # ... but not from two independent proportions
    assert "same images" in paired["text"]
    assert compare_figures({"correct": 0, "count": 0}, ra) is None


# -- folds -----------------------------------------------------------------------------------------
def test_stratified_folds_spread_every_class():
    y = np.repeat(np.arange(3), [10, 7, 5])
    f = stratified_folds(y, 5, 0)
    for c in range(3):
        counts = np.bincount(f[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert (stratified_folds(y, 5, 0) == f).all() and not (stratified_folds(y, 5, 1) == f).all()


def test_multilabel_folds_spread_a_rare_label():
    y = np.zeros((50, 3), int)
    y[:, 0] = 1
    y[:5, 2] = 1  # a rare label on 5 images: one per fold
    f = multilabel_folds(y, 5, 0)
    assert sorted(f[:5]) == [0, 1, 2, 3, 4]
    assert np.bincount(f, minlength=5).tolist() == [10] * 5
