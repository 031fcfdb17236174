"""Two launches into one --run-dir: one trains, the other is refused (exit 2, one line naming the owner).

Before the run directory had an owner lock (pretrain/engine/run_lock.py), two launches started a
second apart both trained, logged every step twice and resumed from each other's half-written
checkpoints.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time

import pytest

from pretrain.engine.run_lock import LOCK_NAME
from tests.conftest import REPO, cpu_env, free_port, launcher_cmd, run_launcher

pytestmark = pytest.mark.slow

COMMON = ["train.checkpoint_every=2", "train.stage1_steps=1", "train.eval_at_end=false", "data.loader=local"]


def test_two_launches_a_second_apart_one_trains_the_other_exits_2(tmp_path, small_demo):
    run = tmp_path / "run"
    over = ["train.max_steps=4", *COMMON]
    procs, logs = [], []
    for i in range(2):
        logs.append(tmp_path / f"launch{i}.err")
        cmd = launcher_cmd(["--num_gpus", "2", "--master_port", str(free_port())], run, small_demo, over)
        with open(logs[-1], "w") as err, open(tmp_path / f"launch{i}.out", "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=out, stderr=err))
        time.sleep(1)
    try:
        for p in procs:
            p.wait(timeout=420)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], codes
    refused = logs[codes.index(2)].read_text()
    errors = [line for line in refused.splitlines() if line.startswith("align-pro: error")]
    assert len(errors) == 1, refused[-3000:]
    assert re.search(
        rf"is in use by another run: host {re.escape(socket.gethostname())}, pid \d+, since \d{{4}}-\d\d-\d\dT",
        errors[0],
    ), errors[0]

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # every step logged once (val lines: val/*)
    assert (run / "checkpoints" / "latest").read_text() == "step00000004"
    assert not (run / LOCK_NAME).exists()  # released by the finished run
    again = run_launcher(run, small_demo, over)
    assert again.returncode == 0 and "already finished at step 4" in again.stdout


def test_a_lock_left_by_a_killed_run_does_not_block_the_relaunch(tmp_path, small_demo):
    """Rank 0 SIGKILLed (DeepSpeed's launch then kills the other rank): the lock file stays, its pid is gone."""
    run = tmp_path / "run"
    over = ["train.max_steps=4", *COMMON]
    crashed = run_launcher(run, small_demo, over, env={"ALIGN_PRO_KILL_AT_STEP": "3"})
    assert crashed.returncode != 0
    owner = json.loads((run / LOCK_NAME).read_text())
    resumed = run_launcher(run, small_demo, over)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"pid {owner['pid']} is gone" in resumed.stderr and "resumed from step 2" in resumed.stdout
    assert not (run / LOCK_NAME).exists()
