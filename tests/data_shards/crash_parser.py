"""A structure-parsing worker that dies the way one does under the OOM killer (SIGKILL), on one
chosen file: patched over ``data_shards.parallel_parse.parse_unit`` by tests. A module-level function, so
that it survives the ``spawn`` of pool and isolation processes (pickled by name, imported there)."""

import os
import signal
from pathlib import Path

from data_shards.parallel_parse import parse_unit

KILLED_NAME = "oom.pdb"  # the file whose parsing process is killed


def parse_or_die(job: tuple) -> tuple:
    """``parse_unit(job)``, except that the process SIGKILLs itself on :data:`KILLED_NAME`."""
    if Path(job[0]).name == KILLED_NAME:
        os.kill(os.getpid(), signal.SIGKILL)
    return parse_unit(job)


def group_records_or_die(ctx, *job) -> dict:
    """``data_shards.build_groups.group_records`` with :func:`parse_or_die` as the parser, for a Ray
    build: a test's monkeypatch does not reach Ray's worker processes, so this task patches the
    worker it runs in (for this call only) and the parsing children it starts get the patched
    function by name. Monkeypatched over ``data_shards.ray_build.group_records`` in the driver."""
    from data_shards import build_groups, parallel_parse

    real = parallel_parse.parse_unit
    parallel_parse.parse_unit = parse_or_die
    try:
        return build_groups.group_records(ctx, *job)
    finally:
        parallel_parse.parse_unit = real


def group_records_with_a_bug(ctx, *job) -> dict:
    """A group task that raises a plain exception (a bug, not a bad file): it must stop the build."""
    raise ValueError(f"a bug in group {job[0]}")
