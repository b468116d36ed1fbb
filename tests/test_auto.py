"""The ``auto`` strategy: tries what the data can afford, keeps the best, and records why."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import EMOJI, make_class_folder
from page_harness import app, assert_clean, goto, home, trained_home  # noqa: F401  (fixtures are used by name)
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
    # the run's curves are the kept probe's solver rounds (each try's own are held back until one is kept)
    from tl_core.share.progress import curve_step

    row = workspace.store().get(res.run_id)
    assert len(workspace.store().epochs(res.run_id)) == len(run.metrics().history) > 1
    assert curve_step(row) == "solver round"


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
    """The emoji sample (160 training images in 5 classes after the split: enough to fine-tune) with a 1-second
    budget: the probe runs, the fine-tune is listed as skipped with its estimate, the backbones with their reason."""
    res = run_training(workspace, EMOJI, TrainConfig(time_budget=1.0))
    assert res.status == "done", res.error
    auto = res.auto
    assert auto["kept"] == "linear" and auto["budget_s"] == 1.0
    assert [t["status"] for t in auto["tried"]][0] == "kept"
    skipped = [t for t in auto["tried"] if t["status"] == "skipped"]
    assert len(skipped) == 3  # the two other backbones' probes and the fine-tune
    partial = skipped[2]
    assert partial["strategy"] == "partial"
    assert partial["estimated_s"] > 1.0 and "left of the 1 s budget" in partial["why"]
    for t in skipped[:2]:  # 200 images: too few to tell backbones apart, so not even estimated
        assert "estimated_s" not in t and "fewer than 500" in t["why"] and "within noise" in t["why"], t
    assert "budget" in auto["reason"] and "raise the time budget to try it" in auto["reason"]


def _fake_tries(tmp_path, monkeypatch, cv: dict[str, float], per_image_s: float, budget: float,
                backbone: str = "efficientnet_lite0", fine_tune_right: int = 108, runtime=None):
    """Run ``train_auto`` with a stand-in for ``train_model`` (no network, no images): each try writes a run folder
    that names it and returns the summary a 600-image, 10-class linear or partial run returns; each backbone's
    probe scores ``cv[backbone]`` by cross-validation, and 108 of its 120 validation images right (the fine-tune:
    ``fine_tune_right``). The per-image cost the budget is estimated with is fixed; the run asks for ``backbone``."""
    import tl_core.runs.auto as auto_mod

    calls = []

    def train_model(data, cfg, workspace, run_dir, progress, should_cancel, test_data, runtime):
        calls.append((cfg.strategy, cfg.backbone))
        run_dir.mkdir(parents=True)
        (run_dir / "which").write_text(f"{cfg.strategy} {cfg.backbone}")
        summary = {"classes": [str(i) for i in range(10)], "split": {"train": 480, "val": 120, "test": 0},
                   "val_accuracy": 0.9, "feature_cache": {"hits": 600, "misses": 0}}
        if cfg.strategy == "linear":
            summary["features"] = {"variant": "depths", "cv": {"last@1": cv[cfg.backbone] - 0.01,
                                                               "depths@1": cv[cfg.backbone]}}
        return summary

    right = np.ones(120)
    right[:12] = 0  # 108 of 120 for every probe: no paired difference
    tuned = np.ones(120)
    tuned[:120 - fine_tune_right] = 0  # the same images wrong, and fewer of them: a paired gain
    monkeypatch.setattr(auto_mod, "_val_correct", lambda run_dir: tuned if run_dir.name == "partial" else right)
    monkeypatch.setattr(auto_mod, "_catalogue_seconds_per_image",
                        lambda b: per_image_s * auto_mod._relative_cost(b, "efficientnet_lite0"))
    run_dir = tmp_path / "runs" / "r1"
    run_dir.parent.mkdir(parents=True)
    out = auto_mod.train_auto(train_model, "data", TrainConfig(time_budget=budget, backbone=backbone).resolved(), None,
                              run_dir, runtime=runtime)
    return out, calls, (run_dir / "which").read_text()


def test_auto_keeps_the_backbone_with_the_best_cross_validated_score(tmp_path, monkeypatch):
    out, calls, which = _fake_tries(tmp_path, monkeypatch, {"efficientnet_lite0": 0.90, "efficientnet_lite1": 0.95,
                                                           "efficientnet_lite2": 0.93}, 0.001, 600.0)
    auto = out["auto"]
    assert calls == [("linear", "efficientnet_lite0"), ("linear", "efficientnet_lite1"),
                     ("linear", "efficientnet_lite2"), ("partial", "efficientnet_lite1")]  # the kept one fine-tuned
    assert which == "linear efficientnet_lite1"  # the kept probe's run folder became the run
    assert auto["kept"] == "linear" and auto["backbone"] == "efficientnet_lite1"
    rows = {(t["strategy"], t["backbone"]): t for t in auto["tried"]}
    assert [rows[("linear", f"efficientnet_lite{i}")]["status"] for i in range(3)] == ["not kept", "kept", "not kept"]
    lite1 = rows[("linear", "efficientnet_lite1")]
    assert lite1["score"] == 0.95 and lite1["scored_by"] == "cross-validation" and lite1["score_images"] == 600
    assert lite1["score_ci"][0] < 0.95 < lite1["score_ci"][1] and lite1["estimated_s"] > 0
    assert rows[("partial", "efficientnet_lite1")]["status"] == "not kept"  # +0.0 points: within noise
    assert "95.0%" in auto["reason"] and "90.0%" in auto["reason"] and "within noise" in auto["reason"]
    assert all(t["why"] for t in auto["tried"]) and "of the 3 probes run" in lite1["why"]
    assert not list((tmp_path / "runs").glob(".*auto*"))  # the tries' staging is gone


def test_auto_skips_what_the_budget_cannot_afford_and_says_by_how_much(tmp_path, monkeypatch):
    """0.5 s per image (a slow machine): Lite1's probe of 600 images is estimated at 8 min, the fine-tune at more;
    with a 100 s budget neither runs, and each is listed with its estimate and what was left."""
    out, calls, which = _fake_tries(tmp_path, monkeypatch, {"efficientnet_lite0": 0.90, "efficientnet_lite1": 0.99,
                                                           "efficientnet_lite2": 0.99}, 0.5, 100.0)
    auto = out["auto"]
    assert calls == [("linear", "efficientnet_lite0")] and which == "linear efficientnet_lite0"
    skipped = [t for t in auto["tried"] if t["status"] == "skipped"]
    assert [(t["strategy"], t["backbone"]) for t in skipped] == [
        ("linear", "efficientnet_lite1"), ("linear", "efficientnet_lite2"), ("partial", "efficientnet_lite0")]
    lite1 = skipped[0]
    assert lite1["estimated_s"] == pytest.approx(600 * 0.5 * 30.6 / 19.2 + 5, rel=0.01)  # the catalogue's cost ratio
    assert lite1["why"].startswith("skipped the efficientnet_lite1 linear probe: estimated 8 min ")
    assert "left of the 1 min 40 s budget" in lite1["why"]
    assert "raise the time budget to compare backbones" in auto["reason"] and auto["budget_s"] == 100.0
    assert "raise the time budget to try it" in auto["reason"]  # the fine-tune, too


def test_a_cold_probe_records_this_machine_s_speed_for_later_estimates(tmp_path):
    """A re-train finds its features cached and has nothing to time: it estimates uncached tries from the last
    cold run's seconds per image (scaled by the catalogue between backbones), without building a model."""
    from types import SimpleNamespace

    from tl_core.runs.auto import _Clock, _relative_cost

    ws = SimpleNamespace(cache_dir=tmp_path)
    clock = _Clock(ws, "efficientnet_lite0")
    clock.observe("efficientnet_lite0", {"feature_cache": {"hits": 0, "misses": 300}}, 30.0, 300)
    clock.observe("efficientnet_lite2", {"feature_cache": {"hits": 300, "misses": 0}}, 1.0, 300)  # warm: not a speed
    again = _Clock(ws, "efficientnet_lite0")
    assert again.per_image("efficientnet_lite0") == pytest.approx(0.1)
    assert again.per_image("efficientnet_lite2") == pytest.approx(0.1 * _relative_cost("efficientnet_lite2",
                                                                                       "efficientnet_lite0"))
    assert _relative_cost("efficientnet_lite2", "efficientnet_lite0") > _relative_cost("efficientnet_lite1",
                                                                                      "efficientnet_lite0") > 1


def test_a_tie_between_probes_keeps_the_cheaper_backbone(tmp_path, monkeypatch):
    """Lite2 asked for, and Lite0 scores the same by cross-validation: the tie keeps Lite0 (a third of the cost),
    not the first one tried; the costlier one says why it lost on an equal score."""
    out, calls, which = _fake_tries(tmp_path, monkeypatch, {"efficientnet_lite0": 0.95, "efficientnet_lite1": 0.90,
                                                           "efficientnet_lite2": 0.95}, 0.001, 600.0,
                                    backbone="efficientnet_lite2")
    assert calls[0] == ("linear", "efficientnet_lite2") and which == "linear efficientnet_lite0"
    auto = out["auto"]
    assert auto["backbone"] == "efficientnet_lite0" and auto["kept"] == "linear"
    rows = {(t["strategy"], t["backbone"]): t for t in auto["tried"]}
    lite2 = rows[("linear", "efficientnet_lite2")]
    assert lite2["status"] == "not kept"
    assert lite2["why"] == "not kept: the same cross-validated score as the kept probe, from a costlier backbone"
    assert "costlier" not in rows[("linear", "efficientnet_lite1")]["why"]  # 0.90: simply lower


def test_under_torchrun_every_rank_runs_the_tries_rank_0_announces(tmp_path, monkeypatch):
    """Rank 0 decides each try (by its clock and its scores) and announces it, then the end; another rank runs
    exactly those tries, in that order, writing nothing, and returns. (It used to return after the first probe: a
    fine-tune rank 0 found room for then failed with "Connection closed by peer", seen in CI on 2026-12-07.)"""
    import tl_core.runs.auto as auto_mod

    said = []  # what rank 0 announced (gather's first element is rank 0's object on every rank)
    monkeypatch.setattr(auto_mod, "gather", lambda rt, obj: (said.append(obj), [obj, None])[1])
    cv = {"efficientnet_lite0": 0.90, "efficientnet_lite1": 0.95, "efficientnet_lite2": 0.93}
    out, calls, _ = _fake_tries(tmp_path / "rank0", monkeypatch, cv, 0.001, 600.0,
                                runtime=SimpleNamespace(distributed=True, is_main=True))
    assert out["auto"]["backbone"] == "efficientnet_lite1" and len(calls) == 4  # three probes and a fine-tune
    assert [(c.strategy, c.backbone) for c in said[:-1]] == calls and said[-1] is None
    heard = iter(said)
    monkeypatch.setattr(auto_mod, "gather", lambda rt, obj: [next(heard), obj])
    followed = []
    got = auto_mod.train_auto(lambda data, cfg, ws, run_dir, *rest: followed.append((cfg.strategy, cfg.backbone,
                                                                                    str(run_dir))),
                              "data", TrainConfig(time_budget=600.0).resolved(), None, tmp_path / "rank1" / "r1",
                              runtime=SimpleNamespace(distributed=True, is_main=False))
    assert got is None and [f[:2] for f in followed] == calls and {f[2] for f in followed} == {os.devnull}
    assert next(heard, "all heard") == "all heard" and not (tmp_path / "rank1").exists()


def test_a_kept_fine_tune_says_why_each_probe_was_not_kept(tmp_path, monkeypatch):
    """The fine-tune gains beyond noise (120 of 120 against 108): it is kept; the probe it started from is "not
    kept" for the fine-tune's gain (not for "a lower score than the kept probe": no probe was kept), the other
    probes for a lower score than that probe."""
    out, calls, which = _fake_tries(tmp_path, monkeypatch, {"efficientnet_lite0": 0.90, "efficientnet_lite1": 0.95,
                                                           "efficientnet_lite2": 0.93}, 0.001, 600.0,
                                    fine_tune_right=120)
    auto = out["auto"]
    assert auto["kept"] == "partial" and auto["backbone"] == "efficientnet_lite1" and which.startswith("partial")
    rows = {(t["strategy"], t["backbone"]): t for t in auto["tried"]}
    assert rows[("partial", "efficientnet_lite1")]["status"] == "kept"
    probe = rows[("linear", "efficientnet_lite1")]
    assert probe["status"] == "not kept" and probe["why"].startswith("not kept: Fine-tuning gained +10.0")
    assert "kept partial" in probe["why"]
    for b in ("efficientnet_lite0", "efficientnet_lite2"):
        why = rows[("linear", b)]["why"]
        assert why == "not kept: a lower cross-validated score than the efficientnet_lite1 probe the kept fine-tune " \
                      "started from", why
    assert not any("than the kept probe" in t.get("why", "") for t in auto["tried"])


def _auto_row(workspace, summary: dict, config: dict | None = None) -> dict:
    """A finished run of the store holding ``summary`` (as run_training records it), started as auto on Lite0."""
    store = workspace.store()
    run_id = store.create_run(str(EMOJI), config or {"backbone": "efficientnet_lite0", "strategy": "auto",
                                                     "features": "auto", "batch_size": 16, "augment": "light"})
    store.update(run_id, status="done", summary=summary)
    return store.get(run_id)


def test_every_surface_names_the_model_auto_kept(workspace, tmp_path, monkeypatch, capsys):
    """Started as auto on Lite0, the run kept Lite1's probe: the runs table, the comparison, a run's header and
    label, `tl-core runs` (text and JSON), the class overview and the curves' unit all name Lite1's linear probe;
    an ordinary run and an auto run still running are named as they were started."""
    from tl_core.classroom.overview import results_rows
    from tl_core.share.progress import compare_rows, curve_step, kept_model, model_text, runs_rows, strategy_text

    out, _, _ = _fake_tries(tmp_path, monkeypatch, {"efficientnet_lite0": 0.90, "efficientnet_lite1": 0.95,
                                                   "efficientnet_lite2": 0.93}, 0.001, 600.0)
    row = _auto_row(workspace, {**out, "seconds": 12.0})
    assert kept_model(row) == ("efficientnet_lite1", "linear")
    assert model_text(row) == "auto → efficientnet_lite1 linear probe"
    assert strategy_text(row) == "Auto → linear probe" and curve_step(row) == "solver round"
    table = runs_rows([row])[0]
    assert table["Backbone"] == "efficientnet_lite1" and table["Strategy"] == "Auto → linear probe"
    assert table["Features"] == "several depths (auto)"  # the kept probe's features (the fake's "depths")
    assert table["Batch size"] is None  # a linear probe has no batches
    compared = compare_rows([row])
    assert compared["Backbone"][row["id"]] == "efficientnet_lite1"
    assert compared["Strategy"][row["id"]] == "Auto → linear probe"

    tuned, _, _ = _fake_tries(tmp_path / "b", monkeypatch, {"efficientnet_lite0": 0.90, "efficientnet_lite1": 0.95,
                                                           "efficientnet_lite2": 0.93}, 0.001, 600.0,
                              fine_tune_right=120)
    part = _auto_row(workspace, tuned)
    assert model_text(part) == "auto → efficientnet_lite1 partial fine-tuning" and curve_step(part) == "epoch"
    assert runs_rows([part])[0]["Batch size"] == "16"  # the fine-tune it kept used the run's batch size
    plain = _auto_row(workspace, {"val_accuracy": 0.9}, {"backbone": "efficientnet_lite2", "strategy": "linear"})
    assert model_text(plain) == "efficientnet_lite2 · Linear probe" and strategy_text(plain) == "Linear probe"
    running = workspace.store().create_run(str(EMOJI), {"backbone": "efficientnet_lite0", "strategy": "auto"},
                                           status="running")
    assert model_text(workspace.store().get(running)) == "efficientnet_lite0 · Automatic"

    from tl_core.cli import main

    assert main(["runs", "--json"]) == 0
    listed = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert (listed[row["id"]]["backbone"], listed[row["id"]]["strategy"]) == ("efficientnet_lite1", "linear")
    assert listed[row["id"]]["config"]["strategy"] == "auto"  # what it was started with stays recorded
    assert main(["runs"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(row["id"]))
    assert "efficientnet_lite1" in line and "auto → linear" in line and "efficientnet_lite0" not in line
    overview = {r["run"]: r for r in results_rows(workspace)}
    assert (overview[part["id"]]["backbone"], overview[part["id"]]["strategy"]) == ("efficientnet_lite1", "partial")


@pytest.mark.slow
def test_the_challenge_leaderboard_names_the_model_auto_kept(tl_home, emoji_run, tmp_path):
    """A group's run started as auto on Lite2 and kept Lite0's probe (the session's emoji run, as its files hold):
    its submission and the leaderboard (and its CSV) name Lite0's linear probe, the model that was scored."""
    import shutil

    from tl_core.classroom import challenge
    from tl_core.storage.workspace import Workspace

    src, res = emoji_run
    top = Workspace(tl_home)
    challenge.setup_challenge(top, make_class_folder(tmp_path / "locked", {"animal": 3, "face": 3, "flag": 3},
                                                     source=EMOJI))
    locked = {f.read_bytes() for f in (challenge.challenge_dir(top) / "test").rglob("*.*")}
    rest = tmp_path / "rest"
    shutil.copytree(EMOJI, rest)
    for f in list(rest.rglob("*.*")):
        if f.read_bytes() in locked:
            f.unlink()
    ws = top.project("owls-0001", create=True)
    row = src.store().get(res.run_id)
    summary = {**row["summary"], "auto": {"kept": "linear", "backbone": "efficientnet_lite0", "tried": [],
                                          "reason": "efficientnet_lite0 scored higher"}}
    run_id = ws.store().create_run(str(rest), {**row["config"], "strategy": "auto", "backbone": "efficientnet_lite2"},
                                   status="done")
    ws.store().update(run_id, summary=summary)
    shutil.copytree(src.run_dir(res.run_id), ws.run_dir(run_id))
    got = challenge.score_run(ws, str(ws.run_dir(run_id)))
    assert (got["backbone"], got["strategy"]) == ("efficientnet_lite0", "linear")
    board = challenge.leaderboard(top)
    assert [(r["backbone"], r["strategy"]) for r in board["rows"]] == [("efficientnet_lite0", "linear")]
    assert ",linear,efficientnet_lite0," in challenge.leaderboard_csv(board)


def test_the_pages_name_the_model_auto_kept(home):
    """The session's run, recorded as started by auto on Lite2 that kept Lite0's probe (what its files hold): the
    Train page's run panel, Home's backbone step and Evaluate's run label name Lite0's linear probe."""
    ws, run_id = home
    store = ws.store()
    row = store.get(run_id)
    store.update(run_id, config={**row["config"], "strategy": "auto", "backbone": "efficientnet_lite2"},
                 summary={**row["summary"], "auto": {"kept": "linear", "backbone": "efficientnet_lite0", "tried": [],
                                                     "reason": "efficientnet_lite0 scored higher"}})
    at = app({"run": run_id})
    assert_clean(at)
    home_text = " ".join(m.value for m in at.markdown)
    assert f"Run {run_id} used efficientnet_lite0." in home_text and "used efficientnet_lite2" not in home_text
    goto(at, "train")
    assert_clean(at)
    panel = next(m.value for m in at.markdown if m.value.startswith("**Status:**"))
    assert "auto → efficientnet_lite0 linear probe" in panel and "efficientnet_lite2" not in panel, panel
    goto(at, "evaluate")
    assert_clean(at)
    label = at.selectbox[0].format_func(at.selectbox[0].value)
    assert "auto → efficientnet_lite0 linear probe" in label, label
