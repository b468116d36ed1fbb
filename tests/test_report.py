"""The self-contained HTML run report (tl_core.report): content, offline use, and a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT
from tl_core.errors import ExportError
from tl_core.share.report import MAX_THUMBNAILS, build_report, write_report

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"


@pytest.fixture(scope="module")
def run_dir(emoji_run):
    """The session's trained emoji run (linear probe, Lite0), with TL_HOME pointing at its workspace."""
    ws, res = emoji_run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TL_HOME", str(ws.home))
        yield Path(res.run_dir)


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


def test_report_embeds_the_misclassified_images(report_html, run_dir):
    wrong = json.loads((run_dir / "metrics.json").read_text())["top_losses"]
    thumbs = re.findall(r"<img src='data:image/jpeg;base64,[A-Za-z0-9+/=]+'", report_html)
    assert len(thumbs) == min(len(wrong), MAX_THUMBNAILS)
    if wrong:
        assert Path(wrong[0]["path"]).name in report_html
        assert f"predicted <span class='bad'>{wrong[0]['predicted']}</span>" in report_html


def test_missing_images_are_skipped_and_counted(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    ghost = {"path": str(tmp_path / "gone" / "ghost.png"), "true": "face", "predicted": "flag",
             "confidence": 0.99, "true_prob": 0.01, "loss": 4.6}
    metrics["top_losses"] = [ghost] + metrics["top_losses"]
    metrics["test"] = metrics["val"]  # a held-out test set adds its own confusion matrix
    (copy / "metrics.json").write_text(json.dumps(metrics))
    (copy / "predictions.json").unlink()  # no predictions: no calibration plot, still a report
    html = build_report(copy)
    assert "1 image(s) could not be shown" in html and "ghost.png" not in html
    assert 'id="confusion-test"' in html and 'id="calibration"' not in html
    assert len(re.findall(r"\* plotly\.js v\d", html)) == 1


def test_temperature_scaled_run_shows_both_reliability_curves(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "temperature": 1.7}))
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["calibration"] = {"temperature": 1.7, "ece_before": 0.09, "ece_after": 0.031, "count": 40}
    (copy / "metrics.json").write_text(json.dumps(metrics))
    html = build_report(copy)
    assert "with temperature 1.70 (ECE" in html and "trained model (ECE" in html
    assert "0.031 (was 0.090)" in html and "T = 1.700" in html


def test_not_a_run_is_refused(tmp_path):
    with pytest.raises(ExportError, match="not a finished run: meta.json is missing"):
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
            assert page.locator(".js-plotly-plot").count() == 3  # curves, confusion matrix, calibration
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
