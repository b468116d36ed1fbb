"""Every view of a refitted linear run's validation mistakes tells the same story: the Mistakes view (saved
predictions), the Grad-CAM grid, the HTML report and ``tl-core explain`` show the same label and confidence
for each misclassified image, because each of them explains the head that made the validation predictions
(fitted on training images alone), not the saved head refitted on training + validation images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tl_core.cli import main
from tl_core.insight.explain import explain_image, explain_misclassified
from tl_core.storage.files import SAVED, VALIDATION_FIT, RunFiles
from tl_core.share.loading import load_model
from tl_core.share.report import build_report

#: every test here runs real networks on real images (module fixtures train or export): the slow tier
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mistakes(emoji_run_dir):
    files = RunFiles(emoji_run_dir)
    meta = files.meta()
    val = files.predictions().get("val")
    assert meta.refitted and val.model == VALIDATION_FIT
    wrong = val.mistakes(meta.classes, meta.temperature)
    assert len(wrong) >= 2, "the emoji run (seed 0) should misclassify 2 validation images"
    return wrong


def _report_tile(html: str, path: str) -> tuple[str, float]:
    """The predicted label and the percentage the report prints under one misclassified image."""
    at = html.index(f"<div class='path'>{Path(path).name}</div>")
    tile = html[html.rindex("<figure", 0, at):at]
    m = re.search(r"predicted <span class='bad'>([^<]+)</span> \((\d+)%\)", tile)
    assert m, tile
    return m.group(1), float(m.group(2))


def test_mistakes_grad_cam_report_and_cli_agree(emoji_run_dir, mistakes, tmp_path, capsys):
    grid = explain_misclassified(emoji_run_dir, k=len(mistakes))
    assert [g["path"] for g in grid] == [m["path"] for m in mistakes]
    html = build_report(emoji_run_dir)
    for m, g in zip(mistakes, grid):
        # the grid: the saved prediction, and the same label and confidence recomputed from the image
        assert (g["true"], g["predicted"]) == (m["true"], m["predicted"])
        assert g["confidence"] == pytest.approx(m["confidence"], abs=1e-9)
        assert g["model"] == VALIDATION_FIT
        assert g["model_label"] == m["predicted"]
        assert g["model_confidence"] == pytest.approx(m["confidence"], abs=1e-3)
        # the report prints the same label and the confidence rounded to a whole percent
        label, pct = _report_tile(html, m["path"])
        assert label == m["predicted"] and pct == round(100 * m["confidence"])
        # tl-core explain RUN IMAGE: the same model, label and confidence
        out = tmp_path / f"{Path(m['path']).stem}.png"
        assert main(["explain", str(emoji_run_dir), m["path"], "--out", str(out), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["label"] == m["predicted"] and doc["model"] == VALIDATION_FIT and out.is_file()
        assert doc["confidence"] == pytest.approx(m["confidence"], abs=1e-3)
        assert doc["target"] == m["predicted"]


def test_the_saved_refitted_model_would_tell_another_story(emoji_run_dir, mistakes):
    """The agreement above is not automatic: the saved head (it has seen these images) gives other confidences."""
    saved = load_model(emoji_run_dir)
    assert saved.head == SAVED
    diffs = []
    for m in mistakes:
        r = explain_image(saved, m["path"])
        assert r["model"] == SAVED
        diffs.append(abs(r["confidence"] - m["confidence"]) if r["label"] == m["predicted"] else 1.0)
    assert max(diffs) > 0.01, diffs
