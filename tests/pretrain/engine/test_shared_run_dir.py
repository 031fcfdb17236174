"""A multi-node run whose ranks do not share RUN (checkpoint.require_shared_run_dir, _whole_checkpoint).

Two spawned gloo ranks stand for two nodes; giving each its own directory is what a run on node-local
disks looks like. Without ``train.remote_dir`` such a run is refused at the start on every rank (its
checkpoints could never be resumed), and a resume where only some ranks see a checkpoint fails on every
rank with the reason instead of leaving them in mismatched collectives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.engine import checkpoint
from tests.spawn_ranks import run_ranks

TIMEOUT_S = 120


def _checkpoint(ckpt: Path, step: int) -> None:
    """A complete 2-rank checkpoint as checkpoint.save leaves it (files, sizes in COMPLETE, latest)."""
    tag = ckpt / f"step{step:08d}"
    tag.mkdir(parents=True)
    for r in range(2):
        (tag / f"rank_{r}.pt").write_bytes(b"x" * (10 + r))
    files = {f"rank_{r}.pt": 10 + r for r in range(2)}
    (tag / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 2, "files": files}))
    (ckpt / "latest").write_text(tag.name)


def _worker(rank: int, init_file: str, out: str, layout: str) -> None:
    from tests.spawn_ranks import gloo_rank

    def results() -> dict:
        import os

        os.environ["LOCAL_RANK"] = "0"  # each rank leads its own "node"
        shared = Path(out) / "run"
        own = Path(out) / f"node{rank}" / "run"
        got: dict = {}
        if layout == "probe":
            checkpoint.require_shared_run_dir(shared, None)  # one directory: passes
            got["probe_left"] = sorted(p.name for p in shared.iterdir())
            checkpoint.require_shared_run_dir(own, "s3://bucket/run")  # remote_dir set: no probe at all
            got["remote_probe"] = own.exists()
            try:
                checkpoint.require_shared_run_dir(own, None)
            except checkpoint.RunDirNotShared as e:
                got["error"] = str(e)
        else:
            ckpt = own / "checkpoints"
            _checkpoint(ckpt, 1)
            if rank == 0:
                _checkpoint(ckpt, 2)  # rank 0's node wrote step 2's marker; rank 1's never did
            got["tag"] = checkpoint._whole_checkpoint(ckpt)
            if rank == 1:  # a replaced node: nothing on its disk
                import shutil

                shutil.rmtree(ckpt)
            try:
                checkpoint._whole_checkpoint(ckpt)
            except checkpoint.CheckpointsUnusable as e:
                got["error"] = str(e)
        return got

    gloo_rank(rank, 2, init_file, out, results, timeout_s=60, stem=layout)


def _run(tmp_path: Path, layout: str) -> list[dict]:
    args = lambda r: (r, str(tmp_path / f"init-{layout}"), str(tmp_path), layout)  # noqa: E731
    return run_ranks(_worker, args, 2, tmp_path, TIMEOUT_S, layout)


def test_ranks_without_one_run_directory_are_refused_on_every_rank(tmp_path):
    r0, r1 = _run(tmp_path, "probe")
    assert r0["probe_left"] == r1["probe_left"] == []  # the probe file is removed again
    assert r0["remote_probe"] is r1["remote_probe"] is False
    for got in (r0, r1):
        assert "is not one shared directory for every rank: rank 1 on " in got["error"]
        assert "train.remote_dir" in got["error"]
    assert str(tmp_path / "node0" / "run") in r0["error"] and str(tmp_path / "node1" / "run") in r1["error"]


def test_ranks_agree_on_rank_0s_candidates_and_fail_together_when_some_see_none(tmp_path):
    r0, r1 = _run(tmp_path, "resume")
    # rank 0's newest (step 2) lacks its marker on rank 1, so both take step 1 and neither hangs
    assert r0["tag"] == r1["tag"] == "step00000001"
    for got in (r0, r1):
        assert got["error"].startswith("1 of 2 ranks see no checkpoint in ")
        assert "a shared file system, or train.remote_dir" in got["error"]


@pytest.mark.parametrize("remote", [None, "s3://bucket/run"])
def test_one_process_needs_no_shared_directory(tmp_path, remote):
    checkpoint.require_shared_run_dir(tmp_path / "run", remote)
    assert not (tmp_path / "run").exists()
