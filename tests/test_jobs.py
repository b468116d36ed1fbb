"""The job queue: worker processes, projects that do not see each other's runs, a shared worker limit."""

from __future__ import annotations

import time

import pytest

from conftest import EMOJI
from tl_core import jobs
from tl_core.config import TrainConfig
from tl_core.errors import RunError
from tl_core.runs.workspace import Workspace, new_project_slug


def wait_done(ws, run_id, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        run = ws.store().get(run_id)
        if run["status"] not in ("queued", "running"):
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} still {run['status']} after {timeout}s")


def test_projects_are_isolated_and_served_by_the_shared_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_MAX_WORKERS", "1")
    top = Workspace(tmp_path / "home")
    slug_a, slug_b = new_project_slug("Class 7B: birds"), new_project_slug("demo")
    assert slug_a.startswith("class-7b-birds-") and len(slug_a) == len("class-7b-birds-") + 8
    a, b = top.project(slug_a, create=True), top.project(slug_b, create=True)
    ra = jobs.submit(a, EMOJI, TrainConfig(max_per_class=5))
    rb = jobs.submit(b, EMOJI, TrainConfig(max_per_class=5, seed=1))
    assert wait_done(a, ra)["status"] == "done" and wait_done(b, rb)["status"] == "done"
    assert [r["id"] for r in a.store().list()] == [ra]
    assert [r["id"] for r in b.store().list()] == [rb]
    assert top.store().list() == []
    assert a.run_dir(ra).is_relative_to(tmp_path / "home" / "projects" / slug_a)
    assert a.cache_dir == b.cache_dir == top.cache_dir  # content-keyed caches are shared
    assert (tmp_path / "home" / "workers").is_dir() and not (a.home / "workers").exists()
    # reachable again by its link, not by a guess
    assert top.project(slug_a).home == a.home
    with pytest.raises(RunError, match="No project"):
        top.project("demo-00000000")
    with pytest.raises(RunError, match="not a valid project id"):
        top.project("../../etc")
