"""Export → Web page: `tl-core export RUN --format webpage --out DIR` and the page it writes, opened from file://
in headless Chromium with the network off (one browser for the module).

The page's JavaScript must preprocess exactly as the engine does (tensor for tensor, transparent and JPEG images
included), answer like `tl-core predict` on held-out images (top-1 and the `unknown` flag), and its page must
classify a chosen file with top-k bars and the `unknown` warning, without one request leaving the machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import EMOJI, cli_fail

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]  # a test-pattern webcam
FASHION_TEST = ROOT / "sample_data" / "fashion_mnist" / "test"
MULTILABEL = ROOT / "sample_data" / "emoji_multilabel" / "images"

# an image (bytes, base64) -> an <img> from a blob: URL -> window.tlstudio.<fn>(img)
_ON_IMG = """async ([b64, fn]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const img = new Image(); img.src = URL.createObjectURL(new Blob([bytes])); await img.decode();
  const out = await window.tlstudio[fn](img);
  return fn === "preprocess" ? Array.from(out) : out;
}"""


def test_missing_runtime_is_one_sentence(emoji_run_dir, tmp_path, monkeypatch, capsys):
    """Without the fetched runtime the export stops at once with one sentence saying how to get it."""
    monkeypatch.setenv("TL_ORT_WEB_DIR", str(tmp_path / "nothing-here"))
    line = cli_fail(capsys, "export", str(emoji_run_dir), "--format", "webpage", "--out", str(tmp_path / "page"))
    assert "onnxruntime-web" in line and "make web-runtime" in line
    assert not (tmp_path / "page").exists()


def _held_out() -> list[Path]:
    """Images the emoji run never saw: emoji_multilabel's that are not emoji files (in-domain, 70) and
    Fashion-MNIST test images (grayscale clothes: out of domain, mostly `unknown`; 30)."""
    seen = {hashlib.sha256(p.read_bytes()).hexdigest() for p in EMOJI.rglob("*.png")}
    emoji = [p for p in sorted(MULTILABEL.glob("*.png")) if hashlib.sha256(p.read_bytes()).hexdigest() not in seen]
    fashion = [p for c in sorted(FASHION_TEST.iterdir())[:3] for p in sorted(c.glob("*.png"))[:10]]
    return emoji[:70] + fashion


@pytest.fixture(scope="module")
def webpage(emoji_run_dir, tmp_path_factory):
    """The emoji run exported as a web page (a verified ONNX graph inside)."""
    from tl_core.cli import main

    out = tmp_path_factory.mktemp("webpage") / "page"
    assert main(["export", str(emoji_run_dir), "--format", "webpage", "--out", str(out), "--json"]) == 0
    return out


@pytest.fixture(scope="module")
def page(webpage):
    """The exported index.html open from file:// in Chromium, offline: every non-file request is aborted and
    recorded (``page.requests``); page errors are collected (``page.errors``)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        ctx = browser.new_context(offline=True)
        requests: list[str] = []

        def route(r):
            if r.request.url.startswith(("file:", "blob:", "data:")):
                return r.continue_()
            requests.append(r.request.url)
            return r.abort()

        ctx.route("**/*", route)
        pg = ctx.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto((webpage / "index.html").as_uri())
        pg.evaluate("window.tlstudio.ready")
        pg.requests, pg.errors = requests, errors
        yield pg
        browser.close()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.mark.browser
@pytest.mark.slow
def test_export_writes_folder_and_zip(webpage):
    import zipfile

    for name in ("index.html", "tlstudio.js", "model.js", "model.onnx.json", "ort/ort.wasm.min.js", "ort/ort-wasm.js"):
        assert (webpage / name).is_file(), name
    with zipfile.ZipFile(webpage.with_name("page.zip")) as z:
        assert "page/index.html" in z.namelist() and "page/model.js" in z.namelist()
    sidecar = json.loads((webpage / "model.onnx.json").read_text())
    assert sidecar["verification"]["passed"]


@pytest.mark.browser
@pytest.mark.slow
def test_page_preprocesses_exactly_like_the_engine(page, emoji_run_dir, tmp_path):
    """Tensor for tensor: RGBA emoji (transparency on white), grayscale PNGs, a JPEG, a semi-transparent PNG
    with a portrait size (upscaled, cropped), and a landscape one (downscaled)."""
    from tl_core.data.images import load_image
    from tl_core.share.loading import load_model

    pre = load_model(emoji_run_dir).pre
    src = sorted(EMOJI.rglob("*.png"))
    load_image(src[5]).resize((300, 200)).save(tmp_path / "photo.jpg", quality=90)
    rgba = np.array(Image.open(src[7]).convert("RGBA").resize((97, 131)))
    rgba[..., 3] = (np.arange(97)[None, :] * 255 // 96).astype(np.uint8)  # alpha from 0 to 255 across
    Image.fromarray(rgba).save(tmp_path / "semi.png")
    wide = np.array(Image.open(src[9]).convert("RGBA").resize((640, 480)))
    wide[::3, :, 3] = 77
    Image.fromarray(wide).save(tmp_path / "wide.png")
    images = src[:3] + [p for p in sorted(FASHION_TEST.rglob("*.png"))[:2]] + [
        tmp_path / "photo.jpg", tmp_path / "semi.png", tmp_path / "wide.png"]
    for f in images:
        got = np.asarray(page.evaluate(_ON_IMG, [_b64(f), "preprocess"]), dtype=np.float32)
        want = pre.eval_from_pil(load_image(f)).numpy().ravel()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-6, f.name


@pytest.mark.browser
@pytest.mark.slow
def test_page_answers_like_predict_on_held_out_images(page, emoji_run_dir):
    """Same top-1 as `tl-core predict` on >= 99% of 100 held-out images, the same `unknown` flag wherever the
    score is not within the export's open-set tolerance of the threshold, and predict's row fields."""
    from tl_core.share.export import OOD_TOLERANCE
    from tl_core.share.loading import load_model
    from tl_core.share.predict import predict_paths

    tm = load_model(emoji_run_dir)
    images = _held_out()
    want, skipped = predict_paths(tm, images, top_k=3)
    assert not skipped and len(want) == len(images) == 100
    got = [page.evaluate(_ON_IMG, [_b64(f), "predict"]) for f in images]
    for g in got:
        assert {"label", "confidence", "top_k", "unknown", "ood_score", "ood_reason", "ood_distances"} <= set(g)
        assert len(g["top_k"]) == 3
    agree = sum(g["label"] == w["label"] for g, w in zip(got, want))
    assert agree >= 99, f"top-1 agrees on {agree}/100"
    t = tm.open_set.threshold
    clear = [(g, w) for g, w in zip(got, want) if abs(w["ood_score"] - t) > OOD_TOLERANCE]
    assert len(clear) >= 95
    assert all(g["unknown"] == w["unknown"] for g, w in clear)
    assert any(w["unknown"] for w in want) and not all(w["unknown"] for w in want)  # both kinds were tested
    assert max(abs(g["confidence"] - w["confidence"]) for g, w in zip(got, want)) < 1e-3
    assert max(abs(g["ood_score"] - w["ood_score"]) for g, w in zip(got, want)) < OOD_TOLERANCE


@pytest.mark.browser
@pytest.mark.slow
def test_page_shows_bars_and_unknown_warning_offline(page):
    """Choosing files shows one card each with top-k bars, and the `unknown` warning exactly where predict says
    unknown; nothing was requested from the network and the page raised no error."""
    files = [sorted(MULTILABEL.glob("*.png"))[0], sorted((FASHION_TEST / "bag").glob("*.png"))[0]]
    rows = [page.evaluate(_ON_IMG, [_b64(f), "predict"]) for f in files]
    page.set_input_files("#files", [str(f) for f in files])
    page.wait_for_function("document.querySelectorAll('#results .card .bar').length >= 6", timeout=60_000)
    cards = page.locator("#results .card")  # newest first
    assert cards.count() == 2
    for k, row in enumerate(reversed(rows)):
        card = cards.nth(k)
        assert card.locator(".bar").count() == 3
        assert card.locator(".bar .name").first.inner_text() == row["label"]
        assert card.locator(".unknown").count() == (1 if row["unknown"] else 0)
    assert "Ready" in page.locator("#status").inner_text()
    assert page.requests == [] and page.errors == []


@pytest.mark.browser
@pytest.mark.slow
def test_page_classifies_the_webcam_continuously(page):
    """Start camera (Chromium's fake one): the live card shows top-k bars that keep being redrawn, and a rate."""
    assert page.locator("#live").is_hidden()  # no camera card before the camera starts
    page.click("#camera")
    page.wait_for_function("document.getElementById('fps').textContent.includes('a second')", timeout=120_000)
    assert page.locator("#live-bars .bar").count() == 3
    page.click("#camera")  # stop
    assert page.locator("#live").is_hidden()
    assert page.requests == [] and page.errors == []
