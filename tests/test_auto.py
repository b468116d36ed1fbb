"""The ``auto`` strategy: tries what the data can afford, keeps the best, and records why."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import EMOJI, make_class_folder
from tl_core.config import TrainConfig
from tl_core.runs.auto import MIN_PER_CLASS_TO_FINETUNE, paired_difference
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
    res = run_training(workspace, data, TrainConfig(strategy="auto"))
    assert res.status == "done", res.error
    auto = res.auto
    assert auto["kept"] == "linear" and [t["strategy"] for t in auto["tried"]] == ["linear"]
    assert str(MIN_PER_CLASS_TO_FINETUNE) in auto["reason"] and "kept linear" in auto["reason"]
    tried = auto["tried"][0]
    lo, hi = tried["val_accuracy_ci"]
    assert lo <= tried["val_accuracy"] <= hi and tried["val_images"] > 0 and tried["seconds"] > 0
    assert res.best_epoch is None and res.features in ("last", "depths")  # a linear run, features chosen by auto
    run = RunFiles(res.run_dir)
    assert run.config().strategy == "linear"  # the saved model is the kept try's, exactly
    assert json.loads((run.dir / "config.json").read_text())["features"] == "auto"
    assert workspace.store().get(res.run_id)["summary"]["auto"]["kept"] == "linear"
    assert not list(run.dir.parent.glob(".*auto*"))  # the tries' staging is gone
    from tl_core.share.progress import stop_text

    why = stop_text("auto", res.stop, res.best_epoch)  # the kept probe's story, not a fine-tune's
    assert why.startswith("The linear probe converged after")


@pytest.mark.slow
def test_auto_skips_fine_tuning_that_does_not_fit_the_budget(workspace, monkeypatch):
    import tl_core.runs.auto as auto_mod

    monkeypatch.setattr(auto_mod, "AUTO_BUDGET_S", 1.0)
    res = run_training(workspace, EMOJI, TrainConfig(strategy="auto", features="last"))
    assert res.status == "done", res.error
    assert res.auto["kept"] == "linear" and len(res.auto["tried"]) == 1
    assert "budget" in res.auto["reason"] and res.auto["budget_s"] == 1.0
