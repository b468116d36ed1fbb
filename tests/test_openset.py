"""Open-set answers (tl_core/insight/openset.py): a model says ``unknown`` for images unlike its training images.

On real images: an emoji model shown Fashion-MNIST and a Fashion-MNIST model shown emoji flag nearly all of them,
and few of their own held-out images; a bundle does the same in a fresh workspace; runs from before open-set
files keep working.
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import EMOJI, FASHION
from tl_core.insight import openset
from tl_core.runs.files import RunFiles


# -- the threshold and the bank, on their own --------------------------------------------------------------
def test_conformal_threshold_is_the_rank_ceil_n_plus_1_times_coverage():
    rng = np.random.default_rng(0)
    scores = rng.permutation(np.arange(100) / 100.0)
    # ⌈101·0.95⌉ = 96th smallest of 0.00 … 0.99 is 0.95
    assert openset.conformal_threshold(scores) == pytest.approx(0.95)
    assert openset.conformal_threshold(scores, coverage=0.9) == pytest.approx(0.90)  # ⌈90.9⌉ = 91st
    # n = 19: ⌈20·0.95⌉ = 19, the largest; fewer than that also fall back to the largest
    assert openset.conformal_threshold(np.arange(19.0)) == 18.0
    assert openset.conformal_threshold([0.3, 0.1, 0.2]) == 0.3
    with pytest.raises(ValueError):
        openset.conformal_threshold([])
    # on fresh scores from the same distribution, about 95% pass
    cal, new = rng.normal(size=400), rng.normal(size=20000)
    passed = 1 - openset.flagged_share(new, openset.conformal_threshold(cal))
    assert 0.92 <= passed <= 0.98


def test_bank_indices_keep_every_class_and_cap_the_rows():
    labels = ["a"] * 3000 + ["b"] * 10 + ["c"] * 500
    keep = openset.bank_indices(labels, max_rows=2048)
    kept = np.asarray(labels)[keep]
    assert len(keep) == 2048 == len(set(keep.tolist()))
    assert (kept == "b").sum() == 10 and (kept == "c").sum() == 500 and (kept == "a").sum() == 1538
    even = openset.bank_indices(["x"] * 900 + ["y"] * 900 + ["z"] * 900, max_rows=100)
    counts = sorted(np.unique(np.asarray(["x"] * 900 + ["y"] * 900 + ["z"] * 900)[even], return_counts=True)[1])
    assert counts == [33, 33, 34]
    assert openset.bank_indices(["a", "b"], max_rows=10).tolist() == [0, 1]


def test_leave_one_out_never_matches_an_image_with_itself():
    rng = np.random.default_rng(1)
    bank = openset.normalise(rng.normal(size=(50, 16))).astype(np.float16)
    assert np.allclose(openset.nn_distance(bank, bank), 0.0, atol=2e-3)  # each finds itself
    loo = openset.nn_distance(bank, bank, exclude_self=True)
    assert (loo > 0.05).all()
    record, b = openset.build_open_set(rng.normal(size=(50, 16)))
    assert record["calibration"] == "leave-one-out" and record["n"] == 50 and b.dtype == np.float16
    record, _ = openset.build_open_set(rng.normal(size=(50, 16)), rng.normal(size=(20, 16)))
    assert record["calibration"] == "validation" and record["n"] == 20
    assert record["threshold"] == pytest.approx(openset.conformal_threshold(record["calibration_scores"]), abs=1e-6)
    with pytest.raises(ValueError):
        openset.build_open_set(rng.normal(size=(1, 16)))


def test_a_threshold_chosen_by_hand_records_the_share_that_passes():
    record, _ = openset.build_open_set(np.random.default_rng(2).normal(size=(40, 8)))
    low = openset.with_threshold(record, 0.0)
    assert low["quantile"] == pytest.approx(1 - openset.flagged_share(record["calibration_scores"], 0.0))
    assert low["chosen"] == "by hand" and openset.with_threshold(record, 2.0)["quantile"] == 1.0
    for bad in (-0.1, 2.5, math.nan):
        with pytest.raises(ValueError):
            openset.with_threshold(record, bad)


# -- trained models on real images ---------------------------------------------------------------------------
def _split_emoji(root: Path, n_train: int = 30) -> tuple[Path, Path]:
    """The first ``n_train`` images of each emoji class to train on; the rest held out."""
    train, held = root / "emoji_train", root / "emoji_held"
    for c in sorted(p for p in EMOJI.iterdir() if p.is_dir()):
        files = sorted(c.iterdir())
        for dst, part in ((train, files[:n_train]), (held, files[n_train:])):
            (dst / c.name).mkdir(parents=True, exist_ok=True)
            for f in part:
                shutil.copy(f, dst / c.name / f.name)
    return train, held


@pytest.fixture(scope="module")
def emoji_model(tmp_path_factory):
    """A linear run (refitted head: leave-one-out threshold) on 30 emoji per class; 10 per class held out."""
    from tl_core.config import TrainConfig
    from tl_core.runs.training import run_training
    from tl_core.runs.workspace import Workspace

    root = tmp_path_factory.mktemp("openset_emoji")
    train, held = _split_emoji(root)
    ws = Workspace(root / "home")
    res = run_training(ws, train, TrainConfig())
    assert res.status == "done", res.error
    return ws, Path(res.run_dir), held


def _flagged(tm, paths) -> tuple[float, list[dict]]:
    from tl_core.share.predict import predict_paths

    rows, skipped = predict_paths(tm, paths)
    assert rows and not skipped
    assert all(isinstance(r["unknown"], bool) and 0.0 <= r["ood_score"] <= 2.0 for r in rows)
    return sum(r["unknown"] for r in rows) / len(rows), rows


@pytest.mark.slow
def test_an_emoji_model_flags_fashion_images_and_few_of_its_own(emoji_model):
    from tl_core.share.loading import load_model

    _, run_dir, held = emoji_model
    files = RunFiles(run_dir)
    rec, bank = files.open_set_record(), files.open_set_bank()
    assert rec["calibration"] == "leave-one-out" and rec["n"] == 150 == rec["bank_rows"] == len(bank)
    assert rec["dim"] == bank.shape[1] == 1280 and bank.dtype == np.float16
    assert np.allclose(np.linalg.norm(bank.astype(np.float32), axis=1), 1.0, atol=1e-2)
    tm = load_model(run_dir)
    own, _ = _flagged(tm, [held])
    fashion, rows = _flagged(tm, [FASHION / "test"])
    assert own <= 0.15, own
    assert fashion >= 0.90, fashion
    # the closest class is still given, and the score is what decides
    assert all(r["label"] in tm.classes for r in rows)
    assert all(r["unknown"] == (r["ood_score"] > rec["threshold"]) for r in rows)


@pytest.mark.slow
def test_a_fashion_model_flags_emoji_images(tmp_path):
    from tl_core.config import TrainConfig
    from tl_core.runs.training import run_training
    from tl_core.runs.workspace import Workspace
    from tl_core.share.loading import load_model
    from tl_core.share.predict import evaluate_dataset

    ws = Workspace(tmp_path / "home")
    res = run_training(ws, FASHION, TrainConfig())  # its test/ folder stays held out
    assert res.status == "done", res.error
    tm = load_model(res.run_dir)
    emoji, _ = _flagged(tm, [EMOJI])
    assert emoji >= 0.90, emoji
    rep = evaluate_dataset(tm, FASHION, workspace=ws)  # the 200 held-out Fashion images
    assert rep["count"] == 200 and rep["unknown_share"] <= 0.15, rep["unknown_share"]


@pytest.mark.slow
def test_features_come_from_the_same_forward_pass_as_the_logits(emoji_run_dir):
    from PIL import Image

    from tl_core.models.features import pooled_features
    from tl_core.models.inference import logits_of_images
    from tl_core.share.loading import load_model

    tm = load_model(emoji_run_dir)
    images = [Image.open(p).convert("RGB") for p in sorted((EMOJI / "food").iterdir())[:4]]
    z = logits_of_images(tm.model, images, tm.pre)
    z2, f = logits_of_images(tm.model, images, tm.pre, with_features=True)
    assert np.allclose(z, z2, atol=1e-4) and f.shape == (4, 1280)
    import torch

    x = torch.stack([tm.pre.eval_from_pil(im) for im in images])
    with torch.inference_mode():
        assert np.allclose(f, pooled_features(tm.model, x).numpy(), atol=1e-4)


@pytest.mark.slow
def test_a_bundle_says_unknown_offline_in_a_fresh_workspace(emoji_model, tmp_path, monkeypatch):
    from tl_core.share.export import export_run
    from tl_core.share.loading import load_model

    _, run_dir, held = emoji_model
    info = export_run(run_dir, "bundle", tmp_path / "emoji.zip")
    assert {"ood.json", "ood_bank.safetensors"} <= set(info.get("files") or zipfile.ZipFile(tmp_path / "emoji.zip").namelist())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(tmp_path / "emoji.zip", elsewhere / "emoji.zip")
    monkeypatch.setenv("TL_HOME", str(tmp_path / "fresh_home"))
    tm = load_model(elsewhere / "emoji.zip")
    assert tm.open_set is not None
    fashion, rows = _flagged(tm, [FASHION / "test"])
    _, run_rows = _flagged(load_model(run_dir), [FASHION / "test"])
    assert fashion >= 0.90
    assert [r["unknown"] for r in rows] == [r["unknown"] for r in run_rows]
    assert np.allclose([r["ood_score"] for r in rows], [r["ood_score"] for r in run_rows], atol=1e-5)


@pytest.mark.slow
def test_a_run_from_before_open_set_scores_still_predicts(emoji_run_dir, tmp_path, capsys):
    from tl_core.cli import main
    from tl_core.share.loading import load_model
    from tl_core.share.predict import predict_paths, predictions_csv

    old = tmp_path / "old_run"
    shutil.copytree(emoji_run_dir, old)
    for name in ("ood.json", "ood_bank.safetensors"):
        (old / name).unlink()
    tm = load_model(old)
    assert tm.open_set is None
    rows, _ = predict_paths(tm, sorted((EMOJI / "flag").iterdir())[:2])
    assert [r["unknown"] for r in rows] == [None, None] and rows[0]["ood_score"] is None
    assert predictions_csv(rows).splitlines()[1].endswith(",,")
    code = main(["predict", str(old), str(sorted((EMOJI / "flag").iterdir())[0]), "--json"])
    out = capsys.readouterr()
    assert code == 0 and json.loads(out.out)[0]["unknown"] is None
    assert "before open-set scores" in out.err


@pytest.mark.slow
def test_cli_predict_and_evaluate_report_unknown(emoji_run_dir, tmp_path, capsys):
    from tl_core.cli import main

    fashion = sorted((FASHION / "test" / "bag").iterdir())[:3]
    code = main(["predict", str(emoji_run_dir), *map(str, fashion), str(sorted((EMOJI / "food").iterdir())[0]),
                 "--json", "--csv", str(tmp_path / "p.csv")])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = json.loads(out.out)
    assert [r["unknown"] for r in rows] == [True, True, True, False]
    assert all(isinstance(r["ood_score"], float) for r in rows)
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].endswith(",unknown,ood_score") and lines[1].split(",")[-2] == "true"
    assert lines[4].split(",")[-2] == "false"
    code = main(["evaluate", str(emoji_run_dir), "--data", str(EMOJI), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    rep = json.loads(out.out)
    # the emoji run's bank holds all 200 images (a refitted head): none of them is unlike them
    assert rep["unknown_share"] == 0.0 and rep["count"] == 200


def test_cli_shows_and_sets_the_threshold(emoji_run_dir, tmp_path, capsys):
    from tl_core.cli import main

    run = tmp_path / "run"
    shutil.copytree(emoji_run_dir, run)
    assert main(["openset", str(run), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert not shown["saved"] and not shown.get("chosen") and 0.0 < shown["threshold"] < 2.0
    assert "calibration_scores" not in shown and "unknown" in shown["meaning"]
    assert main(["openset", str(run), "--threshold", "0.0", "--json"]) == 0
    now = json.loads(capsys.readouterr().out)
    assert now["saved"] and now["threshold"] == 0.0 and now["chosen"] == "by hand" and now["flagged_share"] > 0.5
    assert RunFiles(run).open_set_record()["threshold"] == 0.0
    assert main(["openset", str(run)]) == 0 and "chosen by hand" in capsys.readouterr().out
    assert main(["openset", str(run), "--threshold", "3"]) == 2
    assert "between 0 and 2" in capsys.readouterr().err and RunFiles(run).open_set_record()["threshold"] == 0.0
    (run / "ood.json").unlink()
    assert main(["openset", str(run)]) == 2 and "trained before open-set scores" in capsys.readouterr().err


@pytest.mark.slow
def test_a_saved_threshold_is_what_predictions_use(emoji_run_dir, tmp_path):
    from tl_core.errors import ConfigError, RunError
    from tl_core.share.loading import load_model
    from tl_core.share.predict import predict_paths

    run = tmp_path / "run"
    shutil.copytree(emoji_run_dir, run)
    before = RunFiles(run).stamp()
    image = sorted((EMOJI / "food").iterdir())[0]  # a training image: distance ~0
    assert predict_paths(load_model(run), [image])[0][0]["unknown"] is False
    rec = openset.set_threshold(run, 0.0)  # everything is unknown now
    assert rec["threshold"] == 0.0 and rec["chosen"] == "by hand" and RunFiles(run).stamp() != before
    row = predict_paths(load_model(run), [image])[0][0]
    assert row["unknown"] is (row["ood_score"] > 0.0) and row["label"] == "food"
    assert RunFiles(run).open_set_record()["calibration_scores"]  # the distribution is kept
    with pytest.raises(ConfigError):
        openset.set_threshold(run, 3.0)
    (run / "ood.json").unlink()
    with pytest.raises(RunError):
        openset.set_threshold(run, 0.5)


def test_model_card_and_report_state_the_threshold_and_what_it_means(emoji_run_dir, tmp_path):
    from tl_core.share.card import model_card
    from tl_core.share.report import build_report

    files = RunFiles(emoji_run_dir)
    rec = files.open_set_record()
    card = model_card(files)
    section = card.split("## Images unlike the training images", 1)[1].split("\n## ", 1)[0]
    assert f"Above {rec['threshold']:.3f}" in section and "`unknown`" in section and "95%" in section
    assert "leave-one-out" in section and f"{rec['bank_rows']} training images" in section
    html = build_report(emoji_run_dir)
    assert "Images unlike the training images" in html and f"{rec['threshold']:.3f}" in html
    old = tmp_path / "old"
    shutil.copytree(emoji_run_dir, old)
    (old / "ood.json").unlink()
    (old / "ood_bank.safetensors").unlink()
    assert "before open-set scores" in model_card(RunFiles(old))
    assert "Images unlike the training images</h2>" not in build_report(old)


@pytest.mark.slow
def test_a_fine_tuned_model_scores_with_its_own_features(tmp_path):
    """``partial``: the bank holds the fine-tuned network's features of the training images, and the threshold
    comes from the validation images (held out from the whole network)."""
    from tl_core.config import TrainConfig
    from tl_core.runs.training import run_training
    from tl_core.runs.workspace import Workspace
    from tl_core.share.loading import load_model

    train, held = _split_emoji(tmp_path)
    res = run_training(Workspace(tmp_path / "home"), train, TrainConfig(strategy="partial", epochs=1))
    assert res.status == "done", res.error
    rec = RunFiles(res.run_dir).open_set_record()
    assert rec["calibration"] == "validation" and rec["n"] == 30 and rec["bank_rows"] == 120
    tm = load_model(res.run_dir)
    own, _ = _flagged(tm, [held])
    fashion, _ = _flagged(tm, [FASHION / "test"])
    assert own <= 0.15 and fashion >= 0.90, (own, fashion)


@pytest.mark.parametrize("damage", ["no bank", "bad threshold", "other score", "wrong dim"])
def test_damaged_open_set_files_are_refused_in_one_sentence(emoji_run_dir, tmp_path, damage):
    from tl_core.errors import ExportError
    from tl_core.share.loading import load_model

    run = tmp_path / "run"
    shutil.copytree(emoji_run_dir, run)
    rec = json.loads((run / "ood.json").read_text())
    if damage == "no bank":
        (run / "ood_bank.safetensors").unlink()
    else:
        rec.update({"bad threshold": {"threshold": "high"}, "other score": {"score": "energy"},
                    "wrong dim": {"dim": 7}}[damage])
        (run / "ood.json").write_text(json.dumps(rec))
    with pytest.raises(ExportError) as e:
        load_model(run)
    msg = str(e.value)
    assert "\n" not in msg and ("ood" in msg) and ("again" in msg)
