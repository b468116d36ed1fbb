"""Training strategies on real sample data: accuracy bars, the classic recipe, scratch, determinism, cancel."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EMOJI, FASHION, make_class_folder
from tl_core.config import TrainConfig
from tl_core.errors import CancelledError
from tl_core.storage.files import SAVED, VALIDATION_FIT, RunFiles
from tl_core.runs.training import run_training


def test_linear_probe_on_emoji_is_accurate_and_writes_the_run(emoji_run):
    ws, res = emoji_run
    assert res.status == "done" and res.weights["source"] == "packaged"
    assert res.val_accuracy >= 0.9, res.val_accuracy
    assert res.classes == ["animal", "face", "flag", "food", "vehicle"]
    run_dir = ws.run_dir(res.run_id)
    for f in ("model.safetensors", "val_head.safetensors", "config.json", "meta.json", "metrics.json",
              "predictions.json"):
        assert (run_dir / f).is_file(), f
    metrics = RunFiles(run_dir).metrics()
    assert np.array(metrics.val["confusion"]).sum() == 40 == metrics.val["count"]
    assert metrics.history and metrics.history[-1]["val_acc"] == pytest.approx(res.val_accuracy, abs=1e-6)
    # the probe stopped where its solver converged, well before the iteration cap, and says so; no "best epoch"
    from tl_core.models.probe import PROBE_MAX_ITERATIONS

    assert metrics.stop["reason"] == "converged" and metrics.stop["epoch"] == res.epochs_run
    assert res.epochs_run <= metrics.stop["iterations"] < PROBE_MAX_ITERATIONS == metrics.stop["max_iterations"]
    assert res.best_epoch is None and metrics.best_epoch is None
    assert "top_losses" not in metrics.to_dict()  # mistakes are derived from the saved logits
    row = ws.store().get(res.run_id)
    assert row["status"] == "done" and row["summary"]["val_accuracy"] == res.val_accuracy
    assert len(ws.store().epochs(res.run_id)) == res.epochs_run
    assert json.loads((run_dir / "config.json").read_text())["strategy"] == "linear"


def test_linear_run_reports_cross_validated_accuracy_and_intervals(emoji_run, capsys):
    """A linear run's out-of-fold estimate: k-fold accuracy on every labelled image, with the same probe and C,
    recorded in metrics.json and meta.json; every headline figure carries its Wilson interval."""
    ws, res = emoji_run
    assert res.cv_count == 200 and res.cv_folds == 5  # train + validation, out of fold
    assert 0.8 <= res.cv_accuracy <= 1.0, res.cv_accuracy
    lo, hi = res.cv_accuracy_ci
    assert lo <= res.cv_accuracy <= hi and hi - lo < 0.12  # 200 images: a tighter interval than 40 give
    assert lo <= res.val_accuracy <= hi  # the validation figure is within the cross-validated interval
    vlo, vhi = res.val_accuracy_ci
    assert vlo <= res.val_accuracy <= vhi and vhi - vlo > hi - lo
    files = RunFiles(ws.run_dir(res.run_id))
    m = files.metrics()
    assert m.cv["accuracy"] == res.cv_accuracy and m.cv["correct"] == round(res.cv_accuracy * 200)
    assert m.val["accuracy_ci"] == res.val_accuracy_ci and m.val["correct"] == round(res.val_accuracy * 40)
    assert files.meta().extra["cv"] == m.cv
    assert m.cv["seconds"] < m.seconds  # k probe fits on cached features: a small part of the run
    d = res.to_dict()
    assert {"val_accuracy_ci", "test_accuracy_ci", "cv_accuracy", "cv_accuracy_ci"} <= set(d)
    assert d["test_accuracy_ci"] is None and "micro_f1_ci" not in d


def test_locked_test_share_is_carved_and_never_used_for_a_choice(workspace, monkeypatch, tmp_path):
    """test_split carves a stratified test part; no fit, cross-validation or open-set threshold sees its images."""
    import tl_core.models.crossfit as crossfit
    import tl_core.runs.training as training

    seen: list[np.ndarray] = []
    captured: dict = {}
    real_extract, real_fit, real_open = training.extract_features, training.fit_linear_head, training.build_open_set

    def extract(model, items, *a, **k):
        out = real_extract(model, items, *a, **k)
        captured.setdefault("items", list(items))
        captured.setdefault("feats", out[0] if isinstance(out, tuple) else out)  # (features, style rows)
        return out

    def fit(x_train, y_train, x_val, *a, **k):
        seen.extend([np.asarray(x_train), np.asarray(x_val)])
        return real_fit(x_train, y_train, x_val, *a, **k)

    def open_set(bank, calibration, **k):
        seen.extend([np.asarray(bank)] + ([np.asarray(calibration)] if calibration is not None else []))
        return real_open(bank, calibration, **k)

    monkeypatch.setattr(training, "extract_features", extract)
    monkeypatch.setattr(training, "fit_linear_head", fit)
    monkeypatch.setattr(crossfit, "fit_linear_head", fit)
    monkeypatch.setattr(training, "build_open_set", open_set)
    # through extract_features, where the rows are captured (a recorded backbone would read the cache back)
    monkeypatch.setattr(training, "recorded_backbone", lambda *a, **k: None)
    res = run_training(workspace, EMOJI, TrainConfig(strategy="linear", features="last", test_split=0.2))
    assert res.status == "done", res.error
    assert (res.test_count, res.val_count, res.cv_count) == (40, 30, 160)
    assert res.test_accuracy is not None and res.test_accuracy_ci[0] <= res.test_accuracy <= res.test_accuracy_ci[1]
    test_paths = set(RunFiles(res.run_dir).predictions().get("test").paths)
    assert len(test_paths) == 40 and not test_paths & set(RunFiles(res.run_dir).predictions().get("val").paths)
    rows = [n for n, it in enumerate(captured["items"]) if str(it.path) in test_paths]
    assert len(rows) == 40
    test_rows = {np.asarray(captured["feats"][n], np.float32).tobytes() for n in rows}
    assert len(seen) > 5  # the fits, the cross-validation folds, the refit and the open-set bank
    for x in seen:
        assert not any(np.asarray(r, np.float32).tobytes() in test_rows for r in x)
    # a test set of its own and a carve are one too many
    from tl_core.errors import DatasetError

    own = tmp_path / "own"
    make_class_folder(own / "train", {"a": 3, "b": 3})
    make_class_folder(own / "test", {"a": 1, "b": 1})
    with pytest.raises(DatasetError, match="test share to 0"):
        run_training(workspace, own, TrainConfig(strategy="linear", features="last", test_split=0.2))


def _pretrained_state() -> dict[str, torch.Tensor]:
    from tl_core.models.backbones import build_model

    model, _ = build_model("efficientnet_lite0", 5)
    return model.state_dict()


def _changed(saved: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], prefix: str) -> list[bool]:
    """For each floating-point tensor under ``prefix``: whether the saved run's differs from ``ref``'s."""
    return [not torch.equal(saved[k], ref[k]) for k in saved
            if k.startswith(prefix) and saved[k].is_floating_point() and k in ref]


@pytest.mark.slow
def test_pretrained_beats_scratch_by_a_wide_margin(workspace):
    # 12 training images per class; scratch gets 3 epochs (several times the probe's time) and still loses
    linear = run_training(workspace, EMOJI, TrainConfig(strategy="linear", max_per_class=12))
    scratch = run_training(workspace, EMOJI, TrainConfig(strategy="scratch", epochs=3, augment="none", max_per_class=12))
    assert scratch.weights["source"] == "random" and scratch.status == "done"
    assert linear.val_accuracy >= 0.8, linear.val_accuracy  # chance is 0.2
    assert linear.val_accuracy - scratch.val_accuracy >= 0.3, (linear.val_accuracy, scratch.val_accuracy)
    # scratch really trained every layer from random weights: 3 epochs with a training loss, no probe epoch 0
    epochs = workspace.store().epochs(scratch.run_id)
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and all("train_loss" in e for e in epochs)
    saved = RunFiles(scratch.run_dir).weights()
    ref = _pretrained_state()
    assert all(_changed(saved, ref, "conv_stem.")) and all(_changed(saved, ref, "blocks.0."))


@pytest.mark.slow
def test_finetuning_in_a_fresh_workspace_trains(workspace, monkeypatch):
    """Nothing cached: the probe head's features come from this very model on PyTorch (inference mode), then the
    same model is fine-tuned (it once failed: weights remade in inference mode cannot require gradients)."""
    monkeypatch.setenv("TL_ENGINE", "torch")
    res = run_training(workspace, EMOJI, TrainConfig(strategy="full", epochs=1, max_per_class=6), raise_errors=False)
    assert res.status == "done", res.error
    assert [e["epoch"] for e in workspace.store().epochs(res.run_id)] == [0, 1]


@pytest.mark.slow
def test_full_finetuning_trains_the_backbone_and_keeps_the_better_checkpoint(workspace):
    # the probe fine-tuning starts from is on the last layer's features (LP-FT): compare with that linear run
    linear = run_training(workspace, EMOJI, TrainConfig(strategy="linear", features="last", max_per_class=16))
    full = run_training(workspace, EMOJI, TrainConfig(strategy="full", epochs=2, max_per_class=16))
    assert full.status == "done"
    epochs = workspace.store().epochs(full.run_id)
    assert [e["epoch"] for e in epochs] == [0, 1, 2] and all("val_loss" in e for e in epochs)
    # epoch 0 is the linear probe fine-tuning starts from: validation only, the same accuracy as the linear run
    assert epochs[0].get("probe") and "train_loss" not in epochs[0]
    assert epochs[0]["val_acc"] == pytest.approx(linear.val_accuracy)
    # fine-tuning learns: the training loss falls from epoch to epoch, and here it beats the probe on validation
    assert epochs[2]["train_loss"] < epochs[1]["train_loss"], epochs
    assert full.best_epoch >= 1 and full.val_accuracy > linear.val_accuracy, (full.best_epoch, full.val_accuracy)
    assert epochs[full.best_epoch]["val_acc"] == pytest.approx(full.val_accuracy)  # the kept checkpoint's score
    files = RunFiles(full.run_dir)
    assert files.metrics().best_epoch == full.best_epoch
    assert files.metrics().stop == {"reason": "epochs", "epoch": 2, "epochs": 2, "patience": 4,
                                    "best_epoch": full.best_epoch}
    # every stage of the backbone moved, while the pretrained BatchNorm statistics were kept
    saved, ref = files.weights(), _pretrained_state()
    for stage in ("conv_stem.", "blocks.0.", "blocks.3.", "blocks.6.", "conv_head."):
        assert any(_changed(saved, ref, stage)), stage
    stats = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(saved[k], ref[k]) for k in stats)


def test_partial_unfreezes_only_the_last_blocks():
    from tl_core.models.backbones import build_model
    from tl_core.models.training import set_trainable as _set_trainable

    model, _ = build_model("efficientnet_lite0", 3)
    frozen = _set_trainable(model, "partial", 2)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.5", "blocks.6", "conv_head", "bn2", "classifier"}
    assert frozen and not model.conv_stem.weight.requires_grad


# --------------------------------------------------------------------------------------------------
# partial fine-tuning and class balancing, end to end on an imbalanced emoji subset
# --------------------------------------------------------------------------------------------------
MINORITY = "vehicle"


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> Path:
    """Real emoji in a train/val layout: 30 training images per class but only 3 of ``vehicle``; a balanced
    validation folder of 10 per class, so that the minority's recall is measured on 10 images."""
    root = tmp_path_factory.mktemp("imbalanced")
    for cls in sorted(p for p in EMOJI.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        for split, chosen in (("val", files[:10]), ("train", files[10:10 + (3 if cls.name == MINORITY else 30)])):
            (root / split / cls.name).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, root / split / cls.name / f.name)
    return root


@pytest.fixture(scope="module")
def imbalanced_runs(imbalanced, tmp_path_factory):
    """Linear runs with each class balance, and partial runs (one epoch) without and with the balanced sampler."""
    from tl_core.storage.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("imbalanced_home"))
    runs = {}
    for strategy, balances in (("linear", ("none", "weights", "sampler")), ("partial", ("none", "sampler"))):
        for balance in balances:
            # the linear runs keep the last layer: these tests are about the balance, and partial's probe (epoch 0)
            # is the same fit as the linear run
            extra = {"epochs": 1} if strategy == "partial" else {"features": "last"}
            res = run_training(ws, imbalanced, TrainConfig(strategy=strategy, class_balance=balance, **extra))
            assert res.status == "done", res.error
            runs[strategy, balance] = res
    return ws, runs


def _minority(res) -> dict[str, float]:
    """The minority class's validation recall, and the probability the model gives it on its own images."""
    files = RunFiles(res.run_dir)
    classes = files.meta().classes
    val = files.predictions().get("val")
    y, p = val.targets(classes), val.probs(files.meta().temperature)
    k = classes.index(MINORITY)
    return {"recall": float((p[y == k].argmax(1) == k).mean()), "prob": float(p[y == k, k].mean()),
            "count": int((y == k).sum())}


@pytest.mark.slow
def test_partial_finetuning_end_to_end(imbalanced_runs):
    ws, runs = imbalanced_runs
    res = runs["partial", "none"]
    assert res.status == "done" and res.epochs_run == 1 and res.counts[MINORITY] == 13
    assert res.val_accuracy >= 0.85, res.val_accuracy  # 50 validation images of 5 classes; chance is 0.2
    files = RunFiles(res.run_dir)
    metrics = files.metrics()
    # the best epoch and how training stopped are recorded, in the run's files and in the store
    assert metrics.best_epoch == res.best_epoch == ws.store().get(res.run_id)["summary"]["best_epoch"]
    assert metrics.stop == {"reason": "epochs", "epoch": 1, "epochs": 1, "patience": 4, "best_epoch": res.best_epoch}
    assert [h["epoch"] for h in metrics.history] == [0, 1] and metrics.history[0]["probe"]
    # epoch 0 is the probe (the same fit as the linear run); the fine-tuned epoch beat it and was kept
    assert metrics.history[0]["val_acc"] == pytest.approx(runs["linear", "none"].val_accuracy)
    assert res.best_epoch == 1 and res.val_accuracy > runs["linear", "none"].val_accuracy
    assert files.predictions().get("val").model == SAVED and not files.meta().refitted
    # only the last two stages (and the head) were trained; everything before them is the pretrained network
    saved, ref = files.weights(), _pretrained_state()
    for frozen in ("conv_stem.", "bn1.", "blocks.0.", "blocks.2.", "blocks.4."):
        assert not any(_changed(saved, ref, frozen)), frozen
    for trained in ("blocks.5.", "blocks.6.", "conv_head."):
        assert any(_changed(saved, ref, trained)), trained


@pytest.mark.slow
def test_class_balancing_changes_what_the_model_learns_of_the_minority(imbalanced_runs):
    _, runs = imbalanced_runs
    none, weights, sampler = (runs["linear", b] for b in ("none", "weights", "sampler"))
    m_none, m_weights = _minority(none), _minority(weights)
    assert m_none["count"] == 10
    # loss weights: the 3 vehicle images weigh as much as 30 of another class; more vehicles are found
    assert m_weights["recall"] >= m_none["recall"] + 0.2, (m_none, m_weights)
    assert m_weights["prob"] > m_none["prob"] + 0.05, (m_none, m_weights)
    assert weights.val_accuracy >= none.val_accuracy
    # the learned (saved) head: its minority row moved, and its bias favours the minority more
    k = none.classes.index(MINORITY)
    hn, hw = (RunFiles(r.run_dir).weights() for r in (none, weights))
    assert float((hw["classifier.weight"][k] - hn["classifier.weight"][k]).abs().max()) > 1e-2
    assert float(hw["classifier.bias"][k]) > float(hn["classifier.bias"][k])
    # the linear probe is one full-batch fit: balanced sampling is exactly the weighted objective
    ls, lw = (RunFiles(r.run_dir).predictions().get("val").logits for r in (sampler, weights))
    np.testing.assert_array_equal(ls, lw)
    # fine-tuning with the sampler: its probe (epoch 0) is the balanced one, and the run ends elsewhere than without
    p_none, p_sampler = runs["partial", "none"], runs["partial", "sampler"]
    h_none, h_sampler = (RunFiles(r.run_dir).metrics().history for r in (p_none, p_sampler))
    assert h_sampler[0]["val_acc"] == pytest.approx(weights.val_accuracy)
    assert h_none[0]["val_acc"] == pytest.approx(none.val_accuracy)
    assert h_sampler[1]["train_loss"] != h_none[1]["train_loss"]
    assert _minority(p_sampler) != _minority(p_none)


@pytest.mark.slow
def test_same_seed_same_result(workspace):
    cfg = TrainConfig(strategy="linear", seed=7, max_per_class=10)
    a = run_training(workspace, EMOJI, cfg)
    b = run_training(workspace, EMOJI, cfg)
    pa, pb = (RunFiles(workspace.run_dir(r.run_id)).predictions().get("val") for r in (a, b))
    assert pa.paths == pb.paths and len(pa) == 40
    np.testing.assert_array_equal(pa.logits, pb.logits)
    wa, wb = (RunFiles(workspace.run_dir(r.run_id)).weights() for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the re-train reads the cross-validated estimate back instead of fitting k probes again
    ca, cb = (RunFiles(workspace.run_dir(r.run_id)).metrics().cv for r in (a, b))
    assert not ca.get("reused") and cb["reused"] and {**cb, "reused": False} == {**ca, "reused": False}
    c = run_training(workspace, EMOJI, dataclasses.replace(cfg, seed=8))  # another seed: another split
    assert RunFiles(workspace.run_dir(c.run_id)).predictions().get("val").paths != pa.paths


@pytest.mark.finetune
def test_progress_callback_and_cooperative_cancel(workspace, shared_cache):
    from insight_support import emoji_small

    events = []

    def stop_at_first_training_step():
        return any(e.get("stage") == "train" for e in events)

    with pytest.raises(CancelledError, match="Cancelled"):
        # 12 emoji per class: 10 validation images, and training steps of 4 images, so that one step is cheap
        run_training(workspace, emoji_small(shared_cache), TrainConfig(strategy="full", epochs=1, batch_size=4),
                     progress=events.append, should_cancel=stop_at_first_training_step)
    stages = [e["stage"] for e in events]
    assert stages[0] == "check" and "extract" in stages and "probe" in stages and "decode" in stages
    assert stages.count("train") == 1  # stopped at the first check after the first step
    assert [e["epoch"] for e in events if e["stage"] == "epoch"] == [0]  # the probe's epoch 0, no epoch 1
    run = workspace.store().list()[0]
    assert run["status"] == "cancelled" and "Cancelled" in run["error"]
    assert list(workspace.runs_dir.iterdir()) == []  # nothing of the run was published or left staged


def test_bad_data_path_fails_before_creating_a_run(workspace):
    from tl_core.errors import DatasetError

    with pytest.raises(DatasetError, match="does not exist"):
        run_training(workspace, "/no/such/dataset", TrainConfig())
    assert workspace.store().list() == []


def test_linear_head_solves_the_logistic_regression_objective():
    """fit_linear_head's hand-written gradient: its optimum equals scikit-learn's on the same objective,
    with and without class-balancing sample weights."""
    from sklearn.linear_model import LogisticRegression

    from tl_core.models.probe import fit_linear_head

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    y = np.repeat(np.arange(4), [40, 30, 20, 10])
    x = (centres[y] + rng.normal(scale=1.5, size=(len(y), 32))).astype(np.float32)
    xv, yv = x[::5], y[::5]
    for balance in ("none", "weights"):
        cfg = TrainConfig(strategy="linear", epochs=200, class_balance=balance, linear_c=0.5)
        head, info = fit_linear_head(x, y, xv, yv, 4, cfg)
        sk = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000,
                                class_weight="balanced" if balance != "none" else None).fit(x, y)
        sw = np.ones(len(y)) if balance == "none" else (len(y) / (4 * np.bincount(y)))[y]

        def objective(w, b):  # scikit-learn's objective divided by C
            z = x.astype(np.float64) @ w + b
            z = z - z.max(1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(1, keepdims=True))
            return -(sw * logp[np.arange(len(y)), y]).sum() + (w * w).sum() / (2 * 0.5)

        ours = objective(head.weight.detach().double().numpy().T, head.bias.detach().double().numpy())
        theirs = objective(sk.coef_.T, sk.intercept_)
        # ours stops where scikit-learn's default tol would; theirs is solved to tol 1e-10
        assert ours == pytest.approx(theirs, rel=2e-4), (balance, ours, theirs)
        with torch.no_grad():
            pred = head(torch.from_numpy(x)).argmax(1).numpy()
        assert (pred == sk.predict(x)).mean() >= 0.99
        assert info["epochs_run"] < 200  # it converged and stopped early


def test_with_fewer_images_than_features_the_probe_solves_in_their_span_to_the_same_optimum(monkeypatch):
    """Most small data sets have fewer images than features (300 digits, 1,792 features): the probe solves for the
    weights in the span of the training images (models.probe._row_space), which holds the optimum. It must reach
    scikit-learn's optimum as the features' own coordinates do, multinomial and one-vs-rest, and a warm start
    (the refit on train + validation) too."""
    from sklearn.linear_model import LogisticRegression

    from tl_core.models import probe

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 200))
    y = np.arange(60) % 3
    x = (centres[y] + rng.normal(scale=2.0, size=(60, 200))).astype(np.float32)
    xv, yv = x[:0], y[:0]
    assert probe._row_space(x).shape == (200, 60)  # 60 images of 200 features: their span is used
    cfg = TrainConfig(strategy="linear", linear_c=0.5).resolved()

    def objective(head):  # scikit-learn's objective divided by C
        if isinstance(head, LogisticRegression):
            w, b = head.coef_.T, head.intercept_
        else:
            w, b = head.weight.detach().double().numpy().T, head.bias.detach().double().numpy()
        z = x.astype(np.float64) @ w + b
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -logp[np.arange(len(y)), y].sum() + (w * w).sum() / (2 * 0.5)

    sk = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(x, y)
    span, info = probe.fit_linear_head(x, y, xv, yv, 3, cfg)
    assert info["converged"]
    assert objective(span) == pytest.approx(objective(sk), rel=2e-4)
    with torch.no_grad():
        assert (span(torch.from_numpy(x)).argmax(1).numpy() == sk.predict(x)).all()
    # warm-started from a fit on half the images, as the refit starts from the train-only fit
    half, _ = probe.fit_linear_head(x[::2], y[::2], xv, yv, 3, cfg)
    warm, _ = probe.fit_linear_head(x, y, xv, yv, 3, cfg, init=half)
    # the features' own coordinates (no span) give the same probabilities to the solver's tolerance, cold or warm
    monkeypatch.setattr(probe, "SPAN_BELOW", 0.0)
    assert probe._row_space(x) is None
    full, _ = probe.fit_linear_head(x, y, xv, yv, 3, cfg)
    half_full, _ = probe.fit_linear_head(x[::2], y[::2], xv, yv, 3, cfg)
    warm_full, _ = probe.fit_linear_head(x, y, xv, yv, 3, cfg, init=half_full)
    # (a warm start stops once the objective stops moving, a little above the optimum: in both coordinates)
    assert objective(warm) == pytest.approx(objective(warm_full), rel=2e-4)
    assert objective(warm) == pytest.approx(objective(sk), rel=2e-3)
    with torch.no_grad():
        p_span, p_full = (h(torch.from_numpy(x)).softmax(1) for h in (span, full))
    assert float((p_span - p_full).abs().max()) < 0.02
    # one-vs-rest (multi-label) likewise
    yy = np.eye(3)[y]
    ovr_full, _ = probe.fit_ovr_head(x, yy, x[:0], yy[:0], cfg)
    monkeypatch.setattr(probe, "SPAN_BELOW", 0.75)
    ovr_span, _ = probe.fit_ovr_head(x, yy, x[:0], yy[:0], cfg)
    with torch.no_grad():
        q_span, q_full = (h(torch.from_numpy(x)).sigmoid() for h in (ovr_span, ovr_full))
    assert float((q_span - q_full).abs().max()) < 0.02


def test_checkpoint_selection_prefers_accuracy_then_loss():
    """Fine-tuning (label-smoothed) scores a worse loss than the sharp probe while classifying more images
    correctly: the better checkpoint is the more accurate one, loss breaking ties; patience still stops."""
    from tl_core.models.training import EarlyStopper as _EarlyStopper

    s = _EarlyStopper(patience=2)
    assert s.step(0.44, 0, 0.85) == (True, False)   # the probe
    assert s.step(0.60, 1, 0.82) == (False, False)  # worse on both
    assert s.step(0.51, 2, 0.87) == (True, False)   # more accurate, higher loss: better
    assert s.step(0.50, 3, 0.87) == (True, False)   # as accurate, lower loss: better
    assert s.step(0.55, 4, 0.87) == (False, False)  # as accurate, higher loss: not
    assert s.step(0.40, 5, 0.86) == (False, True)   # lower loss, less accurate: not; second bad epoch stops
    assert (s.best_epoch, s.best, s.best_acc) == (3, 0.50, 0.87)
    nan = _EarlyStopper(patience=0)  # no validation accuracy (no val images): loss decides
    assert nan.step(1.0, 1, float("nan"))[0] and not nan.step(1.1, 2, float("nan"))[0]


@pytest.mark.slow
def test_linear_refit_uses_every_labelled_image_and_keeps_validation_honest(workspace):
    """refit (default): the saved head is fitted on train + validation; validation predictions and figures stay
    those of the training-only fit, kept as val_head.safetensors; calibration reads that fit's saved logits."""
    from tl_core.insight.calibrate import validation_logits
    from tl_core.metrics import softmax
    from tl_core.share.loading import load_model
    from tl_core.share.predict import predict_paths

    plain = run_training(workspace, FASHION, TrainConfig(strategy="linear", refit=False))
    refit = run_training(workspace, FASHION, TrainConfig(strategy="linear"))
    assert plain.val_accuracy == refit.val_accuracy and plain.val_loss == refit.val_loss
    fa, fb = (RunFiles(workspace.run_dir(r.run_id)) for r in (plain, refit))
    va, vb = fa.predictions().get("val"), fb.predictions().get("val")
    np.testing.assert_array_equal(va.logits, vb.logits)
    assert (va.model, vb.model) == (SAVED, VALIDATION_FIT)
    assert fb.meta().fit_on == "train+val" and fb.meta().refitted
    assert fa.meta().fit_on == "train" and not fa.meta().refitted and not fa.has("val_head.safetensors")
    wa, wb = fa.weights(), fb.weights()
    head = [k for k in wa if k.startswith("classifier.")]
    assert head and all(torch.equal(wa[k], wb[k]) for k in wa if k not in head)  # same frozen backbone
    assert not torch.equal(wa["classifier.weight"], wb["classifier.weight"])  # the head saw more images
    vh = fb.validation_head()  # the training-only head: exactly the one the plain run saved
    assert sorted(vh) == sorted(head) and all(torch.equal(vh[k], wa[k]) for k in head)
    # the test split is predicted by the saved (refitted) model
    assert fb.predictions().get("test").model == SAVED and refit.test_accuracy is not None

    v = validation_logits(workspace.run_dir(refit.run_id), workspace)
    assert v["model"] == VALIDATION_FIT
    np.testing.assert_array_equal(v["logits"], vb.logits)
    # the validation-fit model reproduces the saved validation predictions from the images; the saved one does not
    classes = fb.meta().classes

    def probs_of(tm) -> np.ndarray:
        rows, _ = predict_paths(tm, vb.paths, top_k=len(classes))
        return np.array([[{t["label"]: t["confidence"] for t in r["top_k"]}[c] for c in classes] for r in rows])

    val_fit = load_model(workspace.run_dir(refit.run_id), head=VALIDATION_FIT)
    assert val_fit.head == VALIDATION_FIT
    np.testing.assert_allclose(probs_of(val_fit), softmax(vb.logits), atol=1e-4)
    saved = load_model(workspace.run_dir(refit.run_id))
    assert saved.head == SAVED and np.abs(probs_of(saved) - softmax(vb.logits)).max() > 1e-3
    # a run that was not refitted has no other head: asking for it loads the saved model
    assert load_model(workspace.run_dir(plain.run_id), head=VALIDATION_FIT).head == SAVED


# after the refit test: its runs on the same Fashion-MNIST images extract several depths' features, which fills
# the last layer's cache in the same pass (tl_core.models.features.extract_features' last_cache), so this run
# reads the features the comparison needs instead of extracting all 500 images again (any order passes)
@pytest.mark.slow
def test_linear_probe_equals_logistic_regression_on_the_same_images(workspace):
    """The classic recipe: scikit-learn LogisticRegression on frozen Lite0 features of the same images."""
    from sklearn.linear_model import LogisticRegression

    from tl_core.models.backbones import build_model
    from tl_core.models.preprocess import data_config_for
    from tl_core.cache import DecodedImageCache
    from tl_core.data.intake import open_dataset
    from tl_core.data.splits import split_dataset
    from tl_core.cache import FeatureCache
    from tl_core.models.features import extract_features, feature_key
    from tl_core.models.preprocess import Preprocess

    res = run_training(workspace, FASHION, TrainConfig(strategy="linear", features="last"))  # the solver vs sklearn
    ds = open_dataset(FASHION)
    sp = split_dataset(ds, 0.2, 0)
    model, info = build_model("efficientnet_lite0", len(ds.classes))
    pre = Preprocess.from_data_config(data_config_for(model))
    cache = FeatureCache(workspace.cache_dir / "features", feature_key("efficientnet_lite0", info.fingerprint, pre))
    dec = DecodedImageCache(workspace.cache_dir / "decoded")
    cidx = {c: i for i, c in enumerate(ds.classes)}

    def xy(items):
        return extract_features(model, items, pre, dec, cache), np.array([cidx[i.label] for i in items])

    (xtr, ytr), (xte, yte) = xy(sp.train + sp.val), xy(sp.test)
    assert cache.misses == 0  # the run already extracted and cached every image
    # the saved head is refitted on train + validation (the default): the classic recipe on the same images
    sk = LogisticRegression(max_iter=5000).fit(xtr, ytr).score(xte, yte)
    assert abs(res.test_accuracy - sk) <= 0.01, (res.test_accuracy, sk)  # same objective; at most 2 of 200 differ
    assert res.test_accuracy >= 0.78  # 10 clothing classes from 30 images each


def test_linear_probe_converges_by_default_and_epochs_do_not_cap_it():
    """The probe's iteration cap is internal and generous: a problem that needs more than the old default (100
    rounds) converges, ``epochs`` (fine-tuning epochs) plays no part, and the fit names no best epoch."""
    from tl_core.models.probe import PROBE_MAX_ITERATIONS, fit_linear_head

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(10, 256))
    y = np.repeat(np.arange(10), 30)
    # non-negative like pooled features, with scales spread over a decade: as slow to solve as real features
    x = np.abs((centres[y] + rng.normal(scale=4.0, size=(len(y), 256))) * np.logspace(0, 1, 256)).astype(np.float32)
    fits = {}
    for epochs in (1, None):
        head, info = fit_linear_head(x, y, x[:0], y[:0], 10, TrainConfig(strategy="linear", epochs=epochs).resolved())
        fits[epochs] = head
        assert info["converged"] and info["best_epoch"] is None
        assert 100 < info["iterations"] < PROBE_MAX_ITERATIONS, info  # past the old default, short of the cap
    assert torch.equal(fits[1].weight, fits[None].weight)  # epochs changed nothing


def test_runs_table_and_comparison_say_which_features_each_run_used():
    from tl_core.share.progress import MISSING, compare_rows, features_cell, runs_rows, stop_text

    linear = {"id": "a", "status": "done", "created": 0, "config": {"strategy": "linear", "features": "auto"},
              "summary": {"val_accuracy": 0.9, "best_epoch": None, "features": {"variant": "depths"}}}
    partial = {"id": "b", "status": "done", "created": 0, "config": {"strategy": "partial", "features": "auto"},
               "summary": {"val_accuracy": 1.0, "best_epoch": 0}}
    assert features_cell(linear["config"], linear["summary"]) == "several depths (auto)"
    assert "last layer" in features_cell(partial["config"], partial["summary"])
    rows = runs_rows([linear, partial])
    assert rows[0]["Features"] == "several depths (auto)" and rows[0]["Best epoch"] is None
    cmp = compare_rows([linear, partial])
    assert cmp["Features"]["a"] == "several depths (auto)" and "last layer" in cmp["Features"]["b"]
    assert cmp["Best epoch"]["a"] == MISSING and cmp["Strategy"]["b"] != MISSING
    why = stop_text("partial", {"reason": "patience", "epoch": 4, "epochs": 8, "patience": 4}, 0)
    assert "never beat the linear probe" in why and "last layer's features" in why
    lin = stop_text("linear", {"reason": "converged", "epoch": 90, "iterations": 90, "max_iterations": 1000}, None)
    assert "converged after 90 L-BFGS iterations" in lin and "epoch" not in lin.lower()
