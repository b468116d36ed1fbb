"""Scale-out on this CPU: the same fine-tune with 2 processes x 1 thread (DDP, gloo) against 1 process x 2 threads.

    .venv/bin/python benchmarks/scale.py [--images 400] [--epochs 2] [--strategy full]

Both runs go through the command line (``tl-core train ... --nproc N``), on the same images, batch, epochs
and seed, in one invocation and one after the other; the table gives the training pass per epoch (from the
run's history, startup excluded), the whole wall time (process and group start included) and the validation
accuracy, and is prepended to benchmarks/RESULTS.md with the date, the machine and the load average.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _results import cpu_name, markdown_table, prepend  # noqa: E402
from run import make_images  # noqa: E402


def train(data: Path, home: Path, nproc: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "TL_HOME": str(home), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "tl_core.cli", "train", str(data), "--strategy", args.strategy,
                          "--epochs", str(args.epochs), "--batch-size", "16", "--patience", "0", "--nproc", str(nproc),
                          "--json", "--quiet"], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"training with {nproc} process(es) failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout)
    history = json.loads((Path(res["run_dir"]) / "metrics.json").read_text())["history"]
    per_epoch = [h["train_seconds"] for h in history if h.get("train_seconds")]
    return {"wall": wall, "epoch": min(per_epoch), "val": res["val_accuracy"], "world": res["world_size"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--strategy", default="full", choices=["partial", "full", "scratch"])
    args = p.parse_args()
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="tl-scale-"))
    try:
        data = make_images(tmp / "data", args.images)
        # the decoded and feature caches are shared (warm for the second run): decode once, untimed
        cache = tmp / "cache"
        os.environ["TL_CACHE_DIR"] = str(cache)
        train(data, tmp / "warm", 1, argparse.Namespace(**{**vars(args), "epochs": 1}))
        one = train(data, tmp / "one", 1, args)
        two = train(data, tmp / "two", 2, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_train = int(args.images * 0.8)
    rows = [
        ("1 process x 2 threads", f"{one['epoch']:.1f} s ({n_train / one['epoch']:.1f} img/s)", f"{one['wall']:.0f} s",
         f"{one['val']:.3f}", "1.00"),
        ("2 processes x 1 thread (DDP, gloo)", f"{two['epoch']:.1f} s ({n_train / two['epoch']:.1f} img/s)",
         f"{two['wall']:.0f} s", f"{two['val']:.3f}", f"{one['epoch'] / two['epoch']:.2f}"),
    ]
    table = markdown_table(("setup", "training pass per epoch", "wall (start included)", "val accuracy",
                            "speed-up of the pass"), rows)
    head = (f"## {dt.datetime.now():%Y-%m-%d %H:%M} — scale-out on the CPU ({args.strategy}, {args.images} images, "
            f"{args.epochs} epochs, batch 16)\n\n{cpu_name()}, {os.cpu_count()} cores; load average {load:.1f} at the "
            "start. Same images, batch, seed and epochs; the caches warm for both.")
    print(head + "\n\n" + table)
    prepend(head, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
