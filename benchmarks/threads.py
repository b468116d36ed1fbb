"""Fine-tunes that share a machine's cores: how OpenMP's waiting threads (spinning, OpenMP's default, or asleep,
``OMP_WAIT_POLICY=PASSIVE``) change the time of one training alone and of two at once, each process with one thread
or with every core, measured in the same run (docs/settings.md: when to set it; `make test` does, tests/conftest.py).

    .venv/bin/python benchmarks/threads.py [--steps 10] [--repeat 3] [--spincount N ...] [--no-write]

Each process runs ``--steps`` fine-tuning steps of EfficientNet-Lite0 (the default backbone, its packaged weights;
batches of 8 images of 224 x 224, channels-last, as tl_core/models/training.py trains) and reports the seconds of its
timed loop. The policy is the one this script gives (``default`` removes OMP_WAIT_POLICY: OpenMP spins a while
before it sleeps). "Two at once" starts both processes together; their slower time is kept. The six cases run in
turn, ``--repeat`` times; the median of each is given, and as a ratio to one process alone on one thread. Prints a
table and prepends it to benchmarks/RESULTS.md with the date, machine and load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import cpu_name, markdown_table, prepend  # noqa: E402

PROBE = """import json, sys, time
import torch
from tl_core.models.backbones import build_model
torch.manual_seed(0)
model, _ = build_model("efficientnet_lite0", 5)
model = model.train().to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 5, (8,))
def step():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
step()  # the first step allocates: not timed
t = time.perf_counter()
for _ in range(int(sys.argv[1])):
    step()
print(json.dumps({"seconds": time.perf_counter() - t, "threads": torch.get_num_threads()}))
"""


def _start(steps: int, threads: int, policy: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "TL_THREADS", "GOMP_SPINCOUNT")}
    env.update({"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)})
    if policy.isdigit():  # spin this many times, then sleep (libgomp's GOMP_SPINCOUNT; its default is 300,000)
        env["GOMP_SPINCOUNT"] = policy
    elif policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    return subprocess.Popen([sys.executable, "-c", PROBE, str(steps)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)


def _seconds(procs: list[subprocess.Popen]) -> float:
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"a probe failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1])["seconds"])
    return max(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--spincount", type=int, action="append", default=[],
                   help="also every core alone and two at once with GOMP_SPINCOUNT=N (repeatable)")
    p.add_argument("--no-write", action="store_true", help="print only; do not prepend to RESULTS.md")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load0 = os.getloadavg()
    cases = [("1 alone", 1, 1, "default"), ("1 alone", 1, cores, "default"), ("1 alone", 1, cores, "PASSIVE"),
             ("2 at once", 2, 1, "default"), ("2 at once", 2, cores, "default"), ("2 at once", 2, cores, "PASSIVE")]
    cases += [(what, n, cores, str(spins)) for spins in args.spincount
              for what, n in (("1 alone", 1), ("2 at once", 2))]
    times: dict[int, list[float]] = {k: [] for k in range(len(cases))}
    for r in range(args.repeat):
        for k, (what, n, threads, policy) in enumerate(cases):
            times[k].append(_seconds([_start(args.steps, threads, policy) for _ in range(n)]))
            print(f"[{r + 1}/{args.repeat}] {what}, {threads} thread(s), {policy}: {times[k][-1]:.2f} s", flush=True)
    base = statistics.median(times[0])
    wait = {"default": "spin (OpenMP default)", "PASSIVE": "sleep (PASSIVE)"}
    rows = [[what, threads,
             wait[policy] if policy in wait else f"spin {int(policy):,} times, then sleep (GOMP_SPINCOUNT)",
             f"{statistics.median(times[k]):.2f}", f"{statistics.median(times[k]) / base:.2f}"]
            for k, (what, n, threads, policy) in enumerate(cases)]
    load1 = os.getloadavg()
    table = markdown_table(["processes", "threads each", "waiting threads", "seconds (median of the slowest)",
                            "x one alone on 1 thread"], rows)
    head = (f"## {time.strftime('%Y-%m-%d %H:%M')} — threads: {args.steps} Lite0 fine-tuning steps (batch 8) per "
            f"process, alone and two at once ({cpu_name()}, {cores} cores; load {load0[0]:.2f} before, "
            f"{load1[0]:.2f} after)")
    print("\n" + head + "\n\n" + table)
    if not args.no_write:
        print(f"\nprepended to {prepend(head, table)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
