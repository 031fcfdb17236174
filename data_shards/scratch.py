"""Scratch directories that outlive a killed process only until the next one on the host starts.

A build task or benchmark writes large temporary files (a group's record spool, shards before their
upload, a downloaded input, MMseqs2's databases). ``tempfile.TemporaryDirectory`` removes them on any
orderly exit, but a process killed by SIGKILL (the OOM killer, a C++ parser crash taking its Ray worker
down, a cancelled job) leaves them behind, and on a long-lived cluster node they add up.

Here every such directory carries its owner in its name, ``<prefix><host>-<pid>-<random>``, and
creating one first removes the directories with the same prefix, in the same parent, whose owner
process on this host is gone. A directory of another host (a shared ``/tmp`` or build state folder)
or of a live process is never touched; a recycled pid only delays the sweep.

    with owned_tempdir("align-pro-group-") as tmp:     # removed on exit, swept if the process dies
        ...
    folder = owned_dir("align-pro-input-")            # kept until the caller removes it
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def _host() -> str:
    """This host's name, made safe for a file name (no ``-``: it separates the name's fields)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


PF_EXITING = 0x4  # Linux task flag (include/linux/sched.h): the task is inside do_exit


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (another user's process counts as alive). A process
    on its way out does not: one inside ``exit()`` (:data:`PF_EXITING` is set as exit starts; the
    sockets close, which is when Ray reports a worker's death and re-runs its task, before the
    process turns zombie) or a zombie, exited but not yet reaped by its parent (the raylet reaps its
    workers a while later)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state, flags = proc_stat(pid)
    except (OSError, IndexError, ValueError):
        return True  # no /proc (macOS) or the process just went: the next sweep decides
    return state not in ("Z", "X") and not flags & PF_EXITING


def proc_stat(pid: int) -> tuple[str, int]:
    """Linux's one-letter state (``Z``: zombie) and task flags (:data:`PF_EXITING`) of process ``pid``,
    from ``/proc/<pid>/stat``. They follow the parenthesised command name, which may itself hold ") "."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[6])  # fields 3 and 9 of proc(5)


def sweep_dead(prefix: str, parent: str | Path | None = None) -> list[Path]:
    """Remove the directories ``<prefix><this host>-<pid>-*`` under ``parent`` (default: the system
    temporary directory) whose process ``pid`` no longer runs; returns those removed."""
    root = Path(parent or tempfile.gettempdir())
    mine = f"{prefix}{_host()}-"
    removed = []
    for path in root.glob(f"{glob.escape(mine)}*-*"):
        pid = path.name[len(mine) :].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d scratch director%s of dead processes: %s", len(removed),
                 "y" if len(removed) == 1 else "ies", ", ".join(str(p) for p in removed))  # fmt: skip
    return removed


def owned_dir(prefix: str, parent: str | Path | None = None) -> Path:
    """A new directory ``<prefix><host>-<pid>-<random>`` under ``parent`` (default: the system temporary
    directory), after sweeping those of dead processes (:func:`sweep_dead`). The caller removes it."""
    sweep_dead(prefix, parent)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{_host()}-{os.getpid()}-", dir=parent))


@contextlib.contextmanager
def owned_tempdir(prefix: str, parent: str | Path | None = None) -> Iterator[Path]:
    """:func:`owned_dir` as a context manager: the directory is removed when the block exits."""
    path = owned_dir(prefix, parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
