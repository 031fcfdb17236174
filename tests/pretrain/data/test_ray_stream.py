"""Ray reader actors that die mid-epoch are replaced; the epoch loses and repeats nothing."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from data_shards.reader import ShardReader
from pretrain.data.stream import Cursor, local_stream
from tests.conftest import free_port
from tests.pretrain.data.test_stream import VIEWS, _cfg, _plans

pytestmark = pytest.mark.slow


def _kill_process(pid: int) -> None:
    """SIGKILL an actor's worker process, the way the OOM killer or a lost node would."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"reader process {pid} survived SIGKILL")


def test_killed_readers_are_replaced_and_the_epoch_is_exact_by_ids(small_demo):
    ray = pytest.importorskip("ray")
    from pretrain.data.ray_stream import RayBatchStream

    cfg = _cfg(small_demo, "data.readers_per_rank=2", "data.prefetch_batches=3")
    plan = _plans(cfg, 2)[0]
    nb = plan.batches_per_epoch(0)
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=128 * 1024**2, _node_ip_address="127.0.0.1")
    try:
        stream = RayBatchStream(cfg, plan, Cursor(), VIEWS)
        it = iter(stream)
        got = [next(it) for _ in range(5)]
        _kill_process(ray.get(stream.pool.actors[0].pid.remote()))  # batches in flight on it are lost
        got += [next(it) for _ in range(7)]
        _kill_process(ray.get(stream.pool.actors[1].pid.remote()))
        got += [next(it) for _ in range(nb - len(got))]
        restarts = stream.pool.restarts
        stream.close()
    finally:
        ray.shutdown()
    assert restarts == 2
    assert got[-1][2] == Cursor(1, 0)  # exactly one epoch consumed

    ids = [i for batch, bad, _ in got for i in batch["ids"]]
    assert not any(bad for _, bad, _ in got)
    readers = {}
    want = []
    for b in range(nb):
        for path, idx in plan.batch_refs(0, b):
            readers.setdefault(path, ShardReader(path))
            want.append(readers[path].keys()[idx])
    assert len(ids) == len(set(ids)) == nb * cfg.data.batch_size  # none repeated
    assert ids == want  # none lost, same order as the plan

    local = list(itertools.islice(local_stream(cfg, plan, Cursor(), VIEWS), nb))
    assert [b["ids"] for b, _, _ in local] == [b["ids"] for b, _, _ in got]


def test_connect_ray_starts_a_new_instance_where_ray_start_left_an_address(monkeypatch):
    """Without RAY_ADDRESS the launcher's rank 0 starts its own Ray, even on a node where ``ray start``
    recorded a cluster (here one that is gone): a bare ``ray.init(num_cpus=...)`` would try to join
    that cluster and refuse to start."""
    ray = pytest.importorskip("ray")
    from pretrain.data.ray_stream import connect_ray

    temp = Path(tempfile.mkdtemp(prefix="ap-ray-"))  # short: Ray's socket paths have a length limit
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        monkeypatch.setenv("RAY_TMPDIR", str(temp))
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        assert connect_ray() == "started"
        assert ray.cluster_resources()["CPU"] >= 4  # the new instance, with our logical CPUs
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
