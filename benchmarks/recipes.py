"""TL Studio against the classic recipes, side by side, on real held-out data.

    .venv/bin/python benchmarks/recipes.py [--train-per-class 50] [--test-per-class 50] [--epochs 4] [--no-write]
    .venv/bin/python benchmarks/recipes.py --features [--sets emoji,fashion-sample,digits,fashion] [--no-write]

Data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist):
N training images per class from its training set, M per class from its test set held out; and the emoji
sample (sample_data/emoji, 40 per class) split 20 train / 20 held-out test per class. Every recipe uses the
same backbone (EfficientNet-Lite0, packaged ImageNet weights), the same images and the same test set:

1. classic: frozen features (bare timm eval transform, pooled pre-logits; the model channels-last under
   ``torch.inference_mode``) + scikit-learn ``LogisticRegression(max_iter=1000)``.
2. fastai-style ``fine_tune(epochs)``, written out in plain PyTorch (fastai itself pins other torch builds):
   one frozen epoch training a new head (one-cycle, lr 2e-3, BatchNorm in train mode), then everything
   unfrozen with discriminative learning rates (1e-5 / 1e-4 / 1e-3 for early body / late body / head),
   one-cycle (pct_start 0.3, div 5), AdamW wd 0.01, batch 32, the same light augmentation as ours.
3. TL Studio ``linear`` (defaults).
4. TL Studio ``full`` (defaults: LP-FT, 8 epochs, early stopping).

TL Studio holds 20% of the training images out for validation (checkpoint selection, early stopping); the
other recipes train on all of them.

Multi-label (``--only multilabel`` runs just this part): sample_data/emoji_multilabel cut by iterative
stratification into 70% train / 30% held-out test (seed 0); the classic recipe is scikit-learn's
``OneVsRestClassifier(LogisticRegression(max_iter=1000))`` on the same bare frozen features, predicting at 0.5;
TL Studio ``linear`` (one-vs-rest, thresholds chosen on its validation images) and ``full``. Micro-F1 and mAP
on the held-out images.
``--features`` compares the linear probe's features instead (issue 16): the classic recipe (1.) against
TL Studio ``linear`` with ``features=last`` and with the default ``features=auto``, naming the variant auto
chose, its cross-validation scores and seconds, on the emoji sample, the Fashion-MNIST sample
(sample_data/fashion_mnist: its own train/test), scikit-learn's digits (30 per class train, 1000 held out,
8x8 upscaled to 64x64) and Fashion-MNIST 100/class (``--train-per-class``/``--test-per-class``, default 100 here).

Prints a table (held-out accuracy and seconds) and prepends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from _results import cpu_name, markdown_table, prepend  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def fashion_subset(dest: Path, per_train: int, per_test: int) -> Path:
    """train/<class>/ and test/<class>/ PNGs from the Debian package's IDX files."""
    if not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        raise SystemExit(f"Fashion-MNIST is not in {FASHION_DIR}: run `make recipes` (it installs Debian's "
                         "dataset-fashion-mnist as root) or `sudo apt-get install dataset-fashion-mnist`.")
    for split, prefix, per in (("train", "train", per_train), ("test", "t10k", per_test)):
        raw = gzip.open(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz").read()
        images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
        labels = np.frombuffer(gzip.open(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
        for c, name in enumerate(FASHION_NAMES):
            d = dest / split / name
            d.mkdir(parents=True, exist_ok=True)
            # skip each class's first 500: sample_data/fashion_mnist was drawn from the start
            for i in np.where(labels == c)[0][500:500 + per]:
                Image.fromarray(images[i]).save(d / f"{i}.png")
    return dest


def emoji_subset(dest: Path, per_train: int = 20) -> Path:
    """The emoji sample split per class: the first ``per_train`` files train, the rest held out."""
    src = ROOT / "sample_data" / "emoji"
    for cdir in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(cdir.glob("*.png"))
        for split, part in (("train", files[:per_train]), ("test", files[per_train:])):
            (dest / split / cdir.name).mkdir(parents=True, exist_ok=True)
            for f in part:
                shutil.copy(f, dest / split / cdir.name / f.name)
    return dest


def multilabel_subset(dest: Path, test_share: float = 0.3, seed: int = 0) -> tuple[Path, Path]:
    """train.csv / test.csv of the multi-label emoji sample (absolute paths), split by iterative stratification."""
    from tl_core.data.intake import open_dataset
    from tl_core.data.splits import split_dataset

    sp = split_dataset(open_dataset(ROOT / "sample_data" / "emoji_multilabel"), test_share, seed)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name, items in (("train.csv", sp.train), ("test.csv", sp.val)):
        f = dest / name
        f.write_text("path,labels\n" + "".join(f"{i.path.resolve()},{';'.join(i.labels)}\n" for i in items))
        out.append(f)
    return out[0], out[1]


def classic_multilabel(train_csv: Path, test_csv: Path) -> tuple[float, float, float]:
    """Bare frozen features + scikit-learn OneVsRestClassifier(LogisticRegression): (micro-F1, mAP, seconds)."""
    import timm
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score, f1_score
    from sklearn.multiclass import OneVsRestClassifier

    from tl_core.data.images import load_image
    from tl_core.models.backbones import build_model

    t0 = time.perf_counter()
    model, _ = build_model("efficientnet_lite0", 1000)
    model.eval()
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    rows = {f: [ln.split(",", 1) for ln in f.read_text().splitlines()[1:]] for f in (train_csv, test_csv)}
    labels = sorted({lab for r in rows.values() for _, cell in r for lab in cell.split(";")})

    def xy(f: Path) -> tuple[np.ndarray, np.ndarray]:
        feats = []
        with torch.inference_mode():
            for s in range(0, len(rows[f]), 32):
                x = torch.stack([tf(load_image(p)) for p, _ in rows[f][s:s + 32]])
                feats.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
        y = np.array([[int(lab in cell.split(";")) for lab in labels] for _, cell in rows[f]])
        return np.concatenate(feats), y

    (xtr, ytr), (xte, yte) = xy(train_csv), xy(test_csv)
    clf = OneVsRestClassifier(LogisticRegression(max_iter=1000)).fit(xtr, ytr)
    micro = f1_score(yte, clf.predict(xte), average="micro")
    ap = average_precision_score(yte, clf.predict_proba(xte), average="macro")
    return float(micro), float(ap), time.perf_counter() - t0


def ours_multilabel(train_csv: Path, test_csv: Path, strategy: str, ws_dir: Path) -> tuple[float, float, float, str]:
    from tl_core.config import TrainConfig
    from tl_core.storage.files import RunFiles
    from tl_core.runs.training import run_training
    from tl_core.storage.workspace import Workspace

    t0 = time.perf_counter()
    r = run_training(Workspace(ws_dir), train_csv, TrainConfig(strategy=strategy), test_data=test_csv)
    test = RunFiles(r.run_dir).metrics().test
    note = f"best epoch {r.best_epoch} of {r.epochs_run}" if strategy != "linear" else ""
    return float(test["micro_f1"]), float(test["mAP"]), time.perf_counter() - t0, note


def digits_subset(dest: Path, per_train: int = 30, n_test: int = 1000) -> Path:
    """scikit-learn's 8x8 digits as 64x64 PNGs: ``per_train`` per class train (seeded draw), ``n_test`` others test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    train = [i for c in range(10) for i in [j for j in order if d.target[j] == c][:per_train]]
    chosen = set(train)
    test = [i for i in order if i not in chosen][:n_test]
    for split, idx in (("train", train), ("test", test)):
        for i in idx:
            out = dest / split / str(d.target[i])
            out.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((64, 64), Image.NEAREST)
            img.save(out / f"{i}.png")
    return dest


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def frozen_features(model: torch.nn.Module, transform: Any, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The pooled pre-logit features of every image under ``folder`` (one sub-folder per class) and their class
    indices, the classic recipe's way: ``load_image`` (RGBA composited on white, as a careful user would), the timm
    ``transform``, channels-last batches of 32 under ``torch.inference_mode``."""
    from tl_core.data.images import load_image

    files = sorted(f for f in folder.glob("*/*") if f.suffix.lower() in IMAGE_SUFFIXES)
    classes = sorted({f.parent.name for f in files})
    feats = []
    with torch.inference_mode():
        for s in range(0, len(files), 32):
            x = torch.stack([transform(load_image(f)) for f in files[s:s + 32]]).contiguous(
                memory_format=torch.channels_last)
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
    return np.concatenate(feats), np.array([classes.index(f.parent.name) for f in files])


def classic(root: Path) -> tuple[float, float]:
    """Frozen features + scikit-learn logistic regression, the way a careful user writes it: the model and its
    input channels-last (on CPU ~1.5x faster than NCHW here: 94 against 63 images/s, issue 24), under
    ``torch.inference_mode``, batches of 32."""
    import timm
    from sklearn.linear_model import LogisticRegression

    from tl_core.models.backbones import build_model

    t0 = time.perf_counter()
    model, _ = build_model("efficientnet_lite0", 1000)
    model = model.eval().to(memory_format=torch.channels_last)
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model))

    (xtr, ytr), (xte, yte) = (frozen_features(model, tf, root / split) for split in ("train", "test"))
    acc = LogisticRegression(max_iter=1000).fit(xtr, ytr).score(xte, yte)
    return float(acc), time.perf_counter() - t0


def fastai_style(root: Path, epochs: int, batch: int = 32, seed: int = 0) -> tuple[float, float]:
    """fastai's ``fine_tune(epochs)`` recipe in plain PyTorch (see the module docstring)."""
    from torch import nn

    from tl_core.models.backbones import build_model
    from tl_core.models.preprocess import data_config_for
    from tl_core.cache import DecodedImageCache
    from tl_core.data.intake import open_dataset
    from tl_core.models.devices import set_seed
    from tl_core.models.preprocess import Preprocess, train_transform

    set_seed(seed)
    t0 = time.perf_counter()
    tr, te = open_dataset(root / "train"), open_dataset(root / "test", min_per_class=1)
    cidx = {c: i for i, c in enumerate(tr.classes)}
    model, _ = build_model("efficientnet_lite0", len(tr.classes), seed=seed)
    pre = Preprocess.from_data_config(data_config_for(model))
    dec = DecodedImageCache(None)
    aug = train_transform(pre, "light")
    xtr = [dec.get(i, pre.resize, pre.interpolation) for i in tr.items]
    ytr = torch.tensor([cidx[i.label] for i in tr.items])
    xte = torch.stack([pre.eval_from_resized(dec.get(i, pre.resize, pre.interpolation)) for i in te.items])
    yte = torch.tensor([cidx[i.label] for i in te.items])
    model = model.to(memory_format=torch.channels_last)
    early = [*model.conv_stem.parameters(), *model.bn1.parameters(), *(p for b in model.blocks[:4] for p in b.parameters())]
    late = [*(p for b in model.blocks[4:] for p in b.parameters()), *model.conv_head.parameters(), *model.bn2.parameters()]
    head = list(model.get_classifier().parameters())

    def one_cycle(opt: torch.optim.Optimizer, total: int, pct: float, div: float = 25.0, final_div: float = 1e5):
        def f(step: int) -> float:
            p = step / max(total, 1)
            if p < pct:
                return 1 / div + (1 - 1 / div) * (1 - np.cos(np.pi * p / pct)) / 2
            lo = 1 / final_div
            return lo + (1 - lo) * (1 + np.cos(np.pi * (p - pct) / (1 - pct))) / 2
        return torch.optim.lr_scheduler.LambdaLR(opt, [f] * len(opt.param_groups))

    def fit(opt: torch.optim.Optimizer, sched, n: int) -> None:
        for _ in range(n):
            model.train()
            perm = torch.randperm(len(xtr))
            for s in range(0, len(perm), batch):
                idx = perm[s:s + batch]
                x = torch.stack([aug(xtr[i]) for i in idx]).contiguous(memory_format=torch.channels_last)
                loss = nn.functional.cross_entropy(model(x), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()

    steps = (len(xtr) + batch - 1) // batch
    for p in early + late:
        p.requires_grad_(False)
    base = 2e-3
    opt = torch.optim.AdamW([{"params": head, "lr": base}], weight_decay=0.01)
    fit(opt, one_cycle(opt, steps, 0.99), 1)
    for p in early + late:
        p.requires_grad_(True)
    base /= 2
    opt = torch.optim.AdamW([{"params": early, "lr": base / 100}, {"params": late, "lr": base / 10},
                             {"params": head, "lr": base}], weight_decay=0.01)
    fit(opt, one_cycle(opt, steps * epochs, 0.3, div=5.0), epochs)
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(xte[s:s + 64].contiguous(memory_format=torch.channels_last)).argmax(1)
                          for s in range(0, len(xte), 64)])
    return float((pred == yte).float().mean()), time.perf_counter() - t0


def ours(root: Path, strategy: str, ws_dir: Path, features: str = "auto") -> tuple[float, float, str]:
    from tl_core.config import TrainConfig
    from tl_core.storage.files import RunFiles
    from tl_core.storage.workspace import Workspace
    from tl_core.runs.training import run_training

    t0 = time.perf_counter()
    # ROOT holds train/ and test/: the run trains on train/ (20% of it for validation) and reports test/
    r = run_training(Workspace(ws_dir), root, TrainConfig(strategy=strategy, features=features))
    note = f"best epoch {r.best_epoch} of {r.epochs_run}" if strategy != "linear" else ""
    if strategy == "linear":
        rec = RunFiles(Path(r.run_dir)).meta().features
        note = f"{rec['variant']}@C={rec['linear_c']:g}"
        if rec.get("cv"):
            note += " (CV " + ", ".join(f"{k} {v:.3f}" for k, v in rec["cv"].items()) + f"; {rec['seconds']:.1f} s)"
    return float(r.test_accuracy), time.perf_counter() - t0, note


def compare_features(sets: list[tuple[str, Path]], tmp: Path) -> list[tuple[str, ...]]:
    """Classic recipe vs TL Studio linear with the last layer and with ``auto`` on each set."""
    rows = []
    for name, root in sets:
        acc, secs = classic(root)
        rows.append((name, "classic: frozen features + LogisticRegression", f"{acc:.3f}", f"{secs:.0f}", ""))
        for features in ("last", "auto"):
            acc, secs, note = ours(root, "linear", tmp / f"ws-{root.name}", features)
            rows.append((name, f"TL Studio linear, features={features}", f"{acc:.3f}", f"{secs:.0f}", note))
        print("\n".join(" | ".join(r) for r in rows[-3:]), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-per-class", type=int, default=50)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=4, help="fastai-style fine_tune epochs (after 1 frozen)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--only", choices=("all", "multilabel"), default="all",
                    help="multilabel: only the multi-label comparison")
    ap.add_argument("--features", action="store_true", help="compare the linear probe's features (issue 16)")
    ap.add_argument("--sets", default="emoji,fashion-sample,digits,fashion",
                    help="with --features: which sets, comma-separated")
    args = ap.parse_args()

    from tl_core.models.devices import configure_threads

    threads = configure_threads()
    load1 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="tl-recipes-"))
    rows = []
    ml_rows = []
    if args.features:
        per_train = args.train_per_class if "--train-per-class" in sys.argv else 100
        per_test = args.test_per_class if "--test-per-class" in sys.argv else 100
        makers = {"emoji": ("emoji (20/class train, 20/class test)", lambda: emoji_subset(tmp / "emoji")),
                  "fashion-sample": ("Fashion-MNIST sample (sample_data: its train/test)",
                                     lambda: ROOT / "sample_data" / "fashion_mnist"),
                  "digits": ("sklearn digits (30/class train, 1000 test)", lambda: digits_subset(tmp / "digits")),
                  "fashion": (f"Fashion-MNIST ({per_train}/class train, {per_test}/class test)",
                              lambda: fashion_subset(tmp / "fashion", per_train, per_test))}
        unknown = [k for k in args.sets.split(",") if k not in makers]
        if unknown:
            raise SystemExit(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(makers)}")
        try:
            rows = compare_features([(makers[k][0], makers[k][1]()) for k in args.sets.split(",")], tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        table = markdown_table(("data", "recipe", "held-out accuracy", "seconds", "note"), rows)
        head = (f"## Linear-probe features: classic vs auto — {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} — "
                f"{cpu_name()}, {os.cpu_count()} cores ({threads} torch threads), load average at start {load1:.1f}")
        print(head)
        print(table)
        if not args.no_write:
            print(f"wrote {prepend(head, table)}")
        return 0
    try:
        ml_train, ml_test = multilabel_subset(tmp / "multilabel")
        micro, mean_ap, secs = classic_multilabel(ml_train, ml_test)
        ml_rows.append(("classic: frozen features + OneVsRestClassifier(LogisticRegression)", f"{micro:.3f}",
                        f"{mean_ap:.3f}", f"{secs:.0f}", "threshold 0.5"))
        for strategy in ("linear", "full"):
            micro, mean_ap, secs, note = ours_multilabel(ml_train, ml_test, strategy, tmp / "ws-multilabel")
            ml_rows.append((f"TL Studio {strategy}", f"{micro:.3f}", f"{mean_ap:.3f}", f"{secs:.0f}",
                            ("per-label thresholds from validation; " + note).rstrip("; ")))
        print("\n".join(" | ".join(r) for r in ml_rows), flush=True)
        sets = [] if args.only == "multilabel" else [(f"Fashion-MNIST ({args.train_per_class}/class train, {args.test_per_class}/class test)",
                 fashion_subset(tmp / "fashion", args.train_per_class, args.test_per_class)),
                ("emoji (20/class train, 20/class test)", emoji_subset(tmp / "emoji"))]
        for name, root in sets:
            acc, secs = classic(root)
            rows.append((name, "classic: frozen features + LogisticRegression", f"{acc:.3f}", f"{secs:.0f}", ""))
            acc, secs = fastai_style(root, args.epochs)
            rows.append((name, f"fastai-style fine_tune({args.epochs})", f"{acc:.3f}", f"{secs:.0f}", ""))
            for strategy in ("linear", "full"):
                acc, secs, note = ours(root, strategy, tmp / f"ws-{root.name}")
                rows.append((name, f"TL Studio {strategy}", f"{acc:.3f}", f"{secs:.0f}", note))
            print("\n".join(" | ".join(r) for r in rows[-4:]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    table = markdown_table(("data", "recipe", "held-out accuracy", "seconds", "note"), rows) if rows else ""
    ml_table = ("\n\nMulti-label: sample_data/emoji_multilabel, 8 labels, 70% train / 30% held-out test "
                "(iterative stratification, seed 0); Lite0 packaged weights for every recipe.\n\n"
                + markdown_table(("recipe", "held-out micro-F1", "held-out mAP", "seconds", "note"), ml_rows))
    table = (table + ml_table).strip()
    head = (f"## Recipes side by side — {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} — {cpu_name()}, "
            f"{os.cpu_count()} cores ({threads} torch threads), torch {torch.__version__}, "
            f"load average at start {load1:.1f}")
    print(head)
    print(table)
    if not args.no_write:
        print(f"wrote {prepend(head, table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
