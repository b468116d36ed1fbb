"""Page tests of the insight views (issue 8) and the export downloads (issue 7), with ``AppTest``.

They reuse the page tests' trained workspace (one real linear probe on the emoji sample, whose Lite0
features are in the workspace's cache, so the audit and maps cost seconds) and keep every computation
small: the advisor on two backbones at 10 images per class, the lab at 2 and 5 images per class for one
epoch at 64 px. Every computation is a task: a test clicks, then reruns the page until the result is drawn
(:func:`until`). The short tasks (the advisor; Evaluate's Grad-CAM, calibration and map; Try it) run in
threads of the test process (page_harness ``task_threads``: the workers' own claim-and-run code, without a
worker process that imports torch again for every task); the others run on real worker processes: the audit's
t-SNE, the lab and the exports take minutes under load, the exports gained nothing in a thread (their
tracing shares the GIL with the page's reruns), and not every one stops at a cancel.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from page_harness import (  # noqa: F401  (fixtures are used by name)
    EMOJI,
    task_threads,
    app,
    assert_clean,
    button,
    empty_home,
    goto,
    has_button,
    has_metric,
    home,
    metric,
    plotly_specs,
    progress_texts,
    trained_home,
    until,
)

from conftest import make_class_folder
from tl_core.data.library import dataset_signature
from tl_core.runs import tasks
from tl_core.storage.files import RunFiles
from tl_core.storage.workspace import Workspace


@pytest.fixture(autouse=True)
def fresh_caches():
    """Each test computes its own results (the pages' st.cache_data is per process, shared by tests)."""
    import streamlit as st

    st.cache_data.clear()
    yield


def _view(at, name: str):
    at.button_group(key="eval_view").set_value(name).run()
    assert_clean(at)
    return at


def _markers(at) -> list[dict]:
    return [s for s in plotly_specs(at) if s["data"] and s["data"][0].get("mode") == "markers"]


def _image_captions(at) -> list[str]:
    return [i.caption for el in at.get("image") for i in el.proto.imgs]


# --------------------------------------------------------------------------------------------------
# Backbone: "Which backbone fits my data?"
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_backbone_advisor_ranks_backbones_and_the_recommendation_can_be_used(home, task_threads):
    # training is set to Lite2, which is not compared: whichever the advisor recommends, it offers to switch
    at = app({"data": "sample/emoji", "backbone": "efficientnet_lite2"})
    goto(at, "backbone")
    assert_clean(at)
    at.multiselect(key="w_advisor_backbones").set_value(["efficientnet_lite0", "efficientnet_lite1"]).run()
    at.select_slider(key="w_advisor_per_class").set_value(10).run()
    button(at, "Compare backbones").click().run()
    until(at, lambda a: [d for d in a.dataframe if "LogME" in d.value.columns], what="the advisor")
    assert_clean(at)
    table = [d.value for d in at.dataframe if "LogME" in d.value.columns][0]
    assert sorted(table["backbone"]) == ["efficientnet_lite0", "efficientnet_lite1"]
    assert list(table["rank"]) == [1, 2]
    assert table["LogME"].iloc[1:].is_monotonic_decreasing  # the recommendation first, then by LogME
    assert table["probe accuracy"].between(0.2, 1.0).all() and table["k-NN accuracy"].between(0.0, 1.0).all()
    assert (table["seconds"] > 0).all()
    boxes = [b.value for b in list(at.success) + list(at.info) + list(at.warning) if "**Recommended:" in b.value
             and "confidence" in b.value]
    assert len(boxes) == 1
    rec = boxes[0].split("**Recommended: ", 1)[1].split("**", 1)[0]
    # one clear thing: the recommendation is the table's first row, and no banner names another backbone
    assert rec == table["backbone"].iloc[0]
    assert not [s for s in at.success if "Safe default" in s.value]
    assert any(c in boxes[0] for c in ("confidence **high**", "confidence **medium**", "confidence **low**"))
    chart = [s for s in plotly_specs(at) if any(t.get("name") == "linear probe" for t in s["data"])][0]
    probe = [t for t in chart["data"] if t.get("name") == "linear probe"][0]
    assert probe["y"] == pytest.approx(list(table["probe accuracy"]))
    # a second visit finds the finished task (no button press needed)
    goto(at, "home")
    goto(at, "backbone")
    assert [d.value for d in at.dataframe if "LogME" in d.value.columns]
    assert at.session_state["backbone"] == "efficientnet_lite2"
    button(at, f"Use {rec} for training").click().run()
    assert at.session_state["backbone"] == rec and at.query_params["backbone"] == rec
    assert not has_button(at, f"Use {rec} for training")  # it is the backbone for training now


def test_backbone_advisor_asks_for_a_dataset_first(empty_home):
    at = app()
    goto(at, "backbone")
    assert_clean(at)
    assert any("Choose a dataset first" in i.value for i in at.info)


# --------------------------------------------------------------------------------------------------
# Data: audit, embedding map, domain gap
# --------------------------------------------------------------------------------------------------
def _planted_dataset(ws: Workspace) -> Path:
    """train/ and val/ class folders of real emoji with planted problems: an exact copy of a training image
    in val (a leak), a file in two classes, a blank image, and a small class (imbalance)."""
    root = ws.datasets_dir / "planted"
    take = {"animal": (12, 3), "face": (12, 3), "flag": (3, 3)}
    for cls, (n_train, n_val) in take.items():
        files = sorted((EMOJI / cls).iterdir())
        for split, chunk in (("train", files[:n_train]), ("val", files[n_train:n_train + n_val])):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for f in chunk:
                shutil.copy(f, root / split / cls / f.name)
    leaked = sorted((root / "train" / "animal").iterdir())[0]
    shutil.copy(leaked, root / "val" / "animal" / "leaked_copy.png")
    twice = sorted((root / "train" / "face").iterdir())[0]
    shutil.copy(twice, root / "train" / "flag" / "also_a_flag.png")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "train" / "face" / "blank_red.png")
    return root


@pytest.mark.processes
def test_data_audit_lists_planted_duplicates_leak_blank_image_and_fixes_imbalance(home):
    ws, _ = home
    _planted_dataset(ws)
    at = app({"data": "workspace/planted"})
    goto(at, "data")
    assert_clean(at)
    assert not [m for m in at.metric if m.label == "Leaks into validation"]  # nothing computed before the click
    button(at, "Check the data").click().run()
    until(at, lambda a: has_metric(a, "Leaks into validation"), what="the audit")
    assert_clean(at)
    assert int(metric(at, "Leaks into validation")) >= 1
    assert int(metric(at, "Exact duplicates")) >= 2
    assert int(metric(at, "Tiny or blank")) >= 1
    assert float(metric(at, "Imbalance").rstrip("×")) >= 3
    findings = " ".join(w.value for w in at.warning)
    assert "duplicate a training image" in findings and "more than one class folder" in findings
    captions = _image_captions(at)
    assert any(c.startswith("val: animal/leaked_copy.png") for c in captions), captions
    assert any("flag: flag/also_a_flag.png" in c for c in captions)
    assert any(c.startswith("face: face/blank_red.png — blank") for c in captions), captions
    assert any("different labels!" in m.value for m in at.markdown)
    # one click sets the class balance of the Train form
    fix = [b for b in at.button if b.label.startswith("Fix it: use ")][0]
    fix.click().run()
    assert_clean(at)
    assert at.session_state["class_balance"] in ("weights", "sampler")
    chosen = at.session_state["class_balance"]
    assert any("Class balance set to" in s.value for s in at.success)
    goto(at, "train")
    assert_clean(at)
    assert [s for s in at.selectbox if s.label == "Class balance"][0].value == chosen


#: Emoji per class of the data-check test's dataset (the first ones of each class of the sample, as the insight
#: tests' small subset: tests/insight_support.py). The whole 200-image sample is checked in the browser test
#: (test_browser.py, with its bar on the label errors); here the page's three tasks on 60 images prove what the
#: page shows of them, at a third of the feature extraction and of the style pass.
MAP_PER_CLASS = 12


@pytest.mark.processes
def test_data_embedding_map_and_domain_gap_on_emoji(home):
    ws, _ = home
    data = make_class_folder(ws.datasets_dir / "emoji60", {c: MAP_PER_CLASS for c in
                                                           ("animal", "face", "flag", "food", "vehicle")})
    n = 5 * MAP_PER_CLASS
    at = app({"data": "workspace/emoji60"})
    goto(at, "data")
    button(at, "Check the data").click().run()
    # the audit first, then the map and the domain-gap hint follow without another click
    until(at, lambda a: _markers(a) and any("**The domain gap is" in m.value for m in a.markdown),
          what="the audit, the map and the domain gap")
    assert_clean(at)
    audit = tasks.result(ws, tasks.find(ws, "audit", {
        "data": str(data), "signature": dataset_signature(data), "backbone": "efficientnet_lite0",
        "val_split": 0.2, "seed": 0, "max_per_class": 200}))
    assert audit["images"] == n
    # the page shows the worker's findings: a few hard emoji may look like another class, never a tenth of them
    assert int(metric(at, "Likely label errors")) == len(audit["label_issues"]) < n / 10
    assert metric(at, "Leaks into validation") == "0"
    maps = _markers(at)
    assert len(maps) == 1
    traces = maps[0]["data"]
    assert sorted(t["name"] for t in traces) == ["animal", "face", "flag", "food", "vehicle"]
    assert sum(len(t["x"]) for t in traces) == n
    pca = {t["name"]: t["x"] for t in traces}
    # the domain-gap hint, in plain language (emoji icons are far from ImageNet photos)
    assert any("**The domain gap is far**" in m.value for m in at.markdown)
    assert any("far from the backbone's ImageNet photos" in i.value for i in at.info)
    gap = [s for s in plotly_specs(at) if s["data"] and s["data"][0].get("orientation") == "h"][0]
    assert sorted(gap["data"][0]["y"]) == ["animal", "face", "flag", "food", "vehicle"]
    # t-SNE instead of PCA: same points, other coordinates
    at.radio(key="data_map_method").set_value("tsne").run()
    until(at, lambda a: _markers(a), what="the t-SNE map")
    assert_clean(at)
    tsne = _markers(at)[0]["data"]
    assert sum(len(t["x"]) for t in tsne) == n
    assert {t["name"]: t["x"] for t in tsne} != pca


# --------------------------------------------------------------------------------------------------
# Evaluate: Grad-CAM grid, calibration, embedding map of the run
# --------------------------------------------------------------------------------------------------
def _mistakes(ws: Workspace, run_id: str) -> list[dict]:
    """The run's misclassified validation images, from its saved predictions (most confident first)."""
    files = RunFiles(ws.run_dir(run_id))
    return files.predictions().get("val").mistakes(files.meta().classes, files.meta().temperature)


def _misclassified(ws: Workspace, run_id: str) -> list[str]:
    return [r["path"] for r in _mistakes(ws, run_id)]


@pytest.mark.slow
def test_evaluate_shows_a_gradcam_grid_of_the_mistakes(home, task_threads):
    ws, run_id = home
    wrong = _misclassified(ws, run_id)
    assert wrong, "the fixture run makes a few mistakes on the validation images"
    at = app()
    goto(at, "evaluate")
    assert len(at.get("image")) == len(wrong)  # the default view: the mistakes gallery
    mistakes_captions = [c.value for c in at.caption if c.value.startswith("true **")]
    _view(at, "gradcam")
    n = min(12, len(wrong))
    until(at, lambda a: len(a.get("image")) == 2 * n, what="the Grad-CAM grid")
    assert_clean(at)
    assert len(at.get("image")) == 2 * n  # each mistake, and its heat-map beside it
    # the same images with the same captions (labels and confidence) as the Mistakes view: both read the run's
    # saved predictions
    assert [c.value for c in at.caption if c.value.startswith("true **")] == mistakes_captions[:n]
    captions = [c.value for c in at.caption]
    assert sum(c.startswith("heat-map for **") for c in captions) == n
    overlays = [el for el in at.get("image")][1::2]
    assert all(el.proto.imgs[0].url for el in overlays)
    # explaining the true class instead: the heat-maps are for the true labels now
    at.radio(key="gradcam_target").set_value("true").run()
    until(at, lambda a: len(a.get("image")) == 2 * n, what="the Grad-CAM grid of the true class")
    assert_clean(at)
    true_labels = [c.split("true **", 1)[1].split("**", 1)[0] for c in (x.value for x in at.caption)
                   if c.startswith("true **")]
    targets = [c.split("heat-map for **", 1)[1].split("**", 1)[0] for c in (x.value for x in at.caption)
               if c.startswith("heat-map for **")]
    assert targets == true_labels and len(targets) == n


@pytest.mark.slow
def test_evaluate_calibration_shows_ece_before_and_after_and_applies_the_temperature(home, task_threads):
    from tl_core.insight.calibrate import calibrate_run

    ws, run_id = home
    expected = calibrate_run(ws.run_dir(run_id), ws, apply=False)
    at = app()
    goto(at, "evaluate")
    _view(at, "calibration")
    until(at, lambda a: has_metric(a, "ECE before"), what="the calibration")
    assert metric(at, "ECE before") == f"{expected['ece_before']:.3f}"
    assert metric(at, "ECE after") == f"{expected['ece_after']:.3f}"
    assert metric(at, "Temperature T") == f"{expected['temperature']:.2f}"
    assert expected["ece_after"] < expected["ece_before"]
    captions = [c.value for c in at.caption]
    assert "95% CI {:.3f}–{:.3f} (bootstrap)".format(*expected["ece_before_ci"]) in captions, captions
    assert "Out of fold {:.3f}, 95% CI {:.3f}–{:.3f}".format(expected["ece_after_oof"],
                                                               *expected["ece_after_oof_ci"]) in captions, captions
    # whether the page says the gain may be chance follows the result (this run: 40 images, a T near 1)
    says_unclear = any("does not clearly help here" in i.value for i in at.info)
    assert says_unclear == (expected["helps_out_of_fold"] is False and expected["temperature"] != 1.0), expected
    diagram = [s for s in plotly_specs(at) if any("ECE" in (t.get("name") or "") for t in s["data"])][0]
    names = [t["name"] for t in diagram["data"]]
    assert names[0] == "perfectly calibrated"
    assert any(n.startswith("before (T = 1): ECE ") for n in names)
    assert any(n.startswith("after temperature scaling") for n in names)
    assert json.loads((ws.run_dir(run_id) / "meta.json").read_text()).get("temperature", 1.0) == 1.0
    [b for b in at.button if b.label.startswith("Apply temperature scaling")][0].click().run()
    until(at, lambda a: any(s.value.startswith("Applied: this run's predictions") for s in a.success),
          what="applying the temperature")
    assert_clean(at)
    # applying is a task of its own, never shared with another request
    applied = [t for t in ws.store().tasks(kind="calibrate") if t["params"].get("apply")]
    assert len(applied) == 1 and applied[0]["status"] == "done"
    meta = json.loads((ws.run_dir(run_id) / "meta.json").read_text())
    assert meta["temperature"] == pytest.approx(expected["temperature"], rel=1e-4)
    # the run's files changed: the preview is computed again for them and says T is applied
    until(at, lambda a: any("is applied to the run" in i.value for i in a.info), what="the new calibration")
    metrics = json.loads((ws.run_dir(run_id) / "metrics.json").read_text())
    assert metrics["calibration"]["ece_after"] == pytest.approx(expected["ece_after"], abs=1e-6)


@pytest.mark.slow
def test_evaluate_embedding_map_rings_the_misclassified_images(home, task_threads):
    ws, run_id = home
    wrong = _misclassified(ws, run_id)
    at = app()
    goto(at, "evaluate")
    _view(at, "map")
    until(at, lambda a: _markers(a), what="the run's embedding map")
    assert_clean(at)
    spec = _markers(at)[0]
    ringed = [t for t in spec["data"] if t["name"].startswith("misclassified")]
    assert len(ringed) == 1 and ringed[0]["name"] == f"misclassified ({len(wrong)})"
    assert len(ringed[0]["x"]) == len(wrong)
    classes = [t for t in spec["data"] if not t["name"].startswith("misclassified")]
    assert sum(len(t["x"]) for t in classes) == 200


# --------------------------------------------------------------------------------------------------
# Try it: Grad-CAM beside the prediction
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_try_it_shows_a_gradcam_overlay_next_to_each_prediction(home, task_threads):
    at = app()
    goto(at, "try_it")
    files = [(f"{cls}.png", sorted((EMOJI / cls).iterdir())[-1].read_bytes(), "image/png")
             for cls in ("animal", "food")]
    at.file_uploader[0].set_value(files).run()
    assert_clean(at)
    captions = _image_captions(at)
    assert captions.count("your image") == 2
    cams = [c for c in captions if c.startswith("where it saw '")]
    assert len(cams) == 2
    predicted = [m.value.split("→ **", 1)[1].split("**", 1)[0] for m in at.markdown if "→" in m.value]
    assert [c.split("'")[1] for c in cams] == predicted  # the heat-map explains the shown prediction
    at.toggle(key="try_gradcam").set_value(False).run()
    assert not [c for c in _image_captions(at) if c.startswith("where it saw")]


# --------------------------------------------------------------------------------------------------
# Lab: transfer vs scratch
# --------------------------------------------------------------------------------------------------
def _lab_settings(at, sizes, epochs=1, image_size=64):
    at.multiselect(key="w_lab_sizes").set_value(sizes).run()
    at.number_input(key="w_lab_epochs").set_value(epochs).run()
    at.selectbox(key="w_lab_image_size").set_value(image_size).run()


@pytest.mark.processes
def test_lab_runs_in_the_background_and_plots_one_line_per_arm(home):
    ws, _ = home
    at = app({"data": "sample/emoji"})
    goto(at, "lab")
    assert_clean(at)
    _lab_settings(at, [2, 5])
    t0 = time.monotonic()
    button(at, "Run the lab").click().run()
    assert_clean(at)
    assert at.get("progress"), "a progress bar while the lab waits or runs"
    assert button(at, "Cancel")
    [task] = ws.store().tasks(kind="lab")
    assert task["lane"] == "compute"
    until(at, lambda a: not a.get("progress"), what="the lab")
    seconds = time.monotonic() - t0
    assert_clean(at)
    spec = [s for s in plotly_specs(at) if any(t.get("mode") == "lines+markers" for t in s["data"])][0]
    lines = [t for t in spec["data"] if t.get("mode") == "lines+markers"]
    assert [t["name"] for t in lines] == ["pretrained, linear probe", "pretrained, fine-tuned", "from scratch"]
    assert all(t["x"] == [2, 5] for t in lines)
    assert all(0.0 <= y <= 1.0 for t in lines for y in t["y"])
    times = [t for t in spec["data"] if t.get("type") == "bar"]
    assert len(times) == 3 and all(v > 0 for t in times for v in t["y"])
    assert any(i.value.startswith("Chance is 20% (5 classes)") for i in at.info)
    table = at.dataframe[0].value
    assert list(table.index) == [2, 5] and len(table.columns) == 3
    # the time shown counts from the click
    took = [c.value for c in at.caption if c.value.startswith("Took ")]
    assert took and "from the click" in took[0]
    print(f"\n[lab] sizes (2, 5), 1 epoch, 64 px: {seconds:.1f} s through the page")
    # the same settings in a new session (a refresh) find the finished lab
    again = app({"data": "sample/emoji"})
    goto(again, "lab")
    _lab_settings(again, [2, 5])
    assert not [b for b in again.button if b.label == "Run the lab"]
    assert any(s["data"] for s in plotly_specs(again))


@pytest.mark.processes
def test_lab_cancel_stops_it(home):
    ws, _ = home
    at = app({"data": "sample/emoji"})
    goto(at, "lab")
    _lab_settings(at, [5, 10], epochs=3)
    button(at, "Run the lab").click().run()
    # running (past loading the backbone), with its step in the progress line
    until(at, lambda a: any("Starting" not in t and "Waiting" not in t and "since the click" in t
                            for t in progress_texts(a)), what="the lab's first step")
    button(at, "Cancel").click().run()
    until(at, lambda a: not a.get("progress"), timeout=60, what="the cancel")
    assert_clean(at)
    assert any("cancelled" in c.value for c in at.caption)
    assert button(at, "Run the lab")
    [task] = ws.store().tasks(kind="lab")
    assert task["status"] == "cancelled"


# --------------------------------------------------------------------------------------------------
# Runs & export: a verified TorchScript download (ONNX and the HTML report: the browser test, test_browser.py)
# --------------------------------------------------------------------------------------------------
@pytest.mark.processes
def test_runs_page_offers_a_verified_torchscript_download_that_a_refresh_finds_again(home):
    ws, run_id = home
    at = app()
    goto(at, "runs")
    at.multiselect[0].set_value([run_id]).run()
    assert_clean(at)
    offered = [b.label for b in at.button]
    assert "Export ONNX" in offered and "Prepare the HTML report" in offered
    button(at, "Export TorchScript").click().run()
    until(at, lambda a: any(s.value.startswith("Verified on") for s in a.success), what="the TorchScript export")
    assert_clean(at)
    [text] = [s.value for s in at.success if s.value.startswith("Verified on")]
    n = int(text.split("Verified on ", 1)[1].split(" ", 1)[0])
    assert n >= 10 and f"same top-1 class on {n}/{n} images" in text
    diff = float(text.split("largest probability difference ", 1)[1].split(" ", 1)[0])
    assert diff <= 1e-4
    buttons = {d.proto.label: d.proto.help for d in at.get("download_button")}
    model = [lab for lab in buttons if lab.startswith("Model .pt (")]
    assert model and buttons[model[0]] == f"Saved as tl-studio-{run_id}.pt.", buttons
    assert f"Saved as tl-studio-{run_id}.pt.json" in buttons["Classes and preprocessing (.json)"]
    assert not [b for b in at.button if b.label == "Export TorchScript"]  # the downloads took its place
    [task] = ws.store().tasks(kind="export")
    assert task["params"]["format"] == "torchscript"
    assert (tasks.task_dir(ws, task["id"]) / f"tl-studio-{run_id}.pt").stat().st_size > 1_000_000
    # a new session (a refresh) finds the export without exporting again
    again = app()
    goto(again, "runs")
    again.multiselect[0].set_value([run_id]).run()
    assert len([s for s in again.success if s.value.startswith("Verified on")]) == 1
    assert len([d for d in again.get("download_button") if d.proto.label.startswith("Model .")]) == 1
    assert len(ws.store().tasks(kind="export")) == 1
