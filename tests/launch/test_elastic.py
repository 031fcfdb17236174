"""Elastic resume end to end: a run checkpointed by 2 ranks continues on 1, then on 2 again, through
DeepSpeed universal checkpoints, and no sample of the epoch is delivered twice (rule in
``pretrain/data/stream.py``)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_launcher

pytestmark = pytest.mark.slow

COMMON = [
    "train.checkpoint_every=3",
    "train.stage1_steps=1",
    "train.eval_at_end=false",
    "data.loader=local",
]
RECORD = {"ALIGN_PRO_RECORD_BATCHES": "1"}


def _metrics(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r for r in rows if "loss" in r}


def _consumed(run_dir):
    """Every batch each rank consumed (the testing aid's records), as (rank, record) pairs."""
    out = []
    for f in sorted((run_dir / "consumed").glob("rank_*.jsonl")):
        rank = int(f.stem.removeprefix("rank_"))
        out += [(rank, json.loads(x)) for x in f.read_text().splitlines() if x]
    return out


def test_two_ranks_then_one_then_two_continue_the_epoch_without_repeats(tmp_path, small_demo, reference_run):
    # Steps 1-3 on 2 ranks are the session's shared reference run of this recipe (test_multinode's
    # and test_two_pass_zero3's), recorded as RECORD does: continue a copy of it.
    run = tmp_path / "run"
    shutil.copytree(reference_run(["train.max_steps=3", *COMMON]), run)

    shrunk = run_launcher(run, small_demo, ["train.max_steps=6", *COMMON], ranks=1, env=RECORD)
    assert shrunk.returncode == 0, shrunk.stderr[-3000:]
    assert "resumed from step 3 (stage 2, epoch 0, 2 -> 1 ranks)" in shrunk.stdout
    assert (run / "checkpoints" / "step00000003_universal" / "UNIVERSAL_COMPLETE").is_file()

    grown = run_launcher(run, small_demo, ["train.max_steps=9", *COMMON], ranks=2, env=RECORD)
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert "resumed from step 6 (stage 2, epoch 0, 1 -> 2 ranks)" in grown.stdout

    metrics = _metrics(run)
    assert sorted(metrics) == list(range(1, 10))
    # samples_seen counts global batches: 3 steps x 2 ranks x 8, 3 x 1 x 8, 3 x 2 x 8
    assert [metrics[s]["samples_seen"] for s in (3, 6, 9)] == [48, 72, 120]
    assert all(metrics[s]["epoch"] == 0 for s in metrics)

    batches = _consumed(run)
    # which segment of epoch 0 each batch came from: the cursor history at its consumption
    segments = sorted({(rank, tuple(map(tuple, r["resized"])), r["batch"]) for rank, r in batches})
    assert segments == sorted(
        [
            *[(rank, (), b) for rank in (0, 1) for b in range(3)],
            *[(0, ((2, 3),), b) for b in range(3)],
            *[(rank, ((2, 3), (1, 3)), b) for rank in (0, 1) for b in range(3)],
        ]
    )
    ids = [i for _, r in batches for i in r["ids"]]
    assert len(ids) == 120 and all(ids)
    assert len(set(ids)) == len(ids), "a protein was trained on twice within the epoch"
    assert (run / "export" / "model.safetensors").is_file()
    # retention (keep 2) removed step3 and, with it, its universal conversion
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == [
        "step00000006",
        "step00000006_universal",
        "step00000009",
    ]
