"""TL Studio speed and memory benchmark: each row measured against a bare PyTorch/timm baseline in the same run.

    .venv/bin/python benchmarks/run.py [--images 1000] [--epoch-images 500] [--rss-images 2000] [--quick] [--rows 1]

Prints a table and writes benchmarks/RESULTS.md (date, machine, cores, torch version). Images are generated
from the Fashion-MNIST and emoji samples (flips, rotations and crops give distinct content hashes, so every
image is a cache miss on a cold run). Rows (issue #6):

1. Feature extraction throughput from image files, ours (the engine ``TL_ENGINE=auto`` picks, its ONNX file
   exported beforehand) vs a bare loop (PIL open -> timm transform -> model under inference_mode, batch 32),
   EfficientNet-Lite0. Target ratio >= 0.95. 1c/1d: the cold pipeline (nothing decoded or cached) against the
   forward pass alone on ready tensors through the same engine, model and memory format (the limit; target
   >= 0.80), for PyTorch and ONNX Runtime (tl_core.models.engines); 1e: with the decoding threads off
   (tl_core.models.pipeline); 1f/1g: ONNX Runtime vs PyTorch, forward alone, last layer and several depths;
   1h: the one-off export; 1i: PyTorch's forward pass with the batch norms folded (tl_core.models.folding) vs the
   network as it is. ``--rows 1`` runs these rows only.
2. Time to first model, `linear` on Lite0, N images / 10 classes, cold and warm cache. Targets: cold <= 1.1x
   the bare extraction time of those images, warm <= 2 s.
3. One `full` fine-tuning epoch, ours vs a bare PyTorch loop (same model, batch, augmentation). Target <= 1.05.
   Also against a bare loop with our recipe (channels-last, frozen BN statistics, images pre-decoded in
   memory), the gain of the decoded-image cache over decoding every epoch, and DataLoader workers vs none.
4. Peak memory (RSS) of a `full` run on M images. Target <= 3 GB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from _results import cpu_name, markdown_table, prepend  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)


def make_images(dest: Path, n: int, classes: int = 10, photo: bool = False) -> Path:
    """n distinct images in `classes` folders, generated from the sample datasets.

    ``photo`` makes them 1024x768 JPEGs, so that decoding costs what a phone photo's would."""
    src = sorted((ROOT / "sample_data" / "fashion_mnist").glob("*/*/*.png"))
    by_class: dict[str, list[Path]] = {}
    for p in src:
        by_class.setdefault(p.parent.name, []).append(p)
    names = sorted(by_class)[:classes]
    per = n // classes
    for c in names:
        (dest / c).mkdir(parents=True, exist_ok=True)
        base = by_class[c]
        for i in range(per):
            im = Image.open(base[i % len(base)]).convert("RGB")
            v = i // len(base)
            if v % 2:
                im = ImageOps.mirror(im)
            if v // 2:
                im = im.rotate(90 * (v // 2))
            # a size that varies like real photos do, so resizing work is realistic
            size = (1024, 768) if photo else (96 + (i % 5) * 16, 96 + (i % 3) * 16)
            im = im.resize(size, Image.BILINEAR)
            im.save(dest / c / f"{c}_{i:04d}.jpg", quality=92)
    return dest


def bare_extract(files: list[Path], model, transform, batch: int = 32, channels_last: bool = False) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(files), batch):
            x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[s:s + batch]])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            model.forward_head(model.forward_features(x), pre_logits=True)
    return time.perf_counter() - t0


def bare_epoch(files: list[Path], labels: list[int], model, pre, batch: int = 16, channels_last: bool = False,
               arrays: list[np.ndarray] | None = None, frozen_bn: bool = False) -> float:
    """One epoch the plain way: same augmentation, AdamW, batch. Decodes + resizes every image every epoch
    unless ``arrays`` (pre-decoded) is given; NCHW unless ``channels_last``; BatchNorm in train mode unless
    ``frozen_bn`` (what our fine-tuning does: pretrained statistics kept). One untimed warm-up step first."""
    from torchvision.transforms import v2

    aug = v2.Compose([v2.RandomResizedCrop(pre.input_size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                      v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    order = np.random.default_rng(0).permutation(len(files))

    def step(idx) -> None:
        xs = []
        for i in idx:
            arr = arrays[i] if arrays is not None else pre.resized_array(Image.open(files[i]).convert("RGB"))
            xs.append(aug(torch.from_numpy(arr).permute(2, 0, 1)))
        x = torch.stack(xs)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.tensor([labels[i] for i in idx])
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(order[:batch])  # warm-up (allocator, OpenMP threads), as our runs are warm by their second epoch
    t0 = time.perf_counter()
    for s in range(0, len(order), batch):
        step(order[s:s + batch])
    return time.perf_counter() - t0


def engine_epoch(items, labels, model, pre, decoded, workers: int, batch: int = 16) -> float:
    """One epoch of TL Studio's own loop (train_one_epoch over its dataset of cached decoded images, frozen
    BN, channels-last) with ``workers`` DataLoader processes; one untimed warm-up epoch over a few batches."""
    from torch.utils.data import DataLoader, Subset

    from tl_core.models.training import ImageSet as _ImageSet, lr_lambda as _lr_lambda, train_one_epoch
    from tl_core.models.preprocess import train_transform

    ds = _ImageSet(items, labels, decoded, pre, train_transform(pre, "light"))
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(10_000, 0))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    kw = {"num_workers": workers, "persistent_workers": workers > 0}
    train_one_epoch(model, DataLoader(Subset(ds, range(batch)), batch_size=batch, **kw), opt, sched, loss_fn, bns)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0), **kw)
    t0 = time.perf_counter()
    train_one_epoch(model, loader, opt, sched, loss_fn, bns)
    return time.perf_counter() - t0


def peak_rss_of(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run cmd; return (seconds, peak RSS in GB) of that command alone.

    It is started by a small Python process whose only child it is: on Linux a child's peak RSS starts from
    its parent's at the fork, and this benchmark's process holds ~3 GB by row 4 (measured from here directly,
    or as the largest of all this process's children, it read 3.2 GB for a run that peaked at 2.4 GB)."""
    wrap = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r)")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", wrap, *cmd], env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, int(p.stdout.split()[-1]) / 1024 / 1024


class _Done(Exception):
    """The rows asked for are done."""


bench_state: dict[str, float] = {}


def forward_alone(fn, x, n: int, batch: int = 32) -> float:
    """Seconds for ``n`` images through ``fn`` on a ready batch ``x`` (the limit a pipeline can reach)."""
    fn(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(-(-n // batch)):
        fn(x)
    return time.perf_counter() - t0


def extraction_rows(files, model, info, pre, transform, tmp: Path) -> list[tuple[str, str, str, str, str]]:
    """Rows 1-1h: the engine's extraction against bare loops, and the cold pipeline against the forward pass
    alone on the same engine, model and memory format (PyTorch channels-last; ONNX Runtime)."""
    from tl_core.cache import DecodedImageCache, FeatureCache
    from tl_core.data.intake import open_dataset
    from tl_core.models import engines
    from tl_core.models.feature_variants import extractor
    from tl_core.models.features import extract_features, feature_key

    rows = []
    n = len(files)
    t_bare = bare_extract(files, model, transform)
    bench_state["t_bare"] = t_bare
    model_cl, _ = build_model_cl()
    t_bare_cl = bare_extract(files, model_cl, transform, channels_last=True)
    ds = open_dataset(files[0].parent.parent)
    engine_dir = tmp / "engine_cache"  # the ONNX files, exported once before the timed runs (row 1h)
    ex = {v: extractor(model, v) for v in ("last", "depths")}
    t_export = {}
    for v in ex:
        t0 = time.perf_counter()
        engines._export(ex[v], engine_dir / "engines" / f"{engines.engine_key(ex[v], pre)}.onnx", pre)
        t_export[v] = time.perf_counter() - t0

    def cold(name: str, engine: str, threads: str | None = None) -> float:
        """A cold pipeline (nothing decoded, no features cached) with ``TL_ENGINE=engine``."""
        dec_dir = engine_dir / f"decoded_{name}"  # engine_cache_dir() finds the engines next to it
        old = {k: os.environ.get(k) for k in ("TL_ENGINE", "TL_DECODE_THREADS")}
        os.environ["TL_ENGINE"] = engine
        if threads:
            os.environ["TL_DECODE_THREADS"] = threads
        engines._sessions.clear()  # as in a new process: load the cached file, verify on the first batch
        try:
            t0 = time.perf_counter()
            extract_features(model, ds.items, pre, DecodedImageCache(dec_dir),
                             FeatureCache(engine_dir / f"features_{name}",
                                          feature_key("efficientnet_lite0", info.fingerprint, pre)))
            return time.perf_counter() - t0
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    # the forward pass alone, on a ready batch of real images (the uint8 crops the engines take and normalise),
    # through the very engines the pipeline used
    from tl_core.models.pipeline import eval_batches

    x = next(eval_batches(ds.items, [list(range(32))], pre, DecodedImageCache(None), pixels=True))[1]
    engs = {}
    for v in ("last", "depths"):
        for eng_name in ("torch", "onnx", "torch unfolded"):
            os.environ["TL_ENGINE"] = eng_name.split()[0]
            if eng_name == "torch unfolded":  # PyTorch on the network as it is (row 1i)
                os.environ["TL_FOLD_BN"] = "off"
            try:
                engs[v, eng_name] = engines.feature_engine(ex[v], pre, cache_dir=engine_dir, n_images=n)
            finally:
                del os.environ["TL_ENGINE"]
                os.environ.pop("TL_FOLD_BN", None)
            assert engs[v, eng_name].name == eng_name.split()[0], engs[v, eng_name].reason
    # the machine is shared: each cold pipeline runs right next to its forward-alone limit, twice (a fresh
    # decoded cache each time), and the best of each is kept
    best: dict[str, float] = {}

    def keep(name: str, t: float) -> None:
        best[name] = min(best.get(name, float("inf")), t)

    for r in range(2):
        keep("auto", cold(f"auto{r}", "auto"))
        for e in ("torch", "onnx"):
            keep(f"cold {e}", cold(f"{e}{r}", e))
        for e in ("torch", "onnx", "torch unfolded"):
            keep(f"fwd last {e}", forward_alone(engs["last", e], x, n))
            keep(f"fwd depths {e}", forward_alone(engs["depths", e], x, n))
    t_ours, t_torch, t_onnx = best["auto"], best["cold torch"], best["cold onnx"]
    t_seq = cold("sequential", "auto", threads="1")
    fwd = {(v, e): best[f"fwd {v} {e}"] for v in ("last", "depths") for e in ("torch", "onnx", "torch unfolded")}
    auto_engine = engines.feature_engine(model, pre, cache_dir=engine_dir, n_images=n).name
    rows.append(("1. feature extraction, Lite0", f"{n} images, engine {auto_engine} (auto)",
                 f"{n / t_ours:.1f} img/s", f"{n / t_bare:.1f} img/s",
                 f"{t_bare / t_ours:.2f} (target >= 0.95)"))
    rows.append(("1b. same, baseline also channels-last", f"{n} images", f"{n / t_ours:.1f} img/s",
                 f"{n / t_bare_cl:.1f} img/s", f"{t_bare_cl / t_ours:.2f}"))
    for label, name, t in (("1c", "PyTorch", t_torch), ("1d", "ONNX Runtime", t_onnx)):
        key = "torch" if name == "PyTorch" else "onnx"
        rows.append((f"{label}. cold pipeline vs the forward pass alone", f"{n} images, {name}",
                     f"{n / t:.1f} img/s", f"{n / fwd['last', key]:.1f} img/s forward only",
                     f"{fwd['last', key] / t:.2f} (target >= 0.80)"))
    rows.append(("1e. decoding on threads during the forward pass", f"{n} images, auto",
                 f"{n / t_ours:.1f} img/s", f"{n / t_seq:.1f} img/s decode then forward",
                 f"{t_seq / t_ours:.2f} (speed-up)"))
    for label, v in (("1f", "last"), ("1g", "depths")):
        rows.append((f"{label}. ONNX Runtime vs PyTorch, forward alone", f"batch 32, features={v}",
                     f"{n / fwd[v, 'onnx']:.1f} img/s ONNX Runtime", f"{n / fwd[v, 'torch']:.1f} img/s PyTorch",
                     f"{fwd[v, 'torch'] / fwd[v, 'onnx']:.2f}x"))
    for v in ("last", "depths"):
        rows.append(("1i. PyTorch forward alone, batch norms folded vs not", f"batch 32, features={v}",
                     f"{n / fwd[v, 'torch']:.1f} img/s folded", f"{n / fwd[v, 'torch unfolded']:.1f} img/s as it is",
                     f"{fwd[v, 'torch unfolded'] / fwd[v, 'torch']:.2f}x"))
    rows.append(("1h. ONNX export (once per backbone and weights; cached)", "last / depths",
                 f"{t_export['last']:.1f} s / {t_export['depths']:.1f} s", "-",
                 f"pays off from ~{engines.EXPORT_MIN_IMAGES} images (TL_ONNX_MIN_IMAGES)"))
    return rows


def build_model_cl():
    from tl_core.models.backbones import build_model

    m, info = build_model("efficientnet_lite0", 10)
    return m.eval().to(memory_format=torch.channels_last), info


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--epoch-images", type=int, default=500)
    ap.add_argument("--rss-images", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--rows", default="1,2,3,4", help="which rows to run, e.g. 1 (the extraction rows only)")
    args = ap.parse_args()
    rows_wanted = {int(r) for r in args.rows.split(",") if r.strip()}
    if args.quick:
        args.images, args.epoch_images, args.rss_images = 200, 100, 200

    import timm

    from tl_core.models.backbones import build_model
    from tl_core.models.preprocess import data_config_for
    from tl_core.config import TrainConfig
    from tl_core.cache import DecodedImageCache
    from tl_core.data.intake import open_dataset
    from tl_core.storage.workspace import Workspace
    from tl_core.models.devices import configure_threads
    from tl_core.runs.training import run_training
    from tl_core.models.preprocess import Preprocess

    threads = configure_threads()
    tmp = Path(tempfile.mkdtemp(prefix="tl-bench-"))
    rows: list[tuple[str, str, str, str, str]] = []
    # the machine-wide figures below are only meaningful on an otherwise idle machine
    load1 = os.getloadavg()[0]
    try:
        data = make_images(tmp / "data", args.images)
        files = sorted(data.glob("*/*.jpg"))
        n = len(files)
        model, info = build_model("efficientnet_lite0", 10)
        model.eval()
        pre = Preprocess.from_data_config(data_config_for(model))
        transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
        bare_extract(files[:32], model, transform)  # warm-up (allocator, OpenMP threads)

        t_bare = None
        if 1 in rows_wanted:
            rows += extraction_rows(files, model, info, pre, transform, tmp)
            t_bare = bench_state["t_bare"]
        if rows_wanted == {1}:
            raise _Done
        if t_bare is None:
            t_bare = bare_extract(files, model, transform)
        # 2. time to first model, cold and warm
        ws2 = Workspace(tmp / "ws_first")
        cfg = TrainConfig(strategy="linear")
        t0 = time.perf_counter()
        run_training(ws2, data, cfg)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        r_warm = run_training(ws2, data, cfg)
        warm = time.perf_counter() - t0
        rows.append(("2a. first model, linear, cold cache", f"{n} images / 10 classes", f"{cold:.1f} s",
                     f"{t_bare:.1f} s bare extraction", f"{cold / t_bare:.2f}x (target <= 1.1x)"))
        rows.append(("2b. first model, linear, warm cache", f"{n} images / 10 classes", f"{warm:.2f} s", "-",
                     f"target <= 2 s; val acc {r_warm.val_accuracy:.3f}"))

        # 3. one full fine-tuning epoch, ours vs bare
        sub = tmp / "epoch_data"
        make_images(sub, args.epoch_images, photo=True)
        efiles = sorted(sub.glob("*/*.jpg"))
        classes = sorted({f.parent.name for f in efiles})
        labels = [classes.index(f.parent.name) for f in efiles]
        ne = len(efiles)
        # timings on a shared VM vary by +-15% from one epoch to the next: rows 3b-3d take the best of two
        # runs of each side, interleaved, and ours the best of its epochs 2 and 3
        t_plain = bare_epoch(efiles, labels, build_model("efficientnet_lite0", len(classes))[0], pre)
        arrays = [pre.resized_array(Image.open(f).convert("RGB")) for f in efiles]
        t_same_decode, t_same_cached = float("inf"), float("inf")
        for _ in range(2):
            t_same_decode = min(t_same_decode, bare_epoch(efiles, labels, build_model("efficientnet_lite0", len(classes))[0],
                                                          pre, channels_last=True, frozen_bn=True))
            t_same_cached = min(t_same_cached, bare_epoch(efiles, labels, build_model("efficientnet_lite0", len(classes))[0],
                                                          pre, channels_last=True, frozen_bn=True, arrays=arrays))
        del arrays
        ws3 = Workspace(tmp / "ws_epoch")
        res = run_training(ws3, sub, TrainConfig(strategy="full", epochs=3, val_split=0.1, patience=0))
        hist = ws3.store().epochs(res.run_id)
        train_n = ne - round(ne * 0.1)
        # bare epochs train on all images, ours on the 90% train split: scale ours to the same count
        ours = min(h["train_seconds"] for h in hist if h["epoch"] >= 2) * ne / train_n
        rows.append(("3a. full fine-tuning epoch", f"{ne} 1024x768 JPEGs, batch 16, light aug", f"{ours:.1f} s",
                     f"{t_plain:.1f} s plain loop", f"{ours / t_plain:.2f} (target <= 1.05)"))
        rows.append(("3b. same, baseline with our recipe", "same; channels-last, BN stats frozen, pre-decoded",
                     f"{ours:.1f} s", f"{t_same_cached:.1f} s", f"{ours / t_same_cached:.2f} (the engine's own overhead)"))
        rows.append(("3c. decoded-image cache gain", "bare loop, our recipe", f"{t_same_cached:.1f} s pre-decoded",
                     f"{t_same_decode:.1f} s decoding each epoch", f"{t_same_decode / t_same_cached:.2f}x faster"))
        ditems = open_dataset(sub).items
        dlabels = [classes.index(i.label) for i in ditems]
        dec = DecodedImageCache(ws3.cache_dir / "decoded")
        t_w0, t_w2 = float("inf"), float("inf")
        for _ in range(2):
            t_w0 = min(t_w0, engine_epoch(ditems, dlabels, build_model("efficientnet_lite0", len(classes))[0], pre, dec, 0))
            t_w2 = min(t_w2, engine_epoch(ditems, dlabels, build_model("efficientnet_lite0", len(classes))[0], pre, dec, 2))
        rows.append(("3d. DataLoader workers", "our loop, cached images", f"{t_w0:.1f} s no workers",
                     f"{t_w2:.1f} s 2 workers", f"{t_w2 / t_w0:.2f} (kept: none)" if t_w2 >= t_w0 * 0.97
                     else f"{t_w2 / t_w0:.2f} (workers help)"))

        # 4. peak RSS of a full run
        rss_data = make_images(tmp / "rss_data", args.rss_images)
        env = {**os.environ, "TL_HOME": str(tmp / "ws_rss")}
        secs, gb = peak_rss_of([sys.executable, "-m", "tl_core.cli", "train", str(rss_data), "--strategy", "full",
                                "--epochs", "1", "--quiet"], env)
        rows.append(("4. peak RSS, full run", f"{args.rss_images} images, 1 epoch", f"{gb:.2f} GB", "-",
                     f"target <= 3 GB ({secs:.0f} s)"))
    except _Done:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    table = markdown_table(("row", "size", "TL Studio", "baseline", "ratio / note"), rows)
    head = (f"## {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} — {cpu_name()}, {os.cpu_count()} cores "
            f"({threads} torch threads), {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9)} GB, "
            f"torch {torch.__version__}, Python {platform.python_version()}, load average at start {load1:.1f}"
            + (f", at the end {os.getloadavg()[0]:.1f}; rows {args.rows} only" if rows_wanted != {1, 2, 3, 4} else ""))
    print(head)
    print(table)
    if not args.no_write and not args.quick:
        print(f"wrote {prepend(head, table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
