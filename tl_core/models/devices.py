"""Where and how computation runs: the device (``auto`` picks CUDA, then Apple MPS, then the CPU), mixed
precision on a GPU, CPU threads, seeds, and returning freed memory to the system.

A :class:`Runtime` travels with a training or an inference pass: it moves tensors, wraps the forward pass in
``torch.autocast`` (bf16 where the GPU supports it, else fp16 with a gradient scaler; full precision on the
CPU and MPS) and knows the distributed group it belongs to (``tl_core.models.distributed``).

torch is imported inside the functions: the app's server asks :func:`describe_auto_device` what a worker
would use without loading torch.
"""

from __future__ import annotations

import contextlib
import platform
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..config import check_device_name  # the names TrainConfig accepts (re-exported)
from ..errors import ConfigError
from ..settings import setting, usable_cores

__all__ = ["DEVICE_CHOICES", "Runtime", "resolve_device", "describe_auto_device", "check_device_name", "set_seed",
           "configure_threads", "single_threaded", "release_free_memory", "cpu_count", "thread_count",
           "reuse_heap_memory"]

#: What ``TrainConfig.device`` / ``--device`` accept (besides ``cuda:N``).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto", local_rank: int | None = None) -> Any:
    """The ``torch.device`` for ``name``: ``auto`` is CUDA when a GPU is visible, else Apple MPS, else the CPU.

    Args:
        name: auto | cpu | cuda | cuda:N | mps.
        local_rank: in a distributed group on GPUs, each process takes ``cuda:<local_rank>``.
    Raises:
        ConfigError: the device was asked for by name and is not available here.
    """
    import torch

    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"Device {name!r} asked for, but no CUDA GPU is visible to PyTorch here; use auto or cpu.")
        index = int(name.split(":")[1]) if ":" in name else (local_rank or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"Device cuda:{index} asked for, but this machine has {torch.cuda.device_count()} GPU(s).")
        return torch.device("cuda", index)
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError("Device 'mps' asked for, but Apple's Metal (MPS) backend is not available here; use auto or cpu.")
    return torch.device(name)


def describe_auto_device() -> str:
    """What ``auto`` will pick on this machine, found without importing torch (for the app's server)."""
    gpus = sorted(Path("/dev").glob("nvidia[0-9]*")) if Path("/dev").is_dir() else []
    if gpus or shutil.which("nvidia-smi"):
        return f"CUDA GPU ({len(gpus) or 'at least 1'} visible), mixed precision"
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "Apple GPU (MPS)"
    n = cpu_count()
    return f"CPU ({n} core{'' if n == 1 else 's'})"


def cpu_count() -> int:
    """Cores this process may use (the affinity mask in a container, not the host's count)."""
    return usable_cores()


def thread_count() -> int:
    """Threads this process gives PyTorch and ONNX Runtime: ``TL_THREADS``, by default the cores it may use."""
    return setting("TL_THREADS")


@dataclass
class Runtime:
    """The device and numeric precision of one process's work, and its place in a distributed group."""

    device: Any  # torch.device
    precision: str = "fp32"  # fp32 | bf16 | fp16
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    scaler: Any = field(default=None, repr=False)  # torch.amp.GradScaler for fp16

    @classmethod
    def create(cls, device: str = "auto", rank: int = 0, world_size: int = 1, local_rank: int = 0) -> "Runtime":
        """The runtime for ``device``: on CUDA, bf16 autocast where supported, else fp16 with a gradient scaler."""
        import torch

        dev = resolve_device(device, local_rank if world_size > 1 else None)
        precision = "fp32"
        scaler = None
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            if torch.cuda.is_bf16_supported():
                precision = "bf16"
            else:
                precision = "fp16"
                scaler = torch.amp.GradScaler("cuda")
            torch.backends.cudnn.benchmark = True
        return cls(dev, precision, rank, world_size, local_rank, scaler)

    @classmethod
    def cpu(cls) -> "Runtime":
        import torch

        return cls(torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes the run store, the run's files and stdout."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def on_gpu(self) -> bool:
        return self.device.type in ("cuda", "mps")

    def autocast(self) -> Any:
        """Mixed precision for a forward pass (a no-op in fp32)."""
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def loader_options(self) -> dict[str, Any]:
        """DataLoader settings: on a GPU, pinned memory and worker processes feed it; on the CPU the main
        process decodes from the cache (workers were measured slower there: benchmarks/RESULTS.md, row 3d)."""
        if self.device.type == "cuda":
            return {"pin_memory": True, "num_workers": min(4, max(1, cpu_count() // max(1, self.world_size) - 1)),
                    "persistent_workers": True}
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"device": str(self.device), "precision": self.precision, "world_size": self.world_size}


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run repeats exactly on the same machine."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def configure_threads(processes_per_machine: int = 1) -> int:
    """Use every core for intra-op parallelism, shared out between the processes of a group on this machine
    (torch's default can be lower in containers, and torchrun's default of one thread wastes cores)."""
    import torch

    n = max(1, thread_count() // max(1, processes_per_machine))
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
    import torch

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
    per epoch costs a few milliseconds. A no-op where glibc is not the C library, and in a process that keeps its
    heap (:func:`reuse_heap_memory`, :func:`heap_reused`): there the next batch faulted every trimmed page in again
    (a 2-epoch fine-tune of 80 emoji: system time 3.2 s -> 1.2 s and 11.4 s -> 10.0 s without the trims, peak
    resident size 2.5 GB -> 2.8 GB; benchmarks/RESULTS.md, 2026-12-07 evening)."""
    global _malloc_trim
    if _heap_kept:
        return
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None
#: Whether this process keeps freed memory in its heap now (:func:`reuse_heap_memory`).
_heap_kept = False

#: glibc's mallopt parameters, and the ceiling its dynamic mmap threshold reaches (DEFAULT_MMAP_THRESHOLD_MAX on
#: 64-bit; its trim threshold is then twice that): a torch process frees blocks above it within its first batches.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DYNAMIC_MMAP_CEILING = 32 << 20


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt``; False where it is not the C library or refuses the value."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(param, ctypes.c_int(value)))
    except (OSError, AttributeError):
        return False


def reuse_heap_memory() -> bool:
    """Serve large allocations from glibc's heap and keep what is freed there, for a process that runs the same
    forward pass batch after batch (``tl-core train`` of a linear run, ``evaluate``, ``predict``).

    By default glibc gives every allocation above ~32 MB its own ``mmap`` and returns it on ``free``: each batch's
    activations (150 MB for Lite0 at batch 32) are then mapped, zeroed page by page by the kernel and unmapped
    again. On 2 busy cores that was 5 s of system time per 320 images and 1.5-1.8x the wall time of feature
    extraction (measured: sys 5.4 s -> 0.2 s, 13 -> 24 images/s). The process keeps its peak heap until it exits
    (:func:`release_free_memory` leaves it alone), so this is for short processes, not for the app's long-lived
    workers. Returns whether it was applied (glibc only).
    """
    global _heap_kept
    # M_TRIM_THRESHOLD and M_MMAP_THRESHOLD: 1 GiB, where glibc accepts them
    _heap_kept = _mallopt(_M_TRIM_THRESHOLD, 1 << 30) and _mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    return _heap_kept


@contextlib.contextmanager
def heap_reused() -> Iterator[bool]:
    """:func:`reuse_heap_memory` for one task of a long-lived process (a worker): the task's forward passes keep their
    freed activations (a domain-gap check of the 200 emoji: 10.5 s -> 7.3 s, system time 5.2 s -> 0.9 s, the same
    peak memory); afterwards the thresholds are glibc's once its dynamic threshold has risen (32 MB, trimming above
    64 MB) and the free heap goes back to the OS (:func:`release_free_memory`), so an idle worker holds no task's peak.

    Returns:
        A context manager giving whether the thresholds were applied (glibc only).
    """
    global _heap_kept
    applied = reuse_heap_memory()
    try:
        yield applied
    finally:
        if applied:
            _mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_MMAP_CEILING)
            _mallopt(_M_TRIM_THRESHOLD, 2 * _DYNAMIC_MMAP_CEILING)
            _heap_kept = False
            release_free_memory()
