"""Small collectives that work on every process-group backend, and without a group at all.

NCCL reduces CUDA tensors only and gloo CPU tensors only; the loop's bookkeeping (bad-sample
counts, SIGTERM votes, write failures, logged means) goes through :func:`all_reduce_numbers`, which
puts the numbers on the device the default group's backend needs, as :func:`all_gather_rows` does for
rows every rank needs. :func:`rank_and_world`, :func:`barrier` and :func:`node_leader` answer for one
process (rank 0 of 1) when no group is initialised. :func:`everyone_ok` turns one rank's failure into
an error on every rank; :func:`while_others_wait` runs one rank's long work (a checkpoint transfer)
while the others poll it in small collectives instead of timing out in one; :func:`gather_objects`
collects a picklable value from every rank.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

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


WAIT_POLL_S = 5.0  # ranks waiting for another's work meet in a small collective this often


def everyone_ok(error: BaseException | None, what: str) -> None:
    """Collective: raise on every rank when any rank failed ``what`` (its own error where it has one)."""
    failed = all_reduce_numbers([int(error is not None)], dtype=torch.long)[0]
    if error is not None:
        raise RuntimeError(f"{what} failed: {error}") from error
    if failed:
        raise RuntimeError(f"{what} failed on another rank (see its log)")


def while_others_wait(work: Callable[[], object] | None, what: str) -> object:
    """Collective: run ``work`` on this rank (None: nothing to do here) while every rank meets in a
    small collective every ``WAIT_POLL_S`` seconds until no rank is still working; then, when ``work``
    raised on any rank, raise on every rank (:func:`everyone_ok`). Returns what ``work`` returned.

    An upload or download (a large checkpoint, a slow link) can outlast the process group's timeout
    (``deepspeed.init_distributed``'s default, 10 minutes or ``DEEPSPEED_TIMEOUT``; Ray Train's
    ``TorchConfig.timeout_s``, 30 minutes): ranks left blocked in one collective that long fail, NCCL's
    watchdog aborts them. ``work`` runs on a thread so this rank can take part in the polls meanwhile.
    """
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = work()
        except Exception as e:  # noqa: BLE001 - agreed on by every rank below, never left hanging
            box["error"] = e

    if rank_and_world()[1] == 1:  # nobody to poll: the work runs here
        if work is not None:
            run()
        everyone_ok(box.get("error"), what)
        return box.get("result")
    thread = None
    if work is not None:
        thread = threading.Thread(target=run, name="checkpoint-transfer", daemon=True)
        thread.start()
    while True:
        if thread is not None:
            thread.join(WAIT_POLL_S)
        running = thread is not None and thread.is_alive()
        if not all_reduce_numbers([int(running)], op="max", dtype=torch.long)[0]:
            break
    everyone_ok(box.get("error"), what)
    return box.get("result")


def gather_objects(obj) -> list:
    """Collective: ``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if rank_and_world()[1] == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
