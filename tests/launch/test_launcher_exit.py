"""launch/pretrain.py's way out (``leave``): after a process group the Python exit handlers run, buffered
output is flushed and the process leaves with main's code, skipping the interpreter's teardown (where
gloo's threads once aborted a cleanly refused rank); before any group, the ordinary exit."""

from __future__ import annotations

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
