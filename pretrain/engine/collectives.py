"""Small all-reduces of Python numbers that work on every process-group backend.

NCCL reduces CUDA tensors only and gloo CPU tensors only; the loop's bookkeeping (bad-sample
counts, SIGTERM votes, write failures, logged means) goes through :func:`all_reduce_numbers`, which
puts the numbers on the device the default group's backend needs.
"""

from __future__ import annotations

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
