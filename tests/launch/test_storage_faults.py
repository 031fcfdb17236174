"""The launcher when its storage fails: a full disk mid-run, a checkpoint that lost a file.

Each case ends in one line and a documented exit code (RELIABILITY.md), never a traceback, and a
relaunch resumes from the newest checkpoint that is whole.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import mount_small_tmpfs, run_launcher, unmount

pytestmark = pytest.mark.slow

COMMON = ["train.stage1_steps=0", "train.eval_at_end=false", "data.loader=local"]


@pytest.fixture
def small_filesystem(tmp_path):
    """A 16 MiB tmpfs mounted for the test."""
    mnt = mount_small_tmpfs(tmp_path / "small_fs", "16m")
    yield mnt
    unmount(mnt)


def _fill(directory: Path) -> None:
    """Write a file until the file system is full (ENOSPC)."""
    chunk = b"\0" * 65536
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass


def _kill_tree(proc: subprocess.Popen) -> None:
    """Leave no launcher, launch process or rank behind (a failed assertion, a hang)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in [*children, psutil.Process(proc.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=30)


def test_disk_full_mid_run_stops_with_one_line_and_exit_3(small_filesystem, small_demo):
    """The disk fills while the run trains: metrics lines cannot be written (rank 0), then the next
    checkpoint cannot. The run stops in order on every rank with exit 3; latest keeps naming the
    checkpoint written before."""
    run = small_filesystem / "run"
    over = [
        *COMMON,
        "train.max_steps=400",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=1",
        "train.max_failed_checkpoints=1",
    ]
    proc = run_launcher(run, small_demo, over, background=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "latest").is_file():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        _fill(small_filesystem)
        out, err = proc.communicate(timeout=180)  # before the fix: a hang (TensorBoard's dead writer)
    finally:
        _kill_tree(proc)
    assert proc.returncode == 3, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.count("align-pro: stopped:") == 1 and "could not be written" in err or "No space left" in err
    latest = (run / "checkpoints" / "latest").read_text()
    assert (run / "checkpoints" / latest / "COMPLETE").is_file()


def test_a_checkpoint_that_lost_a_file_falls_back_to_the_previous_one(tmp_path, small_demo):
    """A rank's file of the newest checkpoint deleted (or never synced): the relaunch resumes from
    the checkpoint before it, with a warning, and finishes; the damaged one is retired."""
    run = tmp_path / "run"
    over = [*COMMON, "train.checkpoint_every=2", "train.keep_checkpoints=2"]
    first = run_launcher(run, small_demo, [*over, "train.max_steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000004"
    (ckpt / "step00000004" / "rank_1.pt").unlink()
    again = run_launcher(run, small_demo, [*over, "train.max_steps=6"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    assert "resumed from step 2" in again.stdout and "rank_1.pt is missing" in again.stderr
    assert (ckpt / "latest").read_text() == "step00000006"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step00000004", "step00000006"]
    # The step-4 checkpoint written by the relaunch is whole again; a truncated file is caught too.
    optim = sorted((ckpt / "step00000006").glob("*optim_states.pt"))[0]
    optim.write_bytes(optim.read_bytes()[:100])
    for marker in [ckpt / "step00000004" / "COMPLETE"]:
        marker.write_text("{not json")
    refused = run_launcher(run, small_demo, [*over, "train.max_steps=8"])
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    assert refused.stderr.count("align-pro: error") == 1 and "no checkpoint in" in refused.stderr
    assert "were written" in refused.stderr
