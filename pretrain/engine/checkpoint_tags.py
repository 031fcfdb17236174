"""Which checkpoints of ``RUN/checkpoints`` are complete, and which one a resume takes.

A checkpoint directory counts only once it holds its ``COMPLETE`` marker (written last, by rank 0,
with at least ``step`` and ``world_size``, and since 2026-12 the size of every file of the
checkpoint); ``latest`` names the one to resume from and is trusted only when it names a complete
one. A marker that does not parse counts as absent. :func:`checkpoint_problem` tells whether a
complete checkpoint is still whole (a file deleted or never synced since). Needs no process group
and no DeepSpeed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # the marker file, written last (locally and under train.remote_dir)

__all__ = [
    "COMPLETE",
    "checkpoint_problem",
    "complete_record",
    "complete_steps",
    "complete_tags",
    "file_sizes",
    "latest_tag",
    "newest_whole_tag",
]


class DamagedMarkerError(ValueError):
    """A ``COMPLETE`` marker that does not parse as a checkpoint record."""


def complete_record(tag_dir: Path) -> dict:
    """The ``COMPLETE`` marker of a checkpoint directory: at least ``step`` and ``world_size``.

    Raises:
        DamagedMarkerError: the marker is not JSON or lacks an integer ``step`` / ``world_size``.
    """
    path = Path(tag_dir) / COMPLETE
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise DamagedMarkerError(f"{path} is damaged ({e})") from None
    return parse_complete(text, str(path))


def parse_complete(text: str, where: str) -> dict:
    """A ``COMPLETE`` marker's text (local or fetched from ``train.remote_dir``) as its record.

    Raises:
        DamagedMarkerError: naming ``where``: not JSON, or no integer ``step`` / ``world_size``.
    """
    try:
        record = json.loads(text)
        if not isinstance(record, dict) or any(type(record.get(k)) is not int for k in ("step", "world_size")):
            raise ValueError("expected integer step and world_size")
    except ValueError as e:
        raise DamagedMarkerError(f"{where} is damaged ({e})") from None
    return record


def complete_steps(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first; a damaged marker is skipped (logged)."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        if p.is_dir() and (p / COMPLETE).is_file():
            try:
                found.append((complete_record(p)["step"], p.name))
            except DamagedMarkerError as e:
                log.warning("%s; that checkpoint is not used", e)
    return sorted(found, key=lambda st: st[0])


def file_sizes(tag_dir: Path) -> dict[str, int]:
    """Size of every file under a checkpoint directory, by path relative to it (for its marker)."""
    tag_dir = Path(tag_dir)
    return {
        p.relative_to(tag_dir).as_posix(): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }


def checkpoint_problem(tag_dir: Path) -> str | None:
    """Why a complete checkpoint can no longer be loaded, or None when it is whole.

    Checks its marker, every rank's ``rank_<r>.pt`` and, when the marker lists them, that every
    file DeepSpeed wrote is there with its size (a file deleted, truncated or never synced).
    """
    tag_dir = Path(tag_dir)
    try:
        record = complete_record(tag_dir)
    except (DamagedMarkerError, OSError) as e:
        return str(e)
    expected = dict(record.get("files") or {})
    for r in range(record["world_size"]):
        expected.setdefault(f"rank_{r}.pt", None)
    for name, size in sorted(expected.items()):
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
    return None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of complete checkpoints, oldest first (by their step)."""
    return [tag for _, tag in complete_steps(ckpt_dir)]


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names if that checkpoint is complete, else the newest complete one."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and tag == Path(tag).name and not tag.startswith(".") and tag in complete_tags(ckpt_dir):
            return tag
        log.warning("%s names %r, not a complete checkpoint in this directory; falling back", latest, tag)
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def newest_whole_tag(ckpt_dir: Path) -> str | None:
    """The checkpoint a resume loads, as this process sees it: ``latest`` when whole, else the newest
    whole one (no process group; ``checkpoint.load`` makes every rank agree)."""
    newest = latest_tag(ckpt_dir)
    if newest is None:
        return None
    for tag in [newest] + [t for t in reversed(complete_tags(ckpt_dir)) if t != newest]:
        if checkpoint_problem(ckpt_dir / tag) is None:
            return tag
    return None
