"""benchmarks/gpu_check.sh: unknown modes refused; its CPU dry run (bundle, rehearsal install, every command parsed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
DATA = REPO.parent / "shared" / "data"


def _run(args: list[str], tmp_path: Path, timeout: float = 60.0, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("args", [["nonsense"], ["train,nonsense"], ["--dry-run", "tset"]])
def test_an_unknown_mode_is_an_error(tmp_path, args):
    result = _run(args, tmp_path)
    assert result.returncode == 2
    assert "unknown mode" in result.stderr


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_gpu_run_kills_the_group_at_the_logged_step(tmp_path):
    """benchmarks/gpu_run.py: a process that logs steps is SIGKILLed (with its children) once the step shows."""
    metrics = tmp_path / "metrics.jsonl"
    child = (
        "import json, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"  # a rank of the launcher
        f"for s in range(1, 100):\n"
        f"    open({str(metrics)!r}, 'a').write(json.dumps({{'step': s, 'loss': 1.0}}) + '\\n'); time.sleep(0.2)\n"
    )
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_run.py"), "--timeout", "30", "--log", str(tmp_path / "log")]
    cmd += ["--metrics", str(metrics), "--kill-at-step", "3", "--poll", "0.1", "--", sys.executable, "-c", child]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SIGKILL at logged step 3" in result.stdout
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 3 <= max(steps) <= 5  # stopped right after step 3, not at the end
    # the launcher's child died with it: no sleeper left in that session
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "time.sleep(60)" not in ps


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "structures").is_dir(), reason="../shared/data absent: the shards are built from it")
def test_dry_run_builds_the_bundle_and_checks_every_command(tmp_path):
    """The whole dry run: bundle under 64 MiB, rehearsal install, tests collected, every launch's recipe and
    overrides loaded, the first train launch run CPU-sized through the DeepSpeed launcher and read back."""
    result = _run(["--dry-run", "all"], tmp_path, timeout=900, SIM_ENV=str(tmp_path / "sim"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "FAIL" not in summary
    assert "transfer: working tree" in summary and "PASS rehearsal environment imports deepspeed" in summary
    assert "launched on CPU, killed at step 3, report read (torch loss)" in summary
    assert "every launch's recipe + overrides" in summary
    assert 'carry=["build/gpu_bundle"]' in summary
    manifest = json.loads((REPO / "build" / "gpu_bundle" / "MANIFEST.json").read_text())
    assert manifest["total_bytes"] < 56 * 2**20
    assert any(name.startswith("wheels/deepspeed-") for name in manifest["files"])
