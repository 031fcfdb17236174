"""Corrupted shards in the middle of the stream, through the real launcher and Ray readers.

One shard is truncated (unreadable as a whole); another carries four bad samples: a backbone of
the wrong dtype, a sequence whose length disagrees with its structure, a text member that is not
JSON, and a sample carrying a pickle member. One full epoch is trained, so every bad sample is met
exactly once: training goes on, each is skipped, counted in metrics.jsonl and listed with its
shard and key; past ``data.max_bad_sample_ratio`` the run stops with a clear message.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_launcher

pytestmark = pytest.mark.slow

BATCHES_PER_EPOCH = 24  # 8 shards x 48 samples over 2 ranks, 8 per batch
# The epoch of test_corrupt_shards_are_skipped_counted_and_listed in 8 batches of 24 per rank: the
# same samples as 24 of 8, a third of the steps (each step costs fixed collective and logging time).
EPOCH_IN_BIG_BATCHES = (24, 8)  # data.batch_size, steps
BAD_KEYS = {
    "DEMO_TR_000242": "coords must be a float32 array",
    "DEMO_TR_000247": "differs from backbone length",
    "DEMO_TR_000251": "invalid JSON",
    "DEMO_TR_000260": "unexpected member 'DEMO_TR_000260.payload.pickle'",
}


def _rewrite_tar(path: Path, edit) -> None:
    """Rewrite ``path`` with ``edit(name, data) -> list[(name, data)]`` applied to each member."""
    with tarfile.open(path) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for name, data in members:
            for new_name, new_data in edit(name, data):
                info = tarfile.TarInfo(new_name)
                info.size = len(new_data)
                out.addfile(info, io.BytesIO(new_data))
    path.write_bytes(buf.getvalue())


def _float64_backbone(data: bytes) -> bytes:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["coords"] = arrays["coords"].astype(np.float64)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def _edit(name: str, data: bytes):
    key, ext = name.split(".", 1)
    if key == "DEMO_TR_000242" and ext == "backbone.npz":
        return [(name, _float64_backbone(data))]
    if key == "DEMO_TR_000247" and ext == "seq.txt":
        return [(name, data.strip()[:-3] + b"\n")]
    if key == "DEMO_TR_000251" and ext == "text.json":
        return [(name, data[: len(data) // 2])]
    if key == "DEMO_TR_000260" and ext == "meta.json":
        return [(name, data), (f"{key}.payload.pickle", pickle.dumps({"x": 1}))]
    return [(name, data)]


@pytest.fixture
def corrupt_demo(tmp_path, small_demo) -> Path:
    shards = tmp_path / "shards"
    shutil.copytree(small_demo, shards)
    tars = sorted((shards / "train").glob("*.tar"))
    truncated = tars[3]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    _rewrite_tar(tars[5], _edit)  # holds DEMO_TR_000240 ... 000287
    return shards


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def test_corrupt_shards_are_skipped_counted_and_listed(tmp_path, corrupt_demo):
    run = tmp_path / "run"
    batch, steps = EPOCH_IN_BIG_BATCHES
    over = [
        f"data.batch_size={batch}",
        f"train.max_steps={steps}",
        "train.checkpoint_every=100",
        "train.eval_at_end=false",
        "train.stage1_steps=2",
        "data.max_bad_sample_ratio=0.2",
    ]
    p = run_launcher(run, corrupt_demo, over)
    assert p.returncode == 0, p.stderr[-4000:]
    last = [r for r in _rows(run) if "loss" in r][-1]
    assert last["step"] == steps and last["samples_seen"] == 384
    assert last["bad_samples"] == 48 + len(BAD_KEYS)  # the truncated shard's 48 + the 4 bad ones
    listed = [
        json.loads(x) for f in sorted((run / "bad_samples").glob("rank_*.jsonl")) for x in f.read_text().splitlines()
    ]
    assert len(listed) == 48 + len(BAD_KEYS)
    unreadable = [b for b in listed if b["reason"] == "unreadable shard"]
    assert {b["shard"] for b in unreadable} == {str(corrupt_demo / "train" / "shard-000003.tar")}
    assert sorted(b["key"] for b in unreadable) == sorted(f"#{i}" for i in range(48))
    by_key = {b["key"]: b for b in listed if b["reason"] != "unreadable shard"}
    assert set(by_key) == set(BAD_KEYS)
    for key, needle in BAD_KEYS.items():
        assert by_key[key]["shard"].endswith("shard-000005.tar")
        assert needle in by_key[key]["reason"], by_key[key]
    assert p.stderr.count("unreadable shard skipped") == 1  # reported once, not per sample


def test_too_many_bad_samples_stop_the_run_with_a_clear_message(tmp_path, corrupt_demo):
    run = tmp_path / "run"
    over = [
        f"train.max_steps={BATCHES_PER_EPOCH}",
        "train.checkpoint_every=1",
        "train.eval_at_end=false",
        "data.loader=local",
        "data.max_bad_sample_ratio=0.05",
        "data.bad_ratio_min_samples=0",
    ]
    p = run_launcher(run, corrupt_demo, over)
    assert p.returncode == 3, p.stderr[-4000:]
    assert p.stderr.count("align-pro: stopped:") == 1
    assert "above data.max_bad_sample_ratio=0.05" in p.stderr
    assert "Traceback" not in p.stderr
    steps = [r["step"] for r in _rows(run) if "loss" in r]
    assert steps and steps[-1] < BATCHES_PER_EPOCH  # it stopped early, at the first bad batch
    ckpt = run / "checkpoints"
    if steps[-1] > 1:  # checkpoints of the good steps before it are complete and published
        assert (ckpt / (ckpt / "latest").read_text() / "COMPLETE").is_file()
