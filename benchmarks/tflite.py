"""TFLite export on held-out images: float32 agreement with ``predict``, int8 accuracy change (issue 25).

    .venv/bin/python benchmarks/tflite.py [--run RUN_OR_BUNDLE] [--no-write]

Needs the edge extra (``pip install -e '.[edge]'``). Data: sample_data/fashion_mnist: a linear probe is trained on
its ``train/`` folder (300 images; last-layer features, as the tests' emoji run) in a temporary ``TL_HOME`` (or ``--run`` names a trained run), and its
``test/`` folder (200 labelled images the run never saw) is the held-out set. ``tl-core export --format tflite``'s
function writes the float32 and the int8 file (int8 calibrated on the run's training images); then every held-out
image is run, one at a time, through both files with the LiteRT interpreter (1 thread) and through
``predict_paths`` (what ``tl-core predict`` runs).

Reports: float32 top-1 agreement with ``predict``, accuracy of predict / float32 / int8 on the held-out labels,
the int8 change in points with its paired uncertainty (images int8 fixes vs breaks; 95% normal interval of the
mean paired difference), file sizes and the int8 / float32 time ratio (same run, same images); prepends a dated
section to benchmarks/RESULTS.md with the machine and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from _results import cpu_name, markdown_table, prepend  # noqa: E402

DATA = ROOT / "sample_data" / "fashion_mnist"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="a trained run directory; default: train a linear probe on "
                                                 "sample_data/fashion_mnist/train")
    ap.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tl-bench-tflite-") as tmp:
        run = args.run
        t0 = time.perf_counter()
        if run is None:
            env = {**os.environ, "TL_HOME": tmp, "PYTHONPATH": str(ROOT)}
            p = subprocess.run([sys.executable, "-m", "tl_core.cli", "train", str(DATA / "train"), "--strategy",
                                "linear", "--features", "last", "--json", "--quiet"], env=env, capture_output=True, text=True, cwd=ROOT)
            if p.returncode != 0:
                sys.exit(f"training failed:\n{p.stderr[-3000:]}")
            run = str(Path(tmp) / "runs" / json.loads(p.stdout)["run_id"])
            print(f"trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        import numpy as np

        from tl_core.data.images import load_image
        from tl_core.share.formats import export_model
        from tl_core.share.loading import load_model
        from tl_core.share.predict import predict_paths
        from tl_core.share.tflite import litert_runner

        test = sorted(f for f in (DATA / "test").rglob("*") if f.is_file() and not f.name.startswith("."))
        t0 = time.perf_counter()
        res = export_model(run, "tflite", Path(tmp) / "model.tflite", verify_images=[DATA / "test"],
                           max_verify_images=len(test))
        export_s = time.perf_counter() - t0
        tm = load_model(run)
        rows, skipped = predict_paths(tm, [str(f) for f in test])
        assert not skipped and len(rows) == len(test), skipped
        truth = np.array([tm.classes.index(f.parent.name) for f in test])
        ref = np.array([tm.classes.index(r["label"]) for r in rows])
        x = np.stack([tm.pre.eval_from_pil(load_image(f)).numpy() for f in test])
        out: dict[str, dict] = {}
        for name, path in (("float32", res["path"]), ("int8", res["int8"]["path"])):
            run_f = litert_runner(Path(path).read_bytes())
            run_f(x[:4])  # warm-up
            t0 = time.perf_counter()
            probs = run_f(x)
            out[name] = {"top1": probs.argmax(1), "s": time.perf_counter() - t0, "bytes": Path(path).stat().st_size}
    n = len(test)
    f32, q8 = out["float32"]["top1"], out["int8"]["top1"]
    agree = int((f32 == ref).sum())
    acc = {k: float((v == truth).mean()) for k, v in (("predict", ref), ("float32", f32), ("int8", q8))}
    d = (q8 == truth).astype(float) - (f32 == truth).astype(float)  # paired: +1 int8 fixes, -1 int8 breaks
    half = 1.96 * d.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
    change = 100 * d.mean()
    ratio = out["int8"]["s"] / out["float32"]["s"]
    load1 = os.getloadavg()[0]
    table = markdown_table(
        ["file", "MB", "top-1 = predict", "held-out accuracy", "ms / image (1 thread)"],
        [["predict (PyTorch)", "", f"{n}/{n}", f"{acc['predict']:.1%}", ""],
         ["float32 .tflite", f"{out['float32']['bytes'] / 1e6:.1f}", f"{agree}/{n} ({agree / n:.1%})",
          f"{acc['float32']:.1%}", f"{1000 * out['float32']['s'] / n:.0f}"],
         ["int8 .tflite", f"{out['int8']['bytes'] / 1e6:.1f}", f"{int((q8 == ref).sum())}/{n}",
          f"{acc['int8']:.1%}", f"{1000 * out['int8']['s'] / n:.0f}"]])
    note = (f"\nint8 (full-integer: weights and activations, float32 input/output, calibrated on "
            f"{res['int8']['calibration']['images']} {res['int8']['calibration']['source']}) accuracy change: "
            f"{change:+.1f} points (95% paired interval ±{100 * half:.1f}; int8 fixes {int((d > 0).sum())}, breaks "
            f"{int((d < 0).sum())} of {n} images); target at most 2 points lost. int8 / float32 time "
            f"{ratio:.2f} (same images, same run); size ratio {out['int8']['bytes'] / out['float32']['bytes']:.2f}. "
            f"Export (ONNX, convert, quantise, verify) {export_s:.0f} s under the load below. "
            f"Data: sample_data/fashion_mnist, linear probe on train/ (300), held out test/ ({n}).\n")
    head = (f"## TFLite export — {dt.datetime.now():%Y-%m-%d %H:%M} — {cpu_name()}, {os.cpu_count()} cores, "
            f"{res['exporter']}, load average {load0:.1f} at start, {load1:.1f} at end")
    print(head + "\n\n" + table + "\n" + note)
    if not args.no_write:
        prepend(head, table + "\n" + note)


if __name__ == "__main__":
    main()
