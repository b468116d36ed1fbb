"""How fast every catalogue backbone runs here: a forward pass per image at its catalogue input size.

    .venv/bin/python benchmarks/backbone_speed.py [--batch 8] [--repeats 3] [--no-write]

Random weights of the same shape (speed does not depend on the values, and the hub is not needed), one
warm-up batch, then the best of ``--repeats`` timed batches (:func:`tl_core.models.backbones.time_backbone`).
All backbones are timed in one run, each twice in alternating order, and compared with EfficientNet-Lite0 (the
default) as a ratio: on a shared machine the ratios hold better than the milliseconds. The table is prepended
to benchmarks/RESULTS.md; the catalogue's ``cpu_ms`` figures come from it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _results import cpu_name, markdown_table, prepend  # noqa: E402

from tl_core.models.backbones import time_backbone  # noqa: E402
from tl_core.models.catalogue import CATALOGUE  # noqa: E402
from tl_core.models.devices import configure_threads  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = p.parse_args()
    configure_threads()
    load = os.getloadavg()[0]
    names = list(CATALOGUE)
    best: dict[str, float] = {}
    for order in (names, names[::-1]):  # alternate the order: a load spike does not hit one backbone only
        for n in order:
            ms = time_backbone(n, batch=args.batch, repeats=args.repeats)
            best[n] = min(best.get(n, float("inf")), ms)
            print(f"{n:24} {ms:7.1f} ms/image", flush=True)
    ref = best["efficientnet_lite0"]
    rows = [(n, CATALOGUE[n].input_size, f"{CATALOGUE[n].params_m:.1f}M", f"{best[n]:.1f}", f"{best[n] / ref:.2f}",
             f"{1000 / best[n]:.0f}") for n in names]
    table = markdown_table(("backbone", "input px", "params", "ms / image", "x Lite0", "images/s"), rows)
    head = (f"## {dt.datetime.now():%Y-%m-%d %H:%M} — forward pass of every catalogue backbone (batch {args.batch})\n\n"
            f"{cpu_name()}, {os.cpu_count()} cores; load average {load:.1f} at the start (shared machine: read the "
            "ratio to Lite0). Random weights of the same shape; best of two alternating passes.")
    print("\n" + head + "\n\n" + table)
    if not args.no_write:
        prepend(head, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
