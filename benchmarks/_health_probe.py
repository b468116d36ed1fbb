"""The classroom benchmark's health prober: a process of its own, stdlib only, so that what it measures is the
server's answer time, not the benchmark's (whose event loop drives 20 browsers).

Every 0.5 s it asks ``<base>/_stcore/health`` and writes one line to ``out``: the time, the answer's latency in
seconds (``inf`` when it failed), the server's CPU seconds so far and the load average. When an answer is 0.4 s late
and py-spy's path is given, it dumps the server's thread stacks to ``out + ".stacks"`` (what a late answer waits on).

Usage: ``python benchmarks/_health_probe.py BASE_URL SERVER_PID OUT [PY_SPY]`` (``benchmarks/classroom.py`` starts
it and stops it).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request


def server_cpu_s(pid: int, tck: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (NaN once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tck
    except (OSError, IndexError):
        return float("nan")


def ask(base: str, box: list[float]) -> None:
    """Append the health check's latency in seconds to ``box`` (``inf`` when it failed)."""
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(base + "/_stcore/health", timeout=30) as r:
            r.read()
        box.append(time.perf_counter() - t0)
    except OSError:
        box.append(float("inf"))


def main(base: str, pid: int, out: str, spy: str = "") -> None:
    """Sample until killed (see the module's docstring)."""
    tck = os.sysconf("SC_CLK_TCK")
    with open(out, "w", buffering=1) as f, open(out + ".stacks", "w", buffering=1) as stacks:
        while True:
            t = time.time()
            box: list[float] = []
            th = threading.Thread(target=ask, args=(base, box), daemon=True)
            th.start()
            th.join(0.4)
            if th.is_alive() and spy:  # no answer yet: what are the server's threads doing?
                dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True).stdout
                stacks.write(f"=== {t:.3f} +{time.time() - t:.2f} s\n{dump}\n")
            th.join()
            f.write(f"{t:.3f} {box[0]:.4f} {server_cpu_s(pid, tck):.2f} {os.getloadavg()[0]:.2f}\n")
            time.sleep(max(0.0, 0.5 - (time.time() - t)))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:5])
