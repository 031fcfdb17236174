"""One live run per run directory (pretrain/engine/run_lock.py): refused while the owner lives,
taken over once it is provably dead or silent, never stuck after a SIGKILL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pretrain.engine.run_lock import (
    LOCK_NAME,
    STALE_ENV,
    RunDirBusy,
    RunLock,
    agree_refused,
    stale_timeout,
)
from tests.conftest import REPO

HOLD = """
import sys, time
from pretrain.engine.run_lock import RunLock, RunDirBusy
lock = RunLock(sys.argv[1], remote=sys.argv[2] or None, stale_s=float(sys.argv[3]))
try:
    lock.acquire()
except RunDirBusy as e:
    print("busy", e, flush=True)
    sys.exit(2)
print("held", flush=True)
time.sleep(float(sys.argv[4]))
lock.release()
"""


def _holder(run_dir: Path, *, remote: str = "", stale_s: float = 60, hold_s: float = 300) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), remote, str(stale_s), str(hold_s)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )


def _wait_held(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.startswith("held"), line


def _forge(path: Path, mtime_age: float = 0.0, **fields) -> dict:
    record = {
        "host": socket.gethostname(),
        "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        "pid_ns": os.readlink("/proc/self/ns/pid"),
        "pid": os.getpid(),
        "pid_start": psutil.Process().create_time(),
        "since": time.time() - 100,
        "run_id": "forged",
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    if mtime_age:
        t = time.time() - mtime_age
        os.utime(path, (t, t))
    return record


def test_a_live_owner_refuses_a_second_lock_with_one_line_naming_it(tmp_path):
    first = RunLock(tmp_path / "run").acquire()
    try:
        record = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["run_id"] == first.run_id
        assert {"host", "boot_id", "pid_ns", "pid_start", "since"} <= set(record)
        with pytest.raises(RunDirBusy) as refused:
            RunLock(tmp_path / "run").acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in message
        assert first.run_id in message
    finally:
        first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    RunLock(tmp_path / "run").acquire().release()  # free again


def test_a_holder_in_another_process_refuses_until_it_is_sigkilled(tmp_path):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        _wait_held(holder)
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
            RunLock(run).acquire()
        holder.kill()  # SIGKILL: no release, the file stays
        holder.wait()
        assert (run / LOCK_NAME).exists()
        lock = RunLock(run).acquire()  # same host, pid gone: taken over at once, no stale wait
        assert json.loads((run / LOCK_NAME).read_text())["run_id"] == lock.run_id
        lock.release()
    finally:
        holder.kill()


def test_a_reused_pid_does_not_keep_a_dead_owner_alive(tmp_path, capsys):
    path = tmp_path / "run" / LOCK_NAME
    _forge(path, pid_start=psutil.Process().create_time() - 1000)  # our pid, but started at another time
    lock = RunLock(tmp_path / "run").acquire()
    lock.release()
    assert "now belongs to another process" in capsys.readouterr().err


def test_another_boot_of_the_same_host_counts_as_dead(tmp_path, capsys):
    _forge(tmp_path / "run" / LOCK_NAME, boot_id="an-earlier-boot")
    RunLock(tmp_path / "run").acquire().release()
    assert "restarted" in capsys.readouterr().err


def test_an_owner_on_another_host_holds_until_its_heartbeat_is_stale(tmp_path, capsys):
    path = tmp_path / "run" / LOCK_NAME
    _forge(path, host="node-elsewhere", pid=12345, mtime_age=5)
    with pytest.raises(RunDirBusy, match="host node-elsewhere, pid 12345"):
        RunLock(tmp_path / "run", stale_s=60).acquire()
    lock = RunLock(tmp_path / "run", stale_s=2).acquire()  # silent for 5 s > 2 s
    lock.release()
    assert "no heartbeat for 5 s" in capsys.readouterr().err


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = RunLock(tmp_path / "run", stale_s=2, heartbeat_s=0.1).acquire()
    try:
        path = tmp_path / "run" / LOCK_NAME
        old = time.time() - 100
        os.utime(path, (old, old))
        time.sleep(0.6)
        assert time.time() - path.stat().st_mtime < 2
    finally:
        lock.release()


def test_an_unreadable_lock_file_counts_by_its_age(tmp_path):
    path = tmp_path / "run" / LOCK_NAME
    path.parent.mkdir()
    path.write_text("")  # a creator killed between create and write
    with pytest.raises(RunDirBusy, match="cannot be read"):
        RunLock(tmp_path / "run", stale_s=60).acquire()
    old = time.time() - 100
    os.utime(path, (old, old))
    RunLock(tmp_path / "run", stale_s=60).acquire().release()


def test_release_leaves_another_runs_lock_alone(tmp_path):
    lock = RunLock(tmp_path / "run").acquire()
    path = tmp_path / "run" / LOCK_NAME
    _forge(path, run_id="someone-else")
    lock.release()
    assert json.loads(path.read_text())["run_id"] == "someone-else"


@pytest.mark.parametrize("stale", [False, True])
def test_of_simultaneous_launches_exactly_one_gets_the_lock(tmp_path, stale):
    """Fresh directory, or one holding a dead owner's lock that all of them try to take over."""
    run = tmp_path / "run"
    if stale:
        _forge(run / LOCK_NAME, host="node-elsewhere", mtime_age=100)
    procs = [_holder(run, stale_s=10, hold_s=5) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2, 2, 2], outs
    assert not (run / LOCK_NAME).exists()


def test_the_remote_owner_record_refuses_a_launch_on_another_machine(tmp_path, capsys):
    remote = str(tmp_path / "bucket" / "run")  # a train.remote_dir (local path through data_shards.storage)
    first = RunLock(tmp_path / "machine-a", remote=remote).acquire()
    record = json.loads((Path(remote) / LOCK_NAME).read_text())
    assert record["run_id"] == first.run_id and "heartbeat" in record
    try:
        # another machine: its own run directory, the same remote
        with pytest.raises(RunDirBusy, match=f"train.remote_dir {remote} is in use by another run"):
            RunLock(tmp_path / "machine-b", remote=remote).acquire()
        assert not (tmp_path / "machine-b" / LOCK_NAME).exists()  # the local lock was given back
    finally:
        first.release()
    assert not (Path(remote) / LOCK_NAME).exists()
    # a record left by a crashed run elsewhere is taken over once its heartbeat is stale
    _forge(Path(remote) / LOCK_NAME, host="node-elsewhere", heartbeat=time.time() - 100)
    RunLock(tmp_path / "machine-b", remote=remote, stale_s=60).acquire().release()
    assert "taking over the owner record" in capsys.readouterr().err


def test_the_stale_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(STALE_ENV, raising=False)
    assert stale_timeout() == 60
    monkeypatch.setenv(STALE_ENV, "2.5")
    assert stale_timeout() == 2.5 and RunLock("/nonexistent").heartbeat_s == 2.5 / 4
    monkeypatch.setenv(STALE_ENV, "soon")
    with pytest.raises(ValueError, match=STALE_ENV):
        stale_timeout()


def test_agreement_without_a_process_group_is_the_local_verdict():
    assert agree_refused(True) and not agree_refused(False)
