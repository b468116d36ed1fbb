"""Try it → Live with Chromium's fake camera: predictions a second in the browser, the Streamlit server's CPU
meanwhile, and "Add this picture" making a new dataset version.

Starts `streamlit run app.py` on a workspace with a finished run (trains a linear probe on the emoji sample
first when it has none), opens Try it in headless Chromium with a fake camera, turns Live on, waits for the
web-page export (a worker), then counts the component's predictions for ``--seconds`` while sampling the
server process's CPU time (the server alone: its worker processes are other processes).

Usage: python benchmarks/live_tryit.py [--home DIR] [--seconds 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        "--disable-background-networking", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", default=None)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    home = Path(a.home or tempfile.mkdtemp(prefix="tl-live-"))
    env = {**os.environ, "TL_HOME": str(home), "TL_MAX_WORKERS": "1", "PYTHONPATH": str(ROOT)}
    if not (home / "runs").is_dir() or not any((home / "runs").iterdir()):
        subprocess.run([sys.executable, "-m", "tl_core.cli", "train", str(ROOT / "sample_data" / "emoji"),
                        "--strategy", "linear", "--json"], env=env, check=True, stdout=subprocess.DEVNULL)
    port = _free_port()
    log = open(home / "live-server.log", "ab")
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                               "--server.address", "127.0.0.1", "--server.headless", "true",
                               "--browser.gatherUsageStats", "false"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    out: dict = {}
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(180):
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read().strip() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            ctx = browser.new_context(viewport={"width": 1300, "height": 1000})
            ctx.grant_permissions(["camera"], origin=base)
            page = ctx.new_page()
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base)
            page.get_by_test_id("stSidebarNav").get_by_text("Try it", exact=True).click()
            page.get_by_role("heading", name="Try it", exact=True).first.wait_for()
            page.get_by_text("Live: classify the camera continuously").click()
            t0 = time.monotonic()
            start = page.get_by_role("button", name="Start live")
            try:  # absent when this run's web page was made before (the component then shows at once)
                start.wait_for(timeout=15_000)
                start.click()
            except PlaywrightTimeout:
                pass
            page.wait_for_selector("iframe[title*='tl_live_']", timeout=900_000)
            out["export_seconds"] = round(time.monotonic() - t0, 1)
            frame = page.frame_locator("iframe[title*='tl_live_']")
            frame.locator("#fps").filter(has_text="a second").wait_for(timeout=300_000)
            handle = next(f for f in page.frames if "tl_live_" in f.url)
            n0, c0, w0 = handle.evaluate("window.tlstudioLive.total"), _cpu_seconds(server.pid), time.monotonic()
            time.sleep(a.seconds)
            n1, c1, w1 = handle.evaluate("window.tlstudioLive.total"), _cpu_seconds(server.pid), time.monotonic()
            out.update(predictions=n1 - n0, seconds=round(w1 - w0, 2), fps=round((n1 - n0) / (w1 - w0), 2),
                       server_cpu_seconds=round(c1 - c0, 3), server_cpu_percent=round(100 * (c1 - c0) / (w1 - w0), 2),
                       load_average=os.getloadavg())
            out["bars"] = frame.locator(".bar").count()
            # "Wrong? Add this picture to …": the first class
            cls = handle.evaluate("window.TLSTUDIO_MODEL.meta.classes[0]")
            frame.locator("#cls").select_option(cls)
            frame.locator("#add").click()
            msg = page.get_by_text("new version").first
            msg.wait_for(timeout=60_000)
            out["added"] = msg.inner_text()
            page.screenshot(path=str(home / "live.png"), full_page=True)
            out["page_errors"] = errors
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
