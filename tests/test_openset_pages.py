"""Page tests of what a person sees of open-set answers and of the domain gap (issue 23), with ``AppTest``.

They reuse the page tests' trained workspace (one real linear probe on the emoji sample) and real images:
Fashion-MNIST clothes are foreign to the emoji model. Every computation is a task; these are short, so they run in
threads of the test process (page_harness ``task_threads``: the workers' own claim-and-run code, no worker process).
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import pytest

from conftest import FASHION
from page_harness import (  # noqa: F401  (fixtures are used by name)
    EMOJI,
    app,
    assert_clean,
    button,
    goto,
    home,
    metric,
    task_threads,
    plotly_specs,
    trained_home,
    until,
)

from tl_core.runs import tasks

CLASSES = ["animal", "face", "flag", "food", "vehicle"]


@pytest.fixture(autouse=True)
def fresh_caches():
    """Each test computes its own results (the pages' st.cache_data is per process, shared by tests)."""
    import streamlit as st

    st.cache_data.clear()
    yield


def _captions(at) -> list[str]:
    return [i.caption for el in at.get("image") for i in el.proto.imgs]


@pytest.mark.slow
def test_try_it_says_why_an_image_is_unknown_and_shows_the_closest_training_images(home, task_threads):
    ws, run_id = home
    at = app()
    goto(at, "try_it")
    bags = [(f"bag{n}.png", f.read_bytes(), "image/png")
            for n, f in enumerate(sorted((FASHION / "test" / "bag").iterdir())[:2])]
    flag = ("flag.png", sorted((EMOJI / "flag").iterdir())[-1].read_bytes(), "image/png")
    at.file_uploader[0].set_value([*bags, flag]).run()
    assert_clean(at)
    warned = [w.value for w in at.warning if w.value.startswith("Unlike your training images")]
    assert len(warned) == 2, [w.value for w in at.warning]
    # each flagged image says which way it differs, with the two distances (1.00 = the threshold)
    for w in warned:
        assert any(w.startswith(f"Unlike your training images {how}") for how in (
            "in style (colours, strokes, texture)", "in what it shows", "both in style"))
        assert "distances: style" in w and "1.00 is this run's threshold" in w
    assert any(c.value.startswith("Like your training images (distances: style") for c in at.caption)
    caps = _captions(at)
    # the same layout for flagged and not flagged images: the image, its heat-map, the three closest training images
    assert caps.count("your image") == 3
    assert len([c for c in caps if c.startswith("where it saw")]) == 3
    near = [c for c in caps if " · " in c]
    assert len(near) == 9 and all(c.split(" · ")[0] in CLASSES for c in near)
    # the emoji flag's closest training images are flags
    assert [c.split(" · ")[0] for c in near[6:]].count("flag") >= 2
    # the training images are gone (the dataset was moved): a sentence, not an error
    ood = ws.run_dir(run_id) / "ood.json"
    rec = json.loads(ood.read_text())
    assert rec.get("bank_root")
    rec["bank_root"] = str(ws.home / "moved-away")
    ood.write_text(json.dumps(rec))
    at.run()
    assert_clean(at)
    gone = [c.value for c in at.caption if "no longer on disk" in c.value]
    assert len(gone) == 3


@pytest.mark.slow
def test_evaluate_counts_the_foreign_images_the_threshold_catches(home, task_threads):
    from tl_core.metrics import wilson_interval
    from tl_core.share.loading import load_model
    from tl_core.share.predict import predict_paths

    ws, run_id = home
    clothes = [f for c in ("bag", "sneaker", "trouser", "dress") for f in sorted((FASHION / "test" / c).iterdir())[:4]]
    zipped, loose = clothes[:12], clothes[12:]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in zipped:
            z.write(f, f"clothes/{f.parent.name}/{f.name}")
    # a direct call on the same images: what the page must show
    rows, _ = predict_paths(load_model(ws.run_dir(run_id)), clothes)
    expected = sum(bool(r["unknown"]) for r in rows)
    at = app()
    goto(at, "evaluate")
    at.button_group(key="eval_view").set_value("unknown").run()
    assert_clean(at)
    up = [u for u in at.file_uploader if u.label == "Foreign images (or a .zip)"][0]
    up.set_value([("clothes.zip", buf.getvalue(), "application/zip")]
                 + [(f.name, f.read_bytes(), "image/png") for f in loose]).run()
    until(at, lambda a: any(m.label == "Foreign images caught" for m in a.metric), what="the foreign check")
    assert_clean(at)
    assert metric(at, "Foreign images caught") == f"{expected} of 16"
    lo, hi = wilson_interval(expected, 16)
    assert any(f"(95% interval {lo:.0%}–{hi:.0%}, 16 images)" in c.value for c in at.caption)
    # the foreign images' scores on the validation scores' chart
    hist = [s for s in plotly_specs(at) if s["data"][0]["type"] == "histogram"][0]
    assert [t["name"] for t in hist["data"]][1] == "foreign images"
    # the task may run the ONNX engine and the direct call PyTorch: equal within the engines' tolerance (1e-4)
    assert sorted(hist["data"][1]["x"]) == pytest.approx(sorted(r["ood_score"] for r in rows), abs=1e-4)
    # the reasons of the catches add up to the count; the table names the uploads as they were called
    res = tasks.result(ws, ws.store().tasks(kind="foreign_check", status="done")[-1]["id"])
    assert sum(res["by_reason"].values()) == res["caught"] == expected
    table = at.dataframe[-1].value
    assert len(table) == 16 and int(table["unknown"].sum()) == expected
    assert sum(p.startswith("clothes.zip/clothes/") for p in table["image"]) == 12


@pytest.mark.slow
def test_data_page_gives_the_domain_gap_in_style_and_content_per_class(home, task_threads):
    ws, _ = home
    small = ws.datasets_dir / "emoji8"
    for c in CLASSES:
        (small / c).mkdir(parents=True)
        for f in sorted((EMOJI / c).iterdir())[:8]:
            shutil.copy(f, small / c / f.name)
    at = app({"data": "workspace/emoji8"})
    goto(at, "data")
    button(at, "Check the data").click().run()
    until(at, lambda a: any("**In style, the gap is" in m.value for m in a.markdown), what="the domain gap")
    assert_clean(at)
    assert any("**The domain gap is far**" in m.value for m in at.markdown)
    style = [m.value for m in at.markdown if "**In style, the gap is" in m.value][0]
    gap = tasks.result(ws, ws.store().tasks(kind="domain_gap", status="done")[-1]["id"])
    assert f"style gap {gap['style_gap']:.2f}" in style and gap["images"] == 40 and len(gap["per_image"]) == 40
    # per class: the style gap and the rank, most ImageNet-like first
    table = [d.value for d in at.dataframe if "style gap" in d.value.columns][0]
    assert sorted(table["class"]) == CLASSES and table["rank"].tolist() == [1, 2, 3, 4, 5]
    bars = [sp for sp in plotly_specs(at) if sp["layout"].get("xaxis", {}).get("title", {}).get("text", "")
            .startswith("style gap")]
    assert len(bars) == 1 and dict(zip(bars[0]["data"][0]["y"], bars[0]["data"][0]["x"])) == pytest.approx(
        {c: v["style_gap"] for c, v in gap["per_class"].items()})
    best, worst = table["class"].iloc[0], table["class"].iloc[-1]
    assert gap["per_class"][best]["rank"] == 1 and gap["per_class"][worst]["rank"] == 5
    assert any(f"Most ImageNet-like class: **{best}**; least: **{worst}**" in c.value for c in at.caption)
    # the most and least ImageNet-like images, with their class, how sure the head is and their style gap
    caps = [c.value for c in at.caption if c.value.count(" · ") == 2 and c.value.split(" · ")[0] in CLASSES]
    assert len(caps) == 8
    shown = [f"{r['class']} · {r['max_softmax']:.0%} · {r['style_gap']:.2f}"
             for r in gap["most_imagenet_like"] + gap["least_imagenet_like"]]
    assert caps == shown
    assert len(at.get("image")) >= 8  # their thumbnails


def test_the_share_caught_has_its_wilson_interval():
    from tl_core.insight.foreign import caught_at
    from tl_core.metrics import wilson_interval

    got = caught_at([0.5, 1.2, 2.0, 0.99], 1.0)
    assert (got["caught"], got["images"], got["share"]) == (2, 4, 0.5)
    assert got["interval"] == wilson_interval(2, 4)


def test_the_closest_training_images_get_thumbnails_and_a_gone_file_none(tmp_path):
    from tl_core.runs.kinds import _nearest_thumbnails

    there = sorted((EMOJI / "flag").iterdir())[0]
    rows = [{"nearest": [{"path": str(there), "label": "flag", "distance": 0.1},
                         {"path": str(tmp_path / "gone.png"), "label": "face", "distance": 0.2}]},
            {"nearest": None}, {"nearest": [{"path": str(there), "label": "flag", "distance": 0.3}]}]
    _nearest_thumbnails(rows, tmp_path)
    first, gone = rows[0]["nearest"]
    assert (tmp_path / first["thumb"]).is_file() and gone["thumb"] is None
    assert rows[2]["nearest"][0]["thumb"] == first["thumb"]  # one thumbnail per training image
