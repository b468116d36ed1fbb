"""Evaluate and predict of a ``linear`` run through the feature cache (issue 16): the same numbers as the whole
network on every image, for the last layer and several depths; images seen before run through no network; a
wiped cache only costs time."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_class_folder
from tl_core.models.folding import FOLD_CHECK_SIZE

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CLASSES = ("animal", "face", "flag", "food", "vehicle")  # the emoji sample's classes, in order


@pytest.fixture(autouse=True)
def _pytorch_engine(monkeypatch):
    """Forwards are counted at the model's stem, so the tests run the PyTorch engine (an ONNX Runtime session
    verified earlier in the process would otherwise be reused; the engines agree within 1e-4: test_engines)."""
    monkeypatch.setenv("TL_ENGINE", "torch")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two linear runs on 12 emoji per class, ``last`` and ``depths``, in one workspace with a cache of its own
    (the session's may hold every emoji already), and an evaluation folder of 16 per class: 12 seen in training,
    4 new."""
    from tl_core.config import TrainConfig
    from tl_core.runs.training import run_training
    from tl_core.storage.workspace import Workspace

    root = tmp_path_factory.mktemp("linear_cache")
    data = make_class_folder(root / "train", {c: 12 for c in CLASSES})
    held = make_class_folder(root / "eval", {c: 16 for c in CLASSES})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TL_CACHE_DIR", str(root / "cache"))
        ws = Workspace(root / "home")
        out = {}
        for variant in ("last", "depths"):
            res = run_training(ws, data, TrainConfig(strategy="linear", features=variant))
            assert res.status == "done", res.error
            assert res.features == variant
            out[variant] = res.run_dir
        yield ws, out, held


class _Forwards:
    """Counts the images that go through a model's first convolution (its stem: every forward pass), not the
    64x64 check input a batch-norm-folded copy is compared on (tl_core.models.folding; the copy keeps the hook)."""

    def __init__(self, model: torch.nn.Module):
        stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        self.images = 0
        # a function, not a bound method: a deep copy (the folded copy) shares it, and counts here too
        self._h = stem.register_forward_pre_hook(lambda module, inp: self._seen(inp))

    def _seen(self, inp: tuple) -> None:
        if inp[0].shape[-1] != FOLD_CHECK_SIZE:
            self.images += inp[0].shape[0]

    def close(self) -> None:
        self._h.remove()


def _whole_network(tm, monkeypatch):
    """The same loaded model with the feature cache path turned off (every image through the network)."""
    monkeypatch.setattr(type(tm), "cached_features", lambda self, ws: None)


@pytest.mark.parametrize("variant", ["last", "depths"])
def test_evaluate_through_the_cache_equals_the_whole_network(runs, variant, monkeypatch):
    from tl_core.data.library import open_data
    from tl_core.metrics import softmax
    from tl_core.share.loading import load_model
    from tl_core.share.predict import evaluate_dataset, logits_of_dataset_items

    ws, run_dirs, held = runs
    tm = load_model(run_dirs[variant])
    assert tm.cached_features(ws).variant == variant
    items = list(open_data(held, ws, min_per_class=1).items)  # 80 images: 60 seen in training, 20 new
    count = _Forwards(tm.model)
    cached = evaluate_dataset(tm, held, ws)
    assert count.images == 20, "seen images ran through the network again, or new ones did not"
    logits_c, feats_c, *_ = logits_of_dataset_items(tm, items, ws, with_features=True)  # (+ style rows)
    assert count.images == 20, "a second evaluation ran images through the network"

    with monkeypatch.context() as mp:
        _whole_network(tm, mp)
        full = evaluate_dataset(tm, held, ws)
        logits_f, feats_f, *_ = logits_of_dataset_items(tm, items, ws, with_features=True)
    assert count.images == 20 + 2 * 80  # the whole network ran on every image, twice
    count.close()

    assert cached["accuracy"] == full["accuracy"] and cached["confusion"] == full["confusion"]
    assert cached["per_class"] == full["per_class"] and cached["count"] == full["count"] == 80
    assert cached["unknown_share"] == full["unknown_share"]
    assert np.abs(softmax(logits_c, tm.temperature) - softmax(logits_f, tm.temperature)).max() < 1e-5
    assert np.abs(logits_c - logits_f).max() < 1e-4
    assert np.abs(feats_c - feats_f).max() < 1e-4  # the open-set score's input too
    assert cached["accuracy"] > 0.7  # a real model (60 of the 80 images are its training images)


def test_predict_through_the_cache_equals_the_whole_network(runs, tmp_path):
    from tl_core.share.loading import load_model
    from tl_core.share.predict import predict_paths

    ws, run_dirs, held = runs
    folder = tmp_path / "mixed"
    shutil.copytree(held, folder)  # 12 seen per class, 4 new
    (folder / "face" / "broken.png").write_bytes(b"not an image")
    tm = load_model(run_dirs["depths"])
    count = _Forwards(tm.model)
    rows_c, skipped_c = predict_paths(tm, [folder], top_k=3, workspace=ws)
    assert count.images <= 20  # at most the 20 new images ran (the evaluate test may have cached them)
    n = count.images
    again, _ = predict_paths(tm, [folder], top_k=3, workspace=ws)
    assert count.images == n  # all cached now
    rows_f, skipped_f = predict_paths(tm, [folder], top_k=3)  # no workspace: the whole network
    assert count.images == n + 80
    count.close()
    assert [s["path"] for s in skipped_c] == [s["path"] for s in skipped_f] == [str(folder / "face" / "broken.png")]
    assert len(rows_c) == len(rows_f) == 80
    for a, b, c in zip(rows_c, rows_f, again):
        assert a["path"] == b["path"] == c["path"] and a["label"] == b["label"] == c["label"]
        assert abs(a["confidence"] - b["confidence"]) < 1e-5 and a["confidence"] == c["confidence"]
        assert [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]]
        assert a["unknown"] == b["unknown"] and abs(a["ood_score"] - b["ood_score"]) < 1e-4
    # the files go to the extraction a chunk at a time (one chunk above); in chunks of 30 (the broken file in the
    # third), the same rows, and the progress counts every file once, in order
    import tl_core.share.predict as predict_mod

    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(predict_mod, "PREDICT_CHUNK", 30)
        chunked, skipped_k = predict_paths(tm, [folder], top_k=3, workspace=ws, progress=lambda d, t: seen.append((d, t)))
    assert [(r["path"], r["label"]) for r in chunked] == [(r["path"], r["label"]) for r in again]
    assert max(abs(a["confidence"] - c["confidence"]) for a, c in zip(chunked, again)) < 1e-6  # the head's batch
    assert skipped_k == skipped_c and seen[-1] == (81, 81) and seen == sorted(seen)


def test_a_run_whose_cache_was_wiped_still_evaluates(runs, tmp_path, monkeypatch):
    from tl_core.storage.workspace import Workspace
    from tl_core.share.loading import load_model
    from tl_core.share.predict import evaluate_dataset

    ws, run_dirs, held = runs
    tm = load_model(run_dirs["depths"])
    before = evaluate_dataset(tm, held, ws)
    empty = tmp_path / "wiped"
    monkeypatch.setenv("TL_CACHE_DIR", str(empty))  # this workspace's caches, emptied
    wiped = Workspace(ws.home)
    assert not (wiped.cache_dir / "features").exists()
    count = _Forwards(tm.model)
    after = evaluate_dataset(tm, held, wiped)
    assert count.images == 80  # every image extracted again (and cached)
    count.close()
    assert after["accuracy"] == before["accuracy"] and after["confusion"] == before["confusion"]
    assert any((wiped.cache_dir / "features").rglob("*.npy"))
    shutil.rmtree(empty)


def test_runs_that_changed_their_backbone_run_the_whole_network(runs, monkeypatch):
    from tl_core.share.loading import load_model

    ws, run_dirs, _ = runs
    tm = load_model(run_dirs["last"])
    assert tm.cached_features(ws) is not None
    monkeypatch.setattr(type(tm), "config", property(lambda self: {**self.files.config_dict(), "strategy": "full"}))
    assert tm.cached_features(ws) is None


def test_a_warm_re_train_reuses_autos_choice_and_repeats_the_run(runs, monkeypatch):
    """``auto``'s cross-validation runs once per (labelled images' features, labels, probe settings): a re-train
    of the same data, with the same seed or another, reads the recorded choice back (the same seed makes the
    same model); another C chooses again."""
    import dataclasses

    import tl_core.runs.training as training
    from tl_core.config import TrainConfig
    from tl_core.storage.files import RunFiles

    ws, run_dirs, _ = runs
    data = Path(run_dirs["last"]).parent.parent.parent / "train"
    first = training.run_training(ws, data, TrainConfig(strategy="linear"))
    assert first.status == "done" and first.cv  # auto: cross-validated
    calls = []
    real = training.choose_features
    monkeypatch.setattr(training, "choose_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = training.run_training(ws, data, TrainConfig(strategy="linear"))
    assert second.status == "done" and calls == []  # no cross-validation this time
    a, b = RunFiles(Path(first.run_dir)), RunFiles(Path(second.run_dir))
    fa, fb = a.meta().features, b.meta().features
    assert fb.pop("reused") and {**fa, "reused": True} == {**fb, "reused": True}  # variant, C, scales, CV scores
    pa, pb = a.predictions().splits["val"], b.predictions().splits["val"]
    assert np.array_equal(pa.logits, pb.logits)
    # another seed (another split) of the same data: the choice is that of the dataset, read back, and so is the
    # cross-validated estimate (on every labelled image, whatever the split)
    for seed in (7, 8):  # (two: a float sum in the split's order once made one seed's record key differ)
        other = training.run_training(ws, data, dataclasses.replace(TrainConfig(strategy="linear"), seed=seed))
        assert other.status == "done" and calls == []
        c = RunFiles(Path(other.run_dir))
        assert c.meta().features["reused"] and c.meta().features["variant"] == a.meta().features["variant"]
        assert c.meta().features["cv"] == a.meta().features["cv"]
        assert c.metrics().cv.get("reused") and c.metrics().cv["accuracy"] == a.metrics().cv["accuracy"]
        assert list(c.predictions().splits["val"].paths) != list(pa.paths)  # it did split otherwise
    third = training.run_training(ws, data, dataclasses.replace(TrainConfig(strategy="linear"), linear_c=0.5))
    assert third.status == "done" and calls == [1]  # another C: chosen again


#: A process's batches: a 1x1 convolution over 32 images of 16 x 56 x 56 (three 38.5 MB tensors a step, each above the
#: 32 MB that glibc's own threshold ever rises to, as a batch's activations are: 150 MB for Lite0 at batch 32), and
#: the page faults (fresh pages from the kernel) of ``n`` steps.
_BATCHES = (
    "import os, resource, torch\n"
    "x = torch.randn(32, 16, 56, 56)\n"
    "def step():\n"
    "    return (torch.nn.functional.conv2d(x, torch.randn(96, 16, 1, 1)).relu() * 2).sum()\n"
    "def faults(n):\n"
    "    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "    for _ in range(n):\n"
    "        step()\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0\n")


def _batches_in_a_process(code: str) -> list[str]:
    """Run :data:`_BATCHES` then ``code`` in a fresh interpreter (the allocator settings are the process's); its
    printed words."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _BATCHES + code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent).stdout.split()


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator settings")
@pytest.mark.parametrize("reuse", [False, True])
def test_reusing_heap_memory_stops_the_page_faults_of_each_batch(reuse):
    """``reuse_heap_memory`` (what tl-core train/evaluate/predict call first): a batch's activations (three
    38.5 MB tensors here) come from the heap again instead of fresh zeroed pages from the kernel, batch after batch."""
    out = _batches_in_a_process(
        "from tl_core.models.devices import reuse_heap_memory\n"
        f"ok = reuse_heap_memory() if {reuse} else True\n"
        "step()\n"
        "print(ok, faults(10))\n")
    assert out[0] == "True"
    # 10 batches of three 38.5 MB tensors: ~380,000 pages (4 KB, measured) when each allocation is mapped afresh.
    # Reused, none, or the heap grows once or twice more after the first batch (seen here: 0 to ~9,400 pages; with
    # tensors 4x larger, 0 to ~110,000)
    faults = int(out[1])
    assert faults < 40_000 if reuse else faults > 140_000


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator settings")
def test_a_workers_forward_pass_task_reuses_the_heap_and_gives_it_back_after():
    """``heap_reused`` (what a worker process runs a task of forward passes in, e.g. the data check, an export):
    inside it the batches' activations come from the heap again, and the trim a fine-tune makes after each epoch
    leaves the heap alone; after it, large blocks are mapped afresh as glibc does by default, and the heap the task
    grew is handed back (an idle worker does not keep a task's peak)."""
    # (which tasks a worker runs in it: test_tasks.py)
    out = _batches_in_a_process(
        "from tl_core.models.devices import heap_reused, release_free_memory\n"
        "def rss_mb():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20\n"
        "with heap_reused() as ok:\n"
        "    step()\n"
        "    inside = faults(10)\n"
        "    peak = rss_mb()\n"
        "    release_free_memory()\n"  # a fine-tune's trim after each epoch: the heap is kept
        "    kept = rss_mb()\n"
        "after = faults(10)\n"
        "print(ok, inside, after, round(peak), round(kept), round(rss_mb()))\n")
    ok, inside, after, peak, kept, rss = out[0], *map(int, out[1:])
    assert ok == "True"
    # 10 batches of three 38.5 MB tensors: ~380,000 pages when each is mapped afresh (the other test's bars)
    assert inside < 40_000 and after > 140_000, (inside, after)
    assert kept > peak - 15, (peak, kept)  # inside, trimming is left out: the next batch would fault it in again
    assert rss < peak - 60, (peak, rss)  # the ~110 MB of activations the heap kept went back to the OS
