"""`tl-core serve` under load: 200 held-out images posted by 8 concurrent clients (issue 25).

    .venv/bin/python benchmarks/serve.py [--run RUN_OR_BUNDLE] [--clients 8] [--per-request 1] [--no-write]

Data: sample_data/fashion_mnist: a linear probe is trained on its ``train/`` folder (300 images) in a temporary
``TL_HOME`` (or ``--run`` names a trained run or bundle), and its ``test/`` folder (200 images the run never saw)
is what the clients post. ``tl-core predict RUN test/ --json`` gives the reference answers.

The server is ``tl-core serve RUN --port 0`` as its own process (this checkout first on ``PYTHONPATH``). After
8 warm-up requests, two passes over the 200 images, each image posted once per pass:

1. **8 clients**: 8 threads, each with its own HTTP connection, post ``--per-request`` images per request; every
   request's latency is recorded (client side: upload, queue, batch, answer).
2. **1 client**: the same requests one after the other (the baseline: no concurrency, so no batching).

Prints p50/p95 latency, throughput, the server's batches (from ``/health``), agreement with ``predict`` (labels and
``unknown`` flags) and the accuracy on the held-out labels; prepends a dated section to benchmarks/RESULTS.md with
the machine and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import cpu_name, markdown_table, prepend  # noqa: E402
from tl_core.share.serve import post_images  # noqa: E402  (the tests post the same way)

DATA = ROOT / "sample_data" / "fashion_mnist"


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TL_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _cli(args: list[str], env: dict[str, str]) -> object:
    p = subprocess.run([sys.executable, "-m", "tl_core.cli", *args], env=env, capture_output=True, text=True,
                       cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"tl-core {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)


def _start_server(run: str, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "tl_core.cli", "serve", run, "--port", "0"], env=env,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        m = re.search(r"http://localhost:(\d+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, int(m.group(1))
    proc.kill()
    sys.exit("tl-core serve did not start:\n" + "".join(lines)[-3000:])


def _pass(port: int, requests: list[list[Path]], clients: int) -> tuple[float, list[float], dict[str, dict]]:
    """(wall seconds, latencies, rows by path) of posting every request, ``clients`` at a time."""
    import httpx

    local = threading.local()
    latencies: list[float] = []
    rows: dict[str, dict] = {}

    def post(group: list[Path]) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        files = [(p.name, p.read_bytes()) for p in group]  # read before the clock starts
        t0 = time.perf_counter()
        r = post_images(local.client, files)
        latencies.append(time.perf_counter() - t0)
        r.raise_for_status()
        for p, row in zip(group, r.json()["predictions"]):
            rows[str(p)] = row

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(post, requests))
    return time.perf_counter() - t0, latencies, rows


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _health(port: int) -> dict:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/health").json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, help="a trained run (directory or id in $TL_HOME) or bundle; default: "
                                                 "train a linear probe on sample_data/fashion_mnist/train")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-request", type=int, default=1, help="images in each request")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tl-bench-serve-") as tmp:
        env = _env(Path(os.environ.get("TL_HOME", tmp)) if args.run else Path(tmp))
        run = args.run
        if run is None:
            t0 = time.perf_counter()
            trained = _cli(["train", str(DATA / "train"), "--strategy", "linear", "--json", "--quiet"], env)
            run = str(Path(tmp) / "runs" / trained["run_id"])
            print(f"trained {trained['run_id']} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        images = sorted(p for p in (DATA / "test").rglob("*.png"))
        truth = {str(p): p.parent.name for p in images}
        expected = {r["path"]: r for r in _cli(["predict", run, *map(str, images), "--json"], env)}
        k = max(1, args.per_request)
        requests = [images[i:i + k] for i in range(0, len(images), k)]
        proc, port = _start_server(run, env)
        try:
            _pass(port, requests[:8], args.clients)  # warm-up: first connections, first batches
            before = _health(port)["served"]
            wall, lat, rows = _pass(port, requests, args.clients)
            after = _health(port)["served"]
            wall1, lat1, rows1 = _pass(port, requests, 1)
            health = _health(port)["served"]
        finally:
            proc.send_signal(2)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    load_end = os.getloadavg()[0]
    n = len(images)
    same = sum(rows[p]["label"] == expected[p]["label"] for p in expected)
    same_unknown = sum(rows[p]["unknown"] == expected[p]["unknown"] for p in expected)
    same1 = sum(rows1[p]["label"] == expected[p]["label"] for p in expected)
    same_unknown1 = sum(rows1[p]["unknown"] == expected[p]["unknown"] for p in expected)
    acc = sum(rows[p]["label"] == truth[p] for p in rows) / n
    batches = after["batches"] - before["batches"]
    mean_batch = (after["images"] - before["images"]) / max(1, batches)
    batches1 = health["batches"] - after["batches"]
    mean_batch1 = (health["images"] - after["images"]) / max(1, batches1)
    table = markdown_table(
        ["clients", "requests", "images/request", "p50 latency", "p95 latency", "throughput", "same label as predict",
         "same unknown", "batches (mean size)"],
        [[args.clients, len(requests), k, f"{statistics.median(lat) * 1000:.0f} ms", f"{_pct(lat, 0.95) * 1000:.0f} ms",
          f"{n / wall:.1f} images/s", f"{same}/{n}", f"{same_unknown}/{n}", f"{batches} ({mean_batch:.1f})"],
         [1, len(requests), k, f"{statistics.median(lat1) * 1000:.0f} ms", f"{_pct(lat1, 0.95) * 1000:.0f} ms",
          f"{n / wall1:.1f} images/s", f"{same1}/{n}", f"{same_unknown1}/{n}", f"{batches1} ({mean_batch1:.1f})"]])
    print(table)
    print(f"accuracy on the held-out labels: {acc:.3f}; {args.clients} clients / 1 client throughput: "
          f"{wall1 / wall:.2f}x; largest batch {health['largest_batch']}; load average "
          f"{load_start:.1f} -> {load_end:.1f}")
    if args.no_write:
        return
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = (f"## {when} — `tl-core serve` under load (`benchmarks/serve.py`, issue 25)\n\n"
            f"{cpu_name()}, {os.cpu_count()} cores; load average {load_start:.1f} at the start, {load_end:.1f} at "
            f"the end (a shared machine: compare the rows of this run, not across runs). A linear probe "
            f"(efficientnet_lite0) on sample_data/fashion_mnist/train; the {n} images of its test/ folder "
            f"(never seen in training; accuracy {acc:.3f}) posted {k} per request over HTTP on this machine, "
            f"after 8 warm-up requests; latency is the client's (upload, queue, batch, answer). The server "
            f"batches requests that wait together (at most 32 images a batch). {args.clients} clients / 1 client "
            f"throughput: {wall1 / wall:.2f}x.")
    print(f"wrote {prepend(head, table)}")


if __name__ == "__main__":
    main()
