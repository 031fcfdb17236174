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
