"""Crash-proof training: SIGKILL at a known step, SIGTERM (preemption), exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain.engine.export import export_step
from tests.conftest import REPO, cpu_env, launcher_cmd, run_launcher

pytestmark = pytest.mark.slow

COMMON = ["train.checkpoint_every=2", "train.stage1_steps=1", "train.eval_at_end=false", "data.loader=local"]
TERMS = ["loss", "loss_seq_struct", "loss_seq_text", "loss_struct_text", "loss_intra_seq", "loss_intra_text"]


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r for r in rows if "loss" in r}  # validation lines carry val/* only


def test_sigkill_then_relaunch_gives_the_uninterrupted_losses(tmp_path, small_demo, reference_run):
    over = ["train.max_steps=5", *COMMON]
    ref = reference_run(over)  # the uninterrupted run (shared with test_ray_job's and test_object_storage's)

    run = tmp_path / "crash"
    crashed = run_launcher(run, small_demo, over, env={"ALIGN_PRO_KILL_AT_STEP": "3"})
    assert crashed.returncode != 0
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    resumed = run_launcher(run, small_demo, over)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stdout

    want, got = _losses(ref), _losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        for term in TERMS:
            assert got[step][term] == pytest.approx(want[step][term], rel=1e-6, abs=1e-6), (step, term)


@pytest.mark.parametrize("export", ["missing", "of an earlier step"])
def test_a_run_killed_after_its_final_checkpoint_exports_on_relaunch(tmp_path, small_demo, reference_run, export):
    """Killed while exporting (after the last checkpoint): the relaunch has nothing to train but must
    still write the export, or the run could never finish (evaluation reads the export). The export
    left behind may also be an earlier, shorter run's (max_steps raised since): it does not count."""
    over = ["train.max_steps=5", *COMMON]
    run = tmp_path / "run"
    shutil.copytree(reference_run(over), run)
    assert export_step(run / "export") == 5
    final = load_file(str(run / "export" / "model.safetensors"))
    if export == "missing":
        shutil.rmtree(run / "export")
    else:
        stale = {name: tensor + 1.0 for name, tensor in final.items()}
        save_file(stale, str(run / "export" / "model.safetensors"), metadata={"format": "pt", "step": "2"})
    again = run_launcher(run, small_demo, over)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to train, exporting" in again.stdout
    assert export_step(run / "export") == 5
    exported = load_file(str(run / "export" / "model.safetensors"))
    assert all(torch.equal(exported[name], final[name]) for name in final)
    # And now the run reads as finished: through the DeepSpeed launcher and its 2 ranks once; the
    # other time from the launcher script alone, as that answer comes before any process group (a
    # launch costs tens of seconds on 2 cores).
    if export == "missing":
        again = run_launcher(run, small_demo, over)
    else:
        alone = [sys.executable, *launcher_cmd([], run, small_demo, over)[1:]]
        again = subprocess.run(alone, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already finished at step 5" in again.stdout, again.stderr[-3000:]


def test_a_resume_under_another_batch_size_is_refused(tmp_path, small_demo, reference_run):
    """The cursor counts batches: resumed with another data.batch_size it would skip or repeat samples."""
    over = ["train.max_steps=5", *COMMON]
    run = tmp_path / "run"
    shutil.copytree(reference_run(over), run)
    longer = ["train.max_steps=7", *COMMON, "data.batch_size=4"]
    refused = run_launcher(run, small_demo, longer)  # caught by prepare from RUN/config.yaml
    assert refused.returncode == 2 and "data.batch_size 8 -> 4" in refused.stderr, refused.stderr[-3000:]
    (run / "config.yaml").unlink()  # as on a fresh machine resuming from object storage: the checkpoint says it
    refused = run_launcher(run, small_demo, longer)
    assert refused.returncode == 2 and "step 5" in refused.stderr and "data.batch_size 8 -> 4" in refused.stderr
    assert refused.stderr.count("align-pro: error") == 1
    assert (run / "checkpoints" / "latest").read_text() == "step00000005"  # nothing was trained or saved


def test_a_resume_on_another_shard_set_is_refused_and_a_moved_copy_resumes(tmp_path, small_demo, reference_run):
    """The cursor indexes the run's shards: pointed at other shards (same layout, other content) a
    resume would train on unrelated samples; the same shards copied elsewhere are the same data."""
    from data_shards.demo_corpus import build_demo_corpus

    over = ["train.max_steps=5", *COMMON]
    run = tmp_path / "run"
    shutil.copytree(reference_run(over), run)
    other = tmp_path / "other"
    build_demo_corpus(other, num_train=384, num_heldout=96, samples_per_shard=48, seed=1)
    longer = ["train.max_steps=7", *COMMON]
    refused = run_launcher(run, other, longer)
    assert refused.returncode == 2 and "another shard set" in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.count("align-pro: error") == 1 and "Traceback" not in refused.stderr
    assert (run / "checkpoints" / "latest").read_text() == "step00000005"  # nothing was trained or saved
    moved = tmp_path / "moved"
    shutil.copytree(small_demo, moved)
    resumed = run_launcher(run, moved, longer)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 5" in resumed.stdout
    assert (run / "checkpoints" / "latest").read_text() == "step00000007"


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, small_demo):
    run = tmp_path / "run"
    proc = run_launcher(run, small_demo, ["train.max_steps=500", *COMMON], background=True)
    try:
        deadline = time.time() + 300
        metrics = run / "metrics.jsonl"
        while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.5)
        ranks = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if any(part.startswith("--local_rank=") for part in p.cmdline())
        ]
        assert len(ranks) == 2
        for p in ranks:  # a preemption notice reaches every process of the job
            os.kill(p.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: checkpoint saved at step" in out
    tag = (run / "checkpoints" / "latest").read_text()
    step = int(tag.removeprefix("step"))
    assert 3 <= step < 500
    assert (run / "checkpoints" / tag / "COMPLETE").is_file()
    again = run_launcher(run, small_demo, [f"train.max_steps={step + 1}", *COMMON])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {step}" in again.stdout
