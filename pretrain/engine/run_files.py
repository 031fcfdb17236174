"""Small files of a run directory the trainer keeps: bad-sample lists, JSONL truncation on resume, test
aids. The run's best checkpoint is recorded in ``RUN/best_checkpoint.json`` by
:mod:`pretrain.engine.best_checkpoint`, which also reads the ``RUN/best.json`` of older runs."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

from data_shards.storage import write_text
from pretrain.data.stream import UNREADABLE_SHARD
from pretrain.engine.logging_backends import iter_jsonl

log = logging.getLogger(__name__)

FAULT_ENV = "ALIGN_PRO_KILL_AT_STEP"
# TESTING / DEBUGGING AID: when set, every rank appends the protein ids of each batch it consumes,
# with the batch's cursor, to RUN/consumed/rank_<r>.jsonl (used to check the elastic-resume rule).
RECORD_ENV = "ALIGN_PRO_RECORD_BATCHES"


def maybe_inject_fault(step: int, rank: int, run_dir: Path) -> None:
    """TESTING AID: with ALIGN_PRO_KILL_AT_STEP=N, rank 0 SIGKILLs itself right after step N.

    Used by the crash/resume tests to simulate a worker dying at a known moment; it fires once
    per run directory (a marker file remembers it), so an automatic restart that replays step N
    survives. Never set it in real runs.
    """
    target = os.environ.get(FAULT_ENV)
    marker = run_dir / ".fault_injected"
    if target and rank == 0 and step == int(target) and not marker.exists():
        marker.write_text(str(step))
        os.kill(os.getpid(), signal.SIGKILL)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of ``path`` whose ``step`` is at most ``step`` (atomic rewrite)."""
    if not path.is_file():
        return
    kept = [line for line, row in iter_jsonl(path) if row.get("step", 0) <= step]  # a line cut by a crash goes
    write_text(path, "".join(line + "\n" for line in kept))


def append_bad_samples(path: Path, step: int, bad: list[dict], unreadable_seen: set[str]) -> None:
    """Log skipped samples and append them to ``path`` (``RUN/bad_samples/rank_<r>.jsonl``) with ``step``.

    Each ``bad`` entry holds ``shard``, ``key`` and ``reason``; the samples of a whole unreadable
    shard are listed but the shard is logged once (``unreadable_seen`` remembers it). A line that
    cannot be written (a full disk) is logged, never raised: the samples are still counted in
    ``metrics.jsonl``.
    """
    for b in bad:
        if b["reason"] != UNREADABLE_SHARD:
            log.warning("skipped bad sample: shard %s key %s: %s", b["shard"], b["key"], b["reason"])
        elif b["shard"] not in unreadable_seen:
            unreadable_seen.add(b["shard"])
            log.error("unreadable shard skipped: %s (all its samples are counted as bad)", b["shard"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write("".join(json.dumps({"step": step, **b}) + "\n" for b in bad))
    except OSError as e:
        log.error("cannot write %s (%s): %d bad-sample line(s) not listed there", path, e, len(bad))
