"""A rank notices that the DeepSpeed launcher above it is gone (pretrain/engine/launcher_watch.py).

The process tree of a launch is imitated: a "runner" starts a "launch" process whose command line
names ``deepspeed.launcher.launch``, which starts the "rank". The rank watches with a short poll and
records the SIGTERM it sends itself. The real launcher is driven in tests/launch/test_launcher_signals.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO

RANK = """
import os, signal, sys, time
from pathlib import Path
from pretrain.engine.launcher_watch import watch_launcher
out = Path(sys.argv[1])
def on_term(signum, frame):
    out.write_text("SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
watch = watch_launcher(poll_s=0.1)
out.with_suffix(".ready").write_text("watching" if watch else "not watching")
time.sleep(60)
out.write_text("timed out")
"""
# argv: rank code, marker path, then "deepspeed.launcher.launch" (only so that it is in its cmdline)
LAUNCH = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
time.sleep(60)
"""
RUNNER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3], "deepspeed.launcher.launch"])
time.sleep(60)
"""


def _tree(tmp_path: Path, launch_args: tuple[str, ...] = ("deepspeed.launcher.launch",)):
    marker = tmp_path / "rank.txt"
    if launch_args:
        runner = subprocess.Popen(
            [sys.executable, "-c", RUNNER, LAUNCH, RANK, str(marker)], cwd=REPO, start_new_session=True
        )
    else:  # the rank's parent is no DeepSpeed launch process
        runner = subprocess.Popen([sys.executable, "-c", LAUNCH, RANK, str(marker)], cwd=REPO, start_new_session=True)
    deadline, ready = time.time() + 60, marker.with_suffix(".ready")
    while not (ready.exists() and ready.read_text()):  # created before written: wait for the content too
        assert time.time() < deadline, "the rank did not start"
        time.sleep(0.1)
    return runner, marker


def _cleanup(runner: subprocess.Popen) -> None:
    try:
        os.killpg(runner.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    runner.wait()


def _wait_for(marker: Path, timeout: float = 20) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if marker.exists() and marker.read_text():
            return marker.read_text()
        time.sleep(0.1)
    return ""


@pytest.mark.parametrize("victim", ["runner", "launch"])
def test_the_rank_sends_itself_sigterm_when_a_launcher_process_dies(tmp_path, victim):
    runner, marker = _tree(tmp_path)
    try:
        assert marker.with_suffix(".ready").read_text() == "watching"
        launch = psutil.Process(runner.pid).children()[0]
        target = runner.pid if victim == "runner" else launch.pid
        os.kill(target, signal.SIGKILL)
        assert _wait_for(marker) == "SIGTERM"
    finally:
        _cleanup(runner)


def test_no_watch_when_the_parent_is_not_a_deepspeed_launch(tmp_path):
    runner, marker = _tree(tmp_path, launch_args=())
    try:
        assert marker.with_suffix(".ready").read_text() == "not watching"
    finally:
        _cleanup(runner)


SIGINT_TWICE = """
import os, signal, time
from pretrain.engine.launcher_watch import forward_sigint_once
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append("SIGTERM"))
forward_sigint_once()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)
print(got, flush=True)
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
"""


def test_the_first_sigint_stops_like_sigterm_and_the_second_interrupts():
    out = subprocess.run([sys.executable, "-c", SIGINT_TWICE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.split("\n")[:2] == ["['SIGTERM']", "KeyboardInterrupt"], out.stdout + out.stderr
