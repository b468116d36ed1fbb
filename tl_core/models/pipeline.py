"""Feeding a network in eval mode: the next batch is decoded and resized on threads while the current one
runs through the model.

Decoding and resizing take ~15 ms per image on one core, and a sequential loop leaves the forward pass
waiting for them (the whole classic recipe ran at 38 images/s here against 94 images/s for Lite0's forward
pass alone). Pillow and NumPy release the GIL while they decode, resize and copy, so threads overlap them
with the forward pass in the same worker process; no extra process, no pickling of images. This runs only
in worker processes (tasks), never in the app's server.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..cache import DecodedImageCache
from ..data.intake import ImageItem
from ..settings import setting
from .preprocess import Preprocess

__all__ = ["decode_workers", "eval_batches", "batched"]


def decode_workers() -> int:
    """Decoding threads: ``TL_DECODE_THREADS``, else one per core (at most 4; 1 turns prefetching off)."""
    return setting("TL_DECODE_THREADS")


def eval_batches(items: Sequence[ImageItem], batches: Iterable[Sequence[int]], pre: Preprocess,
                 decoded: DecodedImageCache, workers: int | None = None,
                 keep: bool = True, pixels: bool = False) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The eval-preprocessed input of each batch of item indices, as ``(indices, NCHW float tensor)``, or with
    ``pixels`` as ``(indices, NHWC uint8 tensor)`` of the centre crops (:meth:`Preprocess.normalize_pixels` makes
    the former of the latter: the feature engines normalise the batch themselves, which takes the decoding threads
    a tenth of the time).

    While the caller runs batch k, batch k + 1 is already being decoded on ``workers`` threads. The tensors
    are exactly those of the sequential loop (same functions, same order).

    Args:
        items: the dataset items.
        batches: lists of indices into ``items``, in the order they are wanted.
        pre: the model's preprocessing.
        decoded: the decoded-image cache (thread-safe).
        workers: decoding threads (default :func:`decode_workers`).
        keep: keep newly decoded images in ``decoded`` (see :meth:`DecodedImageCache.get`).
        pixels: uint8 crops instead of normalised tensors.
    """
    workers = workers or decode_workers()
    side = pre.input_size

    def one(i: int) -> torch.Tensor:
        return pre.eval_from_resized(decoded.get(items[i], pre.resize, pre.interpolation, keep=keep))

    def into(batch: np.ndarray, k: int, i: int) -> None:
        # the decoding thread fills its slot of the batch: no stacking copy on the caller's thread, which is the
        # forward pass's
        batch[k] = decoded.get(items[i], pre.resize, pre.interpolation, keep=keep, crop=side)

    def begin(idx: list[int], call: Callable[..., Any]) -> Callable[[], torch.Tensor]:
        """Start the batch ``idx`` (``call`` runs a function now, or submits it to the pool); returns what
        gives its tensor once its images are done."""
        if pixels:
            batch = np.empty((len(idx), side, side, 3), np.uint8)
            jobs = [call(into, batch, k, i) for k, i in enumerate(idx)]
            return lambda: (_settle(jobs), torch.from_numpy(batch))[1]
        jobs = [call(one, i) for i in idx]
        return lambda: torch.stack(_settle(jobs))

    if workers <= 1:
        for idx in batches:
            yield list(idx), begin(list(idx), lambda f, *a: f(*a))()
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tl-decode")
    try:
        it = iter(batches)

        def submit() -> tuple[list[int], Callable[[], torch.Tensor]] | None:
            idx = next(it, None)
            return None if idx is None else (list(idx), begin(list(idx), pool.submit))

        pending = submit()
        while pending is not None:
            idx, tensor = pending
            x = tensor()
            pending = submit()  # decode the next batch while the caller runs this one
            yield idx, x
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _settle(jobs: list[Any]) -> list[Any]:
    """The results of ``jobs`` (futures, or values already computed), in order; the first error is raised."""
    return [j.result() if isinstance(j, Future) else j for j in jobs]


def batched(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """``indices`` cut into consecutive batches of at most ``batch_size``."""
    return [list(indices[s:s + batch_size]) for s in range(0, len(indices), batch_size)]

