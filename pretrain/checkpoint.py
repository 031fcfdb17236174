"""Sharded checkpoints with our client state, written so that a crash never corrupts one.

Layout (``RUN/checkpoints``)::

    <tag>/                 DeepSpeed's sharded files (every rank writes its partition)
    <tag>/rank_<r>.pt      this rank's data cursor and random generator states (tensors only)
    <tag>/COMPLETE         written by rank 0 after every rank finished writing
    latest                 the tag of the newest complete checkpoint, replaced atomically

A checkpoint without ``COMPLETE`` is never loaded; ``latest`` moves only after ``COMPLETE``
exists, so a kill at any moment leaves the previous checkpoint usable. Everything is read
back with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

With a ``remote`` location (``train.remote_dir``: an object-storage URL or a shared file system)
this directory is local staging: :mod:`pretrain.checkpoint_store` publishes each checkpoint there
after it is complete here, and resuming fetches the remote one first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, torch.Tensor]:
    """Every random generator the training loop uses (data randomness is keyed by cursor)."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of complete checkpoints, oldest first (by their step)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(tags, key=lambda t: json.loads((ckpt_dir / t / COMPLETE).read_text())["step"])


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names if that checkpoint is complete, else the newest complete one."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).is_file():
            return tag
        log.warning("%s names incomplete checkpoint %r; falling back", latest, tag)
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def _safe_globals() -> list:
    """The only non-tensor classes DeepSpeed puts in its checkpoint files."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, ZeroStageEnum]


def verify_safe(tag_dir: Path) -> None:
    """Refuse a checkpoint whose files need arbitrary unpickling.

    DeepSpeed's own loader calls ``torch.load(weights_only=False)``; every file is first read
    with ``weights_only=True`` and an allowlist of DeepSpeed's two state classes, so a crafted
    file carrying a pickle payload is rejected before DeepSpeed touches it.
    """
    with torch.serialization.safe_globals(_safe_globals()):
        for path in sorted(Path(tag_dir).glob("*.pt")):
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure means we must not unpickle it
                raise RuntimeError(f"refusing checkpoint file {path}: not loadable safely ({e})") from None


def save(
    engine, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, keep: int, remote: str | None = None
) -> str:
    """Write checkpoint ``step<N>`` on every rank, then publish it; returns the tag.

    Must be called on every rank (DeepSpeed's save is collective). With ``remote``, the complete
    local checkpoint is then uploaded there (see :mod:`pretrain.checkpoint_store`).
    """
    tag = f"step{step:08d}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    rank_file = ckpt_dir / tag / f"rank_{rank}.pt"
    tmp = rank_file.with_name(f".{rank_file.name}.tmp")
    torch.save(rank_state, tmp)
    os.replace(tmp, rank_file)
    _barrier()  # every rank's files are on disk
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        _atomic_write_text(ckpt_dir / tag / COMPLETE, json.dumps({"step": step, "world_size": world}))
        _atomic_write_text(ckpt_dir / "latest", tag)
        for old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    _barrier()
    if remote:
        from pretrain import checkpoint_store

        world = dist.get_world_size() if dist.is_initialized() else 1
        checkpoint_store.publish(ckpt_dir, remote, tag, {"step": step, "world_size": world}, keep, ckpt_dir.parent)
    return tag


def load(engine, ckpt_dir: Path, remote: str | None = None) -> tuple[dict, dict] | None:
    """Load the newest complete checkpoint into ``engine``; returns (client_state, rank_state).

    Returns None when there is nothing to resume from. Raises RuntimeError when the checkpoint
    was written by a different number of ranks (elastic resume is not wired in yet). With
    ``remote`` (collective then), the newest checkpoint published there is downloaded first and
    is the one loaded.
    """
    if remote:
        from pretrain import checkpoint_store

        # Nothing published yet (e.g. remote_dir added to a running job): the local staging decides.
        checkpoint_store.fetch(ckpt_dir, remote, ckpt_dir.parent)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    meta = json.loads((ckpt_dir / tag / COMPLETE).read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if meta["world_size"] != world:
        raise RuntimeError(
            f"checkpoint {ckpt_dir / tag} was written by {meta['world_size']} ranks, this run has {world}; "
            "resume with the same number of ranks"
        )
    verify_safe(ckpt_dir / tag)
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rank_state = torch.load(ckpt_dir / tag / f"rank_{rank}.pt", map_location="cpu", weights_only=True)
    return client_state, rank_state


def finished_step(ckpt_dir: Path, remote: str | None = None) -> int | None:
    """The step of the newest complete checkpoint (the remote one when ``remote`` is set), or None.

    Needs no process group.
    """
    if remote:
        from pretrain import checkpoint_store

        found = checkpoint_store.remote_latest(remote)
        if found:
            return int(found[1]["step"])
    tag = latest_tag(Path(ckpt_dir))
    if tag is None:
        return None
    return int(json.loads((Path(ckpt_dir) / tag / COMPLETE).read_text())["step"])
