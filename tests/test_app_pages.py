"""Page tests of the Streamlit app with ``streamlit.testing.v1.AppTest`` (no browser).

The harness (fixtures, helpers) is tests/page_harness.py: one real linear-probe run on the emoji sample is
trained once per session with the ``tl-core`` command; every test gets its own copy of that workspace
(``TL_HOME``), so tests never see each other's runs or tasks.
Long computations are tasks that real worker processes run (``tl_core.runs.workers``): a test clicks,
then reruns the page until the result is drawn (:func:`until`). Where a test looks at the queue itself,
``no_workers`` keeps tasks queued. Short tasks (Try it, the augmentation preview, a bundle, the open-set views)
run in threads of the test process (``task_threads``: the workers' own claim-and-run code, no worker process);
the tests whose point is a process (a real worker cancelled, a dead worker noticed, a fresh interpreter that must
not import torch) and the two about the queue across sessions and a server restart (the full audit, whose t-SNE
does not stop at a cancel) keep real worker processes. Workers a test started are killed when it ends.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from page_harness import (  # noqa: F401  (fixtures are used by name)
    APP,
    EMOJI,
    ROOT,
    app,
    assert_clean,
    button,
    empty_home,
    goto,
    has_button,
    has_metric,
    home,
    metric,
    no_workers,
    task_threads,
    plotly_specs,
    png_bytes,
    progress_texts,
    sample_zip,
    trained_home,
    until,
)
from streamlit.testing.v1 import AppTest
from test_uploads import tasks_in_process  # noqa: F401  (uploads are intake tasks: run here, in the fast tier)

from tl_core.data import library
from tl_core.errors import DatasetError
from tl_core.runs import tasks, workers
from tl_core.runs.datasets import delete_dataset
from tl_core.storage.files import RunFiles
from tl_core.share.progress import describe_progress
from tl_core.storage.workspace import Workspace


# --------------------------------------------------------------------------------------------------
# every page renders, with and without runs
# --------------------------------------------------------------------------------------------------
PAGES = ["home", "data", "backbone", "train", "evaluate", "try_it", "runs", "lab"]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_errors_on_an_empty_workspace(empty_home, page):
    at = app()
    if page != "home":
        goto(at, page)
    assert_clean(at)
    assert at.title, "every page has a title"


def test_pages_without_a_run_point_to_the_next_step(empty_home):
    at = app()
    goto(at, "evaluate")
    assert any("No finished run" in i.value for i in at.info)
    goto(at, "train")
    assert any("Choose a dataset first" in i.value for i in at.info)
    goto(at, "runs")
    assert any("No runs yet" in i.value for i in at.info)


# --------------------------------------------------------------------------------------------------
# Home
# --------------------------------------------------------------------------------------------------
def test_home_explains_and_shows_the_state_of_the_four_steps(home):
    ws, run_id = home
    at = app()
    assert_clean(at)
    text = " ".join(m.value for m in at.markdown)
    assert "Transfer learning" in text
    for step in ("1. Data", "2. Backbone", "3. Train", "4. Evaluate & try"):
        assert f"**{step}**" in text
    assert "Not chosen yet" in text  # no dataset yet in a fresh session
    assert "1 finished run(s)" in text
    # the Train step names the finished run (never "no run yet" beside finished runs)
    assert f"Run {run_id}: done" in text and "No run yet" not in text


@pytest.mark.slow
def test_home_sample_data_button_selects_emoji_lite0_auto_and_opens_train(home, task_threads):
    at = app()
    button(at, "Try it with sample data").click().run()
    assert_clean(at)
    assert at.title[0].value == "Train"
    assert at.session_state["dataset"] == "sample/emoji"
    assert at.session_state["backbone"] == "efficientnet_lite0"
    assert at.query_params["data"] == "sample/emoji"
    assert at.query_params["backbone"] == "efficientnet_lite0"
    strategy = [r for r in at.radio if r.label == "Strategy"][0]
    assert strategy.value == "auto"  # the default strategy
    assert any("emoji" in m.value and "5 classes" in m.value for m in at.markdown)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def test_data_page_on_the_emoji_sample_shows_the_report(home):
    at = app()
    goto(at, "data")
    at.selectbox[0].set_value("sample/emoji").run()
    assert_clean(at)
    assert at.query_params["data"] == "sample/emoji"
    assert metric(at, "Classes") == "5"
    assert metric(at, "Images") == "200"
    assert metric(at, "Training") == "160"
    assert metric(at, "Validation") == "40"
    assert metric(at, "Skipped files") == "0"
    bars = plotly_specs(at)[0]["data"]
    assert sum(sum(b["y"]) for b in bars) == 200
    assert sorted(bars[0]["x"]) == ["animal", "face", "flag", "food", "vehicle"]
    split = at.dataframe[0].value
    assert split["train"].sum() == 160 and split["val"].sum() == 40
    # a thumbnail grid per class: 8 images for each of the 5 classes
    assert sum(len(img.proto.imgs) for img in at.get("image")) == 40


def test_data_page_zip_upload_unpacks_into_the_workspace_and_reports_skipped_files(home, tasks_in_process):
    ws, _ = home
    at = app()
    goto(at, "data")
    data = sample_zip({"pets/animal/notes.txt": b"not an image", "pets/flag/broken.png": b"\x89PNG garbage"})
    at.file_uploader(key="zip_upload").set_value(("My Pets!.zip", data, "application/zip")).run()
    assert_clean(at)
    folder = ws.datasets_dir / "My_Pets"
    assert folder.is_dir(), list(ws.datasets_dir.iterdir())
    assert at.session_state["dataset"] == "workspace/My_Pets"
    assert at.query_params["data"] == "workspace/My_Pets"
    assert metric(at, "Classes") == "2"
    assert metric(at, "Images") == "6"
    assert metric(at, "Skipped files") == "2"
    skipped = " ".join([d.value for d in at.dataframe if "reason" in d.value.columns][0]["reason"])
    assert "not an image file (.txt)" in skipped and "not a readable image" in skipped
    assert any("fewer than 10 images" in w.value for w in at.warning)
    # the next rerun does not unpack the same upload again
    at.run()
    assert sorted(p.name for p in ws.datasets_dir.iterdir() if not p.name.startswith(".")) == ["My_Pets"]


def test_data_page_zip_with_a_labels_csv_is_sorted_into_class_folders(home, tasks_in_process, tmp_path):
    ws, _ = home
    secret = tmp_path / "secret.png"
    secret.write_bytes(sorted((EMOJI / "face").iterdir())[0].read_bytes())
    buf = io.BytesIO()
    rows = ["path,label"]
    with zipfile.ZipFile(buf, "w") as zf:
        for cls in ("animal", "vehicle"):
            for n, f in enumerate(sorted((EMOJI / cls).iterdir())[:3]):
                zf.write(f, f"shots/img_{cls}_{n}.png")
                rows.append(f"img_{cls}_{n}.png,{cls}")
        rows += [f"{secret},animal", "../../secret.png,animal", "missing.png,vehicle"]
        zf.writestr("shots/labels.csv", "\n".join(rows))
    at = app()
    goto(at, "data")
    at.file_uploader(key="zip_upload").set_value(("flat.zip", buf.getvalue(), "application/zip")).run()
    assert_clean(at)
    folder = ws.datasets_dir / "flat"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["animal", "vehicle"]
    assert len(list((folder / "animal").iterdir())) == 3
    assert metric(at, "Classes") == "2" and metric(at, "Images") == "6"
    reasons = " ".join([d.value for d in at.dataframe if "reason" in d.value.columns][0]["reason"])
    assert reasons.count("outside the archive") == 2 and "not found" in reasons
    assert not any(f.read_bytes() == secret.read_bytes() for f in folder.rglob("*.png"))


def test_data_page_refuses_an_unsafe_zip_with_one_sentence(home, tasks_in_process):
    ws, _ = home
    at = app()
    goto(at, "data")
    at.file_uploader(key="zip_upload").set_value(
        ("evil.zip", sample_zip({"../escape.png": png_bytes(next((EMOJI / "face").iterdir()))}), "application/zip")
    ).run()
    assert not at.exception
    assert len(at.error) == 1 and "unsafe path" in at.error[0].value
    assert not (ws.datasets_dir / "evil").exists() and not (ws.datasets_dir.parent / "escape.png").exists()
    at.file_uploader(key="zip_upload").set_value(("photo.zip", b"this is not a zip", "application/zip")).run()
    assert not at.exception
    assert "not a zip archive" in at.error[0].value


def test_data_page_builds_a_dataset_class_by_class(home):
    ws, _ = home
    at = app()
    goto(at, "data")
    for cls, src in (("cats", "animal"), ("flags", "flag")):
        at.text_input(key="build_name").set_value("My Photos")
        at.text_input(key="build_class").set_value(cls)
        files = [(f.name, f.read_bytes(), "image/png") for f in sorted((EMOJI / src).iterdir())[:4]]
        uploader = [u for u in at.file_uploader if u.label == "Images of this class"][0]
        uploader.set_value(files + [("readme.png", b"nope", "image/png")])
        at.run()
        button(at, "Add to dataset").click().run()
        assert not at.exception
        assert any(f"Added 4 image(s) to class '{cls}'" in s.value for s in at.success)
        assert any("readme.png" in w.value for w in at.warning)
    assert sorted(p.name for p in (ws.datasets_dir / "My_Photos").iterdir()) == ["cats", "flags"]
    assert at.session_state["dataset"] == "workspace/My_Photos"
    assert metric(at, "Classes") == "2" and metric(at, "Images") == "8"


# --------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------
def test_backbone_page_lists_the_catalogue_and_recommends_the_offline_default(home):
    at = app()
    goto(at, "backbone")
    assert_clean(at)
    table = at.dataframe[0].value
    assert len(table) >= 3
    lite0 = table[table["backbone"] == "efficientnet_lite0"].iloc[0]
    assert lite0["offline"] == "yes" and lite0["weights"] == "packaged"
    assert lite0["ImageNet top-1 (%)"] == pytest.approx(74.83)
    assert any("Safe default: efficientnet_lite0" in s.value for s in at.success)
    at.selectbox[0].set_value("efficientnet_lite1").run()
    assert at.query_params["backbone"] == "efficientnet_lite1"
    online = [n for n in table["backbone"] if table[table["backbone"] == n].iloc[0]["offline"] != "yes"]
    if online:
        at.selectbox[0].set_value(online[0]).run()
        assert any("fails offline" in w.value for w in at.warning)


@pytest.mark.slow
def test_backbone_page_accepts_fitting_local_weights_and_refuses_others(home, tmp_path, task_threads):
    import timm
    from safetensors.torch import save_file

    ws, _ = home
    at = app()
    goto(at, "backbone")
    # random bytes with a .pth name: refused with one sentence
    at.file_uploader(key="weights_upload").set_value(("junk.pth", b"\x00" * 100, "application/octet-stream")).run()
    assert not at.exception
    assert len(at.error) == 1 and "junk.pth" in at.error[0].value
    assert not list((ws.home / "weights").glob("junk*"))
    # real weights of the architecture (random init here: only the fit is checked; a worker checks them)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=7)
    f = tmp_path / "lite0 mine.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(f))
    at.file_uploader(key="weights_upload").set_value((f.name, f.read_bytes(), "application/octet-stream")).run()
    assert_clean(at)
    assert (ws.home / "weights" / "lite0_mine.safetensors").is_file()
    assert at.session_state["weights"] == "lite0_mine.safetensors"
    assert at.query_params["weights"] == "lite0_mine.safetensors"
    assert any("Training will use it" in s.value for s in at.success)


# --------------------------------------------------------------------------------------------------
# Train
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_page_settings_help_and_augmentation_preview(home, task_threads):
    at = app({"data": "sample/emoji"})
    goto(at, "train")
    assert_clean(at)
    strategy = [r for r in at.radio if r.label == "Strategy"][0]
    assert strategy.options == ["Linear probe (frozen backbone)", "Partial fine-tuning (last blocks)",
                                "Full fine-tuning", "Automatic (try and compare)", "From scratch (no pretraining)"]
    assert "logistic regression" in " ".join(strategy.proto.captions)
    lr = [s for s in at.select_slider if s.label == "Learning rate"][0]
    assert lr.disabled  # auto (the default) sets no learning rate of its own
    strategy.set_value("full").run()
    assert_clean(at)
    lr = [s for s in at.select_slider if s.label == "Learning rate"][0]
    assert not lr.disabled and lr.value == pytest.approx(1e-3)
    assert [n for n in at.number_input if n.label == "Epochs"][0].value == 8
    # preview: 4 sample images x 4 augmented views, drawn by an interactive worker
    until(at, lambda a: len([g for g in a.get("image") if len(g.proto.imgs) == 4]) == 4, what="the preview")
    assert_clean(at)
    grids = [g for g in at.get("image") if len(g.proto.imgs) == 4]
    assert [g.proto.imgs[0].caption for g in grids] == [sorted((EMOJI / c).iterdir())[0].name
                                                       for c in ("animal", "face", "flag", "food")]
    ws, _ = home
    task = [t for t in ws.store().tasks(kind="augment_preview")][-1]
    assert task["lane"] == "interactive" and task["status"] == "done"
    with Image.open(tasks.task_dir(ws, task["id"]) / "aug-0-0.png") as im:
        assert im.size == (224, 224)  # the backbone's input size


def test_train_page_start_queues_a_run_with_the_chosen_settings_and_cancel_stops_it(home, no_workers):
    ws, _ = home
    at = app({"data": "sample/emoji"})
    goto(at, "train")
    [r for r in at.radio if r.label == "Strategy"][0].set_value("partial").run()
    [n for n in at.number_input if n.label == "Epochs"][0].set_value(3).run()
    [n for n in at.number_input if n.label == "Seed"][0].set_value(7).run()
    [r for r in at.radio if r.label == "Augmentation"][0].set_value("strong").run()
    button(at, "Start training").click().run()
    assert_clean(at)
    run_id = at.query_params["run"]
    run = ws.store().get(run_id)
    assert run["status"] == "queued"
    assert Path(run["data"]) == EMOJI
    cfg = run["config"]
    assert (cfg["strategy"], cfg["epochs"], cfg["seed"], cfg["augment"], cfg["backbone"]) == (
        "partial", 3, 7, "strong", "efficientnet_lite0")
    assert any(f"Run {run_id}" == h.value for h in at.subheader)
    assert any("**Status:** queued" in m.value for m in at.markdown)
    # its place in the queue while it waits (no worker here)
    assert any(t.startswith("Waiting in the queue: next in line") for t in progress_texts(at)), progress_texts(at)
    [train_task] = ws.store().tasks(kind="train")
    assert train_task["run_id"] == run_id and train_task["status"] == "queued"
    button(at, "Cancel training").click().run()
    at.run()
    assert ws.store().get(run_id)["status"] == "cancelled"
    assert ws.store().task(train_task["id"])["status"] == "cancelled"
    assert any("**Status:** cancelled" in m.value for m in at.markdown)


@pytest.mark.processes
def test_cancel_on_the_train_page_really_stops_the_worker(home):
    """A real worker process: Start, wait until it trains, Cancel, and the process is gone."""
    ws, _ = home
    at = app({"data": "sample/emoji"})
    goto(at, "train")
    [r for r in at.radio if r.label == "Strategy"][0].set_value("full").run()
    button(at, "Start training").click().run()
    run_id = at.query_params["run"]
    store = ws.store()
    deadline = time.monotonic() + 120
    while store.get(run_id)["status"] != "running" or not store.get(run_id)["pid"]:
        assert store.get(run_id)["status"] in ("queued", "running"), store.get(run_id)
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.2)
    pid = store.get(run_id)["pid"]
    at.run()
    assert any("**Status:** running" in m.value for m in at.markdown)
    button(at, "Cancel training").click().run()
    assert_clean(at)
    deadline = time.monotonic() + 60
    while store.get(run_id)["status"] == "running":
        assert time.monotonic() < deadline, "cancel did not stop the run"
        time.sleep(0.2)
    assert store.get(run_id)["status"] == "cancelled"
    while _alive(pid):  # the worker finishes its loop (no run left) and exits
        assert time.monotonic() < deadline, f"worker {pid} still alive"
        time.sleep(0.2)
    at.run()
    assert any("**Status:** cancelled" in m.value for m in at.markdown)
    # the run draws no progress any more (the augmentation preview, a task of its own, may still be drawing)
    bars = [p.proto.text for p in at.get("progress")]
    assert not [t for t in bars if not t.startswith("Drawing augmented images")], bars


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_train_page_shows_a_running_job_with_progress_eta_and_curves(home, no_workers):
    ws, _ = home
    store = ws.store()
    run_id = store.create_run(str(EMOJI), {"backbone": "efficientnet_lite0", "strategy": "full"}, status="running")
    store.update(run_id, pid=os.getpid(), progress={"stage": "train", "epoch": 2, "epochs": 4, "done": 10,
                                                    "total": 20, "eta_s": 75.0})
    store.add_epoch(run_id, 1, {"train_loss": 1.2, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.6,
                                "lr": 1e-3, "seconds": 30.0})
    at = app({"run": run_id, "data": "sample/emoji"})
    goto(at, "train")
    assert_clean(at)
    bar = at.get("progress")[0]
    assert bar.proto.value == 50
    assert "epoch 2/4" in bar.proto.text and "about 1 min 15 s left" in bar.proto.text
    assert "s since the click" in bar.proto.text  # times count from the click (the run's creation)
    curves = plotly_specs(at)[0]["data"]
    assert {t["name"] for t in curves} == {"training", "validation"}
    assert button(at, "Cancel training")


@pytest.mark.slow
def test_refresh_with_the_run_link_shows_the_same_run(home, task_threads):
    ws, run_id = home
    at = app({"run": run_id, "data": "sample/emoji", "backbone": "efficientnet_lite1"})
    goto(at, "train")
    assert_clean(at)
    assert at.session_state["run"] == run_id and at.session_state["backbone"] == "efficientnet_lite1"
    assert any(h.value == f"Run {run_id}" for h in at.subheader)
    assert any("**Status:** done" in m.value for m in at.markdown)
    acc = ws.store().get(run_id)["summary"]["val_accuracy"]
    assert any(f"validation accuracy **{acc:.1%}**" in s.value for s in at.success)
    curves = plotly_specs(at)[0]["data"]
    assert len(curves[0]["x"]) == len(ws.store().epochs(run_id))
    assert at.query_params["run"] == run_id  # still in the address after the page switch
    # the fresh session's form starts from the shown run's settings
    assert [r for r in at.radio if r.label == "Strategy"][0].value == "linear"
    # (trained with --features last; the form's default is auto. A linear run has no epochs to carry over.)
    assert [b for b in at.selectbox if b.label == "Features"][0].value == "last"


@pytest.mark.slow
def test_a_finetune_says_how_it_stopped_and_what_would_change_it(home, task_threads):
    ws, run_id = home
    store = ws.store()
    src = store.get(run_id)
    new = store.create_run(src["data"], {**src["config"], "strategy": "full", "epochs": 20}, status="done")
    stop = {"reason": "patience", "epoch": 4, "epochs": 20, "patience": 4}
    store.update(new, summary={**src["summary"], "best_epoch": 0, "stop": stop}, weights=src["weights"])
    at = app({"run": new, "data": "sample/emoji"})
    goto(at, "train")
    assert_clean(at)
    [why] = [i.value for i in at.info if i.value.startswith("Stopped at")]
    assert why.startswith("Stopped at epoch 4 of 20: validation accuracy did not improve for 4 epochs")
    assert "never beat the linear probe" in why and "more epochs would stop at the same place" in why
    store.update(new, summary={**src["summary"], "best_epoch": 20, "stop": {**stop, "reason": "epochs", "epoch": 20}})
    at = app({"run": new, "data": "sample/emoji"})
    goto(at, "train")
    assert any(i.value == "Ran all 20 epochs and was still improving at the last one: more epochs may help."
               for i in at.info)
    # the linear probe's own run says nothing about fine-tuning epochs
    at = app({"run": run_id, "data": "sample/emoji"})
    goto(at, "train")
    assert not [i for i in at.info if i.value.startswith(("Stopped at", "Ran all"))]


def test_unknown_or_hostile_url_values_are_ignored(home):
    at = app({"data": "../../etc", "run": "nope", "backbone": "<script>", "weights": "../../../etc/passwd"})
    goto(at, "train")
    assert_clean(at)
    for key in ("dataset", "run", "backbone", "weights"):
        assert key not in at.session_state
    assert "data" not in at.query_params and "run" not in at.query_params


# --------------------------------------------------------------------------------------------------
# Evaluate
# --------------------------------------------------------------------------------------------------
def test_evaluate_shows_accuracy_per_class_confusion_and_mistakes(home):
    ws, run_id = home
    metrics = json.loads((ws.run_dir(run_id) / "metrics.json").read_text())
    at = app()
    goto(at, "evaluate")
    assert_clean(at)
    assert at.selectbox[0].value == run_id
    # the accuracy shows once, as the headline figure (not again beside the per-split figures)
    assert not has_metric(at, "Accuracy")
    count = int(metric(at, "Validation images"))
    assert count == metrics["val"]["count"] == 40
    # validation and cross-validation side by side, each with its interval
    assert metric(at, "Validation accuracy") == f"{metrics['val']['accuracy']:.1%}"
    assert metric(at, f"Cross-validated ({metrics['cv']['folds']} folds) accuracy") == f"{metrics['cv']['accuracy']:.1%}"
    assert any(c.value.startswith("95% CI ") and f"of {metrics['cv']['count']}" in c.value for c in at.caption)
    # so do macro F1 and the calibration error (bootstrap)
    for key in ("macro_f1_ci", "ece_ci"):
        lo, hi = metrics["val"][key]
        assert f"95% CI {lo:.3f}–{hi:.3f} (bootstrap)" in [c.value for c in at.caption], key
    # a linear run's head is refitted on train + validation by default: the page says what the figures measure
    assert any("fitted again on training + validation" in c.value for c in at.caption)
    # the probe's features: this run set the last layer (its mistakes feed the fix-in-place tests); an auto run's
    # line names the fold count and the scores compared
    feats = json.loads((ws.run_dir(run_id) / "meta.json").read_text())["features"]
    [line] = [c.value for c in at.caption if c.value.startswith("Features: ")]
    assert feats["variant"] == "last" and feats["chosen_by"] == "setting" and line == "Features: the last layer (C=1)."
    from tl_core.share.progress import features_text

    auto = {"variant": "depths", "linear_c": 1.0, "chosen_by": "cross-validation", "folds": 5,
            "cv": {"last@1": 0.803, "depths@1": 0.877, "depths@0.3": 0.85}}
    assert features_text(auto) == ("Features: several depths (C=1), chosen by 5-fold cross-validation "
                                   "(0.877 vs 0.803 for the last layer)")
    heat = plotly_specs(at)[0]["data"][0]
    assert heat["type"] == "heatmap"
    assert sum(sum(row) for row in heat["z"]) == count
    assert heat["x"] == heat["y"] == ["animal", "face", "flag", "food", "vehicle"]
    assert at.table[0].value.to_numpy().sum() == count
    per_class = at.dataframe[0].value
    assert list(per_class.index) == heat["x"] and per_class["support"].sum() == count
    # row-normalised: every row sums to 1
    [r for r in at.radio if r.label == "Show"][0].set_value("Row-normalised").run()
    heat = plotly_specs(at)[0]["data"][0]
    assert all(sum(row) == pytest.approx(1.0) for row in heat["z"])
    # gallery: one image per misclassified validation image, most confident first, from the saved predictions
    files = RunFiles(ws.run_dir(run_id))
    wrong = files.predictions().get("val").mistakes(files.meta().classes, files.meta().temperature)
    assert wrong, "the fixture run makes a few mistakes"
    assert len(at.get("image")) == len(wrong)
    captions = [c.value for c in at.caption if c.value.startswith("true ")]
    assert captions == [f"true **{r['true']}** · predicted **{r['predicted']}** · {r['confidence']:.0%}"
                        for r in wrong]


# --------------------------------------------------------------------------------------------------
# Try it
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_try_it_predicts_uploaded_images_with_top_k_and_csv(home, task_threads):
    ws, run_id = home
    at = app()
    goto(at, "try_it")
    assert_clean(at)
    files = [(f"{cls}.png", sorted((EMOJI / cls).iterdir())[-1].read_bytes(), "image/png")
             for cls in ("animal", "flag", "vehicle")]
    at.file_uploader[0].set_value(files + [("broken.jpg", b"not a jpeg", "image/jpeg")]).run()
    assert_clean(at)
    preds = [m.value for m in at.markdown if "→" in m.value]
    assert len(preds) == 3
    hits = sum(m.startswith(f"**{cls}.png** → **{cls}**") for m, cls in zip(preds, ("animal", "flag", "vehicle")))
    assert hits >= 2, preds
    assert any("broken.jpg" in w.value for w in at.warning)
    charts = plotly_specs(at)
    assert len(charts) == 3 and len(charts[0]["data"][0]["y"]) == 3  # top-3 bars
    assert sum(charts[0]["data"][0]["x"]) <= 1.0 + 1e-6
    assert at.get("download_button"), "a CSV download for several images"


@pytest.mark.slow
def test_try_it_handles_odd_images_without_a_traceback(home, task_threads):
    def png(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()

    odd = [
        ("one-pixel.png", png(Image.new("RGB", (1, 1), "red")), "image/png"),
        ("gray16.png", png(Image.new("I;16", (40, 30), 30000)), "image/png"),
        ("transparent.png", png(Image.new("RGBA", (50, 80), (0, 0, 0, 0))), "image/png"),
        ("palette.png", png(Image.new("P", (64, 64))), "image/png"),
        ("empty.jpg", b"", "image/jpeg"),
    ]
    at = app()
    goto(at, "try_it")
    at.file_uploader[0].set_value(odd).run()
    assert not at.exception
    assert len([m for m in at.markdown if "→" in m.value]) == 4
    # blank and one-pixel images may be called unlike the training images: that is right, and not an error
    unreadable = [w.value for w in at.warning if "Unlike your training images" not in w.value]
    assert len(unreadable) == 1 and "empty.jpg" in unreadable[0]


def test_class_by_class_names_cannot_escape_the_workspace(home):
    ws, _ = home
    at = app()
    goto(at, "data")
    at.text_input(key="build_name").set_value("../../outside")
    at.text_input(key="build_class").set_value("../../../etc")
    f = sorted((EMOJI / "food").iterdir())[0]
    [u for u in at.file_uploader if u.label == "Images of this class"][0].set_value([("../x.png", f.read_bytes(), "image/png")])
    at.run()
    button(at, "Add to dataset").click().run()
    assert not at.exception
    assert (ws.datasets_dir / "outside" / "etc" / "x.png").is_file()
    assert not (ws.home.parent / "outside").exists()
    # one class so far: said in one sentence, as the next step (not an error)
    assert not at.error and any("at least two classes" in i.value for i in at.info)


@pytest.mark.slow
def test_try_it_accepts_a_camera_picture(home, task_threads):
    at = app()
    goto(at, "try_it")
    [t for t in at.toggle if t.label == "Use the camera"][0].set_value(True).run()
    buf = io.BytesIO()
    Image.open(sorted((EMOJI / "food").iterdir())[0]).convert("RGB").save(buf, "JPEG")
    at.camera_input[0].set_value(("shot.jpg", buf.getvalue(), "image/jpeg")).run()
    assert_clean(at)
    assert any(m.value.startswith("**camera.jpg** → **") for m in at.markdown)


# --------------------------------------------------------------------------------------------------
# Runs & export
# --------------------------------------------------------------------------------------------------
def _duplicate_run(ws: Workspace, run_id: str) -> str:
    """A second finished run with the first one's files and history (to compare two runs)."""
    store = ws.store()
    src = store.get(run_id)
    new = store.create_run(src["data"], {**src["config"], "seed": 1}, status="done")
    store.update(new, summary={**src["summary"], "val_accuracy": 0.9}, weights=src["weights"])
    for e in store.epochs(run_id)[:20]:
        store.add_epoch(new, e["epoch"], {k: v for k, v in e.items() if k != "epoch"})
    shutil.copytree(ws.run_dir(run_id), ws.run_dir(new))
    return new


@pytest.mark.slow
def test_runs_page_compares_downloads_and_deletes(home, task_threads):
    ws, run_id = home
    other = _duplicate_run(ws, run_id)
    at = app()
    goto(at, "runs")
    assert_clean(at)
    table = at.dataframe[0].value
    assert set(table["Run"]) == {run_id, other}
    assert set(table["Strategy"]) == {"Linear probe"}
    assert table["Val accuracy"].max() == pytest.approx(ws.store().get(run_id)["summary"]["val_accuracy"])
    at.multiselect[0].set_value([run_id, other]).run()
    assert_clean(at)
    curves = plotly_specs(at)[0]["data"]
    assert {t["legendgroup"].rsplit("-", 1)[0] for t in curves} == {run_id, other}
    compare = at.table[0].value
    assert list(compare.columns) == [run_id, other]
    assert compare.loc["Val images", run_id] == "40"
    # how sure: the accuracy with its interval, and the copy's difference, image by image, within noise
    assert "(95% CI " in compare.loc["Val accuracy", run_id] and " of 40)" in compare.loc["Val accuracy", run_id]
    diff = compare.loc[f"Val accuracy vs {run_id}", other]
    assert diff.startswith("+0.0 points, within noise") and "same images" in diff, diff
    assert "Val 95% CI" in table.columns and "CV accuracy" in table.columns
    # download: prepare the bundle (a worker writes it), then a real zip is offered
    assert [b.label for b in at.button].count("Prepare bundle") == 2  # one per selected run
    [b for b in at.button if b.key == f"exp-bundle-{run_id}-start"][0].click().run()
    until(at, lambda a: any(d.proto.label == "Download bundle" for d in a.get("download_button")), what="the bundle")
    assert_clean(at)
    [task] = ws.store().tasks(kind="export")
    bundle = tasks.task_dir(ws, task["id"]) / f"tl-studio-{run_id}.zip"
    with zipfile.ZipFile(bundle) as zf:
        assert {"model.safetensors", "meta.json", "config.json", "MODEL_CARD.md"} <= set(zf.namelist())
    assert [b.label for b in at.button].count("Prepare bundle") == 1  # the other run's is still offered
    # delete the copy
    at.checkbox(key="confirm_delete").check().run()
    button(at, "Delete").click().run()
    assert_clean(at)
    assert [r["id"] for r in ws.store().list()] == []
    assert not ws.run_dir(other).exists() and not ws.run_dir(run_id).exists()
    assert any("No runs yet" in i.value for i in at.info)


# --------------------------------------------------------------------------------------------------
# datasets you manage, and what a new user ran into in the first hour
# --------------------------------------------------------------------------------------------------
def _uploaded_refs(at: AppTest) -> list[str]:
    picker = [s for s in at.selectbox if s.label == "Dataset"][0]
    return [o for o in picker.options if "(uploaded)" in o]


def test_data_page_refuses_a_one_class_zip_with_one_message_and_saves_nothing(home, tasks_in_process):
    ws, _ = home
    at = app()
    goto(at, "data")
    # the zip uploader comes first; the labels CSV is its advanced option, shown on demand
    assert [u.label for u in at.file_uploader][0] == "Dataset .zip"
    assert "Labels CSV (optional)" not in [u.label for u in at.file_uploader]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted((EMOJI / "animal").iterdir())[:5]:
            zf.write(f, f"cats/cats/{f.name}")
    at.file_uploader(key="zip_upload").set_value(("cats.zip", buf.getvalue(), "application/zip")).run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "Only one class ('cats') found in cats.zip; a classifier needs at least two classes. Nothing was saved."]
    assert not [s for s in at.success if "Unpacked" in s.value]
    assert list(ws.datasets_dir.iterdir()) == []  # no dataset, no temporary folder
    assert _uploaded_refs(at) == [] and "dataset" not in at.session_state
    at.run()  # the next rerun neither unpacks it again nor shows a dataset
    assert list(ws.datasets_dir.iterdir()) == [] and _uploaded_refs(at) == []


def test_data_page_renames_and_deletes_an_uploaded_dataset(home, tasks_in_process):
    ws, _ = home
    at = app()
    goto(at, "data")
    at.file_uploader(key="zip_upload").set_value(("pets.zip", sample_zip(), "application/zip")).run()
    assert_clean(at)
    assert at.session_state["dataset"] == "workspace/pets"
    # rename
    at.text_input(key="rename_to").set_value("Garden birds!").run()
    at.button(key="rename_dataset").click().run()
    assert_clean(at)
    assert any("Renamed dataset 'pets' to 'Garden_birds'" in s.value for s in at.success)
    assert at.session_state["dataset"] == "workspace/Garden_birds"
    assert at.query_params["data"] == "workspace/Garden_birds"
    assert sorted(p.name for p in ws.datasets_dir.iterdir()) == ["Garden_birds"]
    assert metric(at, "Images") == "6" and at.text_input(key="rename_to").value == ""
    # delete, after confirming
    assert at.button(key="delete_dataset").disabled
    at.checkbox(key="confirm_delete_dataset").check().run()
    assert not at.button(key="delete_dataset").disabled
    at.button(key="delete_dataset").click().run()
    assert_clean(at)
    assert any("Deleted dataset 'Garden_birds'" in s.value for s in at.success)
    assert list(ws.datasets_dir.iterdir()) == []
    assert _uploaded_refs(at) == [] and "dataset" not in at.session_state and "data" not in at.query_params


def test_data_page_refuses_to_delete_a_dataset_a_queued_run_uses(home, no_workers):
    from tl_core.config import TrainConfig

    ws, _ = home
    folder = library.save_uploaded_zip(ws, "pets.zip", sample_zip())
    run_id = tasks.submit_training(ws, str(folder), TrainConfig())
    at = app({"data": "workspace/pets"})
    goto(at, "data")
    assert not at.exception
    [warn] = [w.value for w in at.warning if "in use by" in w.value]
    assert f"in use by run {run_id} (queued)" in warn and "cannot be renamed or deleted" in warn
    assert at.button(key="delete_dataset").disabled and at.checkbox(key="confirm_delete_dataset").disabled
    assert at.button(key="rename_dataset").disabled
    # the engine refuses too (another tab, a stale page), with the same reason
    with pytest.raises(DatasetError, match=f"in use by run {run_id}"):
        delete_dataset(ws, "pets")
    assert folder.is_dir()
    # once the run is cancelled, the dataset can go
    tasks.cancel_run(ws, run_id)
    at.run()
    at.checkbox(key="confirm_delete_dataset").check().run()
    at.button(key="delete_dataset").click().run()
    assert_clean(at)
    assert not folder.exists() and ws.store().exists(run_id)


def test_file_names_under_preview_thumbnails_are_shortened_not_wrapped():
    from pages._session import short_label

    assert short_label("baby_chick.png") == "baby_chick.png"  # short names are left alone
    long = short_label("IMG_20240612_153045_portrait_mode.jpeg")
    assert long == "IMG_2024….jpeg" and len(long) == 14
    assert len(short_label("a_name_without_any_extension_at_all")) == 14


RAW_NAMES = {"batch_size", "val_split", "val_accuracy", "test_accuracy", "best_epoch", "lr", "augment", "epochs",
             "seed", "strategy", "backbone"}


def _cells(df) -> list[str]:
    """The text of every cell that has a value (missing values are drawn as the table's placeholder)."""
    return [str(v) for v in df.to_numpy().ravel() if not pd.isna(v)]


def test_runs_and_backbone_tables_show_labels_and_values_not_none_or_field_names(home):
    ws, run_id = home
    store = ws.store()
    src = store.get(run_id)
    full = store.create_run(src["data"], {**src["config"], "strategy": "full", "lr": 0.001, "batch_size": 16,
                                          "epochs": 3, "augment": "light"}, status="done")
    store.update(full, summary={**src["summary"], "best_epoch": 2})
    cancelled = store.create_run(src["data"], {**src["config"], "strategy": "partial"}, status="cancelled")
    store.update(cancelled, error="Cancelled before it started.")
    at = app()
    goto(at, "runs")
    assert_clean(at)
    table = at.dataframe[0].value
    assert not RAW_NAMES & set(table.columns), list(table.columns)
    assert {"Batch size", "Learning rate", "Augmentation", "Val accuracy", "Best epoch"} <= set(table.columns)
    assert at.dataframe[0].proto.placeholder == "—"  # missing values show as a dash, not "None"
    assert "None" not in _cells(table)
    rows = table.set_index("Run")
    assert rows.loc[full, "Batch size"] == "16" and rows.loc[full, "Learning rate"] == "0.001"
    assert rows.loc[full, "Strategy"] == "Full fine-tuning" and rows.loc[full, "Augmentation"] == "Light"
    assert rows.loc[full, "Best epoch"] == 2 and str(table["Best epoch"].dtype) == "Int64"  # an int, not 2.0
    assert pd.isna(rows.loc[run_id, "Batch size"])  # the linear probe has no batches: blank
    # the comparison: readable row names, text values, a dash where a run has no value
    at.multiselect[0].set_value([run_id, full, cancelled]).run()
    assert_clean(at)
    compare = at.table[0].value
    assert not RAW_NAMES & {str(i) for i in compare.index}, list(compare.index)
    assert {"Batch size", "Validation share", "Learning rate", "Val accuracy"} <= set(compare.index)
    assert not {"None", "nan", "16.0", "NaN"} & set(_cells(compare)), compare
    assert compare.loc["Batch size", full] == "16" and compare.loc["Batch size", run_id] == "—"
    assert compare.loc["Validation share", run_id] == "20%"
    assert compare.loc["Val accuracy", cancelled] == "—"
    # each finished run shows how to serve it over HTTP (its run directory resolves from any shell) and a curl call
    serve = [c.value for c in at.code if "tl-core serve" in c.value]
    assert len(serve) == 2 and f"tl-core serve {ws.run_dir(run_id)} " in serve[0] + serve[1]
    assert all("curl -F files=@" in c and "/predict" in c for c in serve)
    # the backbone catalogue: speed not measured yet shows a dash
    goto(at, "backbone")
    assert_clean(at)
    assert at.dataframe[0].proto.placeholder == "—"
    assert at.dataframe[0].value["ms / image here"].isna().all()


@pytest.mark.slow
def test_a_cancelled_run_shows_one_sentence_and_no_chart_on_negative_axes(home, task_threads):
    from tl_core.share.figures import training_curves

    ws, _ = home
    store = ws.store()
    run_id = store.create_run(str(EMOJI), {"backbone": "efficientnet_lite0", "strategy": "full"}, status="cancelled")
    store.update(run_id, error="Cancelled before it started.")
    store.add_epoch(run_id, 0, {"train_loss": 1.6, "val_loss": 1.5, "train_acc": 0.3, "val_acc": 0.35})
    at = app({"run": run_id, "data": "sample/emoji"})
    goto(at, "train")
    assert_clean(at)
    assert [w.value for w in at.warning] == ["Cancelled before it started."]  # not "Cancelled: Cancelled…"
    assert not [s for s in plotly_specs(at) if "Loss" in json.dumps(s)]  # one epoch: no curves
    goto(at, "runs")
    at.multiselect[0].set_value([run_id]).run()
    assert_clean(at)
    assert not plotly_specs(at)
    assert any("No curves for" in c.value and run_id in c.value for c in at.caption)
    # a run still going is charted from its first epoch, on non-negative axes
    fig = training_curves({run_id: store.epochs(run_id)})
    assert fig.layout.xaxis.rangemode == "nonnegative" and fig.layout.yaxis.rangemode == "tozero"
    assert list(fig.layout.yaxis2.range) == [0, 1.02]


# --------------------------------------------------------------------------------------------------
# the engine functions the pages lean on (torch-free: the server imports them)
# --------------------------------------------------------------------------------------------------
def test_safe_name_keeps_uploads_inside_their_folder():
    assert library.safe_name("My Pets!") == "My_Pets"
    assert library.safe_name("../../etc/passwd") == "etc_passwd"
    assert library.safe_name(".hidden") == "hidden"
    assert library.safe_name("café crème") == "cafe_creme"
    assert library.safe_name("////", fallback="x") == "x"


def test_save_uploaded_zip_never_overwrites_and_rejects_empty_archives(empty_home):
    ws = empty_home
    a = library.save_uploaded_zip(ws, "pets.zip", sample_zip())
    b = library.save_uploaded_zip(ws, "pets.zip", sample_zip())
    assert (a.name, b.name) == ("pets", "pets-2")
    empty = io.BytesIO()
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(DatasetError, match="holds no images"):
        library.save_uploaded_zip(ws, "empty.zip", empty.getvalue())
    assert not [p for p in ws.datasets_dir.iterdir() if p.name.startswith(".")]  # temporary files cleaned up


def test_save_uploaded_zip_with_a_separate_labels_csv(empty_home):
    ws = empty_home
    buf = io.BytesIO()
    lines = ["file,class"]
    with zipfile.ZipFile(buf, "w") as zf:
        for cls in ("food", "flag"):
            for f in sorted((EMOJI / cls).iterdir())[:2]:
                zf.write(f, f"wrapper/{f.name}")
                lines.append(f"{f.name},{cls} / odd")
    folder = library.save_uploaded_zip(ws, "pics.zip", buf.getvalue(), labels_csv="\n".join(lines).encode())
    assert sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["flag_odd", "food_odd"]
    assert sum(1 for _ in folder.rglob("*.png")) == 4
    with pytest.raises(DatasetError, match="not UTF-8"):
        library.save_uploaded_zip(ws, "pics.zip", buf.getvalue(), labels_csv=b"\xff\xfe\x00bad")


def test_describe_progress_gives_stage_counts_and_time_left():
    frac, text = describe_progress("running", {"stage": "extract", "done": 50, "total": 200, "eta_s": 12})
    assert frac == pytest.approx(0.25) and text == "Computing features with the frozen backbone: 50/200 images · about 12 s left"
    frac, text = describe_progress("running", {"stage": "epoch", "epoch": 3, "epochs": 10},
                                               [{"seconds": 2.0}] * 3)
    assert frac == pytest.approx(0.3) and text.endswith("epoch 3/10 · about 14 s left")
    # the probe's epoch-0 record (an evaluation only) does not shorten the estimate
    _, text = describe_progress("running", {"stage": "epoch", "epoch": 3, "epochs": 10},
                                            [{"epoch": 0, "seconds": 0.1, "probe": True}] + [{"seconds": 2.0}] * 3)
    assert text.endswith("about 14 s left")
    assert describe_progress("queued", None)[1] == "Waiting in the queue"
    assert describe_progress("done", {"stage": "done"}) == (1.0, "Done")


def test_augmentation_preview_uses_the_backbone_input_size():
    from tl_core.models.preprocess import augmentation_preview

    paths = [sorted((EMOJI / "face").iterdir())[0]]
    [(name, views)] = augmentation_preview(paths, "efficientnet_lite1", "strong", copies=2)
    assert name == paths[0].name and len(views) == 2
    assert views[0].shape == (240, 240, 3) and views[0].dtype.name == "uint8"
    [(_, same)] = augmentation_preview(paths, "efficientnet_lite0", "none", copies=2)
    assert (same[0] == same[1]).all() and same[0].shape == (224, 224, 3)


# --------------------------------------------------------------------------------------------------
# Projects: a workspace per named project, selected by ?project=<slug>
# --------------------------------------------------------------------------------------------------
def _create_project(at: AppTest, name: str) -> str:
    at.sidebar.text_input(key="new_project_name").set_value(name)
    [b for b in at.sidebar.button if b.label == "Create project"][0].click().run()
    assert_clean(at)
    return at.query_params["project"]


def _listed_runs(at: AppTest) -> set[str]:
    goto(at, "runs")
    assert_clean(at)
    if any("No runs yet" in i.value for i in at.info):
        return set()
    return set(at.dataframe[0].value["Run"])


def test_a_new_project_gets_its_own_workspace_and_link(home, tasks_in_process):
    ws, run_id = home
    at = app()
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "Shared workspace" in sidebar
    assert any("every user without a project link sees" in c.value for c in at.sidebar.caption)
    slug = _create_project(at, "Birds of my garden")
    assert slug.startswith("birds-of-my-garden-") and len(slug) == len("birds-of-my-garden-") + 8
    assert any(f"**Project:** `{slug}`" in m.value for m in at.sidebar.markdown)
    assert at.sidebar.code[0].value.endswith(f"?project={slug}")
    assert (ws.home / "projects" / slug / "runs.sqlite").is_file()
    # the shared workspace's run is not in the project
    assert _listed_runs(at) == set()
    # an upload lands in the project's datasets, and the shared workspace does not list it
    goto(at, "data")
    at.file_uploader(key="zip_upload").set_value(("garden.zip", sample_zip(), "application/zip")).run()
    assert_clean(at)
    assert (ws.home / "projects" / slug / "datasets" / "garden").is_dir()
    assert not (ws.datasets_dir / "garden").exists()
    assert at.query_params["data"] == "workspace/garden" and at.query_params["project"] == slug
    shared = app()
    goto(shared, "data")
    assert "workspace/garden" not in shared.selectbox[0].options
    # leaving the project drops its selections and shows the shared runs again
    [b for b in at.sidebar.button if b.label == "Leave the project"][0].click().run()
    assert "project" not in at.query_params and "data" not in at.query_params
    assert _listed_runs(at) == {run_id}


def test_runs_of_one_project_are_not_listed_in_another(home):
    ws, shared_run = home
    a = ws.project("class-a-00000001", create=True)
    b = ws.project("class-b-00000002", create=True)
    run_a = a.store().create_run(str(EMOJI), {"backbone": "efficientnet_lite0", "strategy": "linear"}, status="failed")
    run_b = b.store().create_run(str(EMOJI), {"backbone": "efficientnet_lite0", "strategy": "full"}, status="cancelled")
    assert _listed_runs(app({"project": "class-a-00000001"})) == {run_a}
    assert _listed_runs(app({"project": "class-b-00000002"})) == {run_b}
    assert _listed_runs(app()) == {shared_run}
    # a run id of another project in the URL is not taken (it is not a run of this workspace)
    at = app({"project": "class-b-00000002", "run": run_a})
    assert "run" not in at.session_state
    goto(at, "evaluate")
    assert any("No finished run" in i.value for i in at.info)


def test_an_unknown_project_link_says_so_and_shows_nothing_else(home):
    at = app({"project": "nope-12345678"})
    assert not at.exception
    assert len(at.error) == 1 and "No project 'nope-12345678'" in at.error[0].value
    assert not at.title  # no page of any workspace in its place
    assert at.query_params["project"] == "nope-12345678"
    at = app({"project": "../../etc"})
    assert "not a valid project id" in at.error[0].value


# --------------------------------------------------------------------------------------------------
# upload limit, dead-worker checks while polling
# --------------------------------------------------------------------------------------------------
def test_every_uploader_states_the_servers_upload_limit(home):
    from streamlit import config

    old = config.get_option("server.maxUploadSize")
    config.set_option("server.maxUploadSize", 7)
    try:
        at = app()
        seen = {}
        for page in ("data", "backbone", "try_it"):
            goto(at, page)
            if page == "data":  # the labels CSV is the zip's advanced option
                at.toggle(key="use_labels_csv").set_value(True).run()
            assert_clean(at)
            for u in at.file_uploader:
                seen[u.label] = u.proto.help
        assert set(seen) == {"Labels CSV (optional)", "Dataset .zip", "Dataset folder", "Images of this class",
                             "Weights file", "Images"}
        assert all("Up to 7 MB" in h for h in seen.values()), seen
        goto(at, "data")
        assert any("Up to 7 MB" in c.value for c in at.caption)
    finally:
        config.set_option("server.maxUploadSize", old)


@pytest.mark.processes
def test_the_training_poll_notices_a_worker_killed_while_the_server_runs(home, monkeypatch):
    ws, _ = home
    from pages import _session

    calls = []
    real = _session.recover
    monkeypatch.setattr(_session, "recover", lambda w: calls.append(w.home) or real(w))
    at = app({"data": "sample/emoji"})  # the server is up (its start-up check has run)
    store = ws.store()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a worker killed while the server runs: its run still says 'running'
    run_id = store.create_run(str(EMOJI), {"backbone": "efficientnet_lite0", "strategy": "full"}, status="running")
    store.update(run_id, pid=dead.pid, progress={"stage": "train", "epoch": 1, "epochs": 4})
    n = len(calls)
    at.query_params["run"] = run_id
    goto(at, "train")
    assert not at.exception
    assert len(calls) == n + 1  # the poll looked for dead workers
    assert store.get(run_id)["status"] == "interrupted"
    assert "stopped unexpectedly" in store.get(run_id)["error"]
    assert any(w.value.startswith("Interrupted: The training process stopped unexpectedly") for w in at.warning)
    at.run()  # within 10 s of the last check, and no active run: not checked again
    assert len(calls) == n + 1


@pytest.mark.private_cache
def test_runs_page_shows_and_clears_the_cache(tmp_path, monkeypatch):
    """Issue 6: a way to clear the caches from the app."""
    import numpy as np

    from tl_core.cache import cache_usage

    home = tmp_path / "cache_home"
    monkeypatch.setenv("TL_HOME", str(home))
    ws = Workspace(home)
    f = ws.cache_dir / "features" / "k" / "ab" / "x.npy"
    f.parent.mkdir(parents=True)
    np.save(f, np.zeros(250_000, np.float32))  # 1 MB
    at = goto(app(), "runs")
    assert not at.exception
    assert any("features 1.0 MB" in c.value for c in at.caption)
    at.button(key="clear_cache").click().run()
    assert not at.exception and any("Freed 1.0 MB" in s.value for s in at.success)
    assert not any(cache_usage(ws.cache_dir).values())


# --------------------------------------------------------------------------------------------------
# the server never loads torch: every model runs in a worker
# --------------------------------------------------------------------------------------------------
def _imports_of(files: list[Path]) -> list[str]:
    import ast

    out = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", None) != "__future__":
                out.append(ast.unparse(node))
    return list(dict.fromkeys(out))


@pytest.mark.processes
def test_app_and_pages_import_neither_torch_nor_timm():
    """Every import of app.py and of every page, in a fresh interpreter: torch and timm stay out."""
    lines = _imports_of([APP, *sorted((ROOT / "pages").glob("*.py"))])
    assert any("tl_core.runs" in line for line in lines) and any("streamlit" in line for line in lines)
    code = "\n".join(lines) + "\nimport sys\nprint(sorted({'torch', 'timm', 'torchvision'} & set(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


_WALK = '''
import sys
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=120)
at.query_params.update({"data": "sample/emoji"})
at.run()
for page in ("data", "backbone", "train", "evaluate", "try_it", "runs", "lab", "home"):
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, (page, [e.value for e in at.exception])
    if page == "data":
        [b for b in at.button if b.label == "Check the data"][0].click().run()
    if page == "evaluate":
        for view in ("gradcam", "calibration", "map", "unknown"):
            at.button_group(key="eval_view").set_value(view).run()
    if page == "runs":
        at.multiselect[0].set_value([at.multiselect[0].options[0]]).run()
print(sorted({"torch", "timm", "torchvision"} & set(sys.modules)))
'''


@pytest.mark.processes
def test_walking_every_page_and_starting_tasks_loads_no_model_in_the_server(home):
    """The whole app in one fresh process, as a server runs it: every page, a data check, Grad-CAM, calibration
    and the map asked for. The work goes to worker processes; the page process never imports torch."""
    ws, _ = home
    # (the environment is this process's: the workers it starts are forked from the session's zygote; another
    # PYTHONPATH would need a zygote of its own, tl_core.storage.zygote; the app's folder is the working one)
    out = subprocess.run([sys.executable, "-c", _WALK, str(APP)], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    kinds = {t["kind"] for t in ws.store().tasks()}
    assert {"audit", "gradcam", "calibrate", "embedding_map", "augment_preview"} <= kinds, kinds


# --------------------------------------------------------------------------------------------------
# tasks on the pages: the queue, errors, cancel, a full queue, sharing, and a restart of the server
# --------------------------------------------------------------------------------------------------
def _audit_params(path: Path = EMOJI) -> dict:
    """The parameters the Data page gives its audit task (its key), for the default settings."""
    return {"data": str(path), "signature": library.dataset_signature(path), "backbone": "efficientnet_lite0",
            "val_split": 0.2, "seed": 0, "max_per_class": 200}


def _data_page(query: dict | None = None) -> AppTest:
    at = app({"data": "sample/emoji", **(query or {})})
    return goto(at, "data")


def test_a_queued_task_shows_its_place_in_the_queue_and_cancel_stops_it(home, no_workers):
    ws, _ = home
    ahead = tasks.submit(ws, "time_backbone", {"backbone": "resnet18"})  # waits for the same (absent) worker
    at = _data_page()
    assert_clean(at)
    button(at, "Check the data").click().run()
    assert_clean(at)
    task = tasks.find(ws, "audit", _audit_params())
    assert task is not None and task.status == "queued" and task.lane == "compute"
    [text] = progress_texts(at)
    assert text.startswith("Checking the data · Waiting in the queue: number 2 in line, 0 task(s) running (this "
                           "server runs 1 at a time) · waited "), text
    assert not has_button(at, "Check the data")  # the task is there: no second start
    tasks.cancel(ws, ahead.id)
    at.run()
    assert progress_texts(at)[0].startswith("Checking the data · Waiting in the queue: next in line")
    at.button(key="audit-cancel").click().run()
    at.run()
    assert tasks.get(ws, task.id).status == "cancelled"
    assert not at.get("progress")
    assert any("cancelled" in c.value for c in at.caption)
    assert has_button(at, "Check the data")  # it can be started again


def test_a_failed_task_shows_its_error_and_can_be_started_again(home, no_workers):
    ws, _ = home
    failed = tasks.submit(ws, "audit", _audit_params())
    store = ws.store()
    assert store.claim_task(failed.id, os.getpid(), None)
    store.finish_task(failed.id, "failed", "Ran out of memory; use fewer or smaller images, a smaller backbone, "
                                           "or a lower batch size.")
    at = _data_page()
    assert not at.exception
    assert [e.value for e in at.error] == ["Ran out of memory; use fewer or smaller images, a smaller backbone, or a "
                                           "lower batch size."]
    button(at, "Check the data again").click().run()
    assert_clean(at)
    again = tasks.find(ws, "audit", _audit_params())
    assert again.id != failed.id and again.status == "queued"
    assert progress_texts(at)[0].startswith("Checking the data · Waiting in the queue")


def test_a_full_queue_is_refused_in_one_sentence(home, no_workers, monkeypatch):
    ws, _ = home
    monkeypatch.setattr(tasks, "MAX_QUEUED", 1)
    tasks.submit(ws, "time_backbone", {"backbone": "resnet18"})
    at = _data_page()
    button(at, "Check the data").click().run()
    assert not at.exception
    assert [e.value for e in at.error] == ["The queue is full (1 tasks waiting); try again when some have finished."]
    assert tasks.find(ws, "audit", _audit_params()) is None
    assert has_button(at, "Check the data")


@pytest.mark.processes
def test_identical_requests_from_two_sessions_share_one_task(home):
    ws, _ = home
    first, second = _data_page(), _data_page()
    button(first, "Check the data").click().run()
    button(second, "Check the data").click().run()
    assert_clean(first)
    assert_clean(second)
    [audit] = ws.store().tasks(kind="audit")  # thirty students, one button: one task
    for at in (first, second):
        until(at, lambda a: has_metric(a, "Leaks into validation"), what="the shared audit")
        assert_clean(at)
        assert any(c.value.startswith("Took ") and "from the click" in c.value for c in at.caption)
    assert [t["id"] for t in ws.store().tasks(kind="audit")] == [audit["id"]]
    assert metric(first, "Likely label errors") == metric(second, "Likely label errors")


@pytest.mark.processes
def test_a_task_started_before_a_server_restart_is_found_again(home, monkeypatch):
    """Asked for in one server process, found by the next (a new session, fresh caches): queued, then done."""
    import streamlit as st

    ws, _ = home
    real = workers.ensure_workers
    monkeypatch.setattr(workers, "ensure_workers", lambda ws, lane="compute": 0)
    before = _data_page()
    button(before, "Check the data").click().run()
    task = tasks.find(ws, "audit", _audit_params())
    assert task.status == "queued"
    # "restart": a new session with none of the old one's state and empty caches; the task lived in the store
    st.cache_data.clear()
    st.cache_resource.clear()
    monkeypatch.setattr(workers, "ensure_workers", real)
    after = _data_page()
    assert not has_button(after, "Check the data")  # found: no need to ask again
    assert progress_texts(after), "the found task's queue place or progress"
    # the restarted server's start-up recovery gives queued tasks a worker; the result arrives on the same page
    until(after, lambda a: has_metric(a, "Leaks into validation"), what="the audit queued before the restart")
    assert_clean(after)
    assert [t["id"] for t in ws.store().tasks(kind="audit")] == [task.id]
    # and a session opened after it finished shows the result at once
    later = _data_page()
    assert has_metric(later, "Leaks into validation") and not has_button(later, "Check the data")


# --------------------------------------------------------------------------------------------------
# Train: the form is generated from the configuration's fields
# --------------------------------------------------------------------------------------------------
def test_train_form_is_generated_from_the_config_fields(home, no_workers):
    from tl_core.config import STRATEGIES, config_fields

    ws, _ = home
    at = app({"data": "sample/emoji"})
    goto(at, "train")
    assert_clean(at)
    form = [f for f in config_fields() if f.section]
    assert {"epochs", "lr", "batch_size", "seed", "time_budget", "augment", "val_split", "test_split", "class_balance",
            "patience", "linear_c", "features", "refit", "weight_decay", "label_smoothing", "warmup_epochs", "backbone_lr_mult",
            "unfreeze_blocks", "device"} == {f.name for f in form}
    for strategy in ("linear", "auto", "partial"):  # auto: its time budget enabled, the fine-tune settings not
        [r for r in at.radio if r.label == "Strategy"][0].set_value(strategy).run()
        assert_clean(at)
        widgets = {w.label: w for kind in ("number_input", "select_slider", "slider", "radio", "selectbox", "toggle")
                   for w in at.get(kind) if hasattr(w, "label")}
        for f in form:
            w = widgets[f.label]
            assert f.help in w.help
            if strategy in f.strategies:
                assert not w.disabled, (strategy, f.name)
            else:
                assert w.disabled, (strategy, f.name)
                assert f"Not used by {STRATEGIES[strategy].label.split(' (')[0].lower()}" in w.help
    # partial: its own settings reach the saved config
    [n for n in at.number_input if n.label == "Blocks to unfreeze"][0].set_value(3).run()
    [n for n in at.number_input if n.label == "Weight decay"][0].set_value(0.05).run()
    button(at, "Start training").click().run()
    assert_clean(at)
    cfg = ws.store().get(at.query_params["run"])["config"]
    assert (cfg["strategy"], cfg["unfreeze_blocks"], cfg["weight_decay"], cfg["epochs"]) == ("partial", 3, 0.05, 8)
    assert cfg["linear_c"] == 1.0 and cfg["features"] == "auto"  # linear-only settings keep their defaults


@pytest.mark.slow
def test_train_start_button_comes_before_the_advanced_settings(home, task_threads):
    at = app({"data": "sample/emoji"})
    goto(at, "train")
    order = []

    def walk(node) -> None:
        for child in getattr(node, "children", {}).values():
            if getattr(child, "type", None) == "expander":
                order.append(("expander", child.label))
            elif getattr(child, "type", None) == "button":
                order.append(("button", child.label))
            walk(child)

    walk(at.main)
    start = order.index(("button", "Start training"))
    advanced = order.index(("expander", "Advanced"))
    assert start < advanced, order


# --------------------------------------------------------------------------------------------------
# open-set answers: "unlike your training images"
# --------------------------------------------------------------------------------------------------
FASHION = ROOT / "sample_data" / "fashion_mnist"


@pytest.mark.slow
def test_try_it_warns_when_an_image_is_unlike_the_training_images(home, task_threads):
    at = app()
    goto(at, "try_it")
    bags = [(f"bag{n}.png", f.read_bytes(), "image/png")
            for n, f in enumerate(sorted((FASHION / "test" / "bag").iterdir())[:3])]
    emoji = ("flag.png", sorted((EMOJI / "flag").iterdir())[-1].read_bytes(), "image/png")
    at.file_uploader[0].set_value([*bags, emoji]).run()
    assert_clean(at)
    warned = [w.value for w in at.warning if "Unlike your training images" in w.value]
    assert len(warned) == 3, [w.value for w in at.warning]
    # the closest class is still shown, for every image
    preds = [m.value for m in at.markdown if "→" in m.value]
    assert len(preds) == 4 and preds[3].startswith("**flag.png** → **flag**")
    table = at.dataframe[0].value
    assert table["unlike training"].tolist() == [True, True, True, False]


@pytest.mark.slow
def test_evaluate_draws_the_open_set_scores_and_saves_a_moved_threshold(home, task_threads):
    ws, run_id = home
    files = RunFiles(ws.run_dir(run_id))
    rec = files.open_set_record()
    at = app()
    goto(at, "evaluate")
    at.button_group(key="eval_view").set_value("unknown").run()
    assert_clean(at)
    hist = [s for s in plotly_specs(at) if s["data"][0]["type"] == "histogram"]
    assert len(hist) == 1 and hist[0]["data"][0]["x"] == pytest.approx(rec["calibration_scores"])
    assert len(rec["calibration_scores"]) == rec["n"] == 200  # a refitted head: leave-one-out over every image
    lines = [sh for sh in hist[0]["layout"]["shapes"] if sh["type"] == "line"]
    assert lines[0]["x0"] == pytest.approx(rec["threshold"])
    flagged = sum(v > rec["threshold"] for v in rec["calibration_scores"]) / 200
    assert 0.03 <= flagged <= 0.06 and metric(at, "Training images flagged") == f"{flagged:.1%}"  # conformal 95%
    # moving the slider shows the trade-off; saving goes through a task and rewrites ood.json
    lower = round(sorted(rec["calibration_scores"])[100], 3)  # the median: about half flagged
    slider = [s for s in at.slider if s.label == "Threshold"][0]
    slider.set_value(lower).run()
    share = sum(v > lower for v in rec["calibration_scores"]) / 200
    assert 0.4 <= share <= 0.6 and metric(at, "Training images flagged") == f"{share:.1%}"
    button(at, f"Save threshold {lower:.3f} for this run").click().run()
    assert_clean(at)
    assert any("Saved" in s.value for s in at.success)
    saved = RunFiles(ws.run_dir(run_id)).open_set_record()
    assert saved["threshold"] == pytest.approx(lower) and saved["chosen"] == "by hand"
    assert saved["quantile"] == pytest.approx(1 - share, abs=1e-6)
    assert metric(at, "Saved threshold") == f"{lower:.3f}"
