"""The ``auto`` strategy: tries what the data can afford, keeps the best, and records why."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import EMOJI, make_class_folder
from tl_core.config import TrainConfig
from tl_core.runs.auto import MIN_IMAGES_TO_COMPARE_BACKBONES, MIN_PER_CLASS_TO_FINETUNE, duration_text, \
    paired_difference
from tl_core.storage.files import RunFiles
from tl_core.runs.training import run_training


def test_paired_difference_on_the_same_images():
    a = np.array([1, 1, 0, 0, 1, 1, 1, 1, 0, 1], float)
    assert paired_difference(a, a) == (0.0, 0.0)  # the same answers: no difference, no doubt
    b = a.copy()
    b[2] = 1  # one more image right out of 10
    diff, hw = paired_difference(a, b)
    assert diff == pytest.approx(10.0) and 10.0 < hw < 25.0  # +10 points, well within noise on 10 images
    diff, hw = paired_difference(np.zeros(200), np.ones(200))
    assert diff == 100.0 and hw == 0.0


def test_auto_on_a_small_set_keeps_linear_and_says_why(workspace, tmp_path):
    """12 images per class: too few for fine-tuning to help, so auto fits the probe only, keeps it, and the run is
    an ordinary linear run with the record of what auto did."""
    data = make_class_folder(tmp_path / "small", {"animal": 12, "face": 12, "flag": 12})
    res = run_training(workspace, data, TrainConfig())  # auto is the default
    assert res.status == "done", res.error
    auto = res.auto
    ran = [t for t in auto["tried"] if t["status"] != "skipped"]
    assert auto["kept"] == "linear" and [(t["strategy"], t["status"]) for t in ran] == [("linear", "kept")]
    assert str(MIN_PER_CLASS_TO_FINETUNE) in auto["reason"] and "kept linear" in auto["reason"]
    tried = ran[0]
    lo, hi = tried["val_accuracy_ci"]
    assert lo <= tried["val_accuracy"] <= hi and tried["val_images"] > 0 and tried["seconds"] > 0
    slo, shi = tried["score_ci"]  # scored by cross-validation on every labelled image (36), not the 9 val ones
    assert tried["scored_by"] == "cross-validation" and tried["score_images"] == 36 and slo <= tried["score"] <= shi
    # every other try is listed with why it did not run: 36 images cannot tell backbones apart
    skipped = {(t["strategy"], t["backbone"]): t["why"] for t in auto["tried"] if t["status"] == "skipped"}
    assert set(skipped) == {("linear", "efficientnet_lite1"), ("linear", "efficientnet_lite2"),
                            ("partial", "efficientnet_lite0")}
    assert str(MIN_IMAGES_TO_COMPARE_BACKBONES) in skipped[("linear", "efficientnet_lite1")]
    assert res.best_epoch is None and res.features in ("last", "depths")  # a linear run, features chosen by auto
    run = RunFiles(res.run_dir)
    assert run.config().strategy == "linear"  # the saved model is the kept try's, exactly
    assert json.loads((run.dir / "config.json").read_text())["features"] == "auto"
    assert workspace.store().get(res.run_id)["summary"]["auto"]["kept"] == "linear"
    assert not list(run.dir.parent.glob(".*auto*"))  # the tries' staging is gone
    from tl_core.share.progress import stop_text

    why = stop_text("auto", res.stop, res.best_epoch)  # the kept probe's story, not a fine-tune's
    assert why.startswith("The linear probe converged after")


def test_auto_is_the_default_with_a_budget_a_newcomer_accepts():
    from tl_core.config import DEFAULT_TIME_BUDGET_S, field_spec

    cfg = TrainConfig().resolved()
    assert cfg.strategy == "auto" and cfg.time_budget == DEFAULT_TIME_BUDGET_S <= 300
    assert field_spec("time_budget").strategies == ("auto",)  # shown for auto only
    from tl_core.errors import ConfigError

    with pytest.raises(ConfigError, match="Time budget must be above 0"):
        TrainConfig(time_budget=0).resolved()
    assert duration_text(370) == "6 min 10 s" and duration_text(45.4) == "45 s"


@pytest.mark.slow
def test_auto_skips_tries_that_do_not_fit_the_budget_and_says_so(workspace):
    """The emoji sample (160 images in 5 classes after the split: enough to compare backbones and to fine-tune)
    with a 1-second budget: the probe runs, every other try is listed as skipped with its estimate."""
    res = run_training(workspace, EMOJI, TrainConfig(time_budget=1.0))
    assert res.status == "done", res.error
    auto = res.auto
    assert auto["kept"] == "linear" and auto["budget_s"] == 1.0
    assert [t["status"] for t in auto["tried"]][0] == "kept"
    skipped = [t for t in auto["tried"] if t["status"] == "skipped"]
    assert len(skipped) == 3  # the two other backbones' probes and the fine-tune
    (partial,) = [t for t in skipped if t["strategy"] == "partial"]
    assert partial["estimated_s"] > 1.0 and "left of the 1 s budget" in partial["why"]
    for t in skipped:  # a backbone is skipped for the budget, or because the first probe left it no room
        assert ("estimated_s" in t and "left of the 1 s budget" in t["why"]) or "no room" in t["why"], t
    assert "budget" in auto["reason"] and "raise the time budget" in auto["reason"]
