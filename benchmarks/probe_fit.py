"""The linear probe's fit against scikit-learn's, on real frozen features (issue 24: a linear run's time is mostly
probe fits: auto's choice is 15 of them, the cross-validated estimate 5 more).

    .venv/bin/python benchmarks/probe_fit.py [--train 30] [--repeat 5] [--no-write]

Data: scikit-learn's digits as 64x64 PNGs (``recipes.digits_subset``: ``--train`` per class to train, 1,000 others
held out), Lite0's features extracted once, the classic recipe's way: the last layer (1,280 wide) and several
depths (1,792 wide, what ``auto`` mostly keeps). Each
solver then fits the same features ``--repeat`` times (the median is kept), in this one process, one after another:

- ours: ``tl_core.models.probe.fit_linear_head`` as a run calls it (C = 1, scikit-learn's tolerance), which solves
  in the span of the training images when they are fewer than the features (``SPAN_BELOW``);
- ours, features' own coordinates: the same with ``SPAN_BELOW = 0`` (how it solved before);
- scikit-learn: ``LogisticRegression(C=1, max_iter=1000)`` (lbfgs), the classic recipe's.

Every fit runs on one thread (``tl_core.models.devices.single_threaded``, as a run fits its probe): with two BLAS
threads on a busy 2-core machine these small products wait for each other, and a fit took 15-90 s instead of 1.

Each row gives the fit's time, its ratio to scikit-learn's, the objective it reached (scikit-learn's, divided by C),
and held-out accuracy. Prints a table and prepends it to benchmarks/RESULTS.md with the date, machine and load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import cpu_name, markdown_table, prepend  # noqa: E402
from recipes import digits_subset, frozen_features  # noqa: E402


def features(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Lite0's features of the train and test images, the classic recipe's extraction: ``last`` (the pooled last
    layer, 1,280 wide) and ``depths`` (with every stage pooled, 1,792 wide, each stage scaled as a run scales it)."""
    import timm

    from tl_core.models.backbones import build_model
    from tl_core.models.feature_variants import apply_variant, block_scales, extractor

    model, _ = build_model("efficientnet_lite0", 1000)
    model = model.eval().to(memory_format=torch.channels_last)
    deep = extractor(model, "depths").eval()
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model))

    (rtr, ytr), (rte, yte) = (frozen_features(deep, tf, root / split) for split in ("train", "test"))
    last_dim, dims = int(model.num_features), [int(d) for d in deep.block_dims]
    scales = block_scales(rtr, last_dim, dims)
    return {v: (apply_variant(rtr, v, last_dim, dims, scales), ytr, apply_variant(rte, v, last_dim, dims, scales), yte)
            for v in ("last", "depths")}


def objective(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, c: float = 1.0) -> float:
    """scikit-learn's multinomial objective divided by C: summed log-loss + ||W||^2 / (2C)."""
    z = x.astype(np.float64) @ w + b
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].sum() + (w * w).sum() / (2 * c))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=30, help="training images per class (10 classes)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    from sklearn.linear_model import LogisticRegression

    from tl_core.config import TrainConfig
    from tl_core.models import probe
    from tl_core.models.devices import configure_threads, single_threaded

    threads = configure_threads()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tl-probe-fit-") as tmp:
        sets = features(digits_subset(Path(tmp) / "digits", per_train=args.train))
    cfg = TrainConfig(strategy="linear", linear_c=1.0).resolved()
    rows = []
    for variant, (xtr, ytr, xte, yte) in sets.items():
        n, d = xtr.shape

        def ours(span: bool) -> tuple[float, np.ndarray, np.ndarray, int]:
            saved = probe.SPAN_BELOW
            probe.SPAN_BELOW = saved if span else 0.0
            try:
                t0 = time.perf_counter()
                head, info = probe.fit_linear_head(xtr, ytr, xte[:0], yte[:0], 10, cfg)
                seconds = time.perf_counter() - t0
            finally:
                probe.SPAN_BELOW = saved
            return (seconds, head.weight.detach().double().numpy().T, head.bias.detach().double().numpy(),
                    int(info["iterations"]))

        def sklearn() -> tuple[float, np.ndarray, np.ndarray, int]:
            t0 = time.perf_counter()
            lr = LogisticRegression(C=1.0, max_iter=1000).fit(xtr, ytr)
            return time.perf_counter() - t0, lr.coef_.T, lr.intercept_, int(lr.n_iter_[0])

        sides = {"ours (span of the images)": lambda: ours(True),
                 "ours (features' own coordinates)": lambda: ours(False),
                 "scikit-learn LogisticRegression": sklearn}
        times: dict[str, list[float]] = {k: [] for k in sides}
        last: dict[str, tuple] = {}
        with single_threaded():
            for fit in sides.values():  # warm-up: allocator, BLAS
                fit()
            for _ in range(args.repeat):  # interleaved, so a change in the machine's load falls on every side
                for name, fit in sides.items():
                    r = fit()
                    times[name].append(r[0])
                    last[name] = r
        t_sk = statistics.median(times["scikit-learn LogisticRegression"])
        for name in sides:
            t = statistics.median(times[name])
            _, w, b, iters = last[name]
            acc = float(((xte.astype(np.float64) @ w + b).argmax(1) == yte).mean())
            rows.append((name, f"{variant}: {n} x {d}, 10 classes",
                         f"{t:.3f} s (range {min(times[name]):.3f}-{max(times[name]):.3f})", f"{t / t_sk:.2f}x",
                         str(iters), f"{objective(w, b, xtr, ytr):.4f}", f"{acc:.3f}"))
    load1 = os.getloadavg()
    table = markdown_table(("solver", "features", f"fit, median of {args.repeat}", "vs scikit-learn", "iterations",
                            "objective", "held-out accuracy (1,000)"), rows)
    print(table)
    heading = (f"## {time.strftime('%Y-%m-%d %H:%M')} — probe fit vs scikit-learn (`benchmarks/probe_fit.py --train "
               f"{args.train} --repeat {args.repeat}`) — {cpu_name()}, fits on 1 thread ({threads} for the extraction), load average "
               f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end")
    if not args.no_write:
        prepend(heading, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
