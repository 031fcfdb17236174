"""launch/ray_job.py end to end on a local Ray: 2 Ray Train workers (gloo, ZeRO-3, Ray shard readers).

A worker killed mid-run (the ALIGN_PRO_KILL_AT_STEP testing aid) is restarted by FailureConfig from
the latest checkpoint and the run ends with the per-step losses of an uninterrupted
``launch/pretrain.py`` run; a deliberate stop (RunStopped) is not retried and exits 3.

``make test`` runs it in the serial Ray group (``tests/conftest.py``); run by hand beside other Ray
tests, under ``flock /tmp/align_pro_ray.lock``: a second Ray instance on the node can break the others.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_OVERRIDES, cpu_env

pytestmark = pytest.mark.slow

COMMON = ["train.checkpoint_every=2", "train.stage1_steps=1", "train.eval_at_end=false", "train.max_steps=5"]
TERMS = ["loss", "loss_seq_struct", "loss_seq_text", "loss_struct_text", "loss_intra_seq", "loss_intra_text"]


def _ray_job(run_dir, shards, overrides, env=None, timeout=540) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "launch" / "ray_job.py"),
        "--num-workers",
        "2",
        "--num-cpus",
        "4",
        "--max-failures",
        "2",
        "--config",
        "zero3.json",
        "--run-dir",
        str(run_dir),
    ]
    # Shard paths relative to the driver's directory: Ray Train starts workers elsewhere
    # (RAY_SESSION/artifacts/...), and they must still mean what the driver validated.
    for o in [f"data.train_shards={shards.name}/train", f"data.eval_shards={shards.name}/heldout"]:
        cmd += ["--set", o]
    for o in TINY_OVERRIDES + overrides:
        cmd += ["--set", o]
    return subprocess.run(
        cmd, cwd=shards.parent, env={**cpu_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r for r in rows if "loss" in r}


def test_killed_worker_restarts_from_the_checkpoint_with_the_uninterrupted_losses(tmp_path, small_demo, reference_run):
    ref = reference_run([*COMMON, "data.loader=local"])  # 2 launcher ranks (shared with test_resume's)

    run = tmp_path / "ray"
    job = _ray_job(run, small_demo, [*COMMON, "data.loader=ray"], env={"ALIGN_PRO_KILL_AT_STEP": "3"})
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-5000:]
    assert (run / ".fault_injected").read_text() == "3"  # rank 0's worker really died after step 3
    assert "resumed from step 2" in out  # the restarted group loaded checkpoint step2
    assert (run / "checkpoints" / "latest").read_text() == "step00000005"
    assert (run / "export" / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    assert (run / "ray_results").is_dir()

    want, got = _losses(ref), _losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        assert got[step]["samples_seen"] == want[step]["samples_seen"] == 16 * step
        for term in TERMS:
            assert got[step][term] == pytest.approx(want[step][term], rel=1e-6, abs=1e-6), (step, term)


def test_a_deliberate_stop_is_not_retried_and_exits_3(tmp_path, small_demo):
    shards = tmp_path / "shards"
    shutil.copytree(small_demo, shards)
    for shard in sorted((shards / "train").glob("*.tar"))[:4]:  # half the shards unreadable: bad samples at step 1
        shard.write_bytes(b"not a tar file")
    run = tmp_path / "ray"
    over = [*COMMON, "data.loader=ray", "data.max_bad_sample_ratio=0.01", "data.bad_ratio_min_samples=0"]
    job = _ray_job(run, shards, over)
    assert job.returncode == 3, (job.stdout + job.stderr)[-5000:]
    assert "align-pro: stopped:" in job.stderr and "unreadable" in job.stderr
    stopped = json.loads((run / "stopped.json").read_text())
    assert stopped["error"] == "RunStopped"
    assert sorted(_losses(run)) == [1]  # step 1 is logged, then the run stops
    assert not (run / "checkpoints" / "latest").exists()
