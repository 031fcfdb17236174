"""Run a test worker on several spawned gloo ranks with a hard timeout, and collect their results."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

import torch


def run_ranks(
    target: Callable, args_of_rank: Callable[[int], tuple], world: int, out_dir: Path, timeout_s: float, stem: str
) -> list[dict]:
    """Spawn ``target(*args_of_rank(r))`` for r in [0, world) and return each rank's saved result.

    Each worker saves its result to ``out_dir/<stem><r>.pt`` and may write a traceback to
    ``out_dir/<stem><r>.err``. Ranks still running after ``timeout_s`` are killed; the call fails
    on any traceback, any killed rank and any non-zero exit code.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of_rank(r), daemon=True) for r in range(world)]
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
