"""The exports cache (tl_core.share.export.verified_onnx): a run's ONNX graph is made once, reused by later exports
and verified again on every reuse; a damaged entry is rebuilt; the cache counts, evicts and clears its entries.

These tests use torch's legacy exporter (~1 s for Lite0; the dynamo path, 11-15 s, is exercised by test_export.py,
test_webpage.py and test_tflite.py, which now share one graph per run) and an empty cache each
(``private_cache``), so that what a test counts is its own doing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

import tl_core.share.export as E
from tl_core.cache import EXPORTS, cache_summary, clear_cache, enforce_cache_limit
from tl_core.share.export import export_cache_dir, export_run

pytestmark = pytest.mark.private_cache


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """Every call of the module's exporter, by exporter name."""
    calls: list[str] = []
    real = E._export_onnx_file

    def counting(module, example, path, exporter):
        calls.append(exporter)
        real(module, example, path, exporter)

    monkeypatch.setattr(E, "_export_onnx_file", counting)
    return calls


def _entry(cache: Path) -> Path:
    (model,) = sorted((cache / EXPORTS).glob("*.onnx"))
    return model


@pytest.fixture(scope="module")
def first(emoji_run_dir, tmp_path_factory) -> tuple[dict, list[Path]]:
    """One fresh export of the emoji run into an empty cache: its result and the cache entry it left (two files),
    which a test copies into its own cache (one export for the module's tests instead of one each)."""
    cache, out = tmp_path_factory.mktemp("exports_cache"), tmp_path_factory.mktemp("first") / "a.onnx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TL_CACHE_DIR", str(cache))
        info = export_run(emoji_run_dir, "onnx", out, onnx_exporter="legacy", max_verify_images=4)
    assert info["cached"] is False and info["verification"]["passed"]
    entry = _entry(cache)
    assert entry.read_bytes() == out.read_bytes()  # what was kept is what the user got
    return info, [entry, entry.with_name(entry.name + ".json")]


def _seed(cache: Path, entry: list[Path]) -> Path:
    """The first export's cache entry copied into ``cache``; returns its ONNX file."""
    (cache / EXPORTS).mkdir(parents=True)
    for f in entry:
        shutil.copy2(f, cache / EXPORTS / f.name)
    return cache / EXPORTS / entry[0].name


def test_exports_of_one_run_at_once_take_turns_and_run_the_exporter_once(emoji_run_dir, tmp_path, counted):
    """Three exports of one run at the same moment (a class exporting the teacher's run): one runs the exporter, the
    others wait for it, then copy its graph and verify it on their own images."""
    import threading

    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def export(i: int) -> None:
        try:
            results[i] = export_run(emoji_run_dir, "onnx", tmp_path / f"{i}.onnx", onnx_exporter="legacy",
                                    max_verify_images=4)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=export, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 3, errors
    assert counted == ["legacy"]  # one export for the three
    assert sorted(r["cached"] for r in results.values()) == [False, True, True]
    assert all(r["verification"]["passed"] for r in results.values())
    assert len({Path(r["path"]).read_bytes() for r in results.values()}) == 1


def test_second_export_reuses_the_graph_and_verifies_it_again(emoji_run_dir, tmp_path, counted, _private_cache, first):
    first, entry = first
    cached = _seed(_private_cache, entry)
    record = json.loads(cached.with_name(cached.name + ".json").read_text())
    assert record["verification"]["passed"] and record["key"]["exporter"] == "legacy"

    second = export_run(emoji_run_dir, "onnx", tmp_path / "b.onnx", onnx_exporter="legacy", max_verify_images=6)
    assert counted == [] and second["cached"] is True  # no second export
    assert Path(second["path"]).read_bytes() == Path(first["path"]).read_bytes()
    v = second["verification"]  # verified in this call, on this call's images (6, not the first call's 4)
    assert v["passed"] and v["images"] == v["top1_agree"] == 6 and v["open_set"]["passed"]
    sidecar = json.loads(Path(second["sidecar"]).read_text())
    assert sidecar["verification"] == v and sidecar["model_file"] == "b.onnx"
    assert second["export_seconds"] < first["export_seconds"]  # a copy, not an export
    assert cache_summary(_private_cache)["exports"]["entries"] == 1


def _damage_weights(path: Path) -> None:
    """The file still loads, but one class's bias is shifted: only the verification can tell."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    bias = next(t for t in model.graph.initializer if "classifier" in t.name and t.name.endswith("bias"))
    arr = numpy_helper.to_array(bias).copy()
    arr[2] += 3.0
    bias.CopyFrom(numpy_helper.from_array(arr, bias.name))
    onnx.save(model, str(path))


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:4096] = b"\xff" * (4096 - 8)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_damage_weights, _garble], ids=["wrong-weights", "unreadable"])
def test_a_damaged_entry_is_caught_and_rebuilt(emoji_run_dir, tmp_path, counted, _private_cache, caplog, damage,
                                               first):
    good, entry = first
    damage(_seed(_private_cache, entry))
    assert _entry(_private_cache).read_bytes() != Path(good["path"]).read_bytes()
    with caplog.at_level(logging.WARNING, logger=E.__name__):
        info = export_run(emoji_run_dir, "onnx", tmp_path / "b.onnx", onnx_exporter="legacy", max_verify_images=4)
    assert counted == ["legacy"] and info["cached"] is False  # exported afresh, no error
    assert info["verification"]["passed"] and Path(info["path"]).read_bytes() == Path(good["path"]).read_bytes()
    assert "exporting afresh" in caplog.text
    assert _entry(_private_cache).read_bytes() == Path(good["path"]).read_bytes()  # the entry is good again


def test_what_the_graph_depends_on_makes_another_entry(emoji_run_dir, tmp_path):
    """The key changes with the exporter, the graph's outputs, the example batch and any model file's content."""
    import torch

    from tl_core.share.loading import load_model

    tm = load_model(emoji_run_dir)
    with_ood = E._WithOpenSet(tm.model, tm.temperature, False, tm.open_set)
    plain = E._ProbsAndLogits(tm.model, tm.temperature)
    two, one = torch.zeros(2, 3, 224, 224), torch.zeros(1, 3, 224, 224)
    key = E._onnx_cache_key
    base = E._CachedExport(tmp_path, key(tm, with_ood, two, "dynamo")).model
    assert E._CachedExport(tmp_path, key(tm, with_ood, two, "dynamo")).model == base  # deterministic
    others = [key(tm, with_ood, two, "legacy"), key(tm, plain, two, "dynamo"), key(tm, with_ood, one, "dynamo")]
    copy = tmp_path / "ws" / "runs" / "copy"
    shutil.copytree(emoji_run_dir, copy)
    config = copy / "config.json"
    config.write_text(config.read_text() + "\n")  # same settings, other bytes
    others.append(key(load_model(copy), with_ood, two, "dynamo"))
    names = {E._CachedExport(tmp_path, k).model for k in others}
    assert len(names) == len(others) and base not in names


def test_only_a_run_in_a_workspace_is_cached(emoji_run_dir, tmp_path):
    assert export_cache_dir(emoji_run_dir).name == EXPORTS
    loose = tmp_path / "somewhere" / "runs" / "r1"  # a copied run folder, no workspace around it
    shutil.copytree(emoji_run_dir, loose)
    assert export_cache_dir(loose) is None
    bundle = export_run(emoji_run_dir, "bundle", tmp_path / "emoji.zip")
    assert export_cache_dir(bundle["path"]) is None


def test_exports_are_counted_evicted_and_cleared_whole(emoji_run_dir, tmp_path, counted, _private_cache, first):
    from conftest import EMOJI

    for f in _seed(_private_cache, first[1]).parent.iterdir():
        os.utime(f, (1000, 1000))  # used long ago
    one_image = [sorted((EMOJI / "animal").glob("*.png"))[0]]
    export_run(emoji_run_dir, "onnx", tmp_path / "b.onnx", onnx_exporter="legacy", verify_images=one_image)
    assert counted == ["legacy"]  # a one-image example batch is another graph: a second entry
    files = sorted((_private_cache / EXPORTS).iterdir())
    assert len(files) == 4 and not any(f.name.startswith(".") for f in files)  # two models, two records
    summary = cache_summary(_private_cache)["exports"]
    assert summary == {"entries": 2, "bytes": sum(f.stat().st_size for f in files)}
    newest = sorted((_private_cache / EXPORTS).glob("*.onnx"), key=lambda f: f.stat().st_mtime)[-1]
    freed = enforce_cache_limit(_private_cache, max_bytes=summary["bytes"] - 1)  # the older entry goes, whole
    assert 0 < freed < summary["bytes"]
    assert sorted((_private_cache / EXPORTS).iterdir()) == [newest, newest.with_name(newest.name + ".json")]
    assert cache_summary(_private_cache)["exports"] == {"entries": 1, "bytes": summary["bytes"] - freed}
    assert clear_cache(_private_cache) >= summary["bytes"] - freed and not (_private_cache / EXPORTS).exists()


def test_tflite_starts_from_the_shared_graph_pruned_to_probs_and_logits(first, tmp_path):
    """TFLite converts the run's cached open-set graph with its open-set branch cut off: same probs and logits."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from tl_core.share.tflite import _probs_and_logits_only

    info, _ = first
    full = Path(info["path"])
    pruned = _probs_and_logits_only(shutil.copy(full, tmp_path / "model.onnx"))
    assert [o.name for o in onnx.load(str(pruned)).graph.output] == ["probs", "logits"]
    assert len(onnx.load(str(pruned)).graph.node) < len(onnx.load(str(full)).graph.node)
    assert _probs_and_logits_only(pruned) == pruned  # nothing left to cut
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    want = ort.InferenceSession(str(full)).run(["probs", "logits"], {"input": x})
    got = ort.InferenceSession(str(pruned)).run(["probs", "logits"], {"input": x})
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
