"""launch/pretrain.py's way out (``leave``): after a process group the Python exit handlers run, buffered
output is flushed and the process leaves with main's code, skipping the interpreter's teardown (where
gloo's threads once aborted a cleanly refused rank); before any group, the ordinary exit."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = """
import atexit, sys
from launch import pretrain as launcher

class Teardown:  # a module global's __del__ runs in the interpreter's teardown, not in atexit
    def __del__(self, open=open):  # bound now: builtins may be gone by then
        with open({teardown!r}, "w") as f:
            f.write("ran")

keep = Teardown()
atexit.register(lambda: open({handler!r}, "w").write("ran"))
launcher._STATE["process_group"] = {started}
sys.stdout.write("buffered line")  # no newline, no flush
launcher.leave({code})
"""


@pytest.mark.parametrize("started", [True, False], ids=["after-process-group", "before-process-group"])
@pytest.mark.parametrize("code", [0, 2])
def test_leave_runs_exit_handlers_and_keeps_the_code(tmp_path, started, code):
    handler, teardown = tmp_path / "atexit", tmp_path / "teardown"
    script = SCRIPT.format(handler=str(handler), teardown=str(teardown), started=started, code=code)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "buffered line"
    assert handler.read_text() == "ran"  # logging.shutdown, ray.shutdown, temporary folders: still done
    # after a process group the teardown is skipped; before one it is the ordinary exit
    assert teardown.exists() is not started


def _end(code: int, rank: int, present: bool) -> dict:
    """A rank's orderly end with ``code`` (:func:`launch.pretrain._close`, a 5 s wait; rank 1 comes 2 s
    late), or, when not ``present``, a rank that never comes to it (busy elsewhere for 15 s).

    Times are ``time.monotonic()``, one clock for every process on the machine, so the ranks' moments
    compare directly: the test checks their order, not durations that a loaded machine stretches."""
    import time

    import torch.distributed as dist

    from launch import pretrain as launcher

    if not present:
        time.sleep(15)
        return {"absent": True, "woke": time.monotonic()}
    time.sleep(2 * rank)
    arrived = time.monotonic()
    got = launcher._close(code, wait_s=5)
    left = time.monotonic()
    return {"code": got, "arrived": arrived, "left": left, "closed": not dist.is_initialized()}


@pytest.mark.parametrize("peer", ["present", "absent"])
def test_a_non_zero_end_waits_for_the_other_ranks_but_not_forever(tmp_path, peer):
    """Rank 0 refuses (exit 2): it waits at the barrier until rank 1 is there too, so that no rank leaves
    before the reporting one has printed; a rank that never comes costs the wait, not a hang."""
    from tests.spawn_ranks import gloo_rank, run_ranks

    def args(rank: int) -> tuple:
        present = rank == 0 or peer == "present"
        return (rank, 2, str(tmp_path / "init"), str(tmp_path), functools.partial(_end, 2, rank, present), 30, "end")

    first, second = run_ranks(gloo_rank, args, 2, tmp_path, timeout_s=120, stem="end")
    assert first["code"] == 2
    if peer == "present":
        assert first["closed"] and second["code"] == 2 and second["closed"]  # the wait ended at the barrier
        assert first["left"] >= second["arrived"]  # rank 0 left only once rank 1, 2 s late, was there
    else:
        assert not first["closed"]  # the wait timed out: the group is left to the exit
        assert first["left"] - first["arrived"] >= 5  # it waited the whole bound ...
        assert first["left"] < second["woke"]  # ... and left without the rank that never came
