"""Soak: the demo recipe (tiny overrides) under faults injected at random steps.

One epoch is trained through the real launcher with Ray readers on a shard set holding a
truncated shard and four bad samples, in 8 steps of 24 samples per rank (the samples of 24 steps
of 8 in a third of the steps: each step and each checkpoint costs fixed time, and the faults only
need a run that is still going). While it runs, a reader actor process is SIGKILLed at a random
step, and a training rank is SIGKILLed at another random step (the launcher dies with it and is
relaunched with the same command, as a cluster scheduler would). The run must reach the same
final step with the same number of samples seen and the same bad-sample count as the fault-free
arithmetic says: nothing lost, nothing repeated. The figures are printed for RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import run_launcher
from tests.launch.test_bad_data import EPOCH_IN_BIG_BATCHES, _edit, _rewrite_tar

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("ALIGN_PRO_SOAK_SEED", "0"))  # change it to soak other fault steps
BATCH, STEPS = EPOCH_IN_BIG_BATCHES  # one epoch: 8 shards x 48 = 384 samples over 2 ranks
OVERRIDES = [
    f"data.batch_size={BATCH}",
    f"train.max_steps={STEPS}",
    "train.checkpoint_every=2",
    "train.stage1_steps=2",
    "train.eval_at_end=false",
    "data.max_bad_sample_ratio=0.2",
    "data.readers_per_rank=2",
]


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    rows = [json.loads(x) for x in path.read_text().splitlines() if x]
    return max((r["step"] for r in rows if "loss" in r), default=0)


def _processes(proc, needle: str) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if any(needle in part for part in p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _wait_for_step(proc, run_dir: Path, step: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if _last_step(run_dir) >= step:
            return True
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within the deadline")


def test_random_faults_lose_and_repeat_nothing(tmp_path, small_demo):
    shards = tmp_path / "shards"
    shutil.copytree(small_demo, shards)
    tars = sorted((shards / "train").glob("*.tar"))
    tars[3].write_bytes(tars[3].read_bytes()[:1000])  # unreadable shard
    _rewrite_tar(tars[5], _edit)  # four bad samples
    rng = random.Random(SEED)
    reader_kill_step = rng.randint(1, STEPS - 4)
    # at least 2 steps before the end (the run is still going when the kill lands); a kill before the
    # first checkpoint starts the run over, dropping the dead attempt's metrics lines
    rank_kill_step = rng.randint(reader_kill_step + 1, STEPS - 2)
    killed_rank = rng.randint(0, 1)
    run = tmp_path / "run"
    faults = []
    deadline = time.monotonic() + 900
    launches = 0
    while True:
        launches += 1
        assert launches <= 3, "the run did not finish after 2 relaunches"
        proc = run_launcher(run, shards, OVERRIDES, background=True)
        try:
            if not faults and _wait_for_step(proc, run, reader_kill_step, deadline):
                readers = _processes(proc, "ShardReaderActor")
                assert readers, "no reader actor process found"
                victim = rng.choice(readers)
                victim.send_signal(signal.SIGKILL)
                faults.append(f"reader actor pid {victim.pid} SIGKILLed at step {_last_step(run)}")
            if len(faults) == 1 and _wait_for_step(proc, run, rank_kill_step, deadline):
                ranks = [p for p in _processes(proc, "--local_rank=") if "pretrain.py" in " ".join(p.cmdline())]
                victim = next(p for p in ranks if f"--local_rank={killed_rank}" in p.cmdline())
                victim.send_signal(signal.SIGKILL)
                faults.append(f"rank {killed_rank} SIGKILLed at step {_last_step(run)}")
            out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        if proc.returncode == 0:
            break
        assert len(faults) == 2 and launches == 1, err[-4000:]  # only the injected rank kill may fail a launch
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # every step once, after the replay
    last = [r for r in rows if "loss" in r][-1]  # (validation lines carry val/* only)
    assert last["samples_seen"] == 384  # one epoch: 8 shards x 48
    assert last["bad_samples"] == 48 + 4  # the unreadable shard + the four bad samples, once each
    listed = [json.loads(x) for f in (run / "bad_samples").glob("rank_*.jsonl") for x in f.read_text().splitlines()]
    assert len(listed) == 52 and len({(b["shard"], b["key"]) for b in listed}) == 52
    print(
        json.dumps(
            {
                "soak_seed": SEED,
                "faults": faults + ["truncated shard", "4 bad samples"],
                "launches": launches,
                "final_step": steps[-1],
                "samples_seen": last["samples_seen"],
                "bad_samples": last["bad_samples"],
                "samples_lost": 384 - last["samples_seen"],
            }
        )
    )
