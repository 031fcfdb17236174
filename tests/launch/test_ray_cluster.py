"""The Ray Train job on a real two-node Ray cluster started with ``ray start`` on this machine.

A head (``ray start --head``) and a second node (``ray start --address``) run as separate
processes; ``launch/ray_job.py --address`` then runs 2 training workers spread over both nodes,
with their Ray reader actors, to the end. Both nodes share this machine, so they are both
registered under its address; nothing leaves it. Every Ray process is stopped through its own
``ray start --block`` process group (never ``ray stop``, which would hit other Ray instances).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_OVERRIDES, cpu_env, free_port

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")
WAIT_FOR_NODES = """
import os, sys, time, ray
ray.init(address=os.environ["ADDR"], log_to_driver=False)
deadline = time.time() + 120
while time.time() < deadline and sum(n["Alive"] for n in ray.nodes()) < 2:
    time.sleep(1)
readers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("reader_slot")]
print("READER_NODES", " ".join(readers))
sys.exit(0 if sum(n["Alive"] for n in ray.nodes()) >= 2 else 1)
"""


def _ray_env() -> dict:
    return {**cpu_env(), "RAY_AUTH_MODE": "token", "RAY_DEDUP_LOGS": "0", "PYTHONPATH": str(REPO)}


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM a node's process group, then SIGKILL it after ``grace_s``: on SIGTERM the head's
    ``ray start --block`` waits about 30 s for its idle workers before it exits (measured on the 2-core
    dev machine), time the serial Ray test unit would spend doing nothing. The group holds every process
    of the node (GCS, raylet, workers), so nothing outlives the kill."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def two_node_cluster():
    """(address, reader node id) of a head + one node that also offers reader slots, 2 logical CPUs each."""
    if not RAY.exists():
        pytest.skip("the ray command line is not installed")
    temp = Path(tempfile.mkdtemp(prefix="ap-ray-"))  # short: Ray's socket paths have a length limit
    port = free_port()
    common = ["--num-cpus", "2", "--object-store-memory", str(200 << 20), "--block", "--disable-usage-stats"]
    head_cmd = [str(RAY), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1"]
    head_cmd += ["--include-dashboard", "false", "--temp-dir", str(temp / "ray"), *common]
    procs = []
    try:
        procs.append(_spawn(head_cmd, temp / "head.log"))
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not (temp / "ray" / "session_latest").exists() and time.monotonic() < deadline:
            assert procs[0].poll() is None, (temp / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(2)
        node2 = [str(RAY), "start", "--address", address, "--resources", '{"reader_slot": 8}', *common]
        procs.append(_spawn(node2, temp / "node2.log"))
        wait = subprocess.run(
            [sys.executable, "-c", WAIT_FOR_NODES],
            env={**_ray_env(), "ADDR": address},
            timeout=180,
            cwd=temp,
            capture_output=True,
            text=True,
        )
        assert wait.returncode == 0, (temp / "node2.log").read_text()[-3000:]
        (reader_node,) = re.findall(r"READER_NODES (\S+)", wait.stdout)
        yield address, reader_node
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=_ray_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def test_ray_job_runs_across_a_two_node_cluster(tmp_path, small_demo, two_node_cluster):
    address, reader_node = two_node_cluster
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "launch" / "ray_job.py"),
        "--address",
        address,
        "--num-workers",
        "2",
        "--placement-strategy",
        "SPREAD",
        "--max-failures",
        "0",
        "--run-dir",
        str(run_dir),
    ]
    overrides = [
        f"data.train_shards={small_demo / 'train'}",
        f"data.eval_shards={small_demo / 'heldout'}",
        *TINY_OVERRIDES,
        "train.max_steps=3",
        "train.checkpoint_every=3",
        "train.stage1_steps=1",
        "train.eval_at_end=false",
        "data.loader=ray",
        "data.reader_resource=reader_slot",  # readers only where the slots are: the second node
    ]
    for o in overrides:
        cmd += ["--set", o]
    job = subprocess.run(cmd, cwd=REPO, env=_ray_env(), capture_output=True, text=True, timeout=480)
    out = re.sub(r"\x1b\[[0-9;]*m", "", job.stdout + job.stderr)  # Ray colours its worker prefixes
    assert job.returncode == 0, out[-4000:]
    nodes = set(re.findall(r"align-pro: rank \d of 2 on Ray node ([0-9a-f]+)", out))
    assert len(nodes) == 2, out[-4000:]  # one training worker on each node
    # Both nodes share this machine's log directory, so each line may reach the driver twice.
    readers = set(re.findall(r"pid=(\d+)[^)]*\) align-pro: reader actor on Ray node ([0-9a-f]+)", out))
    assert len(readers) == 2, out[-4000:]  # one reader actor per rank
    assert {node for _, node in readers} == {reader_node}, out[-4000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000003"
    assert (run_dir / "export" / "model.safetensors").is_file()
