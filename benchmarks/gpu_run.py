"""Run one training launch of the GPU check with a hard time limit, optionally SIGKILLed at a logged step.

The command runs in a session of its own, its output appended to ``--log``. It ends one of three ways:

- the run directory's ``metrics.jsonl`` logs a training line (one with ``loss``) at step
  ``--kill-at-step`` or later: the whole process group (launcher and ranks) is SIGKILLed at once, as a
  crashed node would be (no checkpoint or export is written on the way out); exit 0;
- the command exits by itself: its exit code (a run that stops before ``--kill-at-step`` is an error, 1);
- ``--timeout`` seconds pass: the group is SIGKILLed; exit 124.

    python benchmarks/gpu_run.py --timeout 300 --metrics RUN/metrics.jsonl --kill-at-step 6 --log OUT/x.log \\
        -- deepspeed --num_gpus 1 launch/pretrain.py --config zero2.json --run-dir RUN ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def last_logged_step(metrics: Path) -> int:
    """The highest step of a training line (with ``loss``) in ``metrics`` (0 when none); half-written lines skipped."""
    if not metrics.is_file():
        return 0
    step = 0
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "loss" in row and isinstance(row.get("step"), int):
            step = max(step, row["step"])
    return step


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(cmd: list[str], timeout: float, log: Path, metrics: Path | None, kill_at: int | None, poll: float) -> int:
    """Run ``cmd`` as the module docstring says; returns the exit code to report."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            try:
                code = proc.wait(timeout=poll)
            except subprocess.TimeoutExpired:
                code = None
            if kill_at is not None and metrics is not None and last_logged_step(metrics) >= kill_at:
                _kill_group(proc)
                step, secs = last_logged_step(metrics), time.monotonic() - start
                msg = f"gpu_run: SIGKILL at logged step {step} after {secs:.0f} s"
                print(msg, flush=True)
                out.write(f"{msg}\n".encode())
                return 0
            if code is not None:
                if kill_at is not None:
                    step = last_logged_step(metrics) if metrics is not None else 0
                    print(f"gpu_run: exited {code} at logged step {step} before step {kill_at}", flush=True)
                    return code or 1
                return code
            if time.monotonic() - start > timeout:
                _kill_group(proc)
                print(f"gpu_run: timed out after {timeout:.0f} s; process group killed", flush=True)
                return 124


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, required=True, help="seconds before the process group is killed")
    p.add_argument("--log", type=Path, required=True, help="the command's stdout and stderr are appended here")
    p.add_argument("--metrics", type=Path, default=None, help="the run's metrics.jsonl (with --kill-at-step)")
    p.add_argument("--kill-at-step", type=int, default=None, help="SIGKILL the group once this step is logged")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between checks")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("no command given (put it after --)")
    if (args.kill_at_step is None) != (args.metrics is None):
        p.error("--kill-at-step and --metrics go together")
    return run(cmd, args.timeout, args.log, args.metrics, args.kill_at_step, args.poll)


if __name__ == "__main__":
    sys.exit(main())
