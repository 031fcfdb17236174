"""What training computes, pinned: the per-step losses of short demo runs against recorded values.

Every other training test compares two runs of today's code (a resume against an uninterrupted
run, two ranks against one, the two-pass step against the one-pass step), so a change that alters
what every run computes passes them all: a different masking draw, batch order, loss term,
learning-rate schedule, optimizer state or how batches are split across ranks. Each run here
(ZeRO-3, the tests' tiny sizes, the stage-1 -> stage-2 switch inside it: the demo recipe on one and
on two ranks, ProtCLIP's demo overlay on one) is compared
with the losses recorded in ``training_trajectories.json``, within float rounding (the tolerance
below; a reordered sum, SDPA against bmm + softmax, moves them by about 1e-6 over 30 steps).

A failure means training computes something else than when the file was recorded. When that is
intended, record it again and say why in the commit::

    ALIGN_PRO_RECORD_TRAJECTORY=1 .venv/bin/python -m pytest tests/pretrain/engine/test_training_trajectory.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.pretrain.engine.trainer_ranks import train_rank
from tests.spawn_ranks import run_ranks

pytestmark = pytest.mark.slow

RECORDED = Path(__file__).with_name("training_trajectories.json")
STEPS = 8
OVERRIDES = ["optim.warmup_steps=2", "train.stage1_steps=3", f"train.max_steps={STEPS}", "train.checkpoint_every=1000"]
PROTCLIP = "configs/recipes/ablations/demo_protclip.yaml"
CASES = {"demo": (None, 1), "demo_2ranks": (None, 2), "protclip": (PROTCLIP, 1)}  # name -> (recipe or demo, ranks)
RTOL, ATOL = 1e-4, 1e-5  # float rounding, far below what a change of computation moves


def _worker(rank: int, world: int, port: int, out: str, shards: str, run_dir: str, recipe: str | None) -> None:
    train_rank(rank, world, port, out, shards, run_dir, "zero3.json", OVERRIDES, recipe=recipe)


def _losses(run_dir: Path) -> dict[str, list[float]]:
    """{loss key: [value at step 1, 2, ...]} from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    keys = sorted(k for k in rows[0] if k.startswith("loss") and k != "loss_backend")
    return {k: [r[k] for r in rows] for k in keys}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_short_run_computes_the_recorded_losses(tmp_path, small_demo, name):
    recipe, world = CASES[name]
    run_dir, port = tmp_path / "run", free_port()
    args = (world, port, str(tmp_path), str(small_demo), str(run_dir), recipe and str(REPO / recipe))
    run_ranks(_worker, lambda r: (r, *args), world, tmp_path, 300.0, "rank")
    got = _losses(run_dir)  # rank 0's log: the step's loss over every rank's batch
    entry = {"recipe": recipe, "ranks": world, "overrides": OVERRIDES, "losses": got}
    if os.environ.get("ALIGN_PRO_RECORD_TRAJECTORY") == "1":  # xdist: record with -p no:xdist (one writer)
        all_runs = json.loads(RECORDED.read_text()) if RECORDED.is_file() else {}
        RECORDED.write_text(json.dumps({**all_runs, name: entry}, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(RECORDED.read_text())[name]
    same_setup = all(recorded.get(k) == entry[k] for k in ("recipe", "ranks", "overrides"))
    assert same_setup, "the file was recorded with another recipe or overrides: record it again"
    assert sorted(got) == sorted(recorded["losses"]), "the run logs other loss terms than were recorded"
    for key, want in recorded["losses"].items():
        assert len(got[key]) == len(want) == STEPS
        assert got[key] == pytest.approx(want, rel=RTOL, abs=ATOL), f"{name}: {key} differs from {RECORDED.name}"
