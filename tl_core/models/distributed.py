"""Distributed training with PyTorch's own tools: a process group started by ``torchrun`` (gloo on the CPU,
nccl on GPUs), ``DistributedDataParallel``, and the few collective decisions a run needs.

The engine stays one code path: every function here is a no-op (or the identity) in a single process, so
training code calls them unconditionally. Under torchrun:

- each rank trains on its shard of every global batch (same global batch size and seed as one process);
- validation is evaluated on shards and summed across ranks;
- early stopping, the kept checkpoint and cancel are decided on rank 0 and broadcast, so no rank waits
  forever in a collective another rank left;
- only rank 0 writes the run store, the run's files and stdout.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Sequence

from .devices import Runtime, configure_threads

__all__ = ["env_ranks", "under_torchrun", "start", "stop", "barrier", "broadcast", "all_reduce_sum", "gather",
           "shard", "Cancel", "wrap", "unwrap", "RankFailedError"]


class RankFailedError(RuntimeError):
    """Another process of the group stopped (it crashed, was killed, or torchrun stopped the group)."""


def env_ranks() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, processes on this machine) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
    return rank, world, local, local_world


def under_torchrun() -> bool:
    """Whether this process is one of a group that torchrun started (WORLD_SIZE > 1)."""
    return env_ranks()[1] > 1


def start(device: str = "auto", timeout_s: float = 600.0) -> Runtime:
    """The :class:`Runtime` of this process; under torchrun, join the process group first (nccl on CUDA,
    gloo otherwise) and share the machine's cores between its processes."""
    import torch.distributed as dist

    rank, world, local, local_world = env_ranks()
    configure_threads(local_world)
    rt = Runtime.create(device, rank, world, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if rt.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return rt


def stop() -> None:
    """Leave the process group (at the end of a run, so that torchrun sees a clean exit)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _tensor(rt: Runtime, values: Sequence[float]) -> Any:
    import torch

    dev = rt.device if rt.device.type == "cuda" else "cpu"  # gloo reduces CPU tensors, nccl GPU tensors
    return torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)


def barrier(rt: Runtime) -> None:
    """Wait until every rank gets here (a no-op in one process)."""
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast(rt: Runtime, values: Sequence[float]) -> list[float]:
    """Rank 0's ``values`` on every rank (decisions made once: keep this checkpoint, stop, cancel)."""
    if not rt.distributed:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = _tensor(rt, values)
    dist.broadcast(t, src=0)
    return t.cpu().tolist()


def all_reduce_sum(rt: Runtime, values: Sequence[float]) -> list[float]:
    """The sum over ranks of each value (losses, correct counts and image counts of validation shards)."""
    if not rt.distributed:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = _tensor(rt, values)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def gather(rt: Runtime, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (the shards of a feature extraction)."""
    if not rt.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def shard(n: int, rt: Runtime) -> list[int]:
    """The indices of ``n`` items this rank handles (every world_size-th, starting at its rank)."""
    return list(range(rt.rank, n, rt.world_size))


class Cancel:
    """A cancel check that every rank answers the same way: rank 0 asks the run store (``local``), and its
    answer is broadcast, so all ranks stop at the same step."""

    def __init__(self, rt: Runtime, local: Callable[[], bool] | None):
        self.rt, self.local = rt, local

    def __call__(self) -> bool:
        mine = bool(self.local()) if (self.local is not None and self.rt.is_main) else False
        if not self.rt.distributed:
            return mine
        return bool(broadcast(self.rt, [1.0 if mine else 0.0])[0])


def wrap(model: Any, rt: Runtime) -> Any:
    """The model in ``DistributedDataParallel`` under torchrun (as it is in one process)."""
    if not rt.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [rt.device.index] if rt.device.type == "cuda" else None
    # find_unused_parameters: partial fine-tuning freezes most of the network
    return DDP(model, device_ids=ids, find_unused_parameters=any(not p.requires_grad for p in model.parameters()))


def unwrap(model: Any) -> Any:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return getattr(model, "module", model)
