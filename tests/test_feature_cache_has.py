"""``FeatureCache.has`` answers "is it cached?" without reading, counting or touching, and ``all_cached`` uses it."""

from __future__ import annotations

import os

import numpy as np

from tl_core.cache import FeatureCache
from tl_core.data.intake import ImageItem
from tl_core.models.features import all_cached


def test_has_sees_the_file_without_reading_counting_or_touching_it(tmp_path):
    c = FeatureCache(tmp_path, "k")
    sha = "ab" * 32
    assert not c.has(sha) and not c.has("") and not c.has(None)
    c.put(sha, np.ones(4, np.float32))
    f = next((tmp_path / "k").rglob("*.npy"))
    os.utime(f, (1_000_000, 1_000_000))
    assert c.has(sha)
    assert (c.hits, c.misses) == (0, 0) and f.stat().st_mtime == 1_000_000  # not counted, not touched
    # a file that get() would reject still "exists": has() promises a look, get() the check
    f.write_bytes(b"not an array")
    assert c.has(sha) and c.get(sha) is None and not c.has(sha)


def test_all_cached_needs_every_item_in_every_cache(tmp_path):
    a, b = FeatureCache(tmp_path, "a"), FeatureCache(tmp_path, "b")
    items = [ImageItem(tmp_path / f"{i}.png", "x", sha256=f"{i:064x}") for i in range(3)]
    for it in items:
        a.put(it.sha256, np.zeros(2, np.float32))
    assert all_cached(items, [a]) and not all_cached(items, [a, b])
    b.put(items[0].sha256, np.zeros(2, np.float32))
    assert not all_cached(items, [a, b])
    assert not all_cached(items + [ImageItem(tmp_path / "n.png", "x")], [a])  # an item with no hash is never cached
    assert all_cached([], [a, b])
