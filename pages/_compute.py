"""Long computations of the pages: run once with visible progress, then served from a cache.

The engine (advisor, audit, embedding map, Grad-CAM, calibration) reports progress through callbacks.
``st.cache_data`` cannot show that progress (elements drawn inside a cached function are replayed on
every cache hit, and writing into a container made outside it breaks the replay), so the work runs
outside the cache, under ``st.status`` with a progress bar, and only its finished result is stored
in ``st.cache_data``, keyed by what determines it (dataset signature, backbone, settings, run files).
Results are read-only and deterministic for their key, so sharing them between users is safe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import streamlit as st

#: progress(done, total, text) as the pages pass it to compute functions
Progress = Callable[[float, float, str], None]


class _NotCached(Exception):
    """Raised inside :func:`_memo` to look up a key without computing anything."""


@st.cache_data(show_spinner=False, max_entries=64)
def _memo(kind: str, key: tuple, _compute: Callable[[], Any]) -> Any:
    # the key alone decides; `_compute` (not hashed) either raises _NotCached (a look-up) or returns the value
    return _compute()


def _not_cached() -> Any:
    raise _NotCached


def cached(kind: str, key: tuple) -> Any | None:
    """The stored result for ``(kind, key)``, or None when it has not been computed (or was evicted)."""
    try:
        return _memo(kind, key, _not_cached)
    except _NotCached:  # exceptions are never cached: the key stays free
        return None


def store(kind: str, key: tuple, value: Any) -> Any:
    """Store ``value`` as the result for ``(kind, key)`` and return it."""
    return _memo(kind, key, lambda: value)


def compute(kind: str, key: tuple, label: str, work: Callable[[Progress], Any]) -> Any:
    """The cached result for ``(kind, key)``, or ``work(progress)`` run under a status box with a progress bar.

    Args:
        kind: what is computed (a namespace of the cache).
        key: everything the result depends on.
        label: what the status box says while it runs.
        work: the computation; it may call ``progress(done, total, text)``.
    Returns:
        The result (also stored for the next time).
    """
    hit = cached(kind, key)
    if hit is not None:
        return hit
    with st.status(label, expanded=True) as box:
        bar = st.progress(0.0, text="Starting…")

        def progress(done: float, total: float, text: str = "") -> None:
            bar.progress(min(1.0, max(0.0, float(done) / float(total or 1))), text=text or label)

        value = work(progress)
        box.update(label=f"{label} Done.", state="complete", expanded=False)
    return store(kind, key, value)


def file_stamp(*paths: str | os.PathLike) -> tuple:
    """(path, size, mtime) of each file that exists: a cache key part that changes when a run's files do."""
    out = []
    for p in paths:
        try:
            s = Path(p).stat()
            out.append((str(p), s.st_size, s.st_mtime_ns))
        except OSError:
            out.append((str(p), None, None))
    return tuple(out)
