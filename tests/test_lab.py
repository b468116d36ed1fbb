"""The transfer-vs-scratch lab on real emoji: pretrained beats scratch where data is scarce."""

from __future__ import annotations

import json

import pytest

from insight_support import emoji_small, insight_home, insight_workspace
from tl_core.cli import main
from tl_core.errors import ConfigError
from tl_core.insight.lab import ARMS, learning_curve

#: every test here runs real networks on real images (module fixtures train or export): the slow tier
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def curve(shared_cache):
    events = []
    res = learning_curve(emoji_small(shared_cache), sizes=[5, 10, None], epochs=1,
                         workspace=insight_workspace(shared_cache), progress=events.append)
    return res, events


@pytest.mark.slow
def test_pretrained_curves_sit_above_scratch_at_5_and_10_images_per_class(curve):
    res, _ = curve
    acc = {(r["arm"], r["images_per_class"]): r["val_accuracy"] for r in res["rows"]}
    for n in (5, 10):
        assert acc[("linear", n)] > acc[("scratch", n)] + 0.2, acc
        assert acc[("finetune", n)] > acc[("scratch", n)] + 0.2, acc
    assert acc[("linear", 10)] >= 0.7  # chance is 0.2


@pytest.mark.slow
def test_lab_result_shape(curve):
    res, events = curve
    # 'all' is 10 per class here (12 images, 2 held out): it merges with 10
    assert res["sizes"] == [5, 10] and res["val"] == 10 and res["epochs"] == 1 and res["image_size"] == 128
    assert [(r["arm"], r["images_per_class"]) for r in res["rows"]] == [
        (a, n) for n in (5, 10) for a in ("linear", "finetune", "scratch")]
    assert all(r["train_images"] == 5 * r["images_per_class"] for r in res["rows"])
    # every arm was timed, and the arms' times fit inside the whole lab's (a fine-tune row's time includes the
    # linear head it starts from, the linear row's time at that size: counted once here)
    assert all(r["seconds"] > 0 for r in res["rows"]) and res["feature_seconds"] > 0
    linear_in_finetune = sum(r["seconds"] for r in res["rows"] if r["arm"] == "linear")
    assert sum(r["seconds"] for r in res["rows"]) - linear_in_finetune + res["feature_seconds"] <= res["seconds"] + 0.01
    assert set(res["arms"]) == set(ARMS) and res["skipped"] == {} and res["weights"] == "packaged"
    # the reading quotes the measured accuracies at the smallest size (chance is 20 %)
    acc = {(r["arm"], r["images_per_class"]): r["val_accuracy"] for r in res["rows"]}
    best_arm = max(("linear", "finetune"), key=lambda a: acc[(a, 5)])
    assert res["reading"].startswith("Chance is 20% (5 classes); accuracies are on 10 validation images.")
    assert (f"reaches {acc[(best_arm, 5)]:.0%} ({best_arm}) while the same network trained from scratch reaches "
            f"{acc[('scratch', 5)]:.0%}") in res["reading"]
    # the progress events carry the accuracy each arm reports
    reported = {(e["arm"], e["images_per_class"]): e["val_accuracy"] for e in events
                if e.get("stage") == "lab" and "val_accuracy" in e}
    assert reported.keys() >= {("scratch", 5), ("scratch", 10)}
    assert all(v == pytest.approx(acc[k], abs=1e-4) for k, v in reported.items())
    json.dumps(res)


def test_lab_rejects_bad_settings(shared_cache):
    data = emoji_small(shared_cache)
    ws = insight_workspace(shared_cache)
    with pytest.raises(ConfigError):
        learning_curve(data, arms=["magic"], workspace=ws)
    with pytest.raises(ConfigError):
        learning_curve(data, sizes=[0], workspace=ws)
    with pytest.raises(ConfigError):
        learning_curve(data, epochs=0, workspace=ws)


def test_cli_lab(shared_cache, monkeypatch, capsys):
    monkeypatch.setenv("TL_HOME", str(insight_home(shared_cache)))
    data = str(emoji_small(shared_cache))
    assert main(["lab", data, "--sizes", "5", "--epochs", "1", "--arms", "linear", "--json", "--quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(r["arm"], r["images_per_class"]) for r in doc["rows"]] == [("linear", 5)]
    assert main(["lab", data, "--sizes", "5,x"]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert main(["lab", data, "--arms", "linear,magic", "--quiet"]) == 2
