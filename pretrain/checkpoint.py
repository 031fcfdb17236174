"""Sharded checkpoints with our client state, written so that a crash never corrupts one.

Layout (``RUN/checkpoints``)::

    <tag>/                 DeepSpeed's sharded files (every rank writes its partition)
    <tag>/rank_<r>.pt      this rank's data cursor and random generator states (tensors only)
    <tag>/COMPLETE         written by rank 0 after every rank finished writing
    latest                 the tag of the newest complete checkpoint, replaced atomically

A checkpoint without ``COMPLETE`` is never loaded; ``latest`` moves only after ``COMPLETE``
exists, so a kill at any moment leaves the previous checkpoint usable. A write that fails on
any rank (disk full, I/O error) is caught on that rank, agreed on by all ranks, the partial
directory is removed and :class:`CheckpointWriteError` is raised everywhere; ``latest`` keeps
naming the previous checkpoint. Everything is read back with ``torch.load(weights_only=True)``
(no arbitrary unpickling).

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

from pretrain.errors import RunStopped

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"

# What a failed write raises: OSError (ENOSPC, EIO, EACCES ...) from open/write, RuntimeError
# from torch.save's zip writer ("PytorchStreamWriter failed writing file").
WRITE_ERRORS = (OSError, RuntimeError)


class CheckpointWriteError(RunStopped):
    """A checkpoint could not be written on some rank; the previous one is intact."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _describe_write_error(path, exc: BaseException) -> str:
    """``path: error (N MiB free)``: torch's zip writer hides ENOSPC behind 'unexpected pos'."""
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free on its file system"
    except OSError:
        free = "free space unknown"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{path}: {first_line} ({free})"


class _RecordWriteErrors:
    """Stands in for DeepSpeed's checkpoint engine during one save.

    Every file DeepSpeed writes goes through ``checkpoint_engine.save``. A write that fails is
    recorded here instead of raised, so that this rank still reaches DeepSpeed's collectives
    inside ``save_checkpoint`` (a rank raising half-way would leave the others waiting in a
    barrier forever); the caller then decides, together with the other ranks, what to do.
    """

    def __init__(self, inner):
        self.inner = inner
        self.errors: list[str] = []

    def save(self, state_dict, path):
        try:
            self.inner.save(state_dict, path)
        except WRITE_ERRORS as e:
            self.errors.append(_describe_write_error(path, e))

    def makedirs(self, path, exist_ok=False):
        try:
            self.inner.makedirs(path, exist_ok=exist_ok)
        except OSError as e:
            self.errors.append(f"{path}: {e}")

    def __getattr__(self, name):
        return getattr(self.inner, name)


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
        if tag and tag == Path(tag).name and not tag.startswith(".") and (ckpt_dir / tag / COMPLETE).is_file():
            return tag
        log.warning("%s names %r, not a complete checkpoint in this directory; falling back", latest, tag)
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def _safe_globals() -> list:
    """The only non-tensor classes DeepSpeed puts in its checkpoint files (plain data holders:
    the loss scaler, the ZeRO stage enum, ZeRO-1/2's (numel, start) fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


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

    Raises:
        CheckpointWriteError: on every rank, when any rank failed to write its files (disk
            full, I/O error); the partial checkpoint is removed and ``latest`` still names the
            previous one. Also when publishing to ``remote`` failed (the remote ``latest`` still
            names the previous checkpoint; the local one is complete).
    """
    tag = f"step{step:08d}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    recorder = _RecordWriteErrors(engine.checkpoint_engine)
    engine.checkpoint_engine = recorder
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine = recorder.inner
    errors = recorder.errors
    if not errors:
        rank_file = ckpt_dir / tag / f"rank_{rank}.pt"
        tmp = rank_file.with_name(f".{rank_file.name}.tmp")
        try:
            torch.save(rank_state, tmp)
            os.replace(tmp, rank_file)
        except WRITE_ERRORS as e:
            errors.append(_describe_write_error(rank_file, e))
    _fail_together(ckpt_dir, tag, errors, rank)  # every rank's files are on disk, or none count
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        try:
            _atomic_write_text(ckpt_dir / tag / COMPLETE, json.dumps({"step": step, "world_size": world}))
            _atomic_write_text(ckpt_dir / "latest", tag)
        except WRITE_ERRORS as e:
            errors.append(f"{ckpt_dir / tag}: publishing failed: {e}")
    _fail_together(ckpt_dir, tag, errors, rank)
    if rank == 0:
        for old in complete_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    _barrier()
    if remote:
        from pretrain import checkpoint_store

        world = dist.get_world_size() if dist.is_initialized() else 1
        try:
            checkpoint_store.publish(ckpt_dir, remote, tag, {"step": step, "world_size": world}, keep, ckpt_dir.parent)
        except RuntimeError as e:  # raised on every rank together; the remote `latest` did not move
            raise CheckpointWriteError(f"checkpoint {tag} is complete locally but not published: {e}") from None
    return tag


def _fail_together(ckpt_dir: Path, tag: str, errors: list[str], rank: int) -> None:
    """If any rank recorded a write error: remove the partial ``tag`` and raise on every rank."""
    if not _any_rank(bool(errors)):
        return
    for e in errors:
        log.error("checkpoint write failed on rank %d: %s", rank, e)
    _barrier()  # nobody is still writing into the directory
    if rank == 0:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        for tmp in ckpt_dir.glob(".latest.tmp*"):
            tmp.unlink(missing_ok=True)
    _barrier()
    previous = latest_tag(ckpt_dir)
    keeps = f"{ckpt_dir / 'latest'} still names {previous}" if previous else "no earlier checkpoint exists"
    detail = "; ".join(errors) if errors else "another rank failed to write its files"
    raise CheckpointWriteError(f"checkpoint {ckpt_dir / tag} was not saved ({detail}); {keeps}")


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
