"""Classroom load test: a class of browser sessions in projects doing different things at once (``--scenario
class``, the default), or several sessions pressing "Check the data" on the emoji sample at the same moment
(``--scenario check``).

    PYTHONPATH=. .venv/bin/python benchmarks/classroom.py [--scenario class] [--sessions 20] [--projects 5] [--no-write]
    PYTHONPATH=. .venv/bin/python benchmarks/classroom.py --scenario check [--sessions 6] [--no-write]

``--scenario check`` starts ``streamlit run app.py`` on a fresh ``TL_HOME`` (no cached features: the audit computes them), opens
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

``--scenario class`` (the default) is a lesson as a class makes it: ``--sessions 20`` browser sessions in
``--projects 5`` projects, each project with one session of each role, all acting at the same moment:

- **upload**: the Data page's zip uploader, a small dataset of its own (2 classes x 8 emoji), until "Unpacked";
- **check**: "Check the data" on the project's lesson set (3 classes x 8 emoji, other images in every project, so
  that no project finds another's features cached), until the data check's findings;
- **train**: a linear probe on the lesson set from the Train page, until "Status: done";
- **try**: an image on Try it with the project's run (trained before the clock starts, with a cache of its own
  that is then thrown away, so the others find no features cached), until the prediction.

It samples the server's RSS and health answer as above and, in the same loop, the task workers' resident memory
(every ``tl_core.runs.workers`` process of this TL_HOME: the largest one and their sum), and reports each
user's wait (role, project, seconds from the action to the result). ``--scenario check`` is the earlier
benchmark (every session presses "Check the data" in the shared workspace).
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


def _worker_rss_mb(home: Path) -> list[float]:
    """Resident memory of every task worker of this TL_HOME (``tl_core.runs.workers ... --home HOME``)."""
    want = f"--home\0{home}\0".encode()
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"tl_core.runs.workers" in cmd and want in cmd + b"\0":
            rss = _rss_mb(int(proc.name))
            if rss is not None:
                out.append(rss)
    return out


def _running_tasks_all(home: Path) -> int:
    """Running tasks of the workspace and every project in it."""
    dbs = [home / "runs.sqlite"] + sorted((home / "projects").glob("*/runs.sqlite"))
    return sum(_running_tasks(db) for db in dbs if db.exists())


class Sampler(threading.Thread):
    """Every 0.5 s: server RSS, health latency, running tasks, server CPU seconds so far; and the workers' RSS
    (the largest, and their sum) in ``workers``."""

    def __init__(self, pid: int, base: str, db: Path):
        super().__init__(daemon=True)
        self.pid, self.base, self.db = pid, base, db
        self.samples: list[tuple[float, float | None, float, int, float]] = []
        self.workers: list[tuple[float, float, int]] = []  # (largest worker MB, all workers MB, how many)
        self.stop = threading.Event()

    def run(self) -> None:
        home = self.db.parent
        while not self.stop.is_set():
            t = time.time()
            self.samples.append((t, _rss_mb(self.pid), _health_s(self.base), _running_tasks_all(home),
                                 _cpu_s(self.pid)))
            w = _worker_rss_mb(home)
            self.workers.append((max(w, default=0.0), sum(w), len(w)))
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


# --------------------------------------------------------------------------------------------------
# a class: 20 sessions in 5 projects doing different things at once
# --------------------------------------------------------------------------------------------------
ROLES = ("upload", "check", "train", "try")
EMOJI = ROOT / "sample_data" / "emoji"


#: Each project's lesson set: 8 images of each of these classes, a different 8 per project (5 projects use all 40).
LESSON_CLASSES = ("animal", "flag", "vehicle")
#: Each project's upload: 8 images of each of these classes, a different 8 per project.
UPLOAD_CLASSES = ("face", "food")
PER_CLASS = 8


def _slice(cls: str, k: int) -> list[Path]:
    files = sorted((EMOJI / cls).iterdir())
    return files[(PER_CLASS * k) % len(files):(PER_CLASS * k) % len(files) + PER_CLASS]


def _class_setup(home: Path, projects: int) -> tuple[list[str], dict[str, str], list[Path]]:
    """Projects, each with a lesson dataset of its own (``lesson``: 3 classes x 8 images, no image shared between
    projects, so no project finds another's features cached), one finished linear run (for Try it) and one zip
    to upload (2 other classes x 8 images).

    The run is trained on the first project's lesson set with a feature cache of its own that is then deleted (the
    sessions find the workspace's cache empty, as a new class would), and copied into every project.
    Returns (project slugs, slug -> run id, the zips).
    """
    import zipfile

    from tl_core.config import TrainConfig
    from tl_core.runs.training import run_training
    from tl_core.storage.workspace import Workspace, new_project_slug

    top = Workspace(home)
    slugs = [new_project_slug(f"group {k + 1}") for k in range(projects)]
    spaces = [top.project(slug, create=True) for slug in slugs]
    for k, ws in enumerate(spaces):
        for cls in LESSON_CLASSES:
            d = ws.datasets_dir / "lesson" / cls
            d.mkdir(parents=True)
            for f in _slice(cls, k):
                shutil.copy(f, d / f.name)
    setup_cache = home.parent / f"{home.name}-setup-cache"
    os.environ["TL_CACHE_DIR"] = str(setup_cache)
    try:
        res = run_training(spaces[0], spaces[0].datasets_dir / "lesson", TrainConfig(strategy="linear"))
        if res.status != "done":
            raise SystemExit(f"the set-up run failed: {res.error}")
    finally:
        os.environ.pop("TL_CACHE_DIR", None)
        shutil.rmtree(setup_cache, ignore_errors=True)
    runs = {slugs[0]: res.run_id}
    row = spaces[0].store().get(res.run_id)
    for slug, ws in zip(slugs[1:], spaces[1:]):
        rid = ws.store().create_run(row["data"], row["config"], status="done")
        ws.store().update(rid, summary=row["summary"])
        shutil.copytree(spaces[0].run_dir(res.run_id), ws.run_dir(rid))
        runs[slug] = rid
    zips = []
    for k in range(projects):
        z = home.parent / f"{home.name}-upload-{k + 1}.zip"
        with zipfile.ZipFile(z, "w") as zf:
            for cls in UPLOAD_CLASSES:
                for f in _slice(cls, k):
                    zf.write(f, f"pets{k + 1}/{cls}/{f.name}")
        zips.append(z)
    return slugs, runs, zips


async def _class_sessions(base: str, plan: list[dict], timeout_s: float) -> list[dict]:
    """Open every session on its page, then all act at once; each returns its plan with ``wait_s`` (action to
    result) or ``error``."""
    import re

    from playwright.async_api import async_playwright

    ms = timeout_s * 1000
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pages = []
        for u in plan:
            ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
            page = await ctx.new_page()
            page.set_default_timeout(180_000)
            q = f"project={u['project']}"
            url = {"upload": f"{base}/data?{q}", "check": f"{base}/data?{q}&data=workspace%2Flesson",
                   "train": f"{base}/train?{q}&data=workspace%2Flesson",
                   "try": f"{base}/try_it?{q}&run={u['run']}"}[u["role"]]
            await page.goto(url)
            pages.append(page)

        async def ready(page, u) -> str | None:
            try:
                if u["role"] == "upload":
                    await page.get_by_role("tab", name="Upload a zip").wait_for()
                elif u["role"] == "check":
                    await page.get_by_role("button", name="Check the data").wait_for()
                elif u["role"] == "train":  # the form's default strategy is the linear probe
                    await page.get_by_role("button", name="Start training").wait_for()
                else:
                    await page.locator("input[type=file]").first.wait_for(state="attached")
                return None
            except Exception as e:  # a page that never drew is that user's result, not the end of the benchmark
                return f"page not ready: {type(e).__name__}: {str(e).splitlines()[0][:120]}"

        not_ready = await asyncio.gather(*(ready(pg, u) for pg, u in zip(pages, plan)))

        async def act(page, u, problem: str | None) -> dict:
            if problem:
                return dict(u, wait_s=None, error=problem)
            t0 = time.perf_counter()
            try:
                if u["role"] == "upload":
                    await page.locator("input[type=file]").first.set_input_files(u["zip"])
                    await page.get_by_text(re.compile(r"Unpacked .+ as dataset")).first.wait_for(timeout=ms)
                elif u["role"] == "check":
                    await page.get_by_role("button", name="Check the data").click()
                    await page.get_by_test_id("stMetricLabel").get_by_text("Leaks into validation",
                                                                           exact=True).wait_for(timeout=ms)
                elif u["role"] == "train":
                    await page.get_by_role("button", name="Start training").click()
                    await page.get_by_text("Status: done").wait_for(timeout=ms)
                else:
                    image = sorted((EMOJI / "vehicle").iterdir())[-1]  # the same picture for every project
                    await page.locator("input[type=file]").first.set_input_files(str(image))
                    await page.get_by_text(re.compile(rf"{re.escape(image.name)} → ")).wait_for(timeout=ms)
                return dict(u, wait_s=time.perf_counter() - t0)
            except Exception as e:  # a session that never got its result is reported, not hidden
                return dict(u, wait_s=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")

        try:
            return list(await asyncio.gather(*(act(pg, u, bad) for pg, u, bad in zip(pages, plan, not_ready))))
        finally:
            await browser.close()


def class_scenario(args: argparse.Namespace) -> int:
    """The class benchmark (see the module's docstring): returns 0 when every session got its result, the
    server stayed under 1 GB and its health check answered within 2 s."""
    home = Path(tempfile.mkdtemp(prefix="tl-class-"))
    load_before = os.getloadavg()
    t_setup = time.time()
    slugs, runs, zips = _class_setup(home, args.projects)
    setup_s = time.time() - t_setup
    plan = [{"user": n + 1, "role": ROLES[(n // len(slugs)) % len(ROLES)], "project": slugs[n % len(slugs)],
             "run": runs[slugs[n % len(slugs)]], "zip": str(zips[n % len(slugs)])} for n in range(args.sessions)]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
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
        users = asyncio.run(_class_sessions(base, plan, args.timeout))
        wall = time.time() - t0
        time.sleep(1.0)
        sampler.stop.set()
        sampler.join()
        load_after = os.getloadavg()
        made = {}
        for db in sorted((home / "projects").glob("*/runs.sqlite")) + [home / "runs.sqlite"]:
            if db.exists():
                with sqlite3.connect(db) as c:
                    for (k,) in c.execute("SELECT kind FROM tasks"):
                        made[k] = made.get(k, 0) + 1
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
        for z in zips:
            z.unlink(missing_ok=True)

    rss = [s[1] for s in sampler.samples if s[1] is not None]
    health = sorted(s[2] for s in sampler.samples)
    worker_peak = max((w[0] for w in sampler.workers), default=0.0)
    workers_sum = max((w[1] for w in sampler.workers), default=0.0)
    workers_most = max((w[2] for w in sampler.workers), default=0)
    failed = [u for u in users if u.get("wait_s") is None]
    by_role = {r: sorted(u["wait_s"] for u in users if u["role"] == r and u.get("wait_s") is not None)
               for r in ROLES}
    rows = [
        ("sessions / projects", f"{args.sessions} / {len(slugs)}", "each project: one session per role "
                                                                   "(upload, check, train, try), all at once"),
        ("sessions that got their result", f"{len(users) - len(failed)} of {len(users)}",
         "; ".join(f"user {u['user']} ({u['role']}): {u['error']}" for u in failed[:3])),
        ("server peak RSS (streamlit process)", f"{max(rss):.0f} MB", f"target <= {RSS_TARGET_MB} MB; {rss[0]:.0f} "
                                                                      "MB before the clicks"),
        ("workers' peak RSS", f"{worker_peak:.0f} MB (largest)", f"all workers together at most {workers_sum:.0f} "
                                                                 f"MB; at most {workers_most} worker processes"),
        ("slowest /_stcore/health answer", f"{health[-1]:.3f} s", f"target < {HEALTH_TARGET_S:.0f} s; median "
                                                                  f"{health[len(health) // 2]:.3f} s, {len(health)} "
                                                                  "samples"),
        ("tasks made", f"{sum(made.values())}", ", ".join(f"{k} {v}" for k, v in sorted(made.items()))),
        ("load average (1 min) before / after", f"{load_before[0]:.1f} / {load_after[0]:.1f}",
         "the machine is shared with other work"),
    ]
    for r in ROLES:
        w = by_role[r]
        if w:
            rows.append((f"wait: {r}", f"median {w[len(w) // 2]:.1f} s", f"fastest {w[0]:.1f} s, slowest {w[-1]:.1f} s "
                                                                        f"({len(w)} users)"))
    table = markdown_table(["measure", "value", "note"], rows)
    per_user = markdown_table(["user", "role", "project", "wait (action to result)"],
                              [(u["user"], u["role"], u["project"],
                               f"{u['wait_s']:.1f} s" if u.get("wait_s") is not None else "no result")
                               for u in users])
    ok = not failed and max(rss) <= RSS_TARGET_MB and health[-1] < HEALTH_TARGET_S
    print(table)
    print(per_user)
    print(f"\nset-up {setup_s:.0f} s; {wall:.1f} s from the sessions opening to the last result; targets "
          f"{'met' if ok else 'NOT met'}")
    if not args.no_write:
        import torch

        head = (f"## Classroom load, a class of {args.sessions} in {len(slugs)} projects — "
                f"{dt.datetime.now():%Y-%m-%d %H:%M} — {cpu_name()}, {os.cpu_count()} cores, torch "
                f"{torch.__version__}, load average at start {load_before[0]:.1f}")
        note = (f"\n`benchmarks/classroom.py --scenario class`: {args.sessions} Chromium sessions in {len(slugs)} "
                "projects act at the same moment (upload a zip, check the project's lesson set of 24 emoji, train a "
                "linear probe on it, try the project's model); fresh TL_HOME, no features cached; TL_MAX_WORKERS default. The server and "
                "the workers (every `tl_core.runs.workers` process of this TL_HOME) are sampled every 0.5 s. "
                "Each user's wait:\n\n" + per_user + "\n")
        print("wrote", prepend(head, table + "\n" + note))
    shutil.rmtree(home, ignore_errors=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=["class", "check"], default="class",
                    help="class: sessions in projects doing different things; check: all press 'Check the data'")
    ap.add_argument("--sessions", type=int, default=None, help="browser sessions (default 20 for class, 6 for check)")
    ap.add_argument("--projects", type=int, default=5, help="projects (class scenario)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a session may wait for its result")
    ap.add_argument("--no-write", action="store_true", help="print only; do not prepend to RESULTS.md")
    args = ap.parse_args(argv)
    if args.sessions is None:
        args.sessions = 20 if args.scenario == "class" else 6
    if args.scenario == "class":
        return class_scenario(args)

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
