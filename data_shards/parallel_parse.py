"""Parsing structure files in worker processes for the shard build, in order, surviving dead workers,
and running the grouped build's tasks here or on Ray (:class:`GroupRunner`, with a progress bar).

A worker process that dies (the OOM killer's SIGKILL, a crash in the C++ parser) costs the file it
was reading, never the build and never a hang: see :func:`parsed_units`. On Ray, a group task
whose worker process dies is run once more with each file parsed in a child process
(:meth:`GroupRunner.map`), so that there too only the file that kills its process is skipped.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from data_shards.archives import located, parse_located
from data_shards.readers.structures import StructureError, StructureFile, read_structure
from data_shards.records import StructureUnit

UNREADABLE = "unreadable structure file"
WORKER_DIED = "worker process died while reading the structure file (e.g. out of memory)"

log = logging.getLogger(__name__)


def parse_unit(job: tuple) -> tuple[StructureFile | None, str | None]:
    """Worker: parse one structure file; never raises.

    ``job`` is (path, plddt, chains[, member]): ``member`` locates an archive member or a remote
    file (:func:`data_shards.archives.located`), read without unpacking to disk.
    """
    path, plddt, chains = job[:3]
    member = job[3] if len(job) > 3 else None
    wanted = set(chains) if chains is not None else None
    try:
        if member is not None:
            return parse_located(member, plddt, wanted), None
        return read_structure(path, plddt=plddt, chains=wanted), None
    except StructureError as exc:
        return None, str(exc)
    except Exception as exc:  # a parser bug must cost one file, not the build
        return None, f"{path}: unexpected parser error ({type(exc).__name__}: {exc})"


def _job(unit: StructureUnit, plddt: str) -> tuple:
    chains = tuple(sorted({row.chain for row in unit.rows})) if unit.rows is not None else None
    member = located(unit)
    if member is not None:
        return unit.display, plddt, chains, member
    return str(unit.path), plddt, chains


# (unit, parsed file or None, error or None, skip reason when parsed is None)
Parsed = tuple[StructureUnit, StructureFile | None, str | None, str]


def parsed_units(units: list[StructureUnit], workers: int, plddt: str, isolate: bool = False) -> Iterator[Parsed]:
    """Parse ``units`` in order; a bounded window of jobs is in flight across ``workers`` processes.

    ``workers`` <= 1 parses in this process, unless ``isolate``: then one child process parses them
    (so that a file that kills its process costs that file, not this process).

    A worker process that dies (the OOM killer's SIGKILL, a crash in the C++ parser) breaks a
    ``ProcessPoolExecutor`` at once, failing every job in flight, instead of hanging as a
    ``multiprocessing.Pool`` would. The jobs in flight are then run again one at a time, each in a
    fresh process, so that only the file that kills its process is skipped (reason
    :data:`WORKER_DIED`); a new pool takes the rest. Results keep the unit order either way.
    """
    if workers <= 1 and not isolate:
        for unit in units:
            yield (unit, *parse_unit(_job(unit, plddt)), UNREADABLE)
        return
    todo = collections.deque(units)
    while todo:
        in_flight = yield from _pool_pass(todo, max(1, workers), plddt)
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


# ----------------------------------------------------------------------------- groups of the grouped build


# Ray's exceptions (``ray.exceptions``) for a task whose worker process died: killed by a signal
# (the kernel's OOM killer's SIGKILL, a segfault in a C++ parser) or by Ray's memory monitor.
WORKER_DEATHS = ("WorkerCrashedError", "OutOfMemoryError")
ISOLATED_RETRIES = 2  # Ray's retries of a task whose worker died (other causes: node loss, memory pressure)


class GroupRunner:
    """Runs ``fn(ctx, *job)`` for group jobs in this process or as Ray tasks (one CPU each).

    Args:
        ctx: the context every job gets (put once into the Ray object store). When it has an
            ``isolating()`` method (:class:`data_shards.build_groups.GroupContext`), that gives the
            context of a re-run whose structure files are each parsed in a child process.
        ray_address: None runs here; "local" (or "") starts a local Ray unless one is running in
            this process, "auto" joins the running cluster, else a cluster address.
        stall_timeout_s: on Ray, cancel and raise RuntimeError when no task ends for this long
            (tasks waiting for CPUs the cluster does not have); None waits.

    A task that raises stops the build (its completion record is missing, so a rerun redoes it).
    A task whose Ray worker process dies (:data:`WORKER_DEATHS`: SIGKILL by the OOM killer, a crash
    in the C++ parser, Ray's memory monitor) is run once more on ``ctx.isolating()``, which Ray
    retries :data:`ISOLATED_RETRIES` times: a file that kills its parsing process then costs that
    file (:data:`WORKER_DIED`), not the build. A task that dies there too stops the build. Without
    ``isolating()``, Ray retries a dead worker's task :data:`ISOLATED_RETRIES` times.
    """

    def __init__(self, ctx, ray_address: str | None = None, stall_timeout_s: float | None = None):
        self.ctx, self.stall_timeout_s = ctx, stall_timeout_s
        self.ray = None
        if ray_address is not None:
            import ray

            if not ray.is_initialized():
                address = None if ray_address in ("", "local") else ray_address
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self.ray = ray
            self.ctx_ref = ray.put(ctx)
            self.remote: dict = {}
            self.window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(self, fn, jobs: list[tuple], bar) -> list:
        """``fn(ctx, *job)`` for every job, results in job order; ``bar.update(weight)`` as each ends."""
        if self.ray is None:
            out = []
            for job in jobs:
                out.append(fn(self.ctx, *job))
                _tick(bar, out[-1])
            return out
        ray = self.ray
        can_isolate = callable(getattr(self.ctx, "isolating", None))
        if fn not in self.remote:  # with the isolating re-run, the first death goes straight to it
            retries = 0 if can_isolate else ISOLATED_RETRIES
            self.remote[fn] = ray.remote(num_cpus=1, max_retries=retries)(fn)
        if _run_isolated not in self.remote:
            self.remote[_run_isolated] = ray.remote(num_cpus=1, max_retries=ISOLATED_RETRIES)(_run_isolated)
        remote = self.remote[fn]
        deaths = tuple(getattr(ray.exceptions, name) for name in WORKER_DEATHS)
        results: dict[int, object] = {}
        pending: dict = {}
        isolated: set[int] = set()
        todo = list(enumerate(jobs))
        while todo or pending:
            while todo and len(pending) < self.window:
                i, job = todo.pop(0)
                pending[remote.remote(self.ctx_ref, *job)] = i
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.stall_timeout_s)
            if not ready:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise RuntimeError(
                    f"no Ray task ended in {self.stall_timeout_s} s ({len(pending)} waiting; "
                    f"cluster resources {ray.cluster_resources()})"
                )
            for ref in ready:
                i = pending.pop(ref)
                try:
                    results[i] = value = ray.get(ref)
                except deaths as exc:
                    if not can_isolate:
                        raise
                    what, why = _task_name(fn, jobs[i]), f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                    if i in isolated:
                        log.error("%s: its Ray worker died again, each file parsed in a child process (%s)", what, why)
                        raise
                    log.warning(
                        "%s: its Ray worker died (%s); running it again with each file parsed in a child "
                        "process, so that a file that kills its process is skipped",
                        what,
                        why,
                    )
                    isolated.add(i)
                    pending[self.remote[_run_isolated].remote(fn, self.ctx_ref, *jobs[i])] = i
                    continue
                _tick(bar, value)
        return [results[i] for i in range(len(jobs))]


def _run_isolated(fn, ctx, *job):
    """Ray task: ``fn(ctx.isolating(), *job)``, the re-run of a task whose worker died."""
    return fn(ctx.isolating(), *job)


def _task_name(fn, job: tuple) -> str:
    """How a log names a task: its function and first argument (the group id of a group task)."""
    first = repr(job[0]) if job else ""
    return f"Ray task {getattr(fn, '__name__', fn)}({first}{', ...' if len(job) > 1 else ''})"


def _tick(bar, result: dict) -> None:
    """Advance a :func:`progress_bar` by one finished group (its inputs, records and skips)."""
    if bar is None:
        return
    if "records" in result:  # phase A: records made; phase B: samples written
        bar.records += len(result["records"])
    else:
        bar.records += sum(s["num_samples"] for part in result.get("splits", {}).values() for s in part["shards"])
    bar.skips += sum(e["count"] for e in result.get("skipped", {}).values())
    bar.update(result.get("inputs", 1))
    bar.set_postfix(records=bar.records, skipped=bar.skips, refresh=False)


def progress_bar(show: bool | None, total: int, desc: str, unit: str):
    """A tqdm bar on stderr with rate, ETA and running record / skip counts, or None when not shown
    (``show`` None: only on a terminal)."""
    show = show if show is not None else sys.stderr.isatty()
    if not show:
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
    bar.records = bar.skips = 0
    return bar
