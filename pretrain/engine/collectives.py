"""Small collectives that work on every process-group backend, and without a group at all.

NCCL reduces CUDA tensors only and gloo CPU tensors only; the loop's bookkeeping (bad-sample
counts, SIGTERM votes, write failures, logged means) goes through :func:`all_reduce_numbers`, which
puts the numbers on the device the default group's backend needs, as :func:`all_gather_rows` does for
rows every rank needs. :func:`rank_and_world`, :func:`barrier` and :func:`node_leader` answer for one
process (rank 0 of 1) when no group is initialised.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_numbers(values: list[float], op: str = "sum", dtype: torch.dtype = torch.float64) -> list:
    """Reduce ``values`` element-wise over all ranks (``op``: "sum" or "max"); identity without a group.

    Returns Python numbers (``int`` for integer ``dtype``), the same on every rank.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=dtype, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the world size); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if _grouped() else (0, 1)


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if _grouped():
        dist.barrier()


def node_leader() -> bool:
    """Whether this is the node's first process (``LOCAL_RANK`` 0; the rank without that variable):
    the one that writes a node's local files."""
    return int(os.environ.get("LOCAL_RANK", rank_and_world()[0])) == 0


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """(b, E) on every rank -> (world, b, E) on the CPU, in rank order (``t[None]`` without a group)."""
    if not _grouped() or dist.get_world_size() == 1:
        return t[None].cpu()
    dev = _device()
    parts = [torch.empty_like(t, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.to(dev).contiguous())
    return torch.stack(parts).cpu()
