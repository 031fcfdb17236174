"""Two DeepSpeed "nodes" on loopback train to the same losses as one node with two ranks.

Each node is its own ``deepspeed --hostfile H --no_ssh --node_rank r`` launcher (what a user runs
on every machine of a cluster without passwordless ssh), with 1 CPU rank, rendezvousing over
TCP on 127.0.0.1 with gloo. The nodes get separate run directories, as machines without a
shared disk would, and publish checkpoints to a shared location (``train.remote_dir``).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, cpu_env, free_port, launcher_cmd

pytestmark = pytest.mark.slow

COMMON = [
    "train.max_steps=3",
    "train.checkpoint_every=3",
    "train.stage1_steps=1",
    "train.eval_at_end=false",
    "data.loader=local",
]
TERMS = ["loss", "loss_seq_struct", "loss_seq_text", "loss_struct_text", "loss_intra_seq", "loss_intra_text"]


def _losses(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r for r in rows if "loss" in r}


def _node_cmd(hostfile: Path, node_rank: int, port: int, run_dir: Path, shards: Path, overrides: list[str]) -> list:
    node = ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank)]
    return launcher_cmd([*node, "--master_addr", "127.0.0.1", "--master_port", str(port)], run_dir, shards, overrides)


def test_two_nodes_match_one_node_with_two_ranks(tmp_path, small_demo, reference_run):
    one = reference_run(COMMON)  # one node, 2 ranks (shared with test_two_pass_zero3's one-pass run)

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only label the nodes with --no_ssh
    port, shared = free_port(), tmp_path / "shared_storage"
    over = [*COMMON, f"train.remote_dir={shared}"]
    procs = [
        subprocess.Popen(
            _node_cmd(hostfile, r, port, tmp_path / f"node{r}", small_demo, over),
            cwd=REPO,
            env=cpu_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    deadline, outs = time.monotonic() + 420, []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    assert "nnodes=2, num_local_procs=1, node_rank=1" in outs[1]  # node b ran the second rank

    want, got = _losses(one), _losses(tmp_path / "node0")
    assert sorted(got) == [1, 2, 3]
    for step in got:
        for term in TERMS:
            assert got[step][term] == pytest.approx(want[step][term], rel=1e-6, abs=1e-6), (step, term)
    # each node staged only its own rank's files; the shared copy has both and is complete
    tag = "step00000003"
    assert (tmp_path / "node0" / "checkpoints" / tag / "rank_0.pt").is_file()
    assert not (tmp_path / "node0" / "checkpoints" / tag / "rank_1.pt").exists()
    assert (tmp_path / "node1" / "checkpoints" / tag / "rank_1.pt").is_file()
    published = shared / "checkpoints" / tag
    assert {"rank_0.pt", "rank_1.pt", "COMPLETE"} <= {p.name for p in published.iterdir()}
    record = json.loads((published / "COMPLETE").read_text())  # both nodes' files, each at its size
    assert record["files"] == {p.name: p.stat().st_size for p in published.iterdir() if p.name != "COMPLETE"}
    assert (shared / "checkpoints" / "latest").read_text() == tag
