"""Shared fixtures: a private workspace per test, the sample datasets, and one cached trained run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_data"
EMOJI = SAMPLES / "emoji"
FASHION = SAMPLES / "fashion_mnist"


@pytest.fixture
def tl_home(tmp_path, monkeypatch) -> Path:
    """A fresh, private TL_HOME for one test."""
    home = tmp_path / "tl_home"
    monkeypatch.setenv("TL_HOME", str(home))
    return home


@pytest.fixture
def workspace(tl_home):
    from tl_core.runs.workspace import Workspace

    return Workspace(tl_home)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """A cache directory shared by the whole session so that features are extracted once."""
    return tmp_path_factory.mktemp("shared_cache")


@pytest.fixture(scope="session")
def emoji_run(tmp_path_factory):
    """One linear-probe run on the emoji sample (Lite0, packaged weights), trained once per session."""
    from tl_core.config import TrainConfig
    from tl_core.runs.workspace import Workspace
    from tl_core.runs.training import run_training

    ws = Workspace(tmp_path_factory.mktemp("emoji_run_home"))
    res = run_training(ws, EMOJI, TrainConfig())
    assert res.status == "done", res.error
    return ws, res


def make_class_folder(root: Path, spec: dict[str, int], source: Path = EMOJI) -> Path:
    """Copy ``n`` real sample images per class into ``root/<class>/`` (classes reuse emoji classes in order)."""
    src_classes = sorted(p for p in source.iterdir() if p.is_dir())
    for (name, n), src in zip(spec.items(), src_classes):
        dst = root / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir())[:n]:
            shutil.copy(f, dst / f.name)
    return root
