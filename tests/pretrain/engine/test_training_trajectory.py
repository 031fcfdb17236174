"""What one training run computes, pinned: the per-step losses of a short demo run against recorded values.

Every other training test compares two runs of today's code (a resume against an uninterrupted
run, two ranks against one, the two-pass step against the one-pass step), so a change that alters
what every run computes passes them all: a different masking draw, batch order, loss term,
learning-rate schedule or optimizer state. This run (one rank, ZeRO-3, the demo recipe at the
tests' tiny sizes, the stage-1 -> stage-2 switch inside it) is compared with the losses recorded in
``demo_trajectory.json``, within float rounding (the tolerance below; a reordered sum, SDPA against
bmm + softmax, moves them by about 1e-6 over 30 steps).

A failure means training computes something else than when the file was recorded. When that is
intended, record it again and say why in the commit::

    ALIGN_PRO_RECORD_TRAJECTORY=1 .venv/bin/python -m pytest tests/pretrain/engine/test_training_trajectory.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.pretrain.engine.trainer_ranks import train_rank
from tests.spawn_ranks import run_ranks

pytestmark = pytest.mark.slow

RECORDED = Path(__file__).with_name("demo_trajectory.json")
OVERRIDES = ["optim.warmup_steps=2", "train.stage1_steps=3", "train.max_steps=8", "train.checkpoint_every=1000"]
RTOL, ATOL = 1e-4, 1e-5  # float rounding, far below what a change of computation moves


def _worker(rank: int, port: int, out: str, shards: str, run_dir: str) -> None:
    train_rank(rank, 1, port, out, shards, run_dir, "zero3.json", OVERRIDES)


def _losses(run_dir: Path) -> dict[str, list[float]]:
    """{loss key: [value at step 1, 2, ...]} from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    keys = sorted(k for k in rows[0] if k.startswith("loss") and k != "loss_backend")
    return {k: [r[k] for r in rows] for k in keys}


def test_a_short_demo_run_computes_the_recorded_losses(tmp_path, small_demo):
    run_dir = tmp_path / "run"
    args = (0, free_port(), str(tmp_path), str(small_demo), str(run_dir))
    run_ranks(_worker, lambda r: args, 1, tmp_path, 300.0, "rank")
    got = _losses(run_dir)
    if os.environ.get("ALIGN_PRO_RECORD_TRAJECTORY") == "1":
        RECORDED.write_text(json.dumps({"overrides": OVERRIDES, "losses": got}, indent=1) + "\n")
    recorded = json.loads(RECORDED.read_text())
    assert recorded["overrides"] == OVERRIDES, "the file was recorded with other overrides: record it again"
    assert sorted(got) == sorted(recorded["losses"]), "the run logs other loss terms than were recorded"
    for key, want in recorded["losses"].items():
        assert len(got[key]) == len(want) == 8
        assert got[key] == pytest.approx(want, rel=RTOL, abs=ATOL), f"{key} differs from {RECORDED.name}"
