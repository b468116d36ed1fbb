"""Classroom load test: a class of browser sessions in projects doing different things at once (``--scenario
class``, the default), or several sessions pressing "Check the data" on the emoji sample at the same moment
(``--scenario check``). Both are one loop: a plan of users (role, project), one headless Chromium context per
user (so one Streamlit session each), every page opened and ready first, then every user acts at the same moment.

    PYTHONPATH=. .venv/bin/python benchmarks/classroom.py [--scenario class] [--sessions 20] [--projects 5]
        [--roles upload,check,train,try] [--nice-clients 10] [--timeout 600] [--no-write]
    PYTHONPATH=. .venv/bin/python benchmarks/classroom.py --scenario check [--sessions 6] [--no-write]

``--scenario class``: ``--sessions`` users in ``--projects`` projects, the roles given in turn, one project
after the other (20 sessions, 5 projects, 4 roles: each project has one session of each role):

- **upload**: the Data page's zip uploader, a small dataset of its own (2 classes x 8 emoji), until "Unpacked";
- **check**: "Check the data" on the project's lesson set (3 classes x 8 emoji, other images in every project, so
  that no project finds another's features cached), until the data check's findings;
- **train**: a linear probe on the lesson set from the Train page, until "Status: done";
- **try**: an image on Try it with the project's run (trained before the clock starts, with a cache of its own
  that is then thrown away, so the others find no features cached), until the prediction.

``--roles check --sessions 5`` has five groups check their own sets at once (a small version of the class);
``--roles check,train --sessions 2 --projects 1 --train-delay 5`` is the stalled data check of the 20-session run
(a check asked for just before a training starts on the same folder).
``--scenario check``: every session checks the emoji sample in the shared workspace (one shared audit task).

Throughout, every 0.5 s, it samples the server process's resident memory (``VmRSS`` of ``streamlit``, not its
workers) and CPU time, the latency of ``GET /_stcore/health`` (does the server still answer while the work goes
on? asked by a small process of its own, so that the figure is the server's and not this process's), the tasks
running, and the task workers' resident memory (every ``tl_core.runs.workers`` process of this TL_HOME: the
largest one and their sum). It reports each user's wait (seconds from the action to the result),
prepends a dated table to ``benchmarks/RESULTS.md`` and exits 0 when every user got a result, the server stayed at
1 GB or less and the health check answered within 2 s. A user without a result is reported with the end of what
its page showed, and the TL_HOME (server log, run stores) is kept to look at.

The browsers stand for the students' own laptops: by default (``--nice-clients 10``) they run at a lower CPU
priority, without the right to raise it again (Chromium run as root lifts its browser and GPU processes to
nice -8, above the server), so that on a 2-core machine they take the cores the server and its workers leave,
as laptops would not take the server's cores at all. ``--nice-clients 0`` runs them as they are. The task
workers run below the server on their own (``tl_core.runs.workers.WORKER_NICE``).
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
from tl_core.storage.processes import kill_workers, worker_pids  # noqa: E402

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
    """Resident memory of every task worker of this TL_HOME (``tl_core.storage.processes.worker_pids``: forked by
    the zygote or started the plain way)."""
    return [rss for rss in (_rss_mb(pid) for pid in worker_pids(home)) if rss is not None]


def _running_tasks_all(home: Path) -> int:
    """Running tasks of the workspace and every project in it."""
    dbs = [home / "runs.sqlite"] + sorted((home / "projects").glob("*/runs.sqlite"))
    return sum(_running_tasks(db) for db in dbs if db.exists())


#: The health check's own prober: a separate small process (stdlib only, at the server's priority), so that its
#: figures are the server's latency alone, not this process's, whose event loop drives 20 browser sessions. Each
#: line: wall-clock time, latency (inf: no answer), the server's CPU seconds so far, the 1-minute load average.
#: With py-spy installed (a diagnostic, not a dependency: ``pip install py-spy``), an answer still missing after
#: 0.4 s has the server's thread stacks dumped then (copied to a file in the temporary folder, named at the end).
#: A script of its own (``benchmarks/_health_probe.py``): it imports nothing of the benchmark's.
_PROBE = Path(__file__).with_name("_health_probe.py")


def _start_prober(base: str, pid: int, out: Path) -> subprocess.Popen:
    """Start :data:`_PROBE` on the server at ``base`` (process ``pid``), writing its samples to ``out``."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent)) or ""
    return subprocess.Popen([sys.executable, str(_PROBE), base, str(pid), str(out), spy],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _prober_samples(out: Path) -> list[tuple[float, float, float, float]]:
    """(time, latency, server CPU seconds so far, load average) per sample of :func:`_start_prober`."""
    rows = []
    for line in out.read_text().splitlines() if out.exists() else []:
        try:
            t, lat, cpu, load = (float(x) for x in line.split())
        except ValueError:
            continue
        rows.append((t, lat, cpu, load))
    return rows


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


def _class_setup(home: Path, projects: int, with_run: bool = True) -> tuple[list[str], dict[str, str], list[Path]]:
    """Projects, each with a lesson dataset of its own (``lesson``: 3 classes x 8 images, no image shared between
    projects, so no project finds another's features cached), one finished linear run (for Try it) and one zip
    to upload (2 other classes x 8 images).

    The run is trained on the first project's lesson set with a feature cache of its own that is then deleted (the
    sessions find the workspace's cache empty, as a new class would), and copied into every project.
    ``with_run`` False skips the run (no session tries a model). Returns (project slugs, slug -> run id, the zips).
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
    zips = []
    for k in range(projects):
        z = home.parent / f"{home.name}-upload-{k + 1}.zip"
        with zipfile.ZipFile(z, "w") as zf:
            for cls in UPLOAD_CLASSES:
                for f in _slice(cls, k):
                    zf.write(f, f"pets{k + 1}/{cls}/{f.name}")
        zips.append(z)
    if not with_run:
        return slugs, {}, zips
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
    return slugs, runs, zips



#: What each role does and the text that says its result is on the page.
RESULT_TEXT = {"upload": "Unpacked … as dataset", "check": "the metric 'Leaks into validation'",
               "train": "Status: done", "try": "<image> → <class>"}


def _url(base: str, u: dict) -> str:
    """The page a user opens: in its project (``project`` None: the shared workspace) on its data or run."""
    q = f"project={u['project']}&" if u.get("project") else ""
    data = u.get("data", "workspace%2Flesson")
    return {"upload": f"{base}/data?{q}", "check": f"{base}/data?{q}data={data}",
            "train": f"{base}/train?{q}data={data}", "try": f"{base}/try_it?{q}run={u.get('run')}"}[u["role"]]


def _chromium(folder: Path, nice: int) -> str:
    """The browser the sessions run in: Chromium itself, or (``nice`` > 0) a wrapper that starts it at that lower
    CPU priority. The sessions stand for the students' own laptops, which in a classroom do not share the
    server's cores; niced, they still share them here, but only take what the server leaves.

    Chromium run as root raises its own browser and GPU processes to nice -8 (above the server); the wrapper
    drops the capability to do so (``setpriv``), so the level given holds for all of its processes."""
    if nice <= 0:
        return CHROMIUM
    wrapper = folder / "chromium-niced"
    keep = "setpriv --bounding-set -sys_nice --inh-caps -sys_nice -- " if shutil.which("setpriv") else ""
    wrapper.write_text(f'#!/bin/sh\nexec {keep}nice -n {int(nice)} {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


async def _sessions(base: str, plan: list[dict], timeout_s: float, browser_path: str,
                    train_delay_s: float = 0.0) -> list[dict]:
    """Open every session of ``plan`` on its page, then all act at once (the trainings ``train_delay_s`` later);
    each returns its plan with ``wait_s`` (action to result) or ``error`` (with the end of what its page showed)."""
    import re

    from playwright.async_api import async_playwright

    ms = timeout_s * 1000
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        pages = []
        for u in plan:
            ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
            page = await ctx.new_page()
            page.set_default_timeout(180_000)
            await page.goto(_url(base, u))
            pages.append(page)

        async def ready(page, u) -> str | None:
            try:
                if u["role"] == "upload":
                    await page.get_by_role("tab", name="Upload a zip").wait_for()
                elif u["role"] == "check":
                    await page.get_by_role("button", name="Check the data").wait_for()
                elif u["role"] == "train":  # the form's default strategy is the linear probe
                    await page.locator(".st-key-start-training").get_by_role("button", name="Start training").wait_for()
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
                    # the zip uploader by its key: the Data page has a folder uploader too, and which file input
                    # comes first in the page is not fixed (a user of a project whose upload was finishing got the
                    # folder's: "[webkitdirectory] input requires passing a path to a directory")
                    await page.locator(".st-key-zip_upload input[type=file]").set_input_files(u["zip"])
                    await page.get_by_text(re.compile(r"Unpacked .+ as dataset")).first.wait_for(timeout=ms)
                elif u["role"] == "check":
                    await page.get_by_role("button", name="Check the data").click()
                    await page.get_by_test_id("stMetricLabel").get_by_text("Leaks into validation",
                                                                           exact=True).wait_for(timeout=ms)
                elif u["role"] == "train":
                    if train_delay_s:
                        await asyncio.sleep(train_delay_s)
                        t0 = time.perf_counter()
                    await page.locator(".st-key-start-training").get_by_role("button", name="Start training").click()
                    await page.get_by_text("Status: done").wait_for(timeout=ms)
                else:
                    image = sorted((EMOJI / "vehicle").iterdir())[-1]  # the same picture for every project
                    await page.locator("input[type=file]").first.set_input_files(str(image))
                    await page.get_by_text(re.compile(rf"{re.escape(image.name)} → ")).wait_for(timeout=ms)
                return dict(u, wait_s=time.perf_counter() - t0)
            except Exception as e:  # a session that never got its result is reported, not hidden
                try:  # what the stalled page shows: the clue to why
                    shown = " ".join((await page.inner_text("main", timeout=5000)).split())[-400:]
                except Exception:
                    shown = "(the page could not be read)"
                return dict(u, wait_s=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
                            shown=shown)

        try:
            return list(await asyncio.gather(*(act(pg, u, bad) for pg, u, bad in zip(pages, plan, not_ready))))
        finally:
            await browser.close()


def _plan(args: argparse.Namespace, home: Path) -> tuple[list[dict], list[Path], str]:
    """The users of the scenario (role, project, run, zip, data) and the files to remove afterwards; and a
    sentence saying what they do, for RESULTS.md."""
    if args.scenario == "check":
        plan = [{"user": n + 1, "role": "check", "project": None, "data": "sample%2Femoji"}
                for n in range(args.sessions)]
        return plan, [], (f"{args.sessions} Chromium sessions press \"Check the data\" on the emoji sample in the "
                          "shared workspace at the same moment (identical requests: one audit task)")
    roles = tuple(args.roles.split(","))
    slugs, runs, zips = _class_setup(home, args.projects, with_run="try" in roles)
    plan = [{"user": n + 1, "role": roles[(n // len(slugs)) % len(roles)], "project": slugs[n % len(slugs)],
             "run": runs.get(slugs[n % len(slugs)]), "zip": str(zips[n % len(slugs)])} for n in range(args.sessions)]
    what = {"upload": "upload a zip", "check": "check the project's lesson set of 24 emoji",
            "train": "train a linear probe on it", "try": "try the project's model"}
    return plan, zips, (f"{args.sessions} Chromium sessions in {len(slugs)} projects act at the same moment ("
                        + ", ".join(what[r] for r in roles) + ")")


def _tasks_made(home: Path) -> list[tuple[str, str, str | None]]:
    """(kind, status, error) of every task of the workspace and its projects."""
    out = []
    for db in [home / "runs.sqlite"] + sorted((home / "projects").glob("*/runs.sqlite")):
        if db.exists():
            with sqlite3.connect(db) as c:
                out += c.execute("SELECT kind, status, error FROM tasks").fetchall()
    return out


def _slow_answers(probe: list[tuple[float, float, float, float]], samples: list[tuple], t0: float,
                  at_least_s: float = 0.5) -> str:
    """The prober's answers of ``at_least_s`` or more, each with what the server was doing: its CPU share over the
    2 s before (1.0 = one core busy), the load average and the tasks running (the sampler's nearest sample)."""
    out = []
    for i, (t, lat, cpu, load) in enumerate(probe):
        if lat < at_least_s:
            continue
        j = max((k for k in range(i) if probe[k][0] <= t - 2.0), default=0)
        share = (cpu - probe[j][2]) / max(t - probe[j][0], 1e-6) if i else float("nan")
        running = min(samples, key=lambda s: abs(s[0] - t))[3] if samples else 0
        out.append(f"{t - t0:.1f}: {lat:.2f} s (server CPU {share:.2f}, load {load:.1f}, {running} running)")
    return "; ".join(out)


def run_scenario(args: argparse.Namespace) -> int:
    """One benchmark run (see the module's docstring): returns 0 when every session got its result, the server
    stayed under 1 GB and its health check answered within 2 s."""
    home = Path(tempfile.mkdtemp(prefix="tl-class-"))
    load_before = os.getloadavg()
    t_setup = time.time()
    plan, extra_files, what = _plan(args, home)
    setup_s = time.time() - t_setup
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(home / "server.log", "wb")
    env = {**os.environ, "TL_HOME": str(home), "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address",
         "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = prober = None
    try:
        deadline = time.monotonic() + 90
        while _health_s(base) == float("inf"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start:\n" + (home / "server.log").read_text()[-2000:])
            time.sleep(0.3)
        sampler = Sampler(server.pid, base, home / "runs.sqlite")
        sampler.start()
        prober = _start_prober(base, server.pid, home / "health.txt")
        t0 = time.time()
        users = asyncio.run(_sessions(base, plan, args.timeout, _chromium(_bin_dir(home), args.nice_clients),
                                      args.train_delay))
        wall = time.time() - t0
        time.sleep(1.0)  # one more sample after the last result
        sampler.stop.set()
        sampler.join()
        prober.terminate()
        load_after = os.getloadavg()
        made = _tasks_made(home)
    finally:
        if sampler is not None:
            sampler.stop.set()
        if prober is not None:
            prober.kill()
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        kill_workers(home)
        log.close()
        for z in extra_files:
            z.unlink(missing_ok=True)

    s0 = sampler.samples[0]
    rss = [s[1] for s in sampler.samples if s[1] is not None]
    probe = [r for r in _prober_samples(home / "health.txt") if r[0] >= t0]
    health = sorted(r[1] for r in probe) or [float("inf")]
    health_here = sorted(s[2] for s in sampler.samples)
    cpu_total = sampler.samples[-1][4] - s0[4]
    worker_peak = max((w[0] for w in sampler.workers), default=0.0)
    workers_sum = max((w[1] for w in sampler.workers), default=0.0)
    workers_most = max((w[2] for w in sampler.workers), default=0)
    failed = [u for u in users if u.get("wait_s") is None]
    kinds: dict[str, int] = {}
    for k, _, _ in made:
        kinds[k] = kinds.get(k, 0) + 1
    projects = len({u["project"] for u in plan})
    rows = [
        ("sessions / projects", f"{len(plan)} / {projects}", what),
        ("sessions that got their result", f"{len(users) - len(failed)} of {len(users)}",
         "; ".join(f"user {u['user']} ({u['role']}): {u['error']}" for u in failed[:3])),
        ("server peak RSS (streamlit process)", f"{max(rss):.0f} MB", f"target <= {RSS_TARGET_MB} MB; {rss[0]:.0f} "
                                                                      "MB before the clicks"),
        ("server CPU (streamlit process)", f"{cpu_total:.1f} s", f"over {wall:.0f} s"),
        ("workers' peak RSS", f"{worker_peak:.0f} MB (largest)", f"all workers together at most {workers_sum:.0f} "
                                                                 f"MB; at most {workers_most} worker processes"),
        ("slowest /_stcore/health answer", f"{health[-1]:.3f} s", f"target < {HEALTH_TARGET_S:.0f} s; median "
                                                                  f"{health[len(health) // 2]:.3f} s, {len(health)} "
                                                                  "samples by a prober process of its own"),
        ("the same, asked from this process", f"{health_here[-1]:.3f} s",
         f"median {health_here[len(health_here) // 2]:.3f} s (this process also drives the browsers)"),
        ("tasks made", f"{len(made)}", ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))),
        ("load average (1 min) before / after", f"{load_before[0]:.1f} / {load_after[0]:.1f}",
         "the machine is shared with other work"),
    ]
    for r in ROLES:
        w = sorted(u["wait_s"] for u in users if u["role"] == r and u.get("wait_s") is not None)
        if w:
            rows.append((f"wait: {r}", f"median {w[len(w) // 2]:.1f} s", f"fastest {w[0]:.1f} s, slowest {w[-1]:.1f} s "
                                                                        f"({len(w)} users)"))
    table = markdown_table(["measure", "value", "note"], rows)
    per_user = markdown_table(["user", "role", "project", "wait (action to result)"],
                              [(u["user"], u["role"], u["project"] or "shared workspace",
                               f"{u['wait_s']:.1f} s" if u.get("wait_s") is not None else "no result")
                               for u in users])
    ok = not failed and max(rss) <= RSS_TARGET_MB and health[-1] < HEALTH_TARGET_S
    slow = _slow_answers(probe, sampler.samples, t0)
    if slow:
        print("slow health answers (prober; s after the sessions opened: latency, server CPU share over the 2 s "
              "before, load average, tasks running):", slow)
    print(table)
    print(per_user)
    for u in failed:
        print(f"user {u['user']} ({u['role']}, {u['project']}): {u['error']}\n  its page showed: {u.get('shown')}")
    if failed:
        bad = [m for m in made if m[1] != "done"]
        print("tasks not done:", bad or "none")
    print(f"\nset-up {setup_s:.0f} s; {wall:.1f} s from the sessions opening to the last result; targets "
          f"{'met' if ok else 'NOT met'}")
    if not args.no_write:
        import torch  # only for the machine line (the server never imports it)

        head = (f"## Classroom load, {args.scenario}: {len(plan)} sessions in {projects} project(s) — "
                f"{dt.datetime.now():%Y-%m-%d %H:%M} — {cpu_name()}, {os.cpu_count()} cores, torch "
                f"{torch.__version__}, load average at start {load_before[0]:.1f}")
        clients = (f"the browsers at nice {args.nice_clients} (they stand for the students' own laptops)"
                   if args.nice_clients > 0 else "the browsers at normal priority")
        note = (f"\n`benchmarks/classroom.py --scenario {args.scenario}`: {what}; fresh TL_HOME, no features cached; "
                f"TL_MAX_WORKERS default; {clients}. The server and the workers (every `tl_core.runs.workers` "
                "process of this TL_HOME) are sampled every 0.5 s; the health check by a process of its own. "
                f"Health answers of 0.5 s or more: {slow or 'none'}. Each user's wait:\n\n" + per_user + "\n")
        print("wrote", prepend(head, table + "\n" + note))
    stacks = home / "health.txt.stacks"
    if stacks.exists() and stacks.stat().st_size:
        kept = Path(tempfile.gettempdir()) / f"tl-class-health-stacks-{dt.datetime.now():%H%M%S}.txt"
        shutil.copy(stacks, kept)
        print(f"the server's thread stacks while a health answer was late: {kept}")
    if failed:
        print(f"kept {home} (server.log, the run stores) to look at the sessions without a result")
    else:
        shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(_bin_dir(home), ignore_errors=True)
    return 0 if ok else 1


def _bin_dir(home: Path) -> Path:
    d = home.parent / f"{home.name}-bin"
    d.mkdir(exist_ok=True)
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=["class", "check"], default="class",
                    help="class: sessions in projects doing different things; check: all press 'Check the data' "
                         "in the shared workspace")
    ap.add_argument("--sessions", type=int, default=None, help="browser sessions (default 20 for class, 6 for check)")
    ap.add_argument("--projects", type=int, default=5, help="projects (class scenario)")
    ap.add_argument("--roles", default=",".join(ROLES),
                    help="class scenario: the roles, comma-separated, given to the sessions in turn, one project "
                         "after the other (default: every role; 'check' alone: each project checks its own set)")
    ap.add_argument("--nice-clients", type=int, default=10,
                    help="run the browsers at this nice level (0: normal priority); they stand for the students' "
                         "laptops, so they should not take the server's cores")
    ap.add_argument("--train-delay", type=float, default=0.0,
                    help="seconds the train users wait before they press Start training (5 with --roles check,train: "
                         "a check asked for just before a training starts on the same folder, the stalled page of "
                         "the 20-session run)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a session may wait for its result")
    ap.add_argument("--no-write", action="store_true", help="print only; do not prepend to RESULTS.md")
    args = ap.parse_args(argv)
    if args.sessions is None:
        args.sessions = 20 if args.scenario == "class" else 6
    bad = set(args.roles.split(",")) - set(ROLES)
    if bad:
        ap.error(f"unknown role(s) {', '.join(sorted(bad))}; choose from {', '.join(ROLES)}")
    return run_scenario(args)


if __name__ == "__main__":
    sys.exit(main())
