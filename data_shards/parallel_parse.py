"""Parsing structure files in worker processes for the shard build, in order, surviving dead workers.

A worker process that dies (the OOM killer's SIGKILL, a crash in the C++ parser) costs the file it
was reading, never the build and never a hang: see :func:`parsed_units`.
"""

from __future__ import annotations

import collections
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from data_shards.readers.structures import StructureError, StructureFile, read_structure
from data_shards.records import StructureUnit

UNREADABLE = "unreadable structure file"
WORKER_DIED = "worker process died while reading the structure file (e.g. out of memory)"


def parse_unit(job: tuple[str, str, tuple[str, ...] | None]) -> tuple[StructureFile | None, str | None]:
    """Worker: parse one structure file; never raises."""
    path, plddt, chains = job
    try:
        return read_structure(path, plddt=plddt, chains=set(chains) if chains is not None else None), None
    except StructureError as exc:
        return None, str(exc)
    except Exception as exc:  # a parser bug must cost one file, not the build
        return None, f"{path}: unexpected parser error ({type(exc).__name__}: {exc})"


def _job(unit: StructureUnit, plddt: str) -> tuple[str, str, tuple[str, ...] | None]:
    chains = tuple(sorted({row.chain for row in unit.rows})) if unit.rows is not None else None
    return str(unit.path), plddt, chains


# (unit, parsed file or None, error or None, skip reason when parsed is None)
Parsed = tuple[StructureUnit, StructureFile | None, str | None, str]


def parsed_units(units: list[StructureUnit], workers: int, plddt: str) -> Iterator[Parsed]:
    """Parse ``units`` in order; a bounded window of jobs is in flight across ``workers`` processes.

    A worker process that dies (the OOM killer's SIGKILL, a crash in the C++ parser) breaks a
    ``ProcessPoolExecutor`` at once, failing every job in flight, instead of hanging as a
    ``multiprocessing.Pool`` would. The jobs in flight are then run again one at a time, each in a
    fresh process, so that only the file that kills its process is skipped (reason
    :data:`WORKER_DIED`); a new pool takes the rest. Results keep the unit order either way.
    """
    if workers <= 1:
        for unit in units:
            yield (unit, *parse_unit(_job(unit, plddt)), UNREADABLE)
        return
    todo = collections.deque(units)
    while todo:
        in_flight = yield from _pool_pass(todo, workers, plddt)
        for unit, future in in_flight:  # the pool broke: find the file that kills its process
            done = future is not None and future.done() and not future.cancelled() and future.exception() is None
            if done:
                yield (unit, *future.result(), UNREADABLE)
            else:
                yield (unit, *_parse_alone(parse_unit, _job(unit, plddt)))


def _pool_pass(todo: collections.deque, workers: int, plddt: str):
    """Yield parsed units from ``todo`` (consumed) until it is empty or the pool breaks.

    Returns:
        [(unit, future or None)] still to be reported when the pool broke (in unit order), else [].
    """
    window = 4 * workers
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    pending: collections.deque = collections.deque()
    try:
        while todo or pending:
            while todo and len(pending) < window:
                unit = todo.popleft()
                try:
                    pending.append((unit, pool.submit(parse_unit, _job(unit, plddt))))
                except BrokenProcessPool:
                    pending.append((unit, None))
                    return list(pending)
            unit, future = pending[0]
            try:
                result = future.result()
            except BrokenProcessPool:
                return list(pending)
            pending.popleft()
            yield (unit, *result, UNREADABLE)
        return []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _parse_alone(parse, job: tuple) -> tuple[StructureFile | None, str | None, str]:
    """Run ``parse(job)`` in a fresh process; (parsed, error, reason) with ``WORKER_DIED`` when it dies."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_parse_into, args=(parse, job, send), daemon=True)
    process.start()
    send.close()  # the child holds the only write end: EOF as soon as it is gone
    try:
        parsed, error = receive.recv()
    except EOFError:
        parsed = error = None
    finally:
        receive.close()
        process.join()
    if parsed is None and error is None:
        code = process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return None, f"worker died ({how}) while reading {job[0]}", WORKER_DIED
    return parsed, error, UNREADABLE


def _parse_into(parse, job: tuple, send) -> None:
    """Child of :func:`_parse_alone`: parse and send the result back."""
    send.send(parse(job))
    send.close()
