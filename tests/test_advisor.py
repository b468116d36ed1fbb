"""Backbone advisor (LogME, LEEP, k-NN, probe) and the domain-gap hint, on the real sample data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from insight_support import emoji_small, insight_home, insight_workspace
from tl_core.insight.advisor import GAP_LEVELS, advise, domain_gap, knn_accuracy, leep_score, logme_score
from tl_core.models.catalogue import offline_backbones
from tl_core.cli import main
from tl_core.errors import ConfigError

OFFLINE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
#: The advisor's top choice must have a probe accuracy within this margin of the best backbone's.
MARGIN = 0.05


def _logme_reference(f: np.ndarray, y: np.ndarray) -> float:
    """The published LogME formulation (eigendecomposition of the D x D matrix F^T F), for comparison."""
    n, d = f.shape
    v, s, vh = np.linalg.svd(f.T @ f)
    out = []
    for k in range(int(y.max()) + 1):
        yk = (y == k).astype(np.float64)
        tmp = vh @ (f.T @ yk)
        alpha, beta = 1.0, 1.0
        for _ in range(200):
            gamma = (beta * s / (alpha + beta * s)).sum()
            m = v @ (tmp * beta / (alpha + beta * s))
            new_alpha = gamma / (m @ m)
            new_beta = (n - gamma) / ((yk - f @ m) ** 2).sum()
            converged = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < 1e-9
            alpha, beta = new_alpha, new_beta
            if converged:
                break
        m = v @ (tmp * beta / (alpha + beta * s))
        ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * s).sum()
              - beta / 2 * ((yk - f @ m) ** 2).sum() - alpha / 2 * (m @ m) - n / 2 * np.log(2 * np.pi))
        out.append(ev / n)
    return float(np.mean(out))


@pytest.mark.parametrize("n,d", [(120, 40), (40, 150)])
def test_logme_matches_the_published_formulation(n, d):
    rng = np.random.default_rng(n)
    y = rng.integers(0, 4, n)
    f = rng.normal(size=(n, d)) + np.eye(4)[y] @ rng.normal(size=(4, d))
    assert logme_score(f, y) == pytest.approx(_logme_reference(f, y), abs=1e-4)


def test_scores_prefer_features_that_carry_the_labels():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    noise = rng.normal(size=(120, 64))
    informative = noise + 3 * np.eye(4)[y] @ rng.normal(size=(4, 64))
    assert logme_score(informative, y) > logme_score(noise, y) + 0.1
    tr, va = np.arange(120) % 4 != 0, np.arange(120) % 4 == 0
    assert knn_accuracy(informative[tr], y[tr], informative[va], y[va]) == 1.0
    assert knn_accuracy(noise[tr], y[tr], noise[va], y[va]) < 0.6
    # LEEP: a source head whose classes map one-to-one onto the labels beats an uninformative one
    sharp = np.full((120, 10), 0.01)
    sharp[np.arange(120), y] = 0.91
    flat = np.full((120, 10), 0.1)
    assert leep_score(sharp, y) > leep_score(flat, y)
    assert leep_score(flat, y) == pytest.approx(np.log(0.25))
    with pytest.raises(ConfigError):
        logme_score(noise[:5], np.zeros(5, dtype=int))


@pytest.fixture(scope="module")
def advice(shared_cache):
    ws = insight_workspace(shared_cache)
    first = advise(emoji_small(shared_cache), OFFLINE, ws, max_per_class=8)
    second = advise(emoji_small(shared_cache), OFFLINE, ws, max_per_class=8)
    return first, second


@pytest.mark.slow
def test_advisor_ranks_the_three_offline_backbones(advice):
    res, _ = advice
    assert set(offline_backbones()) >= set(OFFLINE)
    rows = res["ranking"]
    assert [r["backbone"] for r in rows] and sorted(r["backbone"] for r in rows) == sorted(OFFLINE)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert all(a["logme"] >= b["logme"] for a, b in zip(rows, rows[1:]))
    assert res["train"] == 30 and res["val"] == 10 and res["images"] == 40
    for r in rows:
        assert r["seconds"] > 0 and r["weights"] == "packaged"
        assert 0.0 <= r["probe_accuracy"] <= 1.0 and 0.0 <= r["knn_accuracy"] <= 1.0
        assert r["leep"] < 0 and 0 < r["mean_max_softmax"] < 1
        # chance is 20%: every ImageNet backbone separates emoji classes far better
        assert r["probe_accuracy"] >= 0.6
    best = max(r["probe_accuracy"] for r in rows)
    assert rows[0]["probe_accuracy"] >= best - MARGIN, rows
    assert res["recommended"] in OFFLINE
    assert res["confidence"] in {"high", "medium", "low"} and res["reason"]
    json.dumps(res)  # the CLI prints it as is


@pytest.mark.slow
def test_advisor_second_run_reads_every_feature_from_the_cache(advice):
    first, second = advice
    assert all(r["cache_misses"] == 0 and r["cache_hits"] == 40 for r in second["ranking"])
    assert [r["backbone"] for r in first["ranking"]] == [r["backbone"] for r in second["ranking"]]
    for a, b in zip(first["ranking"], second["ranking"]):
        assert a["logme"] == pytest.approx(b["logme"], abs=1e-9)
        assert a["probe_accuracy"] == b["probe_accuracy"]


@pytest.mark.slow
def test_advisor_reports_a_backbone_it_cannot_load_and_scores_the_rest(shared_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # resnet18 needs the hub: must fail fast, not hang
    res = advise(emoji_small(shared_cache), ["efficientnet_lite0", "resnet18"], insight_workspace(shared_cache),
                 max_per_class=8)
    assert [r["backbone"] for r in res["ranking"]] == ["efficientnet_lite0"]
    assert res["failed"][0]["backbone"] == "resnet18" and "offline" in res["failed"][0]["error"]
    assert res["confidence"] == "low"
    with pytest.raises(ConfigError):
        advise(emoji_small(shared_cache), ["no_such_net"], insight_workspace(shared_cache), max_per_class=8)


@pytest.mark.slow
def test_domain_gap_reads_icons_as_far_and_photos_as_near(shared_cache, tmp_path):
    ws = insight_workspace(shared_cache)
    icons = domain_gap(emoji_small(shared_cache), workspace=ws)
    assert icons["images"] == 60 and set(icons["per_class"]) == {"animal", "face", "flag", "food", "vehicle"}
    assert icons["level"] == "far" and icons["mean_max_softmax"] < GAP_LEVELS[1][0]
    assert icons["reading"] == GAP_LEVELS[2][2]
    assert all(len(v["looks_like"]) >= 1 for v in icons["per_class"].values())
    # real photos of ImageNet objects (scikit-image's coffee cup and camera): the head is sure
    skdata = pytest.importorskip("skimage.data")
    for name in ("coffee", "camera"):
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        (tmp_path / name).mkdir()
        img.save(tmp_path / name / "a.png")
        img.transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / name / "b.png")
    photos = domain_gap(tmp_path, workspace=ws)
    assert photos["mean_max_softmax"] > icons["mean_max_softmax"] + 0.3
    assert photos["level"] == "near"
    assert photos["per_class"]["coffee"]["looks_like"][0]["imagenet"] == "espresso"


@pytest.mark.slow
def test_cli_advise_json_and_errors(shared_cache, monkeypatch, capsys):
    monkeypatch.setenv("TL_HOME", str(insight_home(shared_cache)))
    data = emoji_small(shared_cache)
    assert main(["advise", str(data), "--backbones", "efficientnet_lite0,efficientnet_lite1", "--max-per-class", "8",
                 "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["backbone"] for r in out["ranking"]} == {"efficientnet_lite0", "efficientnet_lite1"}
    assert out["recommended"] in {"efficientnet_lite0", "efficientnet_lite1"}
    assert main(["advise", str(data), "--backbones", "efficientnet_lite0", "--max-per-class", "8", "--quiet"]) == 0
    assert "recommended: efficientnet_lite0" in capsys.readouterr().out
    assert main(["advise", str(data / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert main(["advise", str(data), "--backbones", "no_such_net", "--max-per-class", "8"]) == 2
    assert capsys.readouterr().err.startswith("error: No backbone could be scored")


def test_the_recommendation_is_the_first_row_of_the_ranking():
    from tl_core.insight.advisor import _confidence, _recommended_first

    # LogME favours "a", but the quick probe clearly favours "b" on 100 validation images
    rows = [{"backbone": "a", "logme": 2.0, "probe_accuracy": 0.55}, {"backbone": "b", "logme": 1.0, "probe_accuracy": 0.9},
            {"backbone": "c", "logme": 0.5, "probe_accuracy": 0.5}]
    rec, conf, reason = _confidence(rows, 100)
    assert (rec, conf) == ("b", "low") and "recommending b" in reason
    ordered = _recommended_first(rows, rec)
    assert [(r["rank"], r["backbone"]) for r in ordered] == [(1, "b"), (2, "a"), (3, "c")]
    # when LogME and the probe agree, the order stays LogME's
    rows[1]["probe_accuracy"] = 0.5
    rec, _, _ = _confidence(rows, 100)
    assert [r["backbone"] for r in _recommended_first(rows, rec)] == ["a", "b", "c"]


def test_domain_gap_names_two_lookalikes_and_never_an_unfortunate_imagenet_class():
    from types import SimpleNamespace

    from tl_core.insight.advisor import LOOKALIKES_SHOWN, UNSHOWN_IMAGENET_CLASSES, domain_gap_from_embeddings

    bra, rifle, espresso, tabby, pug = 459, 764, 967, 281, 254
    assert {bra, rifle} <= UNSHOWN_IMAGENET_CLASSES and LOOKALIKES_SHOWN == 2
    tops = [bra, bra, bra, rifle, espresso, espresso, tabby, pug]  # the ImageNet head's top class per image
    probs = np.full((len(tops), 1000), 0.5 / 999, dtype=np.float32)
    probs[np.arange(len(tops)), tops] = 0.5
    emb = SimpleNamespace(imagenet_probs=lambda: probs, classes=["faces"], labels=np.zeros(len(tops), int),
                          backbone="efficientnet_lite0", items=list(range(len(tops))))
    gap = domain_gap_from_embeddings(emb)
    looks = gap["per_class"]["faces"]["looks_like"]
    # the two most frequent classes that may be named, by their first name, with their share of all the images
    assert looks == [{"imagenet": "espresso", "share": 0.25}, {"imagenet": "tabby", "share": 0.125}]
