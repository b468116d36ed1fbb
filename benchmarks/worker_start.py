"""How long a new task worker takes to be ready to run a model: forked by the zygote (tl_core/storage/zygote.py)
against a fresh interpreter (the plain start), measured in the same run.

    .venv/bin/python benchmarks/worker_start.py [--repeat 5] [--no-write]

Each start runs a probe module the way a worker runs (``python -m``): it imports ``tl_core.runs.workers``, then
torch and timm (what a task that runs a model needs), and records when it got there (``time.monotonic``, one clock
for every process of the machine) and its own CPU time. The plain start is what ``TL_ZYGOTE=off`` does
(``tl_core.storage.processes.spawn_detached``); the forked one asks a zygote that is already up (started, and
waited for, before the first timed start). The two kinds alternate, ``--repeat`` of each; the medians are kept.
Prints a table and prepends it to benchmarks/RESULTS.md with the date, machine and load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import cpu_name, markdown_table, prepend  # noqa: E402

PROBE = """import json, os, sys, time
import tl_core.runs.workers
import torch, timm
t = os.times()
open(sys.argv[1], "w").write(json.dumps({"t": time.monotonic(), "cpu": t.user + t.system}))
"""


def _wait(path: Path, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return json.loads(path.read_text())
        time.sleep(0.01)
    raise SystemExit(f"the probe did not report within {timeout:.0f} s (see {path.parent / 'probe.log'})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="print only; do not prepend to RESULTS.md")
    args = p.parse_args(argv)

    from tl_core.storage import zygote
    from tl_core.storage.processes import spawn_detached

    os.environ["TL_ZYGOTE_IDLE_S"] = "30"  # this run's zygote (its key names the temporary folder) leaves soon after
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "tl_worker_start_probe.py").write_text(PROBE)
        os.chdir(d)  # the probe module is found as a worker's module is: first on sys.path, from the folder
        log = d / "probe.log"
        deadline = time.monotonic() + 120
        while zygote.spawn_forked("tl_worker_start_probe", [str(d / "warm.json")], log) is None:
            if time.monotonic() > deadline:
                raise SystemExit("no zygote answered within 120 s")
            time.sleep(0.2)
        _wait(d / "warm.json")
        got: dict[str, list[tuple[float, float]]] = {"fresh interpreter (TL_ZYGOTE=off)": [], "forked by the zygote": []}
        for i in range(args.repeat):
            for how in got:
                out = d / f"{i}-{len(got[how])}-{how[:5]}.json"
                t0 = time.monotonic()
                if how.startswith("fresh"):
                    spawn_detached([sys.executable, "-m", "tl_worker_start_probe", str(out)], log)
                elif zygote.spawn_forked("tl_worker_start_probe", [str(out)], log) is None:
                    raise SystemExit("the zygote stopped answering")
                r = _wait(out)
                got[how].append((r["t"] - t0, r["cpu"]))
        os.chdir(ROOT)
    load1 = os.getloadavg()
    fresh = statistics.median(w for w, _ in got["fresh interpreter (TL_ZYGOTE=off)"])
    rows = []
    for how, runs in got.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        rows.append((how, f"{statistics.median(walls):.2f} s (range {min(walls):.2f}-{max(walls):.2f})",
                     f"{statistics.median(cpus):.2f} s", f"{statistics.median(walls) / fresh:.3f}x"))
    table = markdown_table(("start", f"ready to run a model, median of {args.repeat}", "its CPU", "vs fresh"), rows)
    print(table)
    heading = (f"## {time.strftime('%Y-%m-%d %H:%M')} — a new task worker ready to run a model "
               f"(`benchmarks/worker_start.py --repeat {args.repeat}`) — {cpu_name()}, {os.cpu_count()} cores, load "
               f"average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end")
    if not args.no_write:
        prepend(heading, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
