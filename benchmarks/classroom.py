"""Classroom load test: several browser sessions press "Check the data" on the emoji sample at the same moment.

    PYTHONPATH=. .venv/bin/python benchmarks/classroom.py [--sessions 6] [--no-write]

Starts ``streamlit run app.py`` on a fresh ``TL_HOME`` (no cached features: the audit computes them), opens
N headless Chromium sessions (one browser context each, so N Streamlit sessions) on the Data page of the emoji
sample, and has all of them click "Check the data" at once (asyncio, one click each within a few
milliseconds). Throughout, every 0.5 s, it samples

- the resident memory of the server process itself (``VmRSS`` of the ``streamlit`` process, not its workers),
- the latency of ``GET /_stcore/health`` (does the server still answer while the work goes on?),
- how many tasks the run store says are running,

and waits until every session shows the audit's findings. It prints the server's peak RSS (target < 1 GB), the
slowest session (seconds from its click to its result), the slowest health answer (target < 2 s), the most
tasks running at once (from the store's start and finish times) and how many tasks were made, and prepends a
dated table to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_name, markdown_table, prepend  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tl_core.storage.processes import kill_workers  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
RSS_TARGET_MB = 1024
HEALTH_TARGET_S = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return 0.0


def _health_s(base: str) -> float:
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(f"{base}/_stcore/health", timeout=30) as r:
            r.read()
    except OSError:
        return float("inf")
    return time.perf_counter() - t0


def _running_tasks(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return c.execute("SELECT count(*) FROM tasks WHERE status='running'").fetchone()[0]
    except sqlite3.Error:
        return 0


class Sampler(threading.Thread):
    """Every 0.5 s: server RSS, health latency, running tasks, server CPU seconds so far."""

    def __init__(self, pid: int, base: str, db: Path):
        super().__init__(daemon=True)
        self.pid, self.base, self.db = pid, base, db
        self.samples: list[tuple[float, float | None, float, int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t = time.time()
            self.samples.append((t, _rss_mb(self.pid), _health_s(self.base), _running_tasks(self.db),
                                 _cpu_s(self.pid)))
            self.stop.wait(max(0.0, 0.5 - (time.time() - t)))


def _max_overlap(db: Path) -> tuple[int, int, dict[str, int]]:
    """(most tasks running at once, tasks made, tasks per kind) from the store's start/finish times."""
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT kind, started, finished FROM tasks").fetchall()
    events = []
    for _, s, f in rows:
        if s is not None:
            events += [(s, 1), (f if f is not None else time.time(), -1)]
    best = cur = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        cur += d
        best = max(best, cur)
    kinds: dict[str, int] = {}
    for k, _, _ in rows:
        kinds[k] = kinds.get(k, 0) + 1
    return best, len(rows), kinds


def _audit_times(db: Path) -> tuple[float, float]:
    """(seconds the audit task waited for a worker, seconds it ran) from the store."""
    with sqlite3.connect(db) as c:
        created, started, finished = c.execute(
            "SELECT created, started, finished FROM tasks WHERE kind='audit' ORDER BY created LIMIT 1").fetchone()
    return (started or finished) - created, (finished or time.time()) - (started or finished)


async def _sessions(base: str, n: int, timeout_s: float) -> list[float]:
    """N sessions on the Data page; all click 'Check the data' at once; seconds from each click to its result."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pages = []
        for _ in range(n):
            ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
            page = await ctx.new_page()
            page.set_default_timeout(120_000)
            await page.goto(f"{base}/data?data=sample%2Femoji")
            pages.append(page)
        for page in pages:  # every session ready before anyone clicks
            await page.get_by_role("button", name="Check the data").wait_for()

        async def one(page) -> float:
            t0 = time.perf_counter()
            await page.get_by_role("button", name="Check the data").click()
            await page.get_by_test_id("stMetricLabel").get_by_text("Leaks into validation", exact=True).wait_for(
                timeout=timeout_s * 1000)
            return time.perf_counter() - t0

        try:
            return list(await asyncio.gather(*(one(pg) for pg in pages)))
        finally:
            await browser.close()


def _per_window(points: list[tuple[float, float]], width: float) -> list[tuple[float, float]]:
    out: dict[int, list[float]] = {}
    for t, v in points:
        out.setdefault(int(t // width), []).append(v)
    return [(k * width, sum(v) / len(v)) for k, v in sorted(out.items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--timeout", type=float, default=600, help="seconds a session may wait for its result")
    ap.add_argument("--no-write", action="store_true", help="print only; do not prepend to RESULTS.md")
    args = ap.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="tl-classroom-"))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    log = open(home / "server.log", "wb")
    env = {**os.environ, "TL_HOME": str(home), "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address",
         "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = None
    try:
        deadline = time.monotonic() + 90
        while _health_s(base) == float("inf"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start:\n" + (home / "server.log").read_text()[-2000:])
            time.sleep(0.3)
        sampler = Sampler(server.pid, base, home / "runs.sqlite")
        sampler.start()
        t0 = time.time()
        latencies = asyncio.run(_sessions(base, args.sessions, args.timeout))
        wall = time.time() - t0
        time.sleep(1.0)  # one more sample after the last result
        sampler.stop.set()
        sampler.join()
        load_after = os.getloadavg()
        overlap, made, kinds = _max_overlap(home / "runs.sqlite")
        audit_wait, audit_ran = _audit_times(home / "runs.sqlite")
    finally:
        if sampler is not None:
            sampler.stop.set()
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        kill_workers(home)
        log.close()

    rss = [s[1] for s in sampler.samples if s[1] is not None]
    health = [s[2] for s in sampler.samples]
    peak_rss, slowest_health = max(rss), max(health)
    busy = [(b[4] - a[4]) / max(1e-9, b[0] - a[0]) for a, b in zip(sampler.samples, sampler.samples[1:])]
    cpu_total = sampler.samples[-1][4] - sampler.samples[0][4]
    rows = [
        ("sessions clicking at once", f"{args.sessions}", ""),
        ("server peak RSS (streamlit process)", f"{peak_rss:.0f} MB", f"target < {RSS_TARGET_MB} MB; "
                                                                      f"{rss[0]:.0f} MB before the clicks"),
        ("slowest session, click to result", f"{max(latencies):.1f} s", f"fastest {min(latencies):.1f} s; the one "
                                                                        f"audit task: {audit_wait:.1f} s to start "
                                                                        f"a worker, {audit_ran:.1f} s running"),
        ("slowest /_stcore/health answer", f"{slowest_health:.3f} s", f"target < {HEALTH_TARGET_S:.0f} s; median "
                                                                     f"{sorted(health)[len(health) // 2]:.3f} s, "
                                                                     f"{len(health)} samples"),
        ("server CPU (streamlit process)", f"{cpu_total:.1f} s", f"over the {wall:.0f} s; busiest 0.5 s: "
                                                               f"{max(busy):.0%} of a core"),
        ("most tasks running at once", f"{overlap}", f"sampled: {max(s[3] for s in sampler.samples)}"),
        ("tasks made", f"{made}", ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))),
        ("load average (1 min) before / after", f"{load_before[0]:.1f} / {load_after[0]:.1f}", ""),
    ]
    table = markdown_table(["measure", "value", "note"], rows)
    ok = peak_rss < RSS_TARGET_MB and slowest_health < HEALTH_TARGET_S
    slow = [(t - t0, h) for t, _, h, _, _ in sampler.samples if h >= 0.5]
    if slow:
        print("slow health answers (seconds after the sessions opened, latency):",
              ", ".join(f"{at:.1f}: {h:.2f}" for at, h in slow))
        cpu = [(t - t0, (b[4] - a[4]) / max(1e-9, b[0] - a[0])) for a, b in zip(sampler.samples, sampler.samples[1:])
               for t in [b[0]]]
        print("server CPU per 10 s:", ", ".join(f"{int(k)}: {v:.0%}" for k, v in _per_window(cpu, 10)))
    print(table)
    print(f"\n{wall:.1f} s in all (opening the sessions, the work, closing the browsers); targets "
          f"{'met' if ok else 'NOT met'}")
    if not args.no_write:
        import torch  # only for the machine line (the server never imports it)

        head = (f"## Classroom load — {dt.datetime.now():%Y-%m-%d %H:%M} — {cpu_name()}, {os.cpu_count()} cores, "
                f"torch {torch.__version__}, load average at start {load_before[0]:.1f}")
        note = (f"\n`benchmarks/classroom.py`: {args.sessions} Chromium sessions press \"Check the data\" on the emoji "
                "sample at the same moment, fresh TL_HOME (features not cached); the server process is sampled "
                "every 0.5 s. Every long computation runs in worker processes (TL_MAX_WORKERS default: one per "
                "4 cores, at least 1), so identical requests share one task and the server only reads the store.\n")
        print("wrote", prepend(head, table + "\n" + note))
    shutil.rmtree(home, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
