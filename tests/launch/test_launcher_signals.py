"""A SIGTERM or SIGINT to the `deepspeed` launcher reaches every rank: checkpoint, exit, nothing left behind.

DeepSpeed's runner passes no signal on to its `deepspeed.launcher.launch` child, which keeps the
ranks training as orphans; each rank watches the launcher processes above it
(pretrain/engine/launcher_watch.py). Ctrl-C in a terminal (SIGINT to the whole process group) also
ends with a checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from pretrain.engine.checkpoint_safety import verify_safe
from pretrain.engine.checkpoint_tags import checkpoint_problem
from pretrain.engine.run_lock import LOCK_NAME
from tests.conftest import REPO, cpu_env, free_port, launcher_cmd, run_launcher

pytestmark = pytest.mark.slow

# No scheduled checkpoint before step 1000: any checkpoint found was written by the stop.
COMMON = ["train.checkpoint_every=1000", "train.stage1_steps=1", "train.eval_at_end=false", "data.loader=local"]
GONE_WITHIN_S = 120  # finishing a step and saving takes seconds here; the bound is for a loaded 2-core machine


def _logged_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.parametrize(
    "sig, target",
    [
        (signal.SIGTERM, "launcher"),  # a scheduler or container runtime stopping the process it started
        (signal.SIGINT, "launcher"),
        (signal.SIGINT, "group"),  # Ctrl-C in a terminal
    ],
    ids=["SIGTERM-launcher", "SIGINT-launcher", "SIGINT-group"],
)
def test_a_signal_to_the_launcher_saves_a_checkpoint_and_leaves_no_process(tmp_path, small_demo, sig, target):
    run = tmp_path / "run"
    log = tmp_path / "launcher.log"
    cmd = launcher_cmd(
        ["--num_gpus", "2", "--master_port", str(free_port())], run, small_demo, ["train.max_steps=500", *COMMON]
    )
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=cpu_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.time() + 300
        while _logged_steps(run) < 2:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=0" in p.cmdline()]
        assert len(tree) >= 4, tree  # runner, launch.py, 2 ranks
        steps_before = _logged_steps(run)
        if target == "launcher":
            os.kill(proc.pid, sig)  # only the `deepspeed` process
        else:
            os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
        deadline = time.time() + GONE_WITHIN_S
        while _alive(tree) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(tree), f"still running {GONE_WITHIN_S} s after the signal: {_alive(tree)}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # orphans keep the launcher's process group
        except ProcessLookupError:
            pass
        proc.wait()
    text = log.read_text()
    assert "SIGTERM: checkpoint saved at step" in text, text[-3000:]
    if target == "launcher":
        # Who stops the ranks is a race: the rank's watch ("the deepspeed launcher ... is gone; stopping",
        # polled every second; its own test is tests/pretrain/engine/test_launcher_watch.py) or DeepSpeed's
        # launch.py noticing its parent's death first (seen in CI, 2026-12-06). Either way: saved, exit 0.
        assert text.count("exits successfully") == 2, text[-3000:]  # launch.py: both ranks exited 0
    tag = (run / "checkpoints" / "latest").read_text()
    step = int(tag.removeprefix("step"))
    assert steps_before <= step < 500
    assert (run / "checkpoints" / tag / "COMPLETE").is_file()
    assert not (run / LOCK_NAME).exists(), "the stopped run kept the run directory locked"
    assert ranks and not _alive([r.pid for r in ranks])
    # Whole as a resume checks it first (marker, every rank's file, every file at its written size),
    # and loadable without unpickling anything.
    assert checkpoint_problem(run / "checkpoints" / tag) is None
    verify_safe(run / "checkpoints" / tag)
    if (sig, target) != (signal.SIGTERM, "launcher"):
        # The stop writes its checkpoint through the same path whatever the signal, so one relaunch
        # (a launch costs tens of seconds on 2 cores) shows that a stop's checkpoint resumes; so does
        # test_resume.py's test_sigterm_saves_a_checkpoint_and_exits_zero.
        return

    again = run_launcher(run, small_demo, [f"train.max_steps={step + 2}", *COMMON])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {step}" in again.stdout
    assert (run / "checkpoints" / "latest").read_text() == f"step{step + 2:08d}"
