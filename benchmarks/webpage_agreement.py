"""The exported web page against `tl-core predict` on held-out images, in headless Chromium from file://, offline.

Prints top-1 and `unknown` agreement, the largest confidence and ood_score differences, how many input tensors
equal the engine's exactly, and the browser's time per image (preprocessing + inference, one thread).

Usage: python benchmarks/webpage_agreement.py RUN_DIR [--page DIR]   (exports the page when --page is not given)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EMOJI = ROOT / "sample_data" / "emoji"
ON_IMG = """async ([b64, fn]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const img = new Image(); img.src = URL.createObjectURL(new Blob([bytes])); await img.decode();
  const t0 = performance.now(); const out = await window.tlstudio[fn](img); const ms = performance.now() - t0;
  return [fn === "preprocess" ? Array.from(out) : out, ms];
}"""


def held_out() -> list[Path]:
    """70 emoji_multilabel images that are not emoji files (in-domain), then 30 Fashion-MNIST test images (out of
    domain)."""
    seen = {hashlib.sha256(p.read_bytes()).hexdigest() for p in EMOJI.rglob("*.png")}
    ml = [p for p in sorted((ROOT / "sample_data" / "emoji_multilabel" / "images").glob("*.png"))
          if hashlib.sha256(p.read_bytes()).hexdigest() not in seen]
    fashion = [p for c in sorted((ROOT / "sample_data" / "fashion_mnist" / "test").iterdir())[:3]
               for p in sorted(c.glob("*.png"))[:10]]
    return ml[:70] + fashion  # the 100 images of tests/test_webpage.py


def main() -> int:
    from playwright.sync_api import sync_playwright

    from tl_core.data.images import load_image
    from tl_core.share.webpage import export_webpage
    from tl_core.share.loading import load_model
    from tl_core.share.predict import predict_paths

    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--page")
    a = ap.parse_args()
    page_dir = Path(a.page) if a.page else Path(export_webpage(a.run, Path(tempfile.mkdtemp()) / "page")["path"])
    tm = load_model(a.run)
    images = held_out()
    want, skipped = predict_paths(tm, images, top_k=3)
    assert not skipped
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        ctx = b.new_context(offline=True)
        pg = ctx.new_page()
        pg.goto((page_dir / "index.html").as_uri())
        pg.evaluate("window.tlstudio.ready")
        got, ms, exact = [], [], 0
        for f in images:
            row, t = pg.evaluate(ON_IMG, [base64.b64encode(f.read_bytes()).decode(), "predict"])
            got.append(row)
            ms.append(t)
            x, _ = pg.evaluate(ON_IMG, [base64.b64encode(f.read_bytes()).decode(), "preprocess"])
            exact += bool(np.array_equal(np.asarray(x, np.float32), tm.pre.eval_from_pil(load_image(f)).numpy().ravel()))
        b.close()
    n = len(images)
    out = {
        "images": n, "in_domain": n - sum("fashion" in str(f) for f in images),
        "top1_agree": sum(g["label"] == w["label"] for g, w in zip(got, want)),
        "unknown_agree": sum(g["unknown"] == w["unknown"] for g, w in zip(got, want)),
        "unknown_predict": sum(bool(w["unknown"]) for w in want),
        "input_tensor_exact": exact,
        "max_confidence_diff": max(abs(g["confidence"] - w["confidence"]) for g, w in zip(got, want)),
        "max_ood_score_diff": max(abs(g["ood_score"] - w["ood_score"]) for g, w in zip(got, want)),
        "browser_ms_per_image_median": round(float(np.median(ms)), 1),
        "load_average": os.getloadavg(),
        "page_bytes": sum(f.stat().st_size for f in page_dir.rglob("*") if f.is_file()),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
