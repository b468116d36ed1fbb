"""Data audit on real emoji with planted problems: duplicates, a leak, a near copy, a blank image, a wrong label."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_class_folder
from insight_support import emoji_small, insight_home, insight_workspace
from tl_core.insight.audit import NEAR_DUPLICATE_THRESHOLD, PIXEL_MATCH_THRESHOLD, audit_dataset, class_imbalance, exact_duplicates, near_duplicates, thumbnail_correlation
from tl_core.cli import main
from tl_core.config import TrainConfig


@pytest.fixture(scope="module")
def planted(shared_cache, tmp_path_factory):
    """train/ (9 per class) and val/ (3 per class) folders of real emoji, plus five planted problems."""
    src = emoji_small(shared_cache)
    root = tmp_path_factory.mktemp("planted")
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        for split, chunk in (("train", files[:9]), ("val", files[9:12])):
            (root / split / cls.name).mkdir(parents=True)
            for f in chunk:
                shutil.copy(f, root / split / cls.name / f.name)
    animal = sorted((root / "train" / "animal").iterdir())[0]
    leaked = sorted((root / "val" / "face").iterdir())[0]
    vehicle = sorted((root / "train" / "vehicle").iterdir())[0]
    plants = {
        # 1. the same file in two class folders (an exact duplicate with conflicting labels, and a wrong label)
        "mislabelled": root / "train" / "food" / f"copy_of_{animal.name}",
        # 2. a validation image copied into train: leakage
        "leak": root / "train" / "face" / f"copy_of_{leaked.name}",
        # 3. a resized (48 px) copy: a near duplicate
        "near": root / "train" / "vehicle" / f"small_{vehicle.name}",
        # 4. a blank white image
        "blank": root / "train" / "flag" / "blank.png",
    }
    shutil.copy(animal, plants["mislabelled"])
    shutil.copy(leaked, plants["leak"])
    Image.open(vehicle).convert("RGBA").resize((48, 48), Image.BICUBIC).save(plants["near"])
    Image.new("RGB", (64, 64), (255, 255, 255)).save(plants["blank"])
    res = audit_dataset(root, workspace=insight_workspace(shared_cache))
    return root, plants, {"animal": animal, "leaked": leaked, "vehicle": vehicle}, res


@pytest.mark.slow
def test_exact_duplicates_across_classes_are_found(planted):
    _, plants, orig, res = planted
    groups = {frozenset(g["paths"]): g for g in res["exact_duplicates"]}
    g = groups[frozenset({str(orig["animal"]), str(plants["mislabelled"])})]
    assert g["conflicting_labels"] and sorted(g["labels"]) == ["animal", "food"]
    assert not groups[frozenset({str(orig["leaked"]), str(plants["leak"])})]["conflicting_labels"]
    assert len(res["exact_duplicates"]) == 2  # nothing else in the real data is a byte-for-byte copy
    assert any("more than one class" in f for f in res["findings"])


def test_planted_train_val_leak_is_flagged(planted):
    _, plants, orig, res = planted
    exact = [r for r in res["leakage"] if r["kind"] == "exact"]
    assert len(exact) == 1
    assert exact[0]["held_out"] == str(orig["leaked"]) and exact[0]["train"] == str(plants["leak"])
    assert exact[0]["split"] == "val" and exact[0]["same_label"]
    assert res["findings"][0].startswith(f"{len(res['leakage'])} validation/test image(s) duplicate")


def test_resized_copy_is_a_near_duplicate_and_exact_copies_are_not(planted):
    _, plants, orig, res = planted
    pairs = {frozenset((p["a"], p["b"])): p for p in res["near_duplicates"]}
    p = pairs[frozenset((str(orig["vehicle"]), str(plants["near"])))]
    assert NEAR_DUPLICATE_THRESHOLD <= p["similarity"] <= 1.0 and p["same_label"]
    assert p["pixel_correlation"] >= PIXEL_MATCH_THRESHOLD
    assert len(res["near_duplicates"]) == 1  # look-alike real emoji are not called copies
    assert frozenset((str(orig["animal"]), str(plants["mislabelled"]))) not in pairs
    sims = [p["similarity"] for p in res["near_duplicates"]]
    assert sims == sorted(sims, reverse=True) and min(sims) >= NEAR_DUPLICATE_THRESHOLD


def test_blank_image_is_flagged_and_real_ones_are_not(planted):
    _, plants, _, res = planted
    assert [o["path"] for o in res["odd_images"]] == [str(plants["blank"])]
    assert "blank" in res["odd_images"][0]["reason"]


def test_image_filed_under_the_wrong_class_is_a_likely_label_error(planted):
    _, plants, _, res = planted
    issues = {r["path"]: r for r in res["label_issues"]}
    r = issues[str(plants["mislabelled"])]
    assert r["label"] == "food" and r["suggested"] == "animal" and r["confidence"] >= 0.6
    assert r["label_probability"] < 0.4
    # the probe flags few of the 60 real images (it is not a list of everything)
    assert len(issues) <= 6
    # and says how far it can be trusted: the out-of-fold accuracy it rests on, with its interval
    assert res["label_check_reliable"] is True and res["oof_accuracy"] >= 0.8
    lo, hi = res["oof_accuracy_ci"]
    assert lo < res["oof_accuracy"] < hi and res["label_check"]["images"] == 64  # 60 real + 4 planted
    # on several depths' features (auto's cache), whose one pass also filled the last-layer cache the audit read
    assert res["label_check"]["features"] == "depths"


def test_clean_sample_has_no_duplicates_leaks_or_odd_images(shared_cache):
    res = audit_dataset(emoji_small(shared_cache), workspace=insight_workspace(shared_cache))
    assert res["exact_duplicates"] == [] and res["odd_images"] == []
    assert res["near_duplicates"] == [] and res["leakage"] == []
    assert res["imbalance"]["suggestion"] == "none" and res["suggested_config"] == {}
    assert res["split"] == {"train": 50, "val": 10, "test": 0}


def test_imbalance_suggests_a_fix_that_training_accepts(shared_cache, tmp_path):
    assert class_imbalance({"a": 40, "b": 40})["suggestion"] == "none"
    mild = class_imbalance({"a": 40, "b": 10})
    assert mild["suggestion"] == "weights" and mild["ratio"] == 4.0 and mild["smallest"] == "b"
    assert class_imbalance({"a": 60, "b": 10})["config_patch"] == {"class_balance": "sampler"}
    data = make_class_folder(tmp_path / "imb", {"animal": 12, "face": 4})
    res = audit_dataset(data, workspace=insight_workspace(shared_cache))
    assert res["imbalance"]["imbalanced"] and res["suggested_config"] == {"class_balance": "weights"}
    cfg = dataclasses.replace(TrainConfig(), **res["suggested_config"]).resolved()
    assert cfg.class_balance == "weights"


def test_thumbnail_correlation_tells_copies_from_look_alikes(shared_cache):
    import numpy as np
    from tl_core.data.images import load_image

    data = emoji_small(shared_cache)
    img = np.asarray(load_image(sorted((data / "face").iterdir())[0]))
    small = np.asarray(Image.fromarray(img).resize((48, 48), Image.BICUBIC))
    darker = (img * 0.8).astype(np.uint8)
    assert thumbnail_correlation(img, small) >= PIXEL_MATCH_THRESHOLD
    assert thumbnail_correlation(img, darker) >= PIXEL_MATCH_THRESHOLD
    other = np.asarray(load_image(sorted((data / "face").iterdir())[1]))  # another yellow face
    assert thumbnail_correlation(img, other) < PIXEL_MATCH_THRESHOLD
    assert thumbnail_correlation(img, img[:, ::-1]) < PIXEL_MATCH_THRESHOLD  # mirrored: not the same picture
    blank = np.full((20, 20, 3), 255, np.uint8)
    assert thumbnail_correlation(blank, blank) == 1.0 and thumbnail_correlation(blank, img) == 0.0


def test_helpers_on_plain_lists():
    from tl_core.data.intake import ImageItem
    import numpy as np

    items = [ImageItem(Path(f"/x/{n}.png"), lab, sha256=sha) for n, (lab, sha) in
             enumerate([("a", "1"), ("b", "1"), ("a", "2"), ("a", "3")])]
    assert [g["paths"] for g in exact_duplicates(items)] == [["/x/0.png", "/x/1.png"]]
    feats = np.array([[1, 0], [1, 0], [1, 0.05], [0, 1]], dtype=np.float32)
    pairs = near_duplicates(feats, items, 0.99)
    # items 0 and 1 share content (exact, not near); 0-2 and 1-2 are near; 3 is far from all
    assert sorted((p["a"], p["b"]) for p in pairs) == [("/x/0.png", "/x/2.png"), ("/x/1.png", "/x/2.png")]


@pytest.mark.slow
def test_cli_audit(planted, shared_cache, monkeypatch, capsys):
    root = planted[0]
    monkeypatch.setenv("TL_HOME", str(insight_home(shared_cache)))
    assert main(["audit", str(root), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["leakage"] and out["exact_duplicates"] and out["label_issues"]
    assert out["label_check_reliable"] is True and 0 < out["oof_accuracy"] <= 1 and len(out["oof_accuracy_ci"]) == 2
    assert main(["audit", str(root), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "leak (exact" in text and "label?" in text and "label check: reliable" in text
    assert main(["audit", str(root / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error:")


@pytest.fixture(scope="module")
def emoji_features(shared_cache):
    from tl_core.data.library import open_data
    from tl_core.insight.embedding import embed_items

    ws = insight_workspace(shared_cache)
    ds = open_data(emoji_small(shared_cache), ws)
    emb = embed_items(ds.items, ds.classes, "efficientnet_lite0", ws)
    return emb.features, emb.labels, ds.classes


def test_label_check_finds_flipped_labels_and_spares_the_clean_set(emoji_features):
    """10% of 60 real emoji labels moved to another class: the check finds most of them, and on the labels as
    given (all correct) it flags few images."""
    import numpy as np
    from tl_core.insight.audit import confident_label_issues, cross_validated_probs, label_check_verdict

    x, y, classes = emoji_features
    k = len(classes)
    clean = cross_validated_probs(x, y, k)
    verdict = label_check_verdict(clean, y)
    assert verdict["reliable"] and verdict["oof_accuracy"] >= 0.8
    lo, hi = verdict["oof_accuracy_ci"]
    assert lo < verdict["oof_accuracy"] < hi
    assert len(confident_label_issues(clean, y)) <= 0.08 * len(y)
    rng = np.random.default_rng(7)
    idx = rng.choice(len(y), 6, replace=False)
    noisy = y.copy()
    noisy[idx] = (y[idx] + rng.integers(1, k, len(idx))) % k
    probs = cross_validated_probs(x, noisy, k)
    v = label_check_verdict(probs, noisy)
    assert v["reliable"] and v["oof_accuracy"] < verdict["oof_accuracy"]  # wrong labels lower the agreement
    issues = confident_label_issues(probs, noisy)
    found = {r["index"] for r in issues} & set(idx.tolist())
    assert len(found) >= 4 and len(found) >= 0.4 * len(issues)  # >= 60% of the flips at >= 40% precision
    for r in issues:  # each names a class above its threshold, and the given one below the suggested one and chance
        assert r["confidence"] >= r["threshold"] and r["confidence"] > r["label_probability"]
        assert r["label_probability"] < 1 / k
        assert r["suggested"] != noisy[r["index"]]
    margins = [r["margin"] for r in issues]
    assert margins == sorted(margins, reverse=True)


def test_an_ambiguous_image_keeps_its_label_and_a_wrong_label_is_flagged():
    """Confident learning alone flags a correctly labelled image that looks a bit like another class (its given
    class keeps a fair share of the probability); the check flags a label only when the probe rates it below chance
    (1 / classes), as a wrong label that names an unrelated class is rated."""
    import numpy as np
    from tl_core.insight.audit import LABEL_CHECK_BELOW_CHANCE, confident_label_issues

    rng = np.random.default_rng(0)
    sure = {0: [0.9, 0.05, 0.05], 1: [0.3, 0.5, 0.2], 2: [0.05, 0.05, 0.9]}  # class 1 is often confused
    y = np.repeat(np.arange(3), 30)
    p = np.array([sure[int(c)] for c in y]) + rng.uniform(-0.02, 0.02, (len(y), 3))
    p = np.clip(p, 1e-3, None)
    p /= p.sum(1, keepdims=True)
    ambiguous, wrong = 0, 1  # both labelled 0
    p[ambiguous] = [0.40, 0.55, 0.05]  # a 0 that looks a bit like a 1: p(given) above 1/3
    p[wrong] = [0.02, 0.93, 0.05]  # a 1 filed as 0: the probe gives label 0 almost nothing
    thr1 = p[y == 1, 1].mean()
    assert p[ambiguous, 1] >= thr1 and p[ambiguous, 0] < p[y == 0, 0].mean()  # confident learning's candidate
    flagged = {r["index"]: r for r in confident_label_issues(p, y)}
    assert wrong in flagged and flagged[wrong]["suggested"] == 1
    assert ambiguous not in flagged
    assert LABEL_CHECK_BELOW_CHANCE == 1.0  # below chance, no tuned share: with 2 classes it adds nothing
    two = np.array([[0.35, 0.65], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6], [0.4, 0.6]])
    assert [r["index"] for r in confident_label_issues(two, np.array([0, 0, 0, 0, 1, 1, 1]))] == [0]


def test_a_weak_probe_says_so_and_the_audit_lists_nothing(shared_cache):
    """Features that carry no class information: the probe is at chance but overfits, sure of wrong answers; the
    check says it is not reliable (and why), and the audit then lists no label errors."""
    import numpy as np
    from tl_core.insight.audit import confident_label_issues, cross_validated_probs, label_check_verdict

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 32)).astype(np.float32)
    y = np.repeat(np.arange(4), 30)
    probs = cross_validated_probs(x, y, 4)
    v = label_check_verdict(probs, y)
    assert not v["reliable"] and v["oof_accuracy"] < 0.5 and "not reliable" in v["reason"]
    sure = [r for r in confident_label_issues(probs, y) if r["confidence"] >= 0.95]
    assert len(sure) > 0.05 * len(y)  # why an unreliable check lists nothing rather than only its surest flags
    few = label_check_verdict(np.eye(4)[y[:12]], y[:12])  # right every time, but on 12 images
    assert few["oof_accuracy"] == 1.0 and not few["reliable"] and "too few" in few["reason"]
    # the whole audit on data whose classes are random halves of one emoji class: nothing listed, and said why
    src = sorted((emoji_small(shared_cache) / "face").iterdir())
    root = shared_cache / "random_halves"
    if not root.exists():
        for n, f in enumerate(src):
            (root / "ab"[n % 2]).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / "ab"[n % 2] / f.name)
    res = audit_dataset(root, workspace=insight_workspace(shared_cache))
    assert res["label_check_reliable"] is False and res["label_issues"] == []
    assert any("not reliable" in n for n in res["notes"])


def test_depths_features_fill_the_last_layer_cache_in_the_same_pass(shared_cache, tmp_path):
    """The label check's several-depths features and the last layer's the rest of the audit reads come from one
    forward pass: after it, the last-layer features are all cache hits, and equal the first columns."""
    import numpy as np
    from tl_core.data.library import open_data
    from tl_core.insight.audit import depths_features
    from tl_core.insight.embedding import embed_items
    from tl_core.storage.workspace import Workspace

    ws = Workspace(tmp_path / "home")  # empty caches
    ds = open_data(emoji_small(shared_cache), ws)
    items = ds.items[:6]
    x, last_dim = depths_features(items, "efficientnet_lite0", ws)
    assert x.shape[0] == 6 and x.shape[1] > last_dim
    emb = embed_items(items, ds.classes, "efficientnet_lite0", ws)
    assert emb.cache_misses == 0 and emb.cache_hits == 6
    assert np.allclose(emb.features, x[:, :last_dim], atol=1e-5)  # the last layer is not rescaled
