"""Publishing checkpoints to object storage (or a shared file system) and fetching them back.

DeepSpeed writes every checkpoint to the local staging directory ``RUN/checkpoints`` first
(:mod:`pretrain.engine.checkpoint`); with ``train.remote_dir`` set, this module then mirrors it::

    <remote>/checkpoints/<tag>/...      every rank's files, uploaded by one process per node
    <remote>/checkpoints/<tag>/COMPLETE written by rank 0 once every node's upload finished: step,
                                        world_size and the size of every file every node uploaded
    <remote>/checkpoints/latest         written by rank 0 after COMPLETE: the publish point
    <remote>/config.yaml, metrics.jsonl, best_checkpoint.json
                                        the run record, uploaded with each checkpoint
    <remote>/export/                    the consolidated model (config.yaml uploaded last)

Object stores have no rename, so atomicity comes from order: a tag is never named by ``latest``
before its ``COMPLETE`` exists, and a tag without ``COMPLETE`` is never picked up. Resuming,
rank 0 picks the remote tag (``latest`` if complete, else the newest complete one) and every
node downloads it into its local staging directory before DeepSpeed loads it; rank 0 also fetches
the best checkpoint ``best_checkpoint.json`` pins when this machine has no whole copy of it (the
export writes it as ``RUN/export/best``). An upload that fails on any rank fails the save on every
rank (no rank is left waiting in a barrier). While some ranks upload or download (the node leaders
their checkpoint files, rank 0 the pinned best), the others meet them in a small collective every
few seconds rather than block in one (:func:`pretrain.engine.collectives.while_others_wait`): a
transfer may take longer than the process group's timeout.

Every download is verified against its ``COMPLETE`` record as a local resume verifies a checkpoint
(:func:`pretrain.engine.checkpoint_tags.checkpoint_problem`: every rank's file, every listed file at
its size). A fetched tag that fails is refused (the message names the file) and the resume takes the
previous complete one, as a local resume does. Markers published before the sizes were recorded
(only ``step`` and ``world_size``) are still accepted: only the ranks' files are checked then.

"One process per node" is the rank whose ``LOCAL_RANK`` is 0 (set by the DeepSpeed launcher,
torchrun and Ray Train): it sees every file its node's ranks wrote.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from data_shards import storage
from pretrain.data.hard_negatives import EPOCH_DIR
from pretrain.engine import best_checkpoint
from pretrain.engine.checkpoint_tags import (
    COMPLETE,
    DamagedMarkerError,
    checkpoint_problem,
    complete_record,
    parse_complete,
)
from pretrain.engine.collectives import (
    all_reduce_numbers,
    everyone_ok,
    gather_objects,
    node_leader,
    rank_and_world,
    while_others_wait,
)
from pretrain.errors import ConfigError

log = logging.getLogger(__name__)

LATEST = "latest"
RUN_RECORD = ("config.yaml", "metrics.jsonl", best_checkpoint.FILE)


class RemoteCheckpointsUnusable(ConfigError):
    """Every complete checkpoint under ``train.remote_dir`` a resume could take failed its checks after
    the download (a file lost or truncated there): the launchers exit 2 with the message."""


def _remote_marker(marker: str) -> dict | None:
    """A remote ``COMPLETE`` record, or None (logged) when it is damaged: that tag is never resumed,
    as a local checkpoint with a damaged marker is not (:func:`checkpoint_tags.complete_steps`)."""
    try:
        return parse_complete(storage.read_text(marker), marker)
    except DamagedMarkerError as e:
        log.warning("%s; that checkpoint is not used", e)
        return None


def retired_tags(complete: list[tuple[int, str]], step: int, keep: int) -> list[str]:
    """The complete checkpoints retention removes once the one at ``step`` is published.

    ``complete`` lists (step, tag), oldest first. Kept: the checkpoint at ``step`` and the
    ``keep - 1`` complete ones before it. A complete one with a higher step belongs to a timeline
    that a resume abandoned (killed between COMPLETE and ``latest``, resumed from the previous
    one): it goes too, so neither it nor a fallback to it can outlive ``latest``. Sorting all tags
    and keeping the newest ``keep`` would delete the checkpoint just written instead.
    """
    older = [tag for s, tag in complete if s < step]
    newer = [tag for s, tag in complete if s > step]
    return newer + older[: max(0, len(older) - (keep - 1))]


def remote_complete_tags(remote: str) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint under ``remote/checkpoints``, oldest first."""
    root = storage.join(remote, "checkpoints")
    found = []
    for name in storage.listdir(root):
        if name == LATEST or name.startswith("."):
            continue
        marker = storage.join(root, name, COMPLETE)
        if storage.exists(marker) and (record := _remote_marker(marker)) is not None:
            found.append((record["step"], name))
    return sorted(found)


def remote_latest(remote: str) -> tuple[str, dict] | None:
    """The tag to resume from and its COMPLETE record, or None when nothing complete was published."""
    root = storage.join(remote, "checkpoints")
    latest = storage.join(root, LATEST)
    if storage.exists(latest):
        tag = storage.read_text(latest).strip()
        marker = storage.join(root, tag, COMPLETE)
        if storage.exists(marker) and (record := _remote_marker(marker)) is not None:
            return tag, record
        log.warning("%s names incomplete checkpoint %r; falling back to the newest complete one", latest, tag)
    tags = remote_complete_tags(remote)
    if not tags:
        return None
    tag = tags[-1][1]
    return tag, _remote_marker(storage.join(root, tag, COMPLETE))


def publish(
    ckpt_dir: Path, remote: str, tag: str, complete: dict, keep: int, run_dir: Path, pinned: str | None = None
) -> None:
    """Collective: upload local checkpoint ``tag`` to ``remote``, then mark it complete and latest.

    Call on every rank after every rank's files are in its local ``ckpt_dir/tag``. ``complete``: at
    least ``step`` and ``world_size``; the remote ``COMPLETE`` adds ``files``, the size of every file
    of every node (gathered from the node leaders, :func:`remote_record`). ``pinned``: a tag
    retention keeps whatever its age (the best checkpoint by validation).
    """
    root = storage.join(remote, "checkpoints")

    def upload() -> dict[str, int]:  # node leaders: name -> size of the files this node uploads
        local = ckpt_dir / tag
        sizes = {p.name: p.stat().st_size for p in sorted(local.iterdir()) if p.is_file() and p.name != COMPLETE}
        for name in sizes:
            storage.upload_file(local / name, storage.join(root, tag, name))
        if rank_and_world()[0] == 0:
            _upload_run_record(run_dir, remote)
            sync_epoch_files_up(run_dir, remote)
        return sizes

    sizes = while_others_wait(upload if node_leader() else None, f"uploading checkpoint {tag} to {root}")
    parts = gather_objects(sizes)  # every node's list: without a shared file system, rank 0 sees only its node's
    error = None
    if rank_and_world()[0] == 0:
        try:
            record = remote_record(complete, parts, storage.join(root, tag))
            storage.write_text(storage.join(root, tag, COMPLETE), json.dumps(record))
            storage.write_text(storage.join(root, LATEST), tag)  # the publish point: written last
        except (OSError, ValueError) as e:
            error = e
    everyone_ok(error, f"publishing checkpoint {tag} to {root}")
    if rank_and_world()[0] == 0:
        try:
            _prune(remote, keep, complete["step"], pinned)
        except (OSError, ValueError) as e:  # old tags left behind cost space, not correctness
            log.warning("could not delete old checkpoints under %s: %s", root, e)
    log.info("checkpoint %s published to %s", tag, root)


def remote_record(complete: dict, parts: list[dict | None], where: str) -> dict:
    """The ``COMPLETE`` record of a published checkpoint: ``complete`` (``step``, ``world_size``) with
    ``files``, the size of every file the node leaders uploaded (``parts``: one name -> size map per
    rank, None for a rank that uploaded nothing), as the local marker lists them, so a copy fetched on
    another machine is checked as a local resume checks its own.

    A name two nodes uploaded with different sizes (which copy the remote kept is unknown) is listed
    without a size (only its presence is checked), with a warning.

    Raises:
        ValueError: no node uploaded some rank's ``rank_<r>.pt`` (that checkpoint could not be resumed).
    """
    files: dict[str, int | None] = {}
    for part in parts:
        for name, size in (part or {}).items():
            if name in files and files[name] != size:
                log.warning("%s/%s was uploaded by two nodes with different sizes: size not recorded", where, name)
                size = None
            files[name] = size
    missing = [f"rank_{r}.pt" for r in range(int(complete["world_size"])) if f"rank_{r}.pt" not in files]
    if missing:
        raise ValueError(f"no node uploaded {', '.join(missing)} to {where}")
    return {**complete, "files": dict(sorted(files.items()))}


def _upload_run_record(run_dir: Path, remote: str) -> None:
    """Rank 0: upload ``RUN_RECORD``. The best record goes up as ``best_checkpoint.json`` also for an
    older run that has only ``RUN/best.json`` (:func:`best_checkpoint.published_record`), so a fresh
    machine resuming it keeps its best; a run with no best record (dropped by
    :func:`best_checkpoint.promote` as an abandoned timeline's) deletes the remote one, so a fresh
    machine does not bring that best back."""
    for name in RUN_RECORD:
        if name == best_checkpoint.FILE:
            data = best_checkpoint.published_record(run_dir)
            if data is not None:
                storage.write_bytes(storage.join(remote, name), data)
            else:
                storage.remove_file(storage.join(remote, name))
        elif (run_dir / name).is_file():
            storage.upload_file(run_dir / name, storage.join(remote, name))


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def sync_epoch_files_up(run_dir: Path, remote: str) -> list[str]:
    """Make ``remote/hard_negatives/`` hold what ``RUN/hard_negatives/`` holds (``data.hard_negatives:
    previous_epoch``; the files a checkpoint's batches come from), before that checkpoint is published.

    A file is uploaded when its remote ``<name>.stamp`` (size and mtime of the local copy uploaded)
    differs from the local one, so a file rewritten under the same name goes up again; remote files no
    longer kept locally are deleted. Returns the names uploaded.
    """
    local = Path(run_dir) / EPOCH_DIR
    if not local.is_dir():
        return []
    root = storage.join(remote, EPOCH_DIR)
    kept = sorted(p.name for p in local.glob("epoch*.npy") if p.is_file())
    remote_names = set(storage.listdir(root))
    uploaded = []
    for name in kept:
        stamp = _stamp(local / name)
        marker = storage.join(root, f"{name}.stamp")
        if name in remote_names and f"{name}.stamp" in remote_names and storage.read_text(marker) == stamp:
            continue
        storage.upload_file(local / name, storage.join(root, name))
        storage.write_text(marker, stamp)  # after the file: a stamp never vouches for a partial upload
        uploaded.append(name)
    for name in sorted(remote_names):
        if name.removesuffix(".stamp") not in kept:
            storage.remove_file(storage.join(root, name))
    return uploaded


def fetch_epoch_files(run_dir: Path, remote: str) -> list[str]:
    """Node leader: download the ``remote/hard_negatives/`` files this machine lacks into
    ``RUN/hard_negatives/`` (a fresh machine resuming inside an epoch needs the file its batches came
    from; the resume then checks its digest against the checkpoint's record). Returns the names fetched."""
    root = storage.join(remote, EPOCH_DIR)
    names = [n for n in storage.listdir(root) if n.startswith("epoch") and n.endswith(".npy")]
    local = Path(run_dir) / EPOCH_DIR
    fetched = []
    for name in names:
        if (local / name).is_file():
            continue
        local.mkdir(parents=True, exist_ok=True)
        tmp = local / f".{name}.{os.getpid()}.fetch"
        with storage.open_read(storage.join(root, name)) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)  # streamed: the file can be GBs (N x E float32)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, local / name)
        fetched.append(name)
    return fetched


def _prune(remote: str, keep: int, step: int, pinned: str | None = None) -> None:
    """Delete the complete tags retention retires (:func:`retired_tags`: all but the one at
    ``step`` and the ``keep - 1`` before it, and ``pinned``) and incomplete ones older than ``step``."""
    root = storage.join(remote, "checkpoints")
    complete = remote_complete_tags(remote)
    doomed = [tag for tag in retired_tags(complete, step, keep) if tag != pinned]
    known = {tag for _, tag in complete}
    for name in storage.listdir(root):
        if name not in known and name != LATEST and name.startswith("step") and name[4:].isdigit():
            if int(name[4:]) < step:  # an upload that died before COMPLETE; never resumable
                doomed.append(name)
    for tag in doomed:
        storage.remove_tree(storage.join(root, tag))


def remote_candidates(remote: str) -> list[str]:
    """The remote tags a resume may take, in the order it tries them: :func:`remote_latest`'s, then the
    complete ones of lower steps, newest first (a tag that fails its checks after the download is
    refused and the next one taken). Empty when nothing complete was published."""
    found = remote_latest(remote)
    if found is None:
        return []
    tag, record = found
    return [tag] + [t for s, t in reversed(remote_complete_tags(remote)) if s < int(record["step"]) and t != tag]


def fetch(ckpt_dir: Path, remote: str, run_dir: Path) -> str | None:
    """Collective: bring the remote checkpoint to resume from into local staging; returns its tag.

    Rank 0 decides the tags to try (:func:`remote_candidates`, so every node loads the same one);
    each node's leader downloads the first unless a whole local copy is there and verifies it
    against its ``COMPLETE`` record (:func:`pretrain.engine.checkpoint_tags.checkpoint_problem`).
    When the copy of any node fails (a file missing or of another size than recorded), that tag
    is refused on every rank (logged, naming the file; the copy is deleted) and the previous one
    tried. The leaders then point the local ``latest`` at the tag taken. Also restores
    ``metrics.jsonl`` and ``best_checkpoint.json`` when this machine has none (a fresh node resuming
    a run) and, on rank 0, the checkpoint that record pins when it is not here whole
    (:func:`fetch_pinned`: a failure there is logged, the resume goes on). None: nothing to resume from.

    Raises:
        RemoteCheckpointsUnusable: complete remote checkpoints exist but none passes the checks.
        RuntimeError: a download failed (on every rank).
    """
    choice: list = [[]]
    error = None
    if rank_and_world()[0] == 0:
        try:
            choice = [remote_candidates(remote)]
        except (OSError, ValueError) as e:
            error = e
    everyone_ok(error, f"reading checkpoints under {storage.join(remote, 'checkpoints')}")
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if not choice[0]:
        return None
    problems = []
    for tag in choice[0]:
        work = (lambda tag=tag: _fetch_tag(ckpt_dir, remote, tag)) if node_leader() else None
        problem = while_others_wait(work, f"downloading checkpoint {tag} from {remote}")
        if not all_reduce_numbers([int(problem is not None)], op="max", dtype=torch.long)[0]:
            break
        problems.append(problem or f"{tag} failed its checks on another node (see its log)")
        log.error("checkpoint %s fetched from %s is refused: %s", tag, remote, problems[-1])
    else:
        raise RemoteCheckpointsUnusable(
            f"no checkpoint under {storage.join(remote, 'checkpoints')} is whole ({'; '.join(problems)}); restore "
            f"the missing files there, or move {remote} away to train from the start"
        )
    if problems:
        log.warning("resuming from %s instead", tag)

    def run_record() -> None:  # node leaders
        storage.write_text(ckpt_dir / LATEST, tag)
        fetch_epoch_files(run_dir, remote)
        for name in ("metrics.jsonl", best_checkpoint.FILE):
            local = run_dir / name
            if rank_and_world()[0] == 0 and not local.is_file() and storage.exists(storage.join(remote, name)):
                storage.download_file(storage.join(remote, name), local)

    while_others_wait(run_record if node_leader() else None, f"downloading the run record of {tag} from {remote}")
    # The other ranks wait here, not in DeepSpeed's first collective, while rank 0 fetches the best.
    pinned = (lambda: fetch_pinned(ckpt_dir, remote, run_dir, tag)) if rank_and_world()[0] == 0 else None
    while_others_wait(pinned, f"fetching the best checkpoint {best_checkpoint.FILE} pins from {remote}")
    return tag


def _fetch_tag(ckpt_dir: Path, remote: str, tag: str) -> str | None:
    """Node leader: download ``tag`` (:func:`_download_tag`) and verify the copy against its
    ``COMPLETE`` record; returns why it fails (the copy is then deleted), or None when it is whole.

    The record is the remote one: since 2026-12 it lists every file with its size, so a file lost or
    truncated under ``remote`` is caught here. An older remote marker (only ``step`` and
    ``world_size``) is still accepted: :func:`checkpoint_problem` then checks only that every rank's
    ``rank_<r>.pt`` is there (backward compatible with checkpoints published before the sizes).
    """
    _download_tag(ckpt_dir, remote, tag)
    problem = checkpoint_problem(ckpt_dir / tag)
    if problem is not None:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return problem


def fetch_pinned(ckpt_dir: Path, remote: str, run_dir: Path, resume_tag: str) -> str | None:
    """Rank 0: bring the best checkpoint ``RUN/best_checkpoint.json`` pins into ``ckpt_dir`` when no
    whole copy is here, and verify it as a resume verifies its checkpoint (its ``COMPLETE`` record,
    every rank's file and the recorded sizes, every ``.pt`` loadable with ``weights_only``).

    Nothing is fetched when no best is pinned, the best is the checkpoint resumed from
    (``resume_tag``, already here) or of a later step (an abandoned timeline the next save drops).
    A best that is not under ``remote``, cannot be downloaded or fails the checks is logged and left
    out (a copy that fails is deleted): training resumes all the same, and the export then skips
    ``export/best`` with a warning. Returns the tag fetched, or None.
    """
    from pretrain.engine.checkpoint_safety import verify_safe

    record = best_checkpoint.read(run_dir)
    if record is None or record["tag"] == resume_tag:
        return None
    tag, local = record["tag"], Path(ckpt_dir) / record["tag"]
    if _tag_problem(local, record["step"]) is None:
        return None  # a whole local copy
    try:
        if record["step"] > complete_record(Path(ckpt_dir) / resume_tag)["step"]:
            return None
        source = storage.join(remote, "checkpoints", tag)
        if not storage.exists(storage.join(source, COMPLETE)):
            log.error(
                "%s pins checkpoint %s (step %d, %s %.4g), which is not complete under %s: export/best will be "
                "missing unless a later validation pins another",
                best_checkpoint.FILE, tag, record["step"], record["metric"], record["score"], source,
            )  # fmt: skip
            return None
        shutil.rmtree(local, ignore_errors=True)  # a partial or damaged copy: fetched afresh
        _download_tag(ckpt_dir, remote, tag)
        problem = _tag_problem(local, record["step"])
        if problem is not None:
            raise RuntimeError(problem)
        verify_safe(local)
    except (OSError, ValueError, RuntimeError) as e:
        shutil.rmtree(local, ignore_errors=True)
        log.error("the best checkpoint %s was not fetched from %s: %s", tag, remote, e)
        return None
    log.info("fetched the best checkpoint %s (step %d, %s %.4g) from %s", tag, record["step"],
             record["metric"], record["score"], remote)  # fmt: skip
    return tag


def _tag_problem(tag_dir: Path, step: int) -> str | None:
    """Why checkpoint ``tag_dir`` is not a whole checkpoint of ``step`` (the checks of
    :func:`pretrain.engine.checkpoint_tags.checkpoint_problem`, plus the step), or None."""
    problem = checkpoint_problem(tag_dir)
    if problem is not None:
        return problem
    recorded = complete_record(tag_dir)["step"]
    if recorded != step:
        return f"{tag_dir / COMPLETE} records step {recorded}, not the pinned step {step}"
    return None


def _download_tag(ckpt_dir: Path, remote: str, tag: str) -> None:
    """Download checkpoint ``tag`` into ``ckpt_dir/tag`` (through a staging directory, renamed into
    place) unless a whole local copy is there (:func:`checkpoint_problem`: a local copy that lost or
    lacks a file, e.g. one node's files of a run without a shared file system, is fetched afresh)."""
    local, source = ckpt_dir / tag, storage.join(remote, "checkpoints", tag)
    if checkpoint_problem(local) is None:
        return  # a whole local copy (this machine wrote it, or another node sharing the file system fetched it)
    staging = ckpt_dir / f".fetch-{tag}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    storage.download_dir(source, staging)
    if not (staging / COMPLETE).is_file():
        raise RuntimeError(f"{source} lost its {COMPLETE} marker while downloading")
    if checkpoint_problem(local) is None:  # another node sharing this file system got there first
        shutil.rmtree(staging, ignore_errors=True)
        return
    shutil.rmtree(local, ignore_errors=True)  # a partial or damaged local copy of the same tag
    try:
        os.replace(staging, local)
    except OSError:  # another node sharing this file system got there first
        shutil.rmtree(staging, ignore_errors=True)
        if not (local / COMPLETE).is_file():
            raise


def publish_export(export_dir: Path, remote: str) -> str:
    """Upload a local export directory to ``remote/export`` (config.yaml last); returns the URL.

    ``config.yaml`` is what makes a directory an export, so an older export's copy is deleted
    before anything is overwritten: a reader during the upload finds no export (a clear error)
    rather than the old config next to new weights.
    """
    target = storage.join(remote, "export")
    storage.remove_file(storage.join(target, "config.yaml"))
    storage.upload_dir(export_dir, target, last=("config.yaml",))
    return str(target)
