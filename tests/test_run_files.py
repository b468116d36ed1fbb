"""The one owner of a run's files (tl_core.storage.files): a run is published whole, JSON is written atomically,
older predictions files are still read, and damaged files are refused with messages that say what is wrong."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from insight_support import emoji_small
from tl_core.config import TrainConfig
from tl_core.errors import ConfigError, ExportError, RunError
from tl_core.metrics import softmax
from tl_core.storage.files import (PREDICTIONS_FORMAT, SAVED, VALIDATION_FIT, Predictions, RunFiles, RunMeta,
                                   RunMetrics, SplitPredictions, read_config_file, resolve_run, write_json_atomic)

CLASSES = ["cat", "dog", "fox"]
PRE = {"input_size": 224, "resize": 256, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}


def _meta(**kw) -> RunMeta:
    return RunMeta(**{"backbone": "efficientnet_lite0", "arch": "tf_efficientnet_lite0", "classes": CLASSES,
                      "preprocess": PRE, **kw})


def _files_in(run: Path) -> set[str]:
    return {p.name for p in run.iterdir()} if run.exists() else set()


# --------------------------------------------------------------------------------------------------
# a run is published whole
# --------------------------------------------------------------------------------------------------
def test_staged_run_is_invisible_until_published_and_replaces_an_older_attempt(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "meta.json").write_text("an older, failed attempt")
    staged = RunFiles.staging(run)
    assert staged.dir != run and staged.dir.parent == run.parent and staged.dir.name.startswith(".")
    staged.write_config(TrainConfig())
    staged.write_meta(_meta())
    assert _files_in(run) == {"meta.json"} and (run / "meta.json").read_text() == "an older, failed attempt"
    staged.write_metrics(RunMetrics(val={"accuracy": 0.5}))
    published = staged.publish(run)
    assert published.dir == run and _files_in(run) == {"config.json", "meta.json", "metrics.json"}
    assert published.meta().classes == CLASSES and published.metrics().val == {"accuracy": 0.5}
    assert sorted(p.name for p in run.parent.iterdir()) == ["r1"]  # no staging folder left


@pytest.mark.slow
def test_a_run_that_fails_before_publishing_leaves_no_run_directory(workspace, shared_cache, monkeypatch):
    from tl_core.runs.training import run_training

    data = emoji_small(shared_cache)
    real = RunFiles.write_metrics

    def fail_late(self, metrics):  # everything else is already written: the weights, meta, predictions
        assert {"model.safetensors", "meta.json", "predictions.json"} <= _files_in(self.dir)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunFiles, "write_metrics", fail_late)
    res = run_training(workspace, data, TrainConfig(strategy="linear", max_per_class=4), raise_errors=False)
    assert res.status == "failed" and "No space left on device" in res.error
    assert not Path(res.run_dir).exists()
    assert list(workspace.runs_dir.iterdir()) == []  # the staging folder was removed too
    assert workspace.store().get(res.run_id)["status"] == "failed"
    monkeypatch.setattr(RunFiles, "write_metrics", real)
    ok = run_training(workspace, data, TrainConfig(strategy="linear", max_per_class=4))
    assert _files_in(Path(ok.run_dir)) == {"config.json", "meta.json", "model.safetensors", "val_head.safetensors",
                                           "metrics.json", "predictions.json", "ood.json", "ood_bank.safetensors"}


def test_discard_removes_staged_folders(tmp_path):
    staged = RunFiles.staging(tmp_path / "r2")
    staged.write_meta(_meta())
    RunFiles.discard([staged.dir])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# atomic JSON
# --------------------------------------------------------------------------------------------------
def test_json_is_written_atomically(tmp_path, monkeypatch):
    f = tmp_path / "metrics.json"
    write_json_atomic(f, {"v": 1})
    assert json.loads(f.read_text()) == {"v": 1}
    with pytest.raises(TypeError):
        write_json_atomic(f, {"v": object()})  # cannot be encoded: nothing is written
    assert json.loads(f.read_text()) == {"v": 1} and list(tmp_path.iterdir()) == [f]

    real = Path.write_text

    def half_then_fail(self, text, *a, **k):  # the disk fills up half-way through the temporary file
        real(self, text[: len(text) // 2], *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError):
        write_json_atomic(f, {"v": 2, "pad": "x" * 1000})
    monkeypatch.undo()
    assert json.loads(f.read_text()) == {"v": 1}  # the reader sees the old file, whole
    assert list(tmp_path.iterdir()) == [f]  # and no temporary file is left behind


def test_writes_refresh_what_the_owner_has_read(tmp_path):
    files = RunFiles(tmp_path / "run")
    files.write_meta(_meta())
    files.write_metrics(RunMetrics(val={"ece": 0.2}))
    assert files.meta().temperature == 1.0
    files.set_temperature(1.5, {"temperature": 1.5, "ece_before": 0.2, "ece_after": 0.05})
    assert files.meta().temperature == 1.5 and files.metrics().calibration["ece_after"] == 0.05
    again = RunFiles(tmp_path / "run")
    assert again.temperature == 1.5 and again.metrics().val == {"ece": 0.2}  # the rest of metrics.json is kept


# --------------------------------------------------------------------------------------------------
# predictions: format 2, and format 1 still read
# --------------------------------------------------------------------------------------------------
def _split(model: str = SAVED) -> SplitPredictions:
    logits = np.array([[3.0, 0.0, 0.0],    # cat, right
                       [0.0, 2.0, 0.0],    # labelled cat: wrong (dog)
                       [0.0, 0.0, 4.0],    # labelled dog: wrong (fox), more confident
                       [1.0, 1.0, 1.0],    # labelled wolf: a class the model does not know
                       [0.0, 2.0, 0.0]])   # labelled cat: wrong (dog), ties the second row
    return SplitPredictions("val", ["a.png", "b.png", "c.png", "d.png", "e.png"], ["cat", "cat", "dog", "wolf", "cat"],
                            logits, model)


def test_split_predictions_rows_and_mistakes():
    s = _split()
    assert s.targets(CLASSES).tolist() == [0, 0, 1, -1, 0]
    rows = s.rows(CLASSES, 2.0)
    p = softmax(s.logits, 2.0)
    assert [r["predicted"] for r in rows] == ["cat", "dog", "fox", "cat", "dog"]
    assert [r["confidence"] for r in rows] == pytest.approx(p.max(1).tolist())
    assert rows[3]["true_prob"] == 0.0 and not rows[3]["correct"]
    assert rows[0]["loss"] == pytest.approx(-math.log(p[0, 0]))
    wrong = s.mistakes(CLASSES, 2.0)
    # most confidently wrong first, ties (b and e) by path; an unknown label counts as a mistake
    assert [r["path"] for r in wrong] == ["c.png", "b.png", "e.png", "d.png"]
    assert s.mistakes(CLASSES, 2.0, k=1)[0]["path"] == "c.png"
    # the temperature changes the confidences, never the labels
    assert [r["predicted"] for r in s.rows(CLASSES, 0.5)] == [r["predicted"] for r in rows]
    assert s.rows(CLASSES, 0.5)[1]["confidence"] > rows[1]["confidence"]


def test_index_of_compares_resolved_paths(tmp_path, monkeypatch):
    f = tmp_path / "img.png"
    s = SplitPredictions("val", [str(f)], ["cat"], np.zeros((1, 3)))
    monkeypatch.chdir(tmp_path)
    assert s.index_of(f) == 0 and s.index_of("img.png") == 0 and s.index_of("./img.png") == 0
    assert s.index_of("other.png") is None


def test_predictions_round_trip_in_format_2(tmp_path):
    files = RunFiles(tmp_path / "run")
    files.write_meta(_meta(fit_on="train+val"))
    files.write_predictions(Predictions(CLASSES, {"val": _split(VALIDATION_FIT), "test": _split()}))
    raw = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert raw["format"] == PREDICTIONS_FORMAT and set(raw["splits"]) == {"val", "test"}
    back = RunFiles(tmp_path / "run").predictions()
    assert back.classes == CLASSES and back.get("val").model == VALIDATION_FIT and back.get("test").model == SAVED
    np.testing.assert_allclose(back.get("val").logits, _split().logits)
    assert back.get("val").paths == _split().paths and back.get("val").labels == _split().labels
    assert back.get("train") is None


def test_format_1_predictions_are_still_read(tmp_path):
    """Before logits were the record, each row kept its probabilities (and, for a refitted run's validation
    split, its logits)."""
    run = tmp_path / "run"
    files = RunFiles(run)
    files.write_meta(_meta(fit_on="train+val"))
    probs = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]
    (run / "predictions.json").write_text(json.dumps({
        "classes": CLASSES,
        "val": [{"path": "a.png", "label": "cat", "probs": probs[0], "logits": [2.0, 0.75, 0.0]},
                {"path": "b.png", "label": "dog", "probs": probs[1], "logits": [0.0, 1.1, 1.8]}],
        "test": [{"path": "c.png", "label": "fox", "probs": probs[1]},
                 {"path": "x.png", "label": "fox", "probs": [0.5, 0.5]}],  # another class count: left out
    }))
    p = RunFiles(run).predictions()
    val, test = p.get("val"), p.get("test")
    assert val.model == VALIDATION_FIT and test.model == SAVED  # the refitted run's validation split
    np.testing.assert_array_equal(val.logits, [[2.0, 0.75, 0.0], [0.0, 1.1, 1.8]])
    assert test.paths == ["c.png"]
    np.testing.assert_allclose(test.probs(), [probs[1]], atol=1e-9)  # probabilities without logits: exact
    assert [r["path"] for r in val.mistakes(CLASSES)] == ["b.png"]
    # a run that was not refitted: its validation rows came from the saved model
    RunFiles(run).write_meta(_meta())
    assert RunFiles(run).predictions().get("val").model == SAVED


@pytest.mark.parametrize("data, message", [
    ({"splits": {}}, "no class list"),
    ({"format": PREDICTIONS_FORMAT, "classes": CLASSES,
      "splits": {"val": {"paths": ["a.png"], "labels": [], "logits": [[0, 0, 0]]}}}, "mismatched lengths"),
])
def test_damaged_predictions_say_so(tmp_path, data, message):
    files = RunFiles(tmp_path)
    files.write_meta(_meta())
    (tmp_path / "predictions.json").write_text(json.dumps(data))
    with pytest.raises(RunError, match=message):
        RunFiles(tmp_path).predictions()


# --------------------------------------------------------------------------------------------------
# meta.json validation
# --------------------------------------------------------------------------------------------------
GOOD = {"classes": CLASSES, "num_classes": 3, "arch": "tf_efficientnet_lite0", "preprocess": PRE}

BAD_META = {
    "not an object": ([1, 2], r"lacks classes/num_classes/preprocess; not a TL Studio model"),
    "no preprocess": ({"classes": CLASSES, "num_classes": 3}, r"lacks classes/num_classes/preprocess"),
    "another format": ({**GOOD, "format": "keras/2"}, r"has format 'keras/2'; not a TL Studio model"),
    "newer format": ({**GOOD, "format": "tl-studio-model/7"}, r"format tl-studio-model/7 .* update TL Studio"),
    "duplicate classes": ({**GOOD, "classes": ["cat", "cat", "fox"]}, r"'classes' must be a list of distinct"),
    "empty class name": ({**GOOD, "classes": ["cat", "", "fox"]}, r"'classes' must be a list of distinct"),
    "count mismatch": ({**GOOD, "num_classes": 4}, r"lists 3 classes but says num_classes=4"),
    "count not a number": ({**GOOD, "num_classes": "three"}, r"num_classes='three' is not a number"),
    "no architecture": ({k: v for k, v in GOOD.items() if k != "arch"}, r"names no architecture"),
    "resize below input": ({**GOOD, "preprocess": {**PRE, "resize": 200}}, r"'preprocess' is incomplete or invalid"),
    "zero std": ({**GOOD, "preprocess": {**PRE, "std": [0.5, 0.0, 0.5]}}, r"3 positive stds"),
    "unknown interpolation": ({**GOOD, "preprocess": {**PRE, "interpolation": "magic"}}, r"incomplete or invalid"),
    "two means": ({**GOOD, "preprocess": {**PRE, "mean": [0.5, 0.5]}}, r"incomplete or invalid"),
    "zero temperature": ({**GOOD, "temperature": 0}, r"temperature 0 must be a positive number"),
    "boolean temperature": ({**GOOD, "temperature": True}, r"temperature True must be a positive number"),
    "text temperature": ({**GOOD, "temperature": "2"}, r"temperature '2' must be a positive number"),
}


@pytest.mark.parametrize("case", list(BAD_META))
def test_meta_validation_errors_say_what_is_wrong(tmp_path, case):
    data, message = BAD_META[case]
    (tmp_path / "meta.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match=message) as e:
        RunFiles(tmp_path, where="run-42").meta()
    assert str(e.value).startswith("run-42: meta.json") or str(e.value).startswith("run-42: the model has format")


def test_meta_round_trips_and_keeps_unknown_keys(tmp_path):
    data = {**GOOD, "backbone": "efficientnet_lite0", "temperature": 1.25, "fit_on": "train+val",
            "from_the_future": {"x": 1}}
    (tmp_path / "meta.json").write_text(json.dumps(data))
    meta = RunFiles(tmp_path).meta()
    assert meta.refitted and meta.temperature == 1.25 and meta.num_classes == 3
    assert meta.extra == {"from_the_future": {"x": 1}}
    RunFiles(tmp_path).write_meta(dataclasses.replace(meta, temperature=2.0))
    again = json.loads((tmp_path / "meta.json").read_text())
    assert again["from_the_future"] == {"x": 1} and again["temperature"] == 2.0 and again["num_classes"] == 3


def test_unreadable_json_and_missing_files(tmp_path):
    (tmp_path / "meta.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ExportError, match="meta.json is not UTF-8 text"):
        RunFiles(tmp_path).meta()
    (tmp_path / "meta.json").write_text('{"classes": [')
    with pytest.raises(ExportError, match=r"meta.json is not valid JSON \(.* at line 1, column"):
        RunFiles(tmp_path).meta()
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ExportError, match="config.json must hold a JSON object"):
        RunFiles(tmp_path).config_dict()
    with pytest.raises(RunError, match="has no metrics.json"):
        RunFiles(tmp_path).metrics()
    with pytest.raises(RunError, match="no saved predictions"):
        RunFiles(tmp_path).predictions()


def test_a_bundle_reads_like_a_run_but_cannot_be_changed():
    files = RunFiles.from_bytes({"meta.json": json.dumps(GOOD).encode(), "config.json": b"{}"}, "model.zip")
    assert files.meta().classes == CLASSES and files.metrics() == RunMetrics()  # no metrics: empty, not an error
    with pytest.raises(RunError, match="no saved predictions"):
        files.predictions()
    with pytest.raises(RunError, match="is a bundle and cannot be changed"):
        files.set_temperature(2.0, {})
    assert files.config().strategy == TrainConfig().strategy  # an empty config.json reads as the defaults


def test_metrics_keep_unknown_keys_and_fill_empty_ones(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"val": None, "history": None, "best_epoch": 3,
                                                       "stop": {"reason": "patience", "epoch": 5}, "future": 1}))
    m = RunFiles(tmp_path).metrics()
    assert m.val == {} and m.history == [] and m.best_epoch == 3 and m.stop["reason"] == "patience"
    assert m.extra == {"future": 1} and m.to_dict()["future"] == 1 and "extra" not in m.to_dict()


# --------------------------------------------------------------------------------------------------
# the one resolver of a RUN argument, the one reader of a saved config
# --------------------------------------------------------------------------------------------------
def test_resolve_run_takes_an_id_or_a_directory_and_says_why_not(workspace, tmp_path):
    store = workspace.store()
    run_id = store.create_run("some/data", {"strategy": "linear"}, status="done")
    run = workspace.run_dir(run_id)
    run.mkdir(parents=True)
    with pytest.raises(RunError, match=f"Run {run_id} has status 'done' and no trained model"):  # files removed
        resolve_run(run_id, workspace)
    with pytest.raises(RunError, match=f"{run} is not a trained run"):  # a folder with no model in it
        resolve_run(run, workspace)
    RunFiles(run).write_meta(_meta())
    assert resolve_run(run_id, workspace) == run == resolve_run(run, workspace)
    failed = store.create_run("some/data", {}, status="failed")
    store.set_status(failed, "failed", "out of memory")
    with pytest.raises(RunError, match=r"status 'failed' and no trained model \(out of memory\)"):
        resolve_run(failed, workspace)
    with pytest.raises(RunError, match="No run or run directory 'nope'"):
        resolve_run("nope", workspace)
    with pytest.raises(RunError, match="No run or run directory"):
        resolve_run(tmp_path / "missing", workspace)


def test_a_saved_config_is_read_one_way(tmp_path):
    old = {"strategy": "linear", "epochs": 3, "from_the_future": 1}  # saved before feature variants existed
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(old))
    assert read_config_file(run) == read_config_file(run / "config.json") == old
    cfg = TrainConfig.from_saved(read_config_file(run))
    assert (cfg.features, cfg.epochs) == ("last", 3)  # what it meant when it was saved
    assert RunFiles(run).config() == cfg  # the run's owner reads it the same way
    assert TrainConfig.from_saved(old, {"features": "auto", "seed": 7}).features == "auto"  # flags on top
    assert TrainConfig.from_saved({"features": "depths"}).features == "depths"
    (tmp_path / "list.json").write_text("[1, 2]")
    for bad, message in [(tmp_path / "none.json", "does not exist"), (tmp_path / "list.json", "JSON object")]:
        with pytest.raises(ConfigError, match=message):
            read_config_file(bad)
