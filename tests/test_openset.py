"""Open-set answers (tl_core/models/openset.py): a model says ``unknown`` for images unlike its training images.

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
from tl_core.models import openset
from tl_core.storage.files import RunFiles


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
    record, b, sb = openset.build_open_set(rng.normal(size=(50, 16)))
    assert record["calibration"] == "leave-one-out" and record["n"] == 50 and b.dtype == np.float16 and sb is None
    record, _, _ = openset.build_open_set(rng.normal(size=(50, 16)), rng.normal(size=(20, 16)))
    assert record["calibration"] == "validation" and record["n"] == 20
    # 1.0 sits at the conformal rank of the calibration images' combined scores
    assert record["threshold"] == 1.0
    assert openset.conformal_threshold(record["calibration_scores"]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        openset.build_open_set(rng.normal(size=(1, 16)))


def test_k_nearest_distance_is_the_mean_of_the_k_smallest():
    bank = openset.normalise(np.eye(4, dtype=np.float32))
    q = openset.normalise(np.array([[1.0, 0.5, 0.0, 0.0]]))
    d = 1.0 - (q @ bank.T)[0]
    assert openset.knn_distance(q, bank, 1)[0] == pytest.approx(np.sort(d)[0], abs=1e-6)
    assert openset.knn_distance(q, bank, 2)[0] == pytest.approx(np.sort(d)[:2].mean(), abs=1e-6)
    # leave-one-out with k = 2 never counts a row itself
    loo = openset.knn_distance(bank, bank, 2, exclude_self=True)
    assert np.allclose(loo, 1.0, atol=1e-6)


def _blobs(rng, n, centre, spread=0.3):
    return centre + spread * rng.normal(size=(n, len(centre)))


def test_the_combined_score_keeps_the_95_percent_promise_and_says_why():
    """Content and style from two independent blobs: on fresh images like the bank ~95% pass 1.0 in total (not
    per distance); an image off in style only is flagged ``style``, off in content only ``content``."""
    rng = np.random.default_rng(3)
    c0, s0 = rng.normal(size=32), np.abs(rng.normal(size=24)) + 1.0
    spec = {"stages": [0, 1], "stat": "std", "dims": [8, 16]}
    rec, bank, sbank = openset.build_open_set(_blobs(rng, 300, c0), bank_style=np.abs(_blobs(rng, 300, s0)),
                                              style_spec=spec)
    assert rec["calibration"] == "leave-one-out" and sbank.shape == (300, 24) and rec["style"]["dims"] == [8, 16]
    os_ = openset.OpenSet(bank, rec, sbank)
    fresh = os_.scores(_blobs(rng, 4000, c0), np.abs(_blobs(rng, 4000, s0)))
    assert 0.91 <= 1 - os_.unknown(fresh).mean() <= 0.985
    # each part alone flags fewer than the total (the combined factor is calibrated on the larger of the two)
    assert (fresh.content > 1).mean() < os_.unknown(fresh).mean() and (fresh.style > 1).mean() < os_.unknown(fresh).mean()
    off_style = os_.scores(_blobs(rng, 50, c0), np.abs(_blobs(rng, 50, s0[::-1] * 3)))
    off_content = os_.scores(_blobs(rng, 50, -c0), np.abs(_blobs(rng, 50, s0)))
    reasons = lambda sc: [openset.open_set_fields(i, sc, os_)["ood_reason"] for i in range(len(sc))]  # noqa: E731
    assert reasons(off_style).count("style") >= 45 and reasons(off_content).count("content") >= 45
    row = openset.open_set_fields(0, off_style, os_)
    assert row["unknown"] and row["ood_score"] == pytest.approx(max(row["ood_distances"].values()), abs=1e-6)
    assert row["nearest"] is None  # no paths kept: nothing to show
    assert openset.reason_of(1.2, 1.3) == "both" and openset.reason_of(0.5, None) is None
    assert openset.reason_of(1.2, 1.3, threshold=1.25) == "style"
    with pytest.raises(ValueError):
        os_.scores(_blobs(rng, 2, c0))  # a bank with style rows needs the style statistics


def test_a_threshold_chosen_by_hand_records_the_share_that_passes():
    record, _, _ = openset.build_open_set(np.random.default_rng(2).normal(size=(40, 8)))
    low = openset.with_threshold(record, 0.0)
    assert low["quantile"] == pytest.approx(1 - openset.flagged_share(record["calibration_scores"], 0.0))
    assert low["chosen"] == "by hand" and openset.with_threshold(record, 10.0)["quantile"] == 1.0
    for bad in (-0.1, 10.5, math.nan):
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
    from tl_core.storage.workspace import Workspace

    root = tmp_path_factory.mktemp("openset_emoji")
    train, held = _split_emoji(root)
    ws = Workspace(root / "home")
    res = run_training(ws, train, TrainConfig(strategy="linear"))
    assert res.status == "done", res.error
    return ws, Path(res.run_dir), held


@pytest.fixture(scope="module")
def run_on_fashion(emoji_model) -> tuple[float, list[dict]]:
    """The emoji run's predictions on the 200 Fashion-MNIST test images (share flagged unknown, rows): made once for
    the tests that check them and that compare a bundle's with them."""
    from tl_core.share.loading import load_model

    return _flagged(load_model(emoji_model[1]), [FASHION / "test"])


def _flagged(tm, paths) -> tuple[float, list[dict]]:
    from tl_core.share.predict import predict_paths

    rows, skipped = predict_paths(tm, paths)
    assert rows and not skipped
    assert all(isinstance(r["unknown"], bool) and r["ood_score"] >= 0.0 for r in rows)
    assert all((r["ood_reason"] is None) == (not r["unknown"]) for r in rows)
    return sum(r["unknown"] for r in rows) / len(rows), rows


@pytest.mark.slow
def test_an_emoji_model_flags_fashion_images_and_few_of_its_own(emoji_model, run_on_fashion):
    from tl_core.share.loading import load_model

    _, run_dir, held = emoji_model
    files = RunFiles(run_dir)
    rec, bank = files.open_set_record(), files.open_set_bank()
    assert rec["calibration"] == "leave-one-out" and rec["n"] == 150 == rec["bank_rows"] == len(bank)
    tm = load_model(run_dir)
    # the content bank holds the probe's own input: the pooled pre-logit features of the features auto chose
    # (1280 for Lite0's last layer; more when several depths won)
    assert rec["dim"] == bank.shape[1] == tm.model.get_classifier().in_features >= 1280 and bank.dtype == np.float16
    assert np.allclose(np.linalg.norm(bank.astype(np.float32), axis=1), 1.0, atol=1e-2)
    style = files.open_set_style_bank()  # Lite0 stages 1 and 3: 24 + 112 channel std, one distance each
    assert rec["version"] == 2 and style.shape == (150, rec["style"]["bank_dim"]) == (150, 136)
    assert rec["style"]["groups"] == [[0], [1]] and len(rec["style"]["thresholds"]) == 2
    assert len(rec["bank_paths"]) == len(rec["bank_labels"]) == 150 and not rec["bank_paths"][0].startswith("/")
    own, _ = _flagged(tm, [held])
    fashion, rows = run_on_fashion
    assert own <= 0.15, own
    assert fashion >= 0.90, fashion
    # the closest class is still given, and the score is what decides
    assert all(r["label"] in tm.classes for r in rows)
    assert all(r["unknown"] == (r["ood_score"] > rec["threshold"]) for r in rows)
    # the nearest training images are real files of the training set, nearest first
    near = rows[0]["nearest"]
    assert len(near) == 3 and all(Path(n["path"]).is_file() and n["label"] in tm.classes for n in near)
    assert [n["distance"] for n in near] == sorted(n["distance"] for n in near)


@pytest.mark.slow
def test_a_fashion_model_flags_emoji_images(tmp_path):
    from tl_core.config import TrainConfig
    from tl_core.runs.training import run_training
    from tl_core.storage.workspace import Workspace
    from tl_core.share.loading import load_model
    from tl_core.share.predict import evaluate_dataset

    ws = Workspace(tmp_path / "home")
    res = run_training(ws, FASHION, TrainConfig(strategy="linear"))  # its test/ folder stays held out
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
def test_a_bundle_says_unknown_offline_in_a_fresh_workspace(emoji_model, run_on_fashion, tmp_path, monkeypatch):
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
    _, run_rows = run_on_fashion
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
    assert predictions_csv(rows).splitlines()[1].endswith(",,,,,,")
    assert rows[0]["ood_reason"] is None and rows[0]["ood_distances"] is None and rows[0]["nearest"] is None
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
    assert [r["ood_reason"] for r in rows][3] is None and all(r["ood_reason"] in ("style", "content", "both")
                                                               for r in rows[:3])
    assert all(set(r["ood_distances"]) == {"content", "style"} for r in rows)
    import csv

    got = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [g["unknown"] for g in got] == ["true", "true", "true", "false"]
    assert [g["ood_reason"] for g in got] == [r["ood_reason"] or "" for r in rows]
    assert float(got[0]["ood_style"]) == pytest.approx(rows[0]["ood_distances"]["style"], abs=1e-6)
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
    assert not shown["saved"] and not shown.get("chosen") and shown["threshold"] == 1.0
    assert "calibration_scores" not in shown and "bank_paths" not in shown and "unknown" in shown["meaning"]
    assert "style" in shown["meaning"] and shown["style"]["stages"] and "calibration" not in shown["content"]
    assert main(["openset", str(run), "--threshold", "0.0", "--json"]) == 0
    now = json.loads(capsys.readouterr().out)
    assert now["saved"] and now["threshold"] == 0.0 and now["chosen"] == "by hand" and now["flagged_share"] > 0.5
    assert RunFiles(run).open_set_record()["threshold"] == 0.0
    assert main(["openset", str(run)]) == 0 and "chosen by hand" in capsys.readouterr().out
    assert main(["openset", str(run), "--threshold", "11"]) == 2
    assert "between 0 and 10" in capsys.readouterr().err and RunFiles(run).open_set_record()["threshold"] == 0.0
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
        openset.set_threshold(run, 11.0)
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
    assert f"Above {rec['threshold']:.2f}" in section and "`unknown`" in section and "95%" in section
    assert "leave-one-out" in section and f"{rec['bank_rows']} training images" in section
    assert "**style**" in section and "**content**" in section and "`ood_reason`" in section
    html = build_report(emoji_run_dir)
    assert "Images unlike the training images" in html and f"Above {rec['threshold']:.2f}" in html
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
    from tl_core.storage.workspace import Workspace
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


@pytest.mark.parametrize("damage", ["no bank", "bad threshold", "other score", "wrong dim", "no style rows",
                                    "no style thresholds"])
def test_damaged_open_set_files_are_refused_in_one_sentence(emoji_run_dir, tmp_path, damage):
    from tl_core.errors import ExportError
    from tl_core.share.loading import load_model

    run = tmp_path / "run"
    shutil.copytree(emoji_run_dir, run)
    rec = json.loads((run / "ood.json").read_text())
    if damage == "no bank":
        (run / "ood_bank.safetensors").unlink()
    elif damage == "no style rows":
        from safetensors.numpy import save_file

        save_file({"bank": RunFiles(run).open_set_bank()}, str(run / "ood_bank.safetensors"))
    elif damage == "no style thresholds":
        rec["style"].pop("thresholds")
        (run / "ood.json").write_text(json.dumps(rec))
    else:
        rec.update({"bad threshold": {"threshold": "high"}, "other score": {"score": "energy"},
                    "wrong dim": {"dim": 7}}[damage])
        (run / "ood.json").write_text(json.dumps(rec))
    with pytest.raises(ExportError) as e:
        load_model(run)
    msg = str(e.value)
    assert "\n" not in msg and ("ood" in msg) and ("again" in msg)


# -- version 2: style, old runs, the far-foreign case ------------------------------------------------------------
def _as_version_1(run: Path) -> None:
    """Rewrite a run's open-set files as TL Studio wrote them before style scores (version 1: content only, the
    threshold a cosine distance, no style rows, no image paths)."""
    from safetensors.numpy import save_file

    files = RunFiles(run)
    bank = files.open_set_bank()
    loo = openset.nn_distance(bank, bank, exclude_self=True)
    rec = {"score": "knn-cosine", "version": 1, "threshold": openset.conformal_threshold(loo), "quantile": 0.95,
           "n": len(loo), "dim": int(bank.shape[1]), "bank_rows": len(bank), "calibration": "leave-one-out",
           "calibration_scores": [round(float(v), 6) for v in loo]}
    save_file({"bank": bank}, str(run / "ood_bank.safetensors"))
    (run / "ood.json").write_text(json.dumps(rec))


def test_a_version_1_run_still_loads_and_predicts(emoji_run_dir, tmp_path, capsys):
    from tl_core.cli import main
    from tl_core.share.card import model_card
    from tl_core.share.loading import load_model
    from tl_core.share.predict import predict_paths

    run = tmp_path / "v1"
    shutil.copytree(emoji_run_dir, run)
    _as_version_1(run)
    tm = load_model(run)
    assert tm.open_set.version == 1 and tm.open_set.style is None and tm.style_spec is None
    rec = tm.open_set.record
    fashion = sorted((FASHION / "test" / "bag").iterdir())[:3]
    rows, _ = predict_paths(tm, [*fashion, sorted((EMOJI / "food").iterdir())[0]])
    # the version-1 score: the cosine distance itself, against the cosine threshold
    assert all(r["unknown"] == (r["ood_score"] > rec["threshold"]) for r in rows) and rows[3]["unknown"] is False
    assert all(0.0 <= r["ood_score"] <= 2.0 and r["ood_distances"]["style"] is None for r in rows)
    assert [r["ood_reason"] for r in rows] == ["content" if r["unknown"] else None for r in rows]
    assert all(r["ood_distances"]["content"] == pytest.approx(r["ood_score"] / rec["threshold"], abs=1e-5)
               for r in rows)
    assert rows[0]["nearest"] is None  # version 1 kept no image paths
    assert "cosine distance" in model_card(RunFiles(run))
    # its threshold is still a cosine distance, 0-2
    assert main(["openset", str(run), "--threshold", "2.5"]) == 2 and "between 0 and 2" in capsys.readouterr().err
    assert openset.set_threshold(run, 0.5)["threshold"] == 0.5


def test_style_comes_from_the_same_forward_pass_and_the_cache_gives_the_same(emoji_run_dir, workspace):
    """Features, logits and style of one forward_intermediates pass equal the plain forward's; a linear run's
    cached route (features and style from the feature cache) gives what the whole network gives."""
    import torch
    from PIL import Image

    from tl_core.cache import DecodedImageCache
    from tl_core.data.images import file_sha256
    from tl_core.data.intake import ImageItem
    from tl_core.models.features import DEFAULT_STYLE, pooled_and_style, pooled_features
    from tl_core.models.inference import logits_of_images, logits_of_items, logits_via_cache
    from tl_core.share.loading import load_model

    tm = load_model(emoji_run_dir)
    assert tm.style_spec == DEFAULT_STYLE
    paths = sorted((EMOJI / "food").iterdir())[:3] + sorted((FASHION / "test" / "bag").iterdir())[:2]
    images = [Image.open(p).convert("RGB") for p in paths]
    x = torch.stack([tm.pre.eval_from_pil(im) for im in images])
    with torch.inference_mode():
        f, st = pooled_and_style(tm.model, x, DEFAULT_STYLE)
        assert torch.allclose(f, pooled_features(tm.model, x), atol=1e-4)
        assert torch.allclose(tm.model.get_classifier()(f), tm.model(x), atol=1e-4)
    z, f2, st2 = logits_of_images(tm.model, images, tm.pre, with_features=True, style=DEFAULT_STYLE)
    assert st2.shape == (5, 136) and np.allclose(st2, st.numpy(), atol=1e-4)
    items = [ImageItem(path=p, label="", sha256=file_sha256(p)) for p in paths]
    decoded = DecodedImageCache(workspace.cache_dir / "decoded")
    whole = logits_of_items(tm.model, items, tm.pre, decoded, with_features=True, style=DEFAULT_STYLE)
    source = tm.cached_features(workspace)
    assert source.style_cache is not None
    for _ in range(2):  # extracted and cached, then read back from the cache
        cached = logits_via_cache(tm.model, items, tm.pre, decoded, source, with_features=True, style=DEFAULT_STYLE)
        for a, b in zip(whole, cached):
            assert np.allclose(a, b, atol=1e-4)
    assert source.style_cache.get(items[0].sha256, 136) is not None


def _digits(root: Path, n: int) -> Path:
    """``n`` handwritten digits (scikit-learn's 8x8 scans), dark ink on white, upscaled to 64x64 RGB PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    out = root / "digits"
    out.mkdir()
    d = load_digits()
    for i in range(n):
        a = (255 - d.images[i] * 16).clip(0, 255).astype(np.uint8)
        Image.fromarray(a).resize((64, 64), Image.BILINEAR).convert("RGB").save(out / f"digit_{i:03d}.png")
    return out


@pytest.mark.slow
def test_a_small_varied_colour_model_flags_handwritten_digits(tmp_path):
    """The issue's far-foreign case: a linear model of 8 colour drawings per class (40 images) calls handwritten
    digits unknown (>= 80%; measured 100% of 200) while flagging few of its own held-out images (measured 6% of 160
    at the conformal 95% threshold of 40 leave-one-out scores, 95% interval 3-11%; allowed 15% for that noise)."""
    from tl_core.config import TrainConfig
    from tl_core.runs.training import run_training
    from tl_core.storage.workspace import Workspace
    from tl_core.share.loading import load_model

    train, held = _split_emoji(tmp_path, n_train=8)
    res = run_training(Workspace(tmp_path / "home"), train, TrainConfig(strategy="linear"))
    assert res.status == "done", res.error
    tm = load_model(res.run_dir)
    assert tm.open_set.record["calibration"] == "leave-one-out" and tm.open_set.record["n"] == 40
    digits, rows = _flagged(tm, [_digits(tmp_path, 120)])
    own, _ = _flagged(tm, [held])
    assert digits >= 0.80 and own <= 0.15, (digits, own)
    # the kind of picture differs: most digits are flagged on style
    assert sum(r["ood_reason"] in ("style", "both") for r in rows) >= 0.8 * len(rows)
