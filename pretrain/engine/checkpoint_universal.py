"""Elastic resume: DeepSpeed universal checkpoints for a relaunch on another number of ranks.

``<tag>_universal/`` beside ``<tag>/`` is DeepSpeed's universal form of that checkpoint, made once
(rank 0 at the first resume on another world size, or ahead of time by
``python -m pretrain.convert_checkpoint``), atomically, with its ``UNIVERSAL_COMPLETE`` marker.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from data_shards.storage import write_text
from pretrain.engine.checkpoint_safety import verify_safe, weights_only_loads
from pretrain.engine.checkpoint_tags import COMPLETE, complete_record, latest_tag, newest_whole_tag

UNIVERSAL_SUFFIX = "_universal"
UNIVERSAL_COMPLETE = "UNIVERSAL_COMPLETE"


def saved_world_size(ckpt_dir: Path) -> int | None:
    """Number of ranks that wrote the checkpoint a resume would load, or None (no process group needed).

    ``Trainer.setup`` asks before ``deepspeed.initialize``: a different world size needs
    ``"checkpoint": {"load_universal": true}`` in the config the engine is built with. Resuming from
    object storage, fetch first (``checkpoint_store.fetch``): a fresh machine has nothing local.
    """
    tag = newest_whole_tag(Path(ckpt_dir))
    if tag is None:
        return None
    return int(complete_record(Path(ckpt_dir) / tag)["world_size"])


def universal_config(ds_config: dict) -> dict:
    """A copy of ``ds_config`` whose engine loads DeepSpeed universal checkpoints.

    DeepSpeed reads ``checkpoint.load_universal`` from the config (``engine.load_universal_checkpoint()``)
    when loading; nothing else in the engine depends on it.
    """
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def engine_config(ds_config: dict, ckpt_dir: Path, world: int) -> dict:
    """The DeepSpeed config to build the engine with before ``checkpoint.load`` on ``world`` ranks.

    :func:`universal_config` when the checkpoint to resume was written by another number of ranks
    under ZeRO 1-3. ZeRO-0 checkpoints hold whole copies and load directly: an engine built for a
    universal load would skip restoring the module and fail in ``update_lp_params``.
    """
    saved = saved_world_size(ckpt_dir)
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if saved is not None and saved != world and stage > 0:
        return universal_config(ds_config)
    return ds_config


def convert_tag(ckpt_dir: Path, tag: str, workers: int = 1) -> Path:
    """Rank 0: DeepSpeed's ``ds_to_universal`` of ``tag`` into ``<tag>_universal``, atomically.

    The conversion runs in ``.<tag>_universal.tmp<pid>/`` (the script also drops a
    ``latest_universal`` file beside its output: it stays in the temporary directory), gets a
    ``UNIVERSAL_COMPLETE`` marker, then is renamed into place; a conversion killed half-way
    leaves only a temporary directory, removed by the next attempt.
    """
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    final = ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}"
    if (final / UNIVERSAL_COMPLETE).is_file():
        return final
    shutil.rmtree(final, ignore_errors=True)  # never published (no marker): a leftover
    for stale in ckpt_dir.glob(f".{tag}{UNIVERSAL_SUFFIX}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = ckpt_dir / f".{tag}{UNIVERSAL_SUFFIX}.tmp{os.getpid()}"
    out = work / final.name
    args = Namespace(
        input_folder=str(ckpt_dir / tag),
        output_folder=str(out),
        num_extract_workers=workers,  # > 1 forks a process pool (worth it for large models, offline)
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        # Data parallel only (no tensor / pipeline split): the script's required
        # universal_checkpoint_info then holds nothing but a version, which it injects itself.
        inject_missing_state=True,
    )
    with weights_only_loads():  # the files were verified; this closes the gap until they are read
        ds_to_universal(args)
    meta = complete_record(ckpt_dir / tag)
    write_text(out / UNIVERSAL_COMPLETE, json.dumps({"source": tag, **meta}))
    os.replace(out, final)
    shutil.rmtree(work, ignore_errors=True)
    return final


def convert_to_universal(ckpt_dir: Path, tag: str | None = None, workers: int = 1) -> Path:
    """Convert checkpoint ``tag`` (default: the latest complete one) into ``<tag>_universal`` ahead of time.

    The elastic resume in ``checkpoint.load`` reuses a finished conversion, so running this offline (one
    process, no process group; ``python -m pretrain.convert_checkpoint``) keeps a long conversion of a
    large model from running on rank 0 while the other ranks wait in a collective (and from
    outlasting an NCCL timeout). Files are checked with ``weights_only=True`` first.

    Raises:
        FileNotFoundError: no such complete checkpoint. ValueError: a ZeRO-0 checkpoint (whole copies
        on every rank: it resumes at any world size without conversion).
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint to convert")
    if not (ckpt_dir / tag / COMPLETE).is_file():
        raise FileNotFoundError(f"{ckpt_dir / tag}: not a complete checkpoint (no {COMPLETE})")
    if not any((ckpt_dir / tag).glob("*optim_states.pt")):
        raise ValueError(
            f"{ckpt_dir / tag}: written without ZeRO optimizer partitions (stage 0); it resumes at any "
            "world size as it is"
        )
    verify_safe(ckpt_dir / tag)
    remove_orphan_conversions(ckpt_dir)
    return convert_tag(ckpt_dir, tag, workers)


def remove_orphan_conversions(ckpt_dir: Path) -> None:
    """Rank 0: drop universal conversions whose source checkpoint retention has removed."""
    for p in ckpt_dir.glob(f"*{UNIVERSAL_SUFFIX}"):
        if p.is_dir() and not (ckpt_dir / p.name.removesuffix(UNIVERSAL_SUFFIX) / COMPLETE).is_file():
            shutil.rmtree(p, ignore_errors=True)
