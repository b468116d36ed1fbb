"""`tl-core serve` (tl_core/share/serve.py, tl_core/share/batching.py): the HTTP API's answers are `predict`'s,
hostile uploads get a 4xx and the server carries on, the API key, /model, the bounded queue and the micro-batching.

The app is driven in-process with FastAPI's TestClient (fast tier); one `processes` test starts the real command
and posts from 8 concurrent clients.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import hostile as H
from conftest import EMOJI, FASHION, ROOT

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


def _images(n_emoji: int = 6, n_fashion: int = 6) -> list[Path]:
    """Emoji images (the model's own kind) and Fashion-MNIST test images (held out and unlike its training
    images: its `unknown` flags are exercised too)."""
    emoji = [sorted(d.iterdir())[-1] for d in sorted(EMOJI.iterdir()) if d.is_dir()][:n_emoji]
    fashion = sorted(p for p in (FASHION / "test").rglob("*.png"))[::97][:n_fashion]
    return emoji + fashion


@pytest.fixture(scope="module")
def served(emoji_run):
    """The session's emoji run, loaded once, and a TestClient of its app (API key ``k3y``)."""
    from fastapi.testclient import TestClient

    from tl_core.share.loading import load_model
    from tl_core.share.serve import ServeLimits, create_app

    ws, res = emoji_run
    tm = load_model(res.run_dir)
    app = create_app(tm, api_key="k3y", limits=ServeLimits(max_files=4, max_file_bytes=400_000,
                                                          max_body_bytes=1_000_000, max_pixels=4_000_000))
    with TestClient(app, headers={"X-API-Key": "k3y"}) as client:
        yield tm, ws, client


def _post(client, files: list[tuple[str, bytes]], **kw):
    from tl_core.share.serve import post_images

    return post_images(client, files, **kw)


def test_rows_are_predicts_rows(served):
    from tl_core.share.predict import predict_paths

    tm, ws, client = served
    paths = _images()
    expected, skipped = predict_paths(tm, paths, workspace=ws)  # what `tl-core predict --json` prints
    assert not skipped and len(expected) == len(paths)
    rows = []
    for start in range(0, len(paths), 4):  # several requests of several files (the server's limit is 4)
        r = _post(client, [(p.name, p.read_bytes()) for p in paths[start:start + 4]])
        assert r.status_code == 200, r.text
        rows += r.json()["predictions"]
    assert [r["file"] for r in rows] == [p.name for p in paths]
    assert {e["unknown"] for e in expected} == {True, False}  # both kinds of image are in the comparison
    for row, want in zip(rows, expected):
        assert set(row) - {"file"} == set(want) - {"path"}
        assert row["label"] == want["label"] and row["unknown"] == want["unknown"]
        assert row["ood_reason"] == want["ood_reason"]
        assert [k["label"] for k in row["top_k"]] == [k["label"] for k in want["top_k"]]
        assert row["confidence"] == pytest.approx(want["confidence"], abs=1e-4)
        assert row["ood_score"] == pytest.approx(want["ood_score"], abs=1e-3)
        # the same nearest training images, named relative to the training set: never a path on the server
        assert want["nearest"], "the fixture model keeps its bank's paths"
        assert [n["label"] for n in row["nearest"]] == [n["label"] for n in want["nearest"]]
        for got, full in zip(row["nearest"], want["nearest"]):
            assert not got["path"].startswith("/") and full["path"].endswith("/" + got["path"]), (got, full)


def _one_sentence(r) -> str:
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail.endswith(".") and detail.count(". ") == 0, detail
    return detail


@pytest.mark.parametrize("case, status, words", [
    ("not an image", 422, "not a readable image"),
    ("truncated", 422, "truncated"),
    ("zero bytes", 422, "empty"),
    ("decompression bomb", 413, "megapixels"),
    ("file too large", 413, "per file"),
    ("too many files", 413, "at most 4 files"),
    ("body too large", 413, "request body"),
])
def test_bad_uploads_get_a_4xx_and_the_server_carries_on(served, case, status, words):
    tm, ws, client = served
    good = sorted((EMOJI / "animal").glob("*.png"))[0].read_bytes()
    bad = {"not an image": [("notes.png", b"just some text, not pixels")],
           "truncated": [("cut.png", H.truncate(H.png_bytes((64, 64)), 0.5))],
           "zero bytes": [("empty.jpg", b"")],
           "decompression bomb": [("bomb.png", H.png_with_header_size(30_000, 30_000))],
           "file too large": [("huge.png", H.png_bytes((400, 400)))],  # ~480 kB of noise > 400 kB
           "too many files": [(f"ok{i}.png", good) for i in range(5)],
           "body too large": [(f"big{i}.png", H.png_bytes((300, 300), seed=i)) for i in range(4)]}[case]
    r = _post(client, [("fine.png", good)] + bad if case != "too many files" else bad)
    assert r.status_code == status, r.text
    detail = _one_sentence(r)
    assert words in detail
    if case not in ("too many files", "body too large"):
        assert bad[0][0] in detail  # the file is named
    ok = _post(client, [("fine.png", good)])
    assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] == "animal"


def test_a_streamed_body_is_cut_at_the_limit(served):
    """A chunked body (no Content-Length) is refused once it passes the limit, not after it is all read (driven
    at the ASGI level: the TestClient reads a streamed body whole before the app sees it)."""
    import asyncio

    tm, ws, client = served
    taken, sent = [], []

    head = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'

    async def receive():
        taken.append(1)
        return {"type": "http.request", "body": (head if len(taken) == 1 else b"") + b"x" * 100_000,
                "more_body": len(taken) < 40}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "root_path": "", "query_string": b"",
             "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-type", b"multipart/form-data; boundary=b"), (b"x-api-key", b"k3y"),
                         (b"transfer-encoding", b"chunked")]}
    asyncio.run(client.app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert "request body" in json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["detail"]
    assert len(taken) == 10  # 1 MB limit: refused at the 10th chunk of 100 kB (plus the part header), not the 40th


def test_missing_files_field_is_one_sentence(served):
    tm, ws, client = served
    r = client.post("/predict", data={"image": "x"})
    assert r.status_code == 422 and "'files'" in _one_sentence(r)


def test_api_key(served):
    tm, ws, client = served
    good = [("a.png", H.png_bytes())]
    assert client.get("/health", headers={"X-API-Key": ""}).status_code == 200  # open to all
    none = _post(client, good, headers={"X-API-Key": ""})
    assert none.status_code == 401 and "X-API-Key" in _one_sentence(none)
    wrong = _post(client, good, headers={"X-API-Key": "k3z"})
    assert wrong.status_code == 401 and "wrong" in _one_sentence(wrong)
    assert client.get("/model", headers={"X-API-Key": "k3"}).status_code == 401
    assert _post(client, good, headers={"X-API-Key": "", "Authorization": "Bearer k3y"}).status_code == 200
    assert _post(client, good).status_code == 200


def test_model_description(served):
    tm, ws, client = served
    r = client.get("/model")
    assert r.status_code == 200
    m = r.json()
    assert m["classes"] == tm.classes == sorted(d.name for d in EMOJI.iterdir() if d.is_dir())
    assert m["input"]["size"] == tm.pre.input_size and m["input"]["resize"] == tm.pre.resize
    assert m["open_set"]["threshold"] == pytest.approx(tm.open_set.threshold)
    assert "unknown" in m["open_set"]["meaning"]
    row = _post(client, [("a.png", H.png_bytes())]).json()["predictions"][0]
    assert set(row) <= set(m["scores"])  # every field of a row is explained
    assert m["limits"]["max_files"] == 4
    doc = client.get("/openapi.json").json()
    assert {"/predict", "/model", "/health"} <= set(doc["paths"])
    assert set(doc["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}  # /docs: "Authorize"
    assert "security" not in doc["paths"]["/health"]["get"]


def test_a_full_queue_answers_503_at_once(emoji_run):
    from fastapi.testclient import TestClient

    from tl_core.share.loading import load_model
    from tl_core.share.serve import ServeLimits, create_app

    release = threading.Event()

    def slow(images):
        release.wait(10)
        return [{"label": "x"} for _ in images]

    tm = load_model(emoji_run[1].run_dir)
    app = create_app(tm, limits=ServeLimits(max_queue=1, max_batch=1, window_ms=0), predict=slow)
    batcher = app.state.batcher
    with TestClient(app) as client:
        try:
            running = batcher.submit(["a"])  # taken by the loop, which then waits in `slow`
            deadline = time.monotonic() + 5
            while batcher.waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            waiting = batcher.submit(["b"])  # fills the queue
            t0 = time.monotonic()
            r = _post(client, [("a.png", H.png_bytes())])
            assert r.status_code == 503 and "busy" in _one_sentence(r) and r.headers["Retry-After"]
            assert time.monotonic() - t0 < 5
        finally:
            release.set()
        assert running.result(5) and waiting.result(5)
        assert _post(client, [("a.png", H.png_bytes())]).status_code == 200


def test_micro_batching_gathers_waiting_jobs_and_routes_results():
    from tl_core.errors import ServerBusy
    from tl_core.share.batching import MicroBatcher

    gate, batches = threading.Event(), []

    def predict(images):
        gate.wait(5)
        if "boom" in images:
            raise RuntimeError("boom")
        batches.append(list(images))
        return [x * 10 for x in images]

    b = MicroBatcher(predict, max_batch=8, window_s=0.05, max_queue=20)
    first = b.submit([1])
    time.sleep(0.1)  # the loop holds job 1 and waits in predict
    jobs = [b.submit([i, i + 100]) for i in range(2, 7)]  # 5 jobs of 2 images: 8 fit in one batch
    failing = b.submit(["boom"])
    gate.set()
    assert first.result(5) == [10]
    assert [j.result(5) for j in jobs] == [[i * 10, (i + 100) * 10] for i in range(2, 7)]
    with pytest.raises(RuntimeError):
        failing.result(5)
    assert b.submit([7]).result(5) == [70]  # the loop carried on after the failure
    # 4 jobs in one pass, the 5th carried to the next, which failed with "boom" and ran again job by job
    assert [len(x) for x in batches] == [1, 8, 2, 1]
    b.stop()
    small = MicroBatcher(lambda ims: (time.sleep(1), ims)[1], max_queue=1)
    small.submit([1])
    time.sleep(0.1)
    small.submit([2])
    with pytest.raises(ServerBusy):
        small.submit([3])
    small.stop()


def test_serve_refuses_a_bad_port_in_one_line(capsys, emoji_run_dir):
    from conftest import cli_fail

    assert "--port" in cli_fail(capsys, "serve", str(emoji_run_dir), "--port", "70000")


@pytest.mark.processes
def test_real_server_answers_8_concurrent_clients_like_predict(emoji_run, tmp_path):
    """`tl-core serve` as a process on a free port: 8 threads post 24 images (one or two per request); every
    label and unknown flag is predict's; Ctrl-C (SIGINT) stops it cleanly."""
    import httpx

    from tl_core.share.loading import load_model
    from tl_core.share.predict import predict_paths

    ws, res = emoji_run
    env = {**os.environ, "TL_HOME": str(ws.home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tl_core.cli", "serve", str(res.run_dir), "--port", "0",
                             "--api-key", "k3y"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        port, lines = None, []
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
            lines.append(line)
            m = re.search(r"http://localhost:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, "".join(lines)
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        paths = _images(5, 19)
        tm = load_model(res.run_dir)
        expected = {r["path"]: r for r in predict_paths(tm, paths, workspace=ws)[0]}
        groups = [paths[i:i + 2] if i % 3 == 0 else paths[i:i + 1] for i in range(len(paths))
                  if i % 3 != 1]  # requests of two files and of one file, covering every image once
        assert sorted(p for g in groups for p in g) == sorted(paths)

        def post(group):
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": "k3y"}, timeout=60) as c:
                r = _post(c, group)
                r.raise_for_status()
                return [(str(p), row) for p, row in zip(group, r.json()["predictions"])]

        with ThreadPoolExecutor(8) as pool:
            got = [x for rows in pool.map(post, groups) for x in rows]
        assert len(got) == len(paths)
        for path, row in got:
            assert (row["label"], row["unknown"]) == (expected[path]["label"], expected[path]["unknown"]), path
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/health").json()["status"] == "ok"
            assert _post(c, [("x.png", b"nope")], headers={"X-API-Key": "k3y"}).status_code == 422
            assert c.get("/health").status_code == 200  # still up
    finally:
        proc.send_signal(2)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0
