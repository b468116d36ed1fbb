"""Which open-set score tells a model's own kind of image from images unlike its training images.

    .venv/bin/python benchmarks/openset.py [--no-write]

Two directions, on the sample data: an emoji model (30 images per class to train on, 10 per class held out)
shown Fashion-MNIST test images, and a Fashion-MNIST model (its train/ folder; test/ held out) shown the emoji.
Both are linear runs of the default backbone (Lite0, packaged weights). One run per direction without the refit,
so that the validation images are held out from the head: each candidate's threshold is the conformal
⌈(n+1)·0.95⌉-th smallest validation score, as the shipped one is. Candidates (higher = more unusual):

- ``knn-cosine``: cosine distance of the pre-logit features to the nearest training image (the shipped score);
- ``class-mean``: cosine distance to the nearest class mean of the training features;
- ``energy``: -logsumexp(logits); ``max-logit``: -max logit; ``msp``: -max softmax probability.

Printed and recorded per candidate: AUROC (held-out in-distribution vs the other dataset), FPR@95 (share of the
other dataset accepted at the score that accepts 95% of the held-out in-distribution images), and the shares the
conformal threshold flags of each. A last row per direction is the shipped model (refitted head, leave-one-out
threshold; what `tl-core train` writes) through ``predict_paths``. The table is prepended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _results import cpu_name, markdown_table, prepend  # noqa: E402

from tl_core.cache import DecodedImageCache  # noqa: E402
from tl_core.config import TrainConfig  # noqa: E402
from tl_core.data.library import open_data  # noqa: E402
from tl_core.data.splits import split_dataset  # noqa: E402
from tl_core.insight import openset  # noqa: E402
from tl_core.models.devices import configure_threads  # noqa: E402
from tl_core.models.inference import logits_of_items  # noqa: E402
from tl_core.models.metrics import softmax  # noqa: E402
from tl_core.runs.training import run_training  # noqa: E402
from tl_core.runs.workspace import Workspace  # noqa: E402
from tl_core.share.loading import load_model  # noqa: E402
from tl_core.share.predict import predict_paths  # noqa: E402

EMOJI, FASHION = ROOT / "sample_data" / "emoji", ROOT / "sample_data" / "fashion_mnist"
CANDIDATES = ("knn-cosine", "class-mean", "energy", "max-logit", "msp")


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an outside image > score of an inside one), ties counted half (Mann-Whitney U)."""
    a, b = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    greater = (b[:, None] > a[None, :]).sum() + 0.5 * (b[:, None] == a[None, :]).sum()
    return float(greater / (len(a) * len(b)))


def fpr_at_95(inside: np.ndarray, outside: np.ndarray) -> float:
    """Share of outside images accepted at the score below which 95% of the inside images fall."""
    t = np.quantile(np.asarray(inside, np.float64), 0.95)
    return float((np.asarray(outside) <= t).mean())


def emoji_folder(root: Path) -> Path:
    """The emoji sample as train/ (first 30 per class) and test/ (the other 10): test is held out."""
    for c in sorted(p for p in EMOJI.iterdir() if p.is_dir()):
        files = sorted(c.iterdir())
        for part, chosen in (("train", files[:30]), ("test", files[30:])):
            (root / part / c.name).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                shutil.copy(f, root / part / c.name / f.name)
    return root


def scores_of(ftr: np.ndarray, ytr: np.ndarray, n_cls: int, f: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
    bank = openset.normalise(ftr).astype(np.float16)
    means = openset.normalise(np.stack([openset.normalise(ftr[ytr == k]).mean(0) for k in range(n_cls)]))
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    return {"knn-cosine": openset.nn_distance(f, bank), "class-mean": openset.nn_distance(f, means),
            "energy": -lse, "max-logit": -z.max(1), "msp": -softmax(z).max(1)}


def direction(ws: Workspace, name: str, data: Path, other: Path) -> list[tuple]:
    cfg = TrainConfig(refit=False)
    res = run_training(ws, data, cfg)
    tm = load_model(res.run_dir)
    ds = open_data(data, ws)
    split = split_dataset(ds, cfg.val_split, cfg.seed, cfg.max_per_class)
    held = [i for i in split.test]
    outside = list(open_data(other, ws, min_per_class=1).items)
    decoded = DecodedImageCache(ws.cache_dir / "decoded")
    cidx = {c: k for k, c in enumerate(tm.classes)}

    def run(items):
        return logits_of_items(tm.model, items, tm.pre, decoded, with_features=True)

    ztr, ftr = run(split.train)
    ytr = np.array([cidx[i.label] for i in split.train])
    parts = {k: run(items) for k, items in (("val", split.val), ("held", held), ("other", outside))}
    s = {k: scores_of(ftr, ytr, len(tm.classes), f, z) for k, (z, f) in parts.items()}
    rows = []
    for c in CANDIDATES:
        t = openset.conformal_threshold(s["val"][c])
        rows.append((name, c, f"{auroc(s['held'][c], s['other'][c]):.3f}", f"{fpr_at_95(s['held'][c], s['other'][c]):.1%}",
                     f"{openset.flagged_share(s['held'][c], t):.1%}", f"{openset.flagged_share(s['other'][c], t):.1%}"))
        print(*rows[-1], sep="\t", flush=True)
    shipped = load_model(run_training(ws, data, TrainConfig()).run_dir)  # refit + leave-one-out, the default
    flags = {}
    for k, items in (("held", held), ("other", outside)):
        pred, _ = predict_paths(shipped, [str(i.path) for i in items])
        flags[k] = np.mean([r["unknown"] for r in pred])
    rows.append((name, "knn-cosine as shipped (refit, leave-one-out)", "-", "-", f"{flags['held']:.1%}",
                 f"{flags['other']:.1%}"))
    print(*rows[-1], sep="\t", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = p.parse_args()
    configure_threads()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tl-openset-") as tmp:
        ws = Workspace(Path(tmp) / "home")
        emoji = emoji_folder(Path(tmp) / "emoji")
        rows = direction(ws, "emoji model vs Fashion-MNIST", emoji, FASHION / "test")
        rows += direction(ws, "Fashion-MNIST model vs emoji", FASHION, EMOJI)
    table = markdown_table(("direction", "score", "AUROC", "FPR@95", "held-out flagged", "other flagged"), rows)
    head = (f"## {dt.datetime.now():%Y-%m-%d %H:%M} — open-set scores (`benchmarks/openset.py`)\n\n"
            f"{cpu_name()}, {os.cpu_count()} cores; load average {load:.1f} at the start. Lite0 linear runs without "
            "refit; thresholds at the conformal 95% of validation scores; held-out = the in-distribution test "
            "images (emoji: 50, Fashion: 200), other = the other dataset (Fashion test 200, emoji 200).")
    print(table)
    if not args.no_write:
        print(f"written to {prepend(head, table)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
