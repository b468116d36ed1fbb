"""Micro-batching: one inference loop that serves many concurrent callers with one model.

Callers (the HTTP server's request handlers) :meth:`MicroBatcher.submit` a list of images and get a
:class:`concurrent.futures.Future` of their rows. One thread takes the queued jobs, gathers those that arrive
within a few milliseconds of each other into one batch (up to ``max_batch`` images), runs the model once on the
batch and hands each caller its own rows. When a batch fails, its jobs run again one at a time, so one bad job
fails alone. The queue is bounded: when ``max_queue`` jobs wait, :meth:`submit`
raises :class:`~tl_core.errors.ServerBusy` at once instead of letting latency grow without limit.

The model runs on this one thread only, so its memory is one batch's and torch's intra-op threads are not
fought over by several forward passes at once.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import ServerBusy

__all__ = ["MicroBatcher", "BatchStats"]


@dataclass
class _Job:
    images: Sequence[Any]
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """What the loop has done since it started: jobs, images and forward passes (``batches``)."""

    jobs: int = 0
    images: int = 0
    batches: int = 0
    largest_batch: int = 0


class MicroBatcher:
    """A bounded queue of jobs in front of one inference thread that batches them.

    Args:
        predict: called on the loop's thread with a list of images; returns one result per image, in order.
        max_batch: the most images one call of ``predict`` gets (a job larger than this runs alone, whole).
        window_s: how long the loop waits for more jobs once it holds one and the batch is not full.
        max_queue: the most jobs waiting; one more makes :meth:`submit` raise :class:`ServerBusy`.
    """

    def __init__(self, predict: Callable[[list[Any]], list[Any]], max_batch: int = 32, window_s: float = 0.005,
                 max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("max_batch and max_queue must be at least 1 and window_s not negative")
        self._predict = predict
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queue = max_queue
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._carry: _Job | None = None  # a job that did not fit in the last batch: first in the next
        self._stopping = False  # the stop sentinel was taken while gathering a batch
        self.stats = BatchStats()

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet taken by the loop (approximate, as ``queue.Queue.qsize``)."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start the loop's thread (a daemon); does nothing when it runs already.

        This thread lives only in the ``tl-core serve`` process, a process of its own whose one job is this model
        (never in the Streamlit server, whose long work goes to worker processes): the HTTP handlers stay
        responsive while one loop owns the model and batches what waits.
        """
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="tl-serve-inference", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the jobs queued so far, then end the loop's thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(None)  # blocks only while the queue is full: the loop is draining it
        thread.join(timeout)
        self._stopping = False

    def submit(self, images: Sequence[Any]) -> Future:
        """Queue one job; its future gets the list of results (or the exception ``predict`` raised).

        Raises:
            ServerBusy: ``max_queue`` jobs are waiting already.
        """
        self.start()
        job = _Job(list(images))
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ServerBusy(f"The server is busy ({self.max_queue} requests are waiting); try again in a few "
                             "seconds.") from None
        return job.future

    def _next_batch(self) -> list[_Job] | None:
        """Block for a first job, then gather more for up to ``window_s`` while the batch has room; None: stop."""
        first, self._carry = self._carry, None
        if first is None:
            if self._stopping:
                return None
            first = self._queue.get()
            if first is None:
                return None
        jobs, size = [first], len(first.images)
        deadline = time.monotonic() + self.window_s
        while size < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if job is None:  # stop after this batch (and a carried job)
                self._stopping = True
                break
            if size + len(job.images) > self.max_batch:
                self._carry = job
                break
            jobs.append(job)
            size += len(job.images)
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            images = [im for j in jobs for im in j.images]
            if not images:
                for j in jobs:
                    j.future.set_result([])
                continue
            try:
                results = self._predict(images)
            except Exception as e:
                self._one_by_one(jobs, e)
                continue
            start = 0
            for j in jobs:
                j.future.set_result(results[start:start + len(j.images)])
                start += len(j.images)
            s = self.stats
            s.jobs, s.images, s.batches = s.jobs + len(jobs), s.images + len(images), s.batches + 1
            s.largest_batch = max(s.largest_batch, len(images))

    def _one_by_one(self, jobs: list[_Job], error: Exception) -> None:
        """A batch failed: run each of its jobs alone, so that only the job that fails gets the error."""
        if len(jobs) == 1:
            jobs[0].future.set_exception(error)
            return
        for j in jobs:
            try:
                j.future.set_result(self._predict(list(j.images)))
            except Exception as e:  # this caller hears of it; the loop carries on
                j.future.set_exception(e)
