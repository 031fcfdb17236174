"""Which checkpoints of ``RUN/checkpoints`` are complete, and which one a resume takes.

A checkpoint directory counts only once it holds its ``COMPLETE`` marker (written last, by rank 0,
with at least ``step`` and ``world_size``); ``latest`` names the one to resume from and is trusted
only when it names a complete one. Needs no process group and no DeepSpeed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pretrain.engine.checkpoint_store import COMPLETE

log = logging.getLogger(__name__)

__all__ = ["COMPLETE", "complete_record", "complete_steps", "complete_tags", "latest_tag"]


def complete_record(tag_dir: Path) -> dict:
    """The ``COMPLETE`` marker of a checkpoint directory: at least ``step`` and ``world_size``."""
    return json.loads((Path(tag_dir) / COMPLETE).read_text())


def complete_steps(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [
        (complete_record(p)["step"], p.name) for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file()
    ]
    return sorted(found, key=lambda st: st[0])


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of complete checkpoints, oldest first (by their step)."""
    return [tag for _, tag in complete_steps(ckpt_dir)]


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names if that checkpoint is complete, else the newest complete one."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and tag == Path(tag).name and not tag.startswith(".") and (ckpt_dir / tag / COMPLETE).is_file():
            return tag
        log.warning("%s names %r, not a complete checkpoint in this directory; falling back", latest, tag)
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None
