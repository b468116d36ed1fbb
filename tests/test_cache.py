"""The cache module knows every cache under the cache folder (issue 26): decoded images, features, the results
recorded beside the features (auto's choices), the ONNX engines and the image checks. It counts them, evicts
them (least recently used first, across kinds) and clears them. Fast tier: small files in a private folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from tl_core.cache import (CACHE_KINDS, ImageCheckCache, cache_summary, cache_usage, clear_cache, enforce_cache_limit,
                           recorded)


def _file(path: Path, n: int, used: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * n)
    os.utime(path, (used, used))
    return path


def _every_kind(cache: Path) -> dict[str, list[Path]]:
    """One entry of each kind (two files for the engine and the export, three for the checks), last used at
    1000..5000."""
    checks = ImageCheckCache(cache / "checked.sqlite")
    checks.put("ab" * 32, 10, 10, None)
    checks._db.close()
    for f in cache.glob("checked.sqlite*"):
        os.utime(f, (5000, 5000))
    return {
        "decoded": [_file(cache / "decoded" / "256-bicubic" / "ab" / "a.npy", 100, 1000)],
        "features": [_file(cache / "features" / "k" / "ab" / "a.npy", 200, 2000)],
        "choices": [_file(cache / "features" / "k" / "choices" / "c.json", 30, 3000)],
        # the ONNX file is old, but its verification record was written later: the engine was used at 4500
        "engines": [_file(cache / "engines" / "e1.onnx", 400, 1500), _file(cache / "engines" / "e1.verified", 5, 4500)],
        # a run's ONNX export and its record, reused (the ONNX file touched) at 3500
        "exports": [_file(cache / "exports" / "x1.onnx", 300, 3500),
                    _file(cache / "exports" / "x1.onnx.json", 7, 3200)],
        "checks": sorted(cache.glob("checked.sqlite*")),
    }


def test_summary_counts_every_kind_and_skips_files_being_written(tmp_path):
    cache = tmp_path / "cache"
    files = _every_kind(cache)
    _file(cache / "engines" / ".e2.onnx.1.2.tmp.onnx", 999, 9000)  # an export being written: not an entry yet
    _file(cache / "features" / "k" / "ab" / ".b.npy.1.2.tmp", 999, 9000)
    _file(cache / "exports" / ".x2.onnx.1.2.tmp.onnx", 999, 9000)
    summary = cache_summary(cache)
    assert list(summary) == list(CACHE_KINDS)
    for kind, fs in files.items():
        assert summary[kind] == {"entries": 1, "bytes": sum(f.stat().st_size for f in fs)}, kind
    assert summary["checks"]["bytes"] > 0
    assert cache_usage(cache) == {k: v["bytes"] for k, v in summary.items()}


def test_eviction_is_least_recently_used_across_kinds_engines_whole_checks_never(tmp_path):
    cache = tmp_path / "cache"
    files = _every_kind(cache)
    usage = cache_usage(cache)
    # keep room for the engine, the export and the checks only: decoded (1000), features (2000) and choices (3000)
    # go, in that order; the engine's ONNX file (1500) stays with its newer record
    keep = usage["engines"] + usage["exports"] + usage["checks"]
    assert enforce_cache_limit(cache, max_bytes=keep) == usage["decoded"] + usage["features"] + usage["choices"]
    assert all(f.exists() for f in files["engines"] + files["exports"] + files["checks"])
    assert not any(f.exists() for k in ("decoded", "features", "choices") for f in files[k])
    # the export (used at 3500) goes before the engine (4500), whole: its record (3200) with it
    assert enforce_cache_limit(cache, max_bytes=usage["engines"] + usage["checks"]) == usage["exports"]
    assert not any(f.exists() for f in files["exports"]) and all(f.exists() for f in files["engines"])
    # the engine goes whole; the checks stay even when the cap cannot be met without them (only clear_cache
    # removes them: workers and the server keep the database open)
    assert enforce_cache_limit(cache, max_bytes=0) == usage["engines"]
    assert not any(f.exists() for f in files["engines"]) and all(f.exists() for f in files["checks"])
    assert {k: v for k, v in cache_usage(cache).items() if v} == {"checks": usage["checks"]}


def test_eviction_never_removes_the_check_database_under_an_open_connection(tmp_path):
    """Another process (a worker opening a dataset) holds the check database open while a training's end evicts
    down to the cap: the database stays the same file, its open connection keeps reading and writing, and a
    fresh connection finds everything recorded, intact."""
    import sqlite3

    cache = tmp_path / "cache"
    _file(cache / "decoded" / "256-bicubic" / "ab" / "a.npy", 100, 1000)
    open_checks = ImageCheckCache(cache / "checked.sqlite")
    open_checks.put("ab" * 32, 10, 10, None)
    inode = (cache / "checked.sqlite").stat().st_ino
    assert enforce_cache_limit(cache, max_bytes=0) == 100  # the decoded image only
    assert (cache / "checked.sqlite").stat().st_ino == inode
    open_checks.put("cd" * 32, 20, 20, "unreadable")  # the open connection writes on, into the same file
    fresh = ImageCheckCache(cache / "checked.sqlite")
    assert fresh.get("ab" * 32) == (10, 10, None) and fresh.get("cd" * 32) == (20, 20, "unreadable")
    with sqlite3.connect(cache / "checked.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_eviction_order_follows_use_not_kind(tmp_path):
    cache = tmp_path / "cache"
    old_engine = [_file(cache / "engines" / "e1.onnx", 400, 1000), _file(cache / "engines" / "e1.images", 3, 1000)]
    new_feature = _file(cache / "features" / "k" / "ab" / "a.npy", 200, 2000)
    assert enforce_cache_limit(cache, max_bytes=300) == 403
    assert new_feature.exists() and not any(f.exists() for f in old_engine)


def test_clear_empties_every_kind(tmp_path):
    cache = tmp_path / "cache"
    _every_kind(cache)
    (cache / "runs_are_not_cache.txt").write_text("kept")
    total = sum(cache_usage(cache).values())
    assert clear_cache(cache) == total
    assert not any(cache_usage(cache).values())
    assert sorted(p.name for p in cache.iterdir()) == ["runs_are_not_cache.txt"]


def test_a_recorded_result_read_back_counts_as_used(tmp_path):
    """auto's recorded choice is touched when a re-train reads it, so eviction keeps what is in use."""
    from tl_core.runs.training import _recorded

    calls = []
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    out, reused = _recorded(tmp_path, ["t"], [x], lambda: calls.append(1) or {"v": 1})
    assert (out, reused, calls) == ({"v": 1}, False, [1])
    (f,) = tmp_path.glob("*.json")
    os.utime(f, (1000, 1000))
    out, reused = _recorded(tmp_path, ["t"], [x], lambda: calls.append(1) or {"v": 2})
    assert (out, reused, calls) == ({"v": 1}, True, [1])
    assert f.stat().st_mtime > 1000


def test_a_recorded_backbone_is_one_features_entry_counted_and_evicted_whole(tmp_path):
    """A warm linear run's backbone record (an 18 MB tensor file and its record.json): counted with the features,
    its last use the newest of its files, evicted together (a record.json alone would leave the tensors for good)."""
    cache = tmp_path / "cache"
    rec = cache / "features" / "backbones" / "0123abcd"
    trunk = _file(rec / "trunk.safetensors", 5000, 1000)
    meta = _file(rec / "record.json", 50, 4000)  # read back (touched) at 4000
    old = _file(cache / "features" / "k" / "ab" / "a.npy", 200, 2000)
    summary = cache_summary(cache)
    assert summary["features"] == {"entries": 2, "bytes": 5250} and summary["choices"]["entries"] == 0
    assert enforce_cache_limit(cache, max_bytes=5050) == 200  # the older vector goes, the record stays whole
    assert trunk.exists() and meta.exists() and not old.exists()
    assert enforce_cache_limit(cache, max_bytes=0) == 5050
    assert not trunk.exists() and not meta.exists()


def test_a_refitted_head_is_a_recorded_choice_not_features(tmp_path):
    # a warm re-train's recorded head (tl_core.runs.training._refit_once): a result recorded beside the features,
    # counted and evicted with auto's other recorded choices
    cache = tmp_path / "cache"
    head = cache / "features" / "outoffold" / "refits" / "0123abcd.npy"
    head.parent.mkdir(parents=True)
    np.save(head, np.zeros((3, 5), np.float32))
    size = head.stat().st_size
    summary = cache_summary(cache)
    assert summary["choices"] == {"entries": 1, "bytes": size}
    assert summary["features"]["entries"] == 0
    assert enforce_cache_limit(cache, max_bytes=0) == size
    assert not head.exists()


def test_a_feature_vector_reads_back_exactly_and_a_damaged_one_is_refused(tmp_path):
    # FeatureCache.get reads what np.save wrote without parsing its header; anything else goes through np.load,
    # and every vector is checked the same way (width, dtype, finite)
    from tl_core.cache import FeatureCache

    fc = FeatureCache(tmp_path, "k")
    vec = np.random.default_rng(0).normal(size=40).astype(np.float32)
    fc.put("a" * 64, vec)
    got = fc.get("a" * 64, 40)
    assert np.array_equal(got, vec) and got.flags.writeable
    assert fc.get("a" * 64, 41) is None and not fc._file("a" * 64).exists()  # another width: unusable, removed
    fc.put("b" * 64, vec)
    f = fc._file("b" * 64)
    f.write_bytes(f.read_bytes()[:-4])  # truncated: the header says 40 values, 39 are there
    assert fc.get("b" * 64, 40) is None and not f.exists()
    bad = vec.copy()
    bad[3] = np.nan
    fc.put("c" * 64, bad)
    assert fc.get("c" * 64, 40) is None
    np.save(fc._file("d" * 64).parent.mkdir(parents=True, exist_ok=True) or fc._file("d" * 64), vec.astype(">f4"))
    assert fc.get("d" * 64, 40) is None  # big-endian: not float32 as written by put
    assert fc.get("e" * 64, 40) is None  # nothing recorded


def test_a_recorded_result_is_json_or_an_array_read_back_and_checked(tmp_path, caplog):
    calls = []
    head = tmp_path / "features" / "somewhere" / "0123abcd.npy"
    wb = np.arange(6, dtype=np.float32).reshape(2, 3)
    out, reused = recorded(head, lambda: calls.append(1) or wb)
    again, reused2 = recorded(head, lambda: calls.append(1) or wb + 1)
    assert (reused, reused2, calls) == (False, True, [1]) and np.array_equal(again, wb)

    def wants_3x3(a):
        if a.shape != (3, 3):
            raise ValueError(f"shape {a.shape}")

    with caplog.at_level(logging.WARNING):
        fixed, reused3 = recorded(head, lambda: np.zeros((3, 3), np.float32), wants_3x3)
    assert not reused3 and fixed.shape == (3, 3) and "unusable" in caplog.text
    assert recorded(head, lambda: None, wants_3x3)[1]  # what was measured again is recorded
    choice = tmp_path / "features" / "k" / "choices" / "c.json"
    assert recorded(choice, lambda: {"v": 1}) == ({"v": 1}, False)
    assert recorded(choice, lambda: {"v": 2}) == ({"v": 1}, True)
    # counted and evicted as recorded choices wherever they lie; a cached vector (sharded by its hash) is features
    vec = tmp_path / "features" / "k" / "ab" / ("ab" + "0" * 62 + ".npy")
    vec.parent.mkdir(parents=True)
    np.save(vec, np.zeros(4, np.float32))
    summary = cache_summary(tmp_path)
    assert summary["choices"]["entries"] == 2 and summary["features"]["entries"] == 1
    enforce_cache_limit(tmp_path, max_bytes=0)
    assert not head.exists() and not choice.exists() and not vec.exists()
