"""Sharded checkpoints with our client state, written so that a crash never corrupts one.

Layout (``RUN/checkpoints``)::

    <tag>/                 DeepSpeed's sharded files (every rank writes its partition)
    <tag>/rank_<r>.pt      this rank's data cursor and random generator states (tensors only)
    <tag>/COMPLETE         written by rank 0 after every rank finished writing
    latest                 the tag of the newest complete checkpoint, replaced atomically
    <tag>_universal/       DeepSpeed universal form of <tag>, made on the first resume on another
                           number of ranks (:mod:`pretrain.engine.checkpoint_universal`)

With ``eval.select_metric`` set, the checkpoint that scored best on validation is pinned in
``RUN/best_checkpoint.json`` and retention never removes it (:mod:`pretrain.engine.best_checkpoint`).

A checkpoint without ``COMPLETE`` is never loaded; ``latest`` moves only after ``COMPLETE``
exists, so a kill at any moment leaves the previous checkpoint usable. A write that fails on
any rank (disk full, I/O error) is caught on that rank, agreed on by all ranks, the partial
directory is removed and :class:`CheckpointWriteError` is raised everywhere; ``latest`` keeps
naming the previous checkpoint. Everything is read back with ``torch.load(weights_only=True)``
(no arbitrary unpickling).

With a ``remote`` location (``train.remote_dir``: an object-storage URL or a shared file system)
this directory is local staging: :mod:`pretrain.engine.checkpoint_store` publishes each checkpoint there
after it is complete here, and resuming fetches the remote one first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from data_shards.storage import write_text
from pretrain.engine import best_checkpoint, checkpoint_store
from pretrain.engine.checkpoint_safety import verify_safe, weights_only_loads
from pretrain.engine.checkpoint_store import retired_tags
from pretrain.engine.checkpoint_tags import (
    COMPLETE,
    checkpoint_problem,
    complete_record,
    complete_steps,
    complete_tags,
    file_sizes,
    latest_tag,
)
from pretrain.engine.checkpoint_universal import UNIVERSAL_SUFFIX, convert_tag, remove_orphan_conversions
from pretrain.engine.collectives import all_reduce_numbers, barrier, gather_objects, rank_and_world
from pretrain.errors import ConfigError, RunStopped

log = logging.getLogger(__name__)


# What a failed write raises: OSError (ENOSPC, EIO, EACCES ...) from open/write, RuntimeError
# from torch.save's zip writer ("PytorchStreamWriter failed writing file").
WRITE_ERRORS = (OSError, RuntimeError)


class CheckpointWriteError(RunStopped):
    """A checkpoint could not be written on some rank; the previous one is intact."""


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (collective)."""
    return bool(all_reduce_numbers([int(flag)], op="max", dtype=torch.long)[0])


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


@contextlib.contextmanager
def _recording_write_errors(engine):
    """Inside the block, every file ``engine.save_checkpoint`` writes records its failure instead of raising.

    Yields the list of error descriptions. Besides the checkpoint engine (the sharded states),
    rank 0's DeepSpeed engine copies its recovery scripts (``zero_to_fp32.py``, ...) into the
    checkpoint directory with ``shutil.copyfile``, outside the checkpoint engine and over the
    previous save's copies: on a full disk that copy is what fails. Here the copy goes to a
    temporary directory first and is renamed into place, so a failure is recorded and leaves the
    previous scripts whole.
    """
    recorder = _RecordWriteErrors(engine.checkpoint_engine)
    engine.checkpoint_engine = recorder
    copy_scripts = getattr(engine, "_copy_recovery_script", None)
    if copy_scripts is not None:

        def copy_scripts_atomically(save_path: str) -> None:
            tmp = Path(save_path) / f".recovery_scripts.tmp{os.getpid()}"
            try:
                tmp.mkdir(exist_ok=True)
                copy_scripts(str(tmp))
                for script in tmp.iterdir():
                    os.replace(script, Path(save_path) / script.name)
            except OSError as e:
                recorder.errors.append(_describe_write_error(Path(save_path) / "zero_to_fp32.py", e))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        engine._copy_recovery_script = copy_scripts_atomically
    try:
        yield recorder.errors
    finally:
        engine.checkpoint_engine = recorder.inner
        if copy_scripts is not None:
            del engine._copy_recovery_script  # the class's method again


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


def save(
    engine, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, keep: int, remote: str | None = None
) -> str:
    """Write checkpoint ``step<N>`` on every rank, then publish it; returns the tag.

    Must be called on every rank (DeepSpeed's save is collective). With ``remote``, the complete
    local checkpoint is then uploaded there (see :mod:`pretrain.engine.checkpoint_store`).

    Raises:
        CheckpointWriteError: on every rank, when any rank failed to write its files (disk
            full, I/O error); the partial checkpoint is removed and ``latest`` still names the
            previous one. Also when publishing to ``remote`` failed (the remote ``latest`` still
            names the previous checkpoint; the local one is complete).
    """
    tag = f"step{step:08d}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with _recording_write_errors(engine) as errors:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
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
            record = {"step": step, "world_size": world, "files": file_sizes(ckpt_dir / tag)}
            write_text(ckpt_dir / tag / COMPLETE, json.dumps(record))
            write_text(ckpt_dir / "latest", tag)
        except WRITE_ERRORS as e:
            errors.append(f"{ckpt_dir / tag}: publishing failed: {e}")
    _fail_together(ckpt_dir, tag, errors, rank)
    pinned = [None]
    if rank == 0:
        pinned = [_pin_best(ckpt_dir, engine, step, tag)]
        for old in retired_tags(complete_steps(ckpt_dir), step, keep):
            if old == pinned[0]:
                continue  # the best checkpoint by eval.select_metric outlives retention
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
            shutil.rmtree(ckpt_dir / f"{old}{UNIVERSAL_SUFFIX}", ignore_errors=True)  # its elastic-resume form
    barrier()
    if remote:
        world = dist.get_world_size() if dist.is_initialized() else 1
        if dist.is_initialized():
            dist.broadcast_object_list(pinned, src=0)  # rank 0 prunes the remote copy
        try:
            checkpoint_store.publish(
                ckpt_dir, remote, tag, {"step": step, "world_size": world}, keep, ckpt_dir.parent, pinned=pinned[0]
            )
        except RuntimeError as e:  # raised on every rank together; the remote `latest` did not move
            raise CheckpointWriteError(f"checkpoint {tag} is complete locally but not published: {e}") from None
    return tag


def _pin_best(ckpt_dir: Path, engine, step: int, tag: str) -> str | None:
    """Rank 0: pin ``tag`` as the best checkpoint when the last validation scored its weights best
    (:func:`best_checkpoint.promote`); returns the pinned tag retention keeps. A failure to write
    ``RUN/best_checkpoint.json`` is logged, not raised (the checkpoint itself is complete)."""
    try:
        best = best_checkpoint.promote(ckpt_dir.parent, engine, step, tag)
    except OSError as e:
        log.error("could not record the best checkpoint in %s: %s", ckpt_dir.parent / best_checkpoint.FILE, e)
        return best_checkpoint.pinned_tag(ckpt_dir.parent, step)
    return best["tag"] if best is not None else None


def _fail_together(ckpt_dir: Path, tag: str, errors: list[str], rank: int) -> None:
    """If any rank recorded a write error: remove the partial ``tag`` and raise on every rank."""
    if not _any_rank(bool(errors)):
        return
    for e in errors:
        log.error("checkpoint write failed on rank %d: %s", rank, e)
    barrier()  # nobody is still writing into the directory
    if rank == 0:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        for tmp in ckpt_dir.glob(".latest.tmp*"):
            tmp.unlink(missing_ok=True)
    barrier()
    previous = latest_tag(ckpt_dir)
    keeps = f"{ckpt_dir / 'latest'} still names {previous}" if previous else "no earlier checkpoint exists"
    detail = "; ".join(errors) if errors else "another rank failed to write its files"
    raise CheckpointWriteError(f"checkpoint {ckpt_dir / tag} was not saved ({detail}); {keeps}")


def _param_group_names(engine) -> list:
    return [g.get("name") for g in engine.optimizer.param_groups] if engine.optimizer is not None else []


class CheckpointsUnusable(ConfigError):
    """Every complete checkpoint of a run lost a file or its marker: resuming would lose the run's
    state, starting over would silently discard it (the launchers exit 2 with the message)."""


class RunDirNotShared(ConfigError):
    """Ranks of a multi-node run do not share ``RUN`` and no ``train.remote_dir`` is set: each node's
    checkpoint files would stay on its own disk, rank 0's ``COMPLETE`` would list only its node's,
    and the run could never resume (the launchers exit 2 with the message)."""


SHARED_PROBE_TRIES = 5  # one-second looks for rank 0's probe file (NFS attribute caches lag a little)


def require_shared_run_dir(run_dir: Path, remote: str | None) -> None:
    """Collective, before training on several ranks: every rank must see the files rank 0 writes
    under ``run_dir`` (one shared file system), unless ``remote`` (``train.remote_dir``) is where
    checkpoints go. Rank 0 writes a probe file with a fresh name; every rank looks for it.

    Raises:
        RunDirNotShared: on every rank, naming the ranks (and hosts) that do not see it.
    """
    import socket
    import time
    import uuid

    rank, world = rank_and_world()
    if world == 1 or remote:
        return
    probe = Path(run_dir) / gather_objects(f".shared-probe-{uuid.uuid4().hex}" if rank == 0 else None)[0]
    if rank == 0:
        write_text(probe, "written by rank 0 at start: every rank of the run must see this file\n")
    barrier()
    seen = False
    for attempt in range(SHARED_PROBE_TRIES):
        seen = probe.is_file()
        if seen:
            break
        time.sleep(1.0 if attempt + 1 < SHARED_PROBE_TRIES else 0.0)
    views = gather_objects((seen, socket.gethostname()))  # every rank has looked
    if rank == 0:
        probe.unlink(missing_ok=True)
    barrier()  # no rank goes on while the probe is still there
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise RunDirNotShared(
            f"{run_dir} is not one shared directory for every rank: {', '.join(blind)} cannot see the file rank 0 "
            f"wrote there (on {views[0][1]}). Each node's checkpoint files would stay on its own disk and the run "
            "could not resume: put the run directory on a shared file system, or set train.remote_dir (an "
            "object-storage URL or a shared path) so that checkpoints are published there"
        )


def _whole_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint that is still whole on every rank (collective), starting at
    ``latest`` as rank 0 sees it; a damaged one is logged and the previous one taken. None when no
    rank sees any checkpoint.

    Raises:
        CheckpointsUnusable: complete checkpoints exist but none is whole, or some ranks see
            checkpoints and others none (a node's disk replaced under a run without a shared one).
    """
    newest = latest_tag(ckpt_dir)
    seeing = all_reduce_numbers([int(newest is not None)], dtype=torch.long)[0]
    if seeing == 0:
        return None
    world = rank_and_world()[1]
    if seeing < world:
        raise CheckpointsUnusable(
            f"{world - seeing} of {world} ranks see no checkpoint in {ckpt_dir} while the others do; resume "
            "needs every rank to read the same checkpoint directory (a shared file system, or train.remote_dir)"
        )
    # Rank 0's list for everyone: the loop below is collective, so every rank must try the same tags.
    candidates = gather_objects([newest] + [t for t in reversed(complete_tags(ckpt_dir)) if t != newest])[0]
    problems = []
    for tag in candidates:
        problem = checkpoint_problem(ckpt_dir / tag)
        if not _any_rank(problem is not None):
            if problems:
                log.warning("resuming from %s instead: %s", ckpt_dir / tag, "; ".join(problems))
            return tag
        problems.append(problem or f"{ckpt_dir / tag} is incomplete on another rank")
        log.error("checkpoint %s cannot be resumed: %s", ckpt_dir / tag, problems[-1])
    raise CheckpointsUnusable(
        f"no checkpoint in {ckpt_dir} is whole ({'; '.join(problems)}); restore the missing files, or move "
        f"{ckpt_dir} away to train from the start"
    )


def load(engine, ckpt_dir: Path) -> tuple[dict, dict] | None:
    """Load the newest complete checkpoint into ``engine``; returns (client_state, rank_state).

    Returns None when there is nothing to resume from (collective when a process group exists).

    Same number of ranks: ``rank_state`` is this rank's ``rank_<r>.pt`` (cursor, RNG states).

    Another number of ranks (elastic resume): with ZeRO 1-3 the optimizer partitions no longer
    match, so rank 0 converts the checkpoint with DeepSpeed's ``ds_to_universal`` into
    ``<tag>_universal`` (once; atomically), every rank waits for it and loads it; the engine
    must have been built with :func:`universal_config`. ZeRO 0 keeps whole copies and loads as
    usual. ``rank_state`` then carries ``cursors``, every old rank's cursor in rank order (the
    data position is remapped from them, see ``EpochPlan.resume_cursor``), and the RNG states
    of old rank ``r mod old_world``. ``client_state["world_size"]`` is the old world size.

    Every file is checked loadable with ``weights_only=True`` first (:func:`verify_safe`): the
    original checkpoint before conversion, the converted one before DeepSpeed reads it.

    Resuming from object storage: ``checkpoint_store.fetch`` first brings the published checkpoint
    into ``ckpt_dir``.
    """
    tag = _whole_checkpoint(ckpt_dir)
    if tag is None:
        return None
    meta = complete_record(ckpt_dir / tag)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    saved_world = int(meta["world_size"])
    verify_safe(ckpt_dir / tag)
    load_tag = tag
    names = _param_group_names(engine)
    if saved_world != world and engine.zero_optimization():
        if not engine.load_universal_checkpoint():
            raise RuntimeError(
                f"checkpoint {ckpt_dir / tag} was written by {saved_world} ranks, this run has {world}: build the "
                "engine with checkpoint_universal.engine_config(...) to resume through a universal checkpoint"
            )
        error = ""
        if rank == 0:
            try:
                remove_orphan_conversions(ckpt_dir)
                convert_tag(ckpt_dir, tag)
            except Exception as e:  # noqa: BLE001 - reported on every rank below, never left hanging
                error = f"{type(e).__name__}: {e}"
                log.exception("universal conversion of %s failed", ckpt_dir / tag)
        if _any_rank(bool(error)):
            raise RuntimeError(
                f"could not convert {ckpt_dir / tag} ({saved_world} ranks) to a universal checkpoint for "
                f"{world} ranks: {error or 'see rank 0'}; relaunch with {saved_world} ranks to resume as it is"
            )
        load_tag = f"{tag}{UNIVERSAL_SUFFIX}"
        verify_safe(ckpt_dir / load_tag, recursive=True)
        log.info("elastic resume: %d -> %d ranks through %s", saved_world, world, ckpt_dir / load_tag)
    with weights_only_loads():
        _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=load_tag, load_lr_scheduler_states=False)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / load_tag}")
    if names and _param_group_names(engine) != names:
        # ZeRO-3's universal load copies group 0's hyper-parameters (its "name" included) into
        # every group (deepspeed 0.19.8); the trainer tells encoder groups by their name.
        for g, name in zip(engine.optimizer.param_groups, names):
            g["name"] = name
    if saved_world == world:
        rank_state = torch.load(ckpt_dir / tag / f"rank_{rank}.pt", map_location="cpu", weights_only=True)
        return client_state, rank_state
    saved = [
        torch.load(ckpt_dir / tag / f"rank_{r}.pt", map_location="cpu", weights_only=True) for r in range(saved_world)
    ]
    rank_state = {
        "cursor": saved[rank % saved_world]["cursor"],
        "cursors": [s["cursor"] for s in saved],
        "rng": saved[rank % saved_world]["rng"],
    }
    return {**client_state, "world_size": saved_world}, rank_state


def finished_step(ckpt_dir: Path, remote: str | None = None) -> int | None:
    """The step of the newest complete checkpoint (the remote one when ``remote`` is set), or None.

    Needs no process group.
    """
    if remote:
        found = checkpoint_store.remote_latest(remote)
        if found:
            return int(found[1]["step"])
    tag = latest_tag(Path(ckpt_dir))
    if tag is None:
        return None
    return int(json.loads((Path(ckpt_dir) / tag / COMPLETE).read_text())["step"])
