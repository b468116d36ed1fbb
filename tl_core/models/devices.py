"""Where and how computation runs: seeds, CPU threads, and returning freed memory to the system.

(Issue 13 adds device selection here: CUDA, then MPS, then CPU.)
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["set_seed", "configure_threads", "single_threaded", "release_free_memory"]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run repeats exactly on the same machine."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def configure_threads() -> int:
    """Use every core for intra-op parallelism (torch's default can be lower in containers)."""
    n = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n



@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run small linear-algebra work (probe fits, LogME, similarity matrices) on one thread.

    On a busy machine two intra-op threads wait for each other on every small operation: a linear probe on
    200 x 1280 features took 12 s with two torch threads and 1 s with one (the same holds for OpenBLAS).
    Restores the previous settings on exit. Not for convolutions over images, which do gain from threads.

    Returns:
        A context manager.
    """
    saved = torch.get_num_threads()
    limiter: Any = contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(1)
    except Exception:  # threadpoolctl missing (it comes with scikit-learn): torch alone is limited
        pass
    torch.set_num_threads(1)
    try:
        with limiter:
            yield
    finally:
        torch.set_num_threads(saved)



def release_free_memory() -> None:
    """Hand memory that is free inside the C heap back to the OS (glibc ``malloc_trim``).

    A training step frees ~1.5 GB of activations, which glibc keeps in its heap; evaluation then
    allocates differently sized buffers on top and the process's resident size climbs. Trimming once
    per epoch costs a few milliseconds. A no-op where glibc is not the C library."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None

