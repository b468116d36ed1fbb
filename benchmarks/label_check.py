"""How well the label-error check finds wrong labels, and whether it knows when it cannot.

For each dataset: out-of-fold probabilities of the linear probe on cached EfficientNet-Lite0 features
(``tl_core.insight.audit.cross_validated_probs``), the check on the labels as given (every flag there is a false
alarm on these curated sets), then ``--repeats`` times with 10% of the labels flipped at random to another class:
the share of flips found (recall) and of flags that are flips (precision), pooled over the repeats with a Wilson
95% interval (n = flips, or flags; the repeats share images, so the interval is a little narrow), and the mean ±
sd over the repeats. Sets:

- ``fashion``: sample_data/fashion_mnist, train + test (500 images, 10 classes);
- ``emoji``: sample_data/emoji (200 images, 5 classes);
- ``digits``: scikit-learn's ``load_digits`` (8x8 px, upscaled to 32 px), 30 per class (300 images);
- ``digits-b``: 40 other images per class of the same source (400 images, none shared with ``digits``): a set
  the label check's rule was not chosen on;
- ``fashion-tops``: Fashion-MNIST shirt / t-shirt / pullover / coat only (200 images): a hard set;
- ``tops-small``: the same four classes, 15 training images each (60 images): harder still.

The targets (issue 24): where the probe is >= 80% accurate, find >= 60% of the flips at >= 40% precision and
flag <= 8% of the clean set; on a hard set, flag <= 10% or say ``label_check_reliable: false``.

With ``cleanlab`` importable (``pip install --target DIR cleanlab`` and ``PYTHONPATH=DIR``) its
``find_label_issues`` on the same probabilities is printed beside ours as a yardstick only (it is AGPL: never a
dependency of TL Studio).

The probe sees the several-depths features ``auto`` caches (``tl_core.models.feature_variants``), as the audit's
label check does (``tl_core.insight.audit.depths_features``); ``--features last`` gives the last layer's instead.

Usage: ``python benchmarks/label_check.py [--repeats 5] [--home /tmp/label-check] [--write]`` (features are cached
in the workspace ``--home``; the first run extracts ~1,600 images, a few minutes on 2 CPU cores; ``--write``
prepends the table to benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tl_core.data.library import open_data  # noqa: E402
from tl_core.insight.audit import (confident_label_issues, cross_validated_probs,  # noqa: E402
                                   label_check_verdict)
from tl_core.insight.embedding import embed_items, load_backbone  # noqa: E402
from tl_core.metrics import wilson_interval  # noqa: E402
from tl_core.models.devices import single_threaded  # noqa: E402
from tl_core.storage.workspace import Workspace  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_name, markdown_table, prepend  # noqa: E402

TOPS = ("shirt", "t-shirt_top", "pullover", "coat")


def _digits(dst: Path, per_class: int = 30) -> Path:
    """scikit-learn's 8x8 digits as 32 px grayscale PNGs, ``per_class`` of each digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if (dst / ".complete").exists():
        return dst
    d = load_digits()
    seen: dict[int, int] = {}
    for img, t in zip(d.images, d.target):
        if seen.get(int(t), 0) >= per_class:
            continue
        seen[int(t)] = seen.get(int(t), 0) + 1
        out = dst / str(int(t))
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((32, 32), Image.NEAREST).save(
            out / f"{int(t)}_{seen[int(t)]:03d}.png")
    (dst / ".complete").write_text("ok")
    return dst


def _tops(dst: Path) -> Path:
    """The four look-alike Fashion-MNIST classes (train + test images of each)."""
    if (dst / ".complete").exists():
        return dst
    src = ROOT / "sample_data" / "fashion_mnist"
    for c in TOPS:
        (dst / c).mkdir(parents=True, exist_ok=True)
        for part in ("train", "test"):
            for f in sorted((src / part / c).iterdir()):
                shutil.copy(f, dst / c / f"{part}_{f.name}")
    (dst / ".complete").write_text("ok")
    return dst


def _tops_small(dst: Path, per_class: int = 15) -> Path:
    """The four look-alike classes with ``per_class`` training images each: a hard set with a weaker probe."""
    if (dst / ".complete").exists():
        return dst
    src = ROOT / "sample_data" / "fashion_mnist" / "train"
    for c in TOPS:
        (dst / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / c).iterdir())[:per_class]:
            shutil.copy(f, dst / c / f.name)
    (dst / ".complete").write_text("ok")
    return dst


def _digits_b(dst: Path, skip: int = 30, per_class: int = 40) -> Path:
    """scikit-learn's digits again: the ``per_class`` images of each digit after the first ``skip`` (none of
    :func:`_digits`'s)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if (dst / ".complete").exists():
        return dst
    d = load_digits()
    seen: dict[int, int] = {}
    for img, t in zip(d.images, d.target):
        t = int(t)
        seen[t] = seen.get(t, 0) + 1
        if not skip < seen[t] <= skip + per_class:
            continue
        out = dst / str(t)
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((32, 32), Image.NEAREST).save(
            out / f"{t}_{seen[t]:03d}.png")
    (dst / ".complete").write_text("ok")
    return dst


def _features(path: Path, ws: Workspace, variant: str = "last") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The set's features: several depths scaled as ``auto`` (and the audit) scales them, or the last layer's."""
    ds = open_data(path, ws)
    if variant == "last":
        emb = embed_items(ds.items, ds.classes, "efficientnet_lite0", ws)
        return emb.features, emb.labels, ds.classes
    from tl_core.cache import DecodedImageCache, FeatureCache
    from tl_core.models.feature_variants import apply_variant, block_scales, extractor
    from tl_core.models.features import extract_features, feature_key
    from tl_core.models.preprocess import resolve_preprocess

    model, info = load_backbone("efficientnet_lite0")
    pre = resolve_preprocess(model)
    ext = extractor(model, "depths")
    fc = FeatureCache(ws.cache_dir / "features", feature_key("efficientnet_lite0", info.fingerprint, pre, "depths"))
    raw = extract_features(ext, ds.items, pre, DecodedImageCache(ws.cache_dir / "decoded"), fc)
    x = apply_variant(raw, "depths", ext.last_features, ext.block_dims,
                      block_scales(raw, ext.last_features, ext.block_dims))
    cidx = {c: i for i, c in enumerate(ds.classes)}
    return x, np.array([cidx[i.label] for i in ds.items], dtype=np.int64), ds.classes


def _flip(y: np.ndarray, k: int, share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``share`` of the labels moved to another class drawn uniformly; returns (noisy labels, flipped mask)."""
    idx = rng.choice(len(y), int(round(share * len(y))), replace=False)
    noisy = y.copy()
    noisy[idx] = (y[idx] + rng.integers(1, k, len(idx))) % k
    mask = np.zeros(len(y), bool)
    mask[idx] = True
    return noisy, mask


def _check(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict]:
    """Our check as audit_dataset runs it: the verdict, then every candidate (none when not reliable)."""
    verdict = label_check_verdict(probs, y)
    issues = confident_label_issues(probs, y) if verdict["reliable"] else []
    flagged = np.zeros(len(y), bool)
    flagged[[r["index"] for r in issues]] = True
    return flagged, verdict


def _cleanlab(probs: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        return None
    return np.asarray(find_label_issues(y, probs), bool)


def _pooled(flagged: list[np.ndarray], truth: list[np.ndarray]) -> tuple[str, str, list[float], list[float]]:
    """Recall and precision pooled over the repeats, each as "p [lo, hi] (k/n)", and per repeat."""
    tp = sum(int((f & t).sum()) for f, t in zip(flagged, truth))
    nt, nf = sum(int(t.sum()) for t in truth), sum(int(f.sum()) for f in flagged)

    def fmt(k: int, n: int) -> str:
        if not n:
            return "—"
        lo, hi = wilson_interval(k, n)
        return f"{k / n:.0%} [{lo:.0%}, {hi:.0%}] ({k}/{n})"

    rec = [int((f & t).sum()) / max(int(t.sum()), 1) for f, t in zip(flagged, truth)]
    prec = [int((f & t).sum()) / int(f.sum()) for f, t in zip(flagged, truth) if f.any()]
    return fmt(tp, nt), fmt(tp, nf), rec, prec


def _ms(v: list[float]) -> str:
    return f"{np.mean(v):.0%} ± {np.std(v):.0%}" if v else "—"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="random flips per dataset")
    ap.add_argument("--share", type=float, default=0.10, help="share of labels flipped")
    ap.add_argument("--home", default="/tmp/label-check", help="workspace (feature cache) for the run")
    ap.add_argument("--sets", default="fashion,emoji,digits,digits-b,fashion-tops,tops-small")
    ap.add_argument("--features", choices=("last", "depths"), default="depths",
                    help="the backbone features the probe sees (the audit: depths)")
    ap.add_argument("--write", action="store_true", help="prepend the table to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    home = Path(args.home)
    ws = Workspace(home)
    load0 = os.getloadavg()[0]
    sets = {"fashion": lambda: ROOT / "sample_data" / "fashion_mnist", "emoji": lambda: ROOT / "sample_data" / "emoji",
            "digits": lambda: _digits(home / "data" / "digits"), "digits-b": lambda: _digits_b(home / "data" / "digitsb"),
            "fashion-tops": lambda: _tops(home / "data" / "tops"),
            "tops-small": lambda: _tops_small(home / "data" / "tops15")}
    rows = []
    for name in args.sets.split(","):
        x, y, classes = _features(sets[name](), ws, args.features)
        k = len(classes)
        t0 = time.perf_counter()
        with single_threaded():
            probs = cross_validated_probs(x, y, k)
        cv_s = time.perf_counter() - t0
        flagged, v = _check(probs, y)
        cl = _cleanlab(probs, y)
        fl, tr, rel, acc_noisy, cl_fl = [], [], [], [], []
        for r in range(args.repeats):
            noisy, truth = _flip(y, k, args.share, np.random.default_rng(100 + r))
            with single_threaded():
                pn = cross_validated_probs(x, noisy, k)
            f, vn = _check(pn, noisy)
            fl.append(f), tr.append(truth), rel.append(vn["reliable"]), acc_noisy.append(vn["oof_accuracy"])
            c = _cleanlab(pn, noisy)
            if c is not None:
                cl_fl.append(c)
        found, prec, rec_r, prec_r = _pooled(fl, tr)
        nflag = int(flagged.sum())
        clo, chi = wilson_interval(nflag, len(y))
        lo, hi = v["oof_accuracy_ci"]
        row = [name, len(y), k, f"{v['oof_accuracy']:.1%} [{lo:.0%}, {hi:.0%}]", "yes" if v["reliable"] else "no",
               f"{nflag / len(y):.1%} [{clo:.0%}, {chi:.0%}] ({nflag})",
               f"{np.mean(acc_noisy):.1%}", f"{sum(rel)}/{len(rel)}", found, _ms(rec_r), prec, _ms(prec_r), f"{cv_s:.1f}"]
        if cl is not None:
            cf, cp, _, _ = _pooled(cl_fl, tr)
            row += [f"{cl.mean():.1%}", cf, cp]
        rows.append(row)
        print(f"{name}: done", file=sys.stderr)
    header = ["set", "images", "classes", "oof acc. clean [95% CI]", "reliable", "flagged clean [95% CI] (n)",
              f"oof acc. {args.share:.0%} flipped", "reliable (flipped)", "flips found [95% CI] (k/n)",
              "found per repeat", "precision [95% CI] (k/n)", "precision per repeat", "CV s"]
    if any(len(r) > len(header) for r in rows):
        header += ["cleanlab flagged clean", "cleanlab found", "cleanlab precision"]
        rows = [r + ["—"] * (len(header) - len(r)) for r in rows]
    table = markdown_table(header, rows)
    print(table)
    note = (f"{args.repeats} random flips of {args.share:.0%} per set; found and precision pooled over them (Wilson "
            "95% interval) and per repeat (mean ± sd). A check that is not reliable lists nothing (found 0%).")
    print("\n" + note)
    if args.write:
        head = (f"## Label-error check ({time.strftime('%Y-%m-%d')}, `benchmarks/label_check.py --features "
                f"{args.features}`)\n\n{cpu_name()}, {os.cpu_count()} cores; load average {load0:.1f} at the start, "
                f"{os.getloadavg()[0]:.1f} at the end. EfficientNet-Lite0, {args.features} features, out-of-fold "
                "probabilities of the linear probe (5 folds, C = 1).")
        print("wrote", prepend(head, table + "\n\n" + note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
