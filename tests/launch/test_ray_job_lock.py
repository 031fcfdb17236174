"""launch/ray_job.py takes the run directory's owner lock in its driver (pretrain/engine/run_lock.py).

Refused (exit 2, one line naming the owner, Ray never started) while another run owns the
directory; while it runs, its driver owns it; when it ends, the lock is gone.
In the serial Ray group of tests/conftest.py (it starts a local Ray).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pretrain.engine.run_lock import LOCK_NAME, RunDirBusy, RunLock
from tests.conftest import REPO, TINY_OVERRIDES, cpu_env

pytestmark = pytest.mark.slow

COMMON = ["train.checkpoint_every=2", "train.stage1_steps=1", "train.eval_at_end=false", "train.max_steps=2"]


def _job_cmd(run_dir, shards) -> list[str]:
    cmd = [sys.executable, str(REPO / "launch" / "ray_job.py"), "--num-workers", "2", "--num-cpus", "4"]
    cmd += ["--config", "zero3.json", "--run-dir", str(run_dir)]
    for o in [f"data.train_shards={shards.name}/train", f"data.eval_shards={shards.name}/heldout"]:
        cmd += ["--set", o]
    for o in [*TINY_OVERRIDES, *COMMON, "data.loader=local"]:
        cmd += ["--set", o]
    return cmd


def test_the_ray_job_driver_owns_the_run_directory(tmp_path, small_demo):
    run = tmp_path / "run"
    with RunLock(run):  # another live run owns it
        refused = subprocess.run(
            _job_cmd(run, small_demo), cwd=small_demo.parent, env=cpu_env(), capture_output=True, text=True, timeout=300
        )
    assert refused.returncode == 2, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("align-pro: error")]
    assert len(errors) == 1 and f"pid {os.getpid()}, since" in errors[0], refused.stderr[-3000:]
    assert not (run / "ray_results").exists() and not (run / "config.yaml").exists()  # nothing started or written

    job = subprocess.Popen(
        _job_cmd(run, small_demo),
        cwd=small_demo.parent,
        env=cpu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while not (run / LOCK_NAME).is_file():
            assert job.poll() is None and time.time() < deadline, "the driver took no lock"
            time.sleep(0.2)
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == job.pid
        with pytest.raises(RunDirBusy, match=f"pid {job.pid}"):
            RunLock(run).acquire()
        out = job.communicate(timeout=540)[0].decode()
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-5000:]
    assert not (run / LOCK_NAME).exists()
