"""Run a test worker on several spawned gloo ranks with a hard timeout, and collect their results."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def join_group(rank: int, world: int, port: int) -> None:
    """The environment a spawned worker needs before it starts the gloo group (CPU DeepSpeed)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def gloo_rank(
    rank: int, world: int, init_file: str, out_dir: str, results: Callable[[], dict], timeout_s: float = 30, stem="rank"
) -> None:
    """Be ``rank`` of a ``world``-rank gloo group (file rendezvous at ``init_file``, one torch thread):
    save ``results()`` to ``out_dir/<stem><rank>.pt`` (what :func:`run_ranks` collects), or the
    traceback to ``out_dir/<stem><rank>.err`` when it raises; the group is left in either case."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
        )
        torch.save(results(), os.path.join(out_dir, f"{stem}{rank}.pt"))
    except BaseException:
        Path(out_dir, f"{stem}{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launched_rank(rank: int, world: int, port: int, out_dir: str, results: Callable[[], dict], stem="rank") -> None:
    """Be ``rank`` of ``world`` as a launched rank is (:func:`join_group`'s environment; ``results`` starts
    the group with :func:`pretrain.run.init_process_group` when it needs one): save ``results()`` to
    ``out_dir/<stem><rank>.pt`` (what :func:`run_ranks` collects), or the traceback to
    ``out_dir/<stem><rank>.err`` when it raises; the group is closed in either case."""
    from pretrain.run import close_process_group

    join_group(rank, world, port)
    try:
        torch.save(results(), os.path.join(out_dir, f"{stem}{rank}.pt"))
    except BaseException:
        Path(out_dir, f"{stem}{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        close_process_group()


def trainer_overrides(shards: str | Path) -> list[str]:
    """Recipe overrides for a Trainer built inside a spawned worker on a demo corpus at ``shards``."""
    from tests.conftest import TINY_OVERRIDES

    return [
        f"data.train_shards={shards}/train",
        f"data.eval_shards={shards}/heldout",
        "data.loader=local",
        "train.eval_at_end=false",
        "train.tensorboard=false",
        *TINY_OVERRIDES,
    ]


def _run_then_exit(target: Callable, args: tuple) -> None:
    """Run one rank's worker, then leave through ``os._exit``.

    A rank that finished its work (results saved, process group destroyed) can still abort in
    interpreter teardown when gloo's threads are destroyed while joinable ("terminate called
    without an active exception", exit -6: seen once in a CI run of the checkpoint tests), which
    would read as a crashed rank. A crash during the work still shows: an abort before this point
    keeps its signal, an exception exits 1 with its traceback.
    """
    code = 0
    try:
        target(*args)
    except BaseException:  # noqa: BLE001 - reported through the exit code and the traceback
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_ranks(
    target: Callable, args_of_rank: Callable[[int], tuple], world: int, out_dir: Path, timeout_s: float, stem: str
) -> list[dict]:
    """Spawn ``target(*args_of_rank(r))`` for r in [0, world) and return each rank's saved result.

    Each worker saves its result to ``out_dir/<stem><r>.pt`` and may write a traceback to
    ``out_dir/<stem><r>.err``. Ranks still running after ``timeout_s`` are killed; the call fails
    on any traceback, any killed rank and any non-zero exit code.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_run_then_exit, args=(target, args_of_rank(r)), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join(5)
    errors = [f.read_text() for f in sorted(Path(out_dir).glob(f"{stem}*.err"))]
    assert not errors, "\n".join(errors)
    assert not alive, f"{len(alive)} rank(s) hung past {timeout_s}s and were killed"
    assert [p.exitcode for p in procs] == [0] * world, f"ranks died: {[p.exitcode for p in procs]}"
    return [torch.load(Path(out_dir) / f"{stem}{r}.pt") for r in range(world)]
