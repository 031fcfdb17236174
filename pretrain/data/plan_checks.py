"""What a checkpoint records of its data plan, and the checks that a launch may use or resume it.

A data cursor counts batches of one plan (:class:`pretrain.data.stream.EpochPlan`): the shard set, the
batch size, the seed and every setting that composes batches (property sampling, length grouping,
hard negatives). :func:`plan_record` is what the trainer saves with each checkpoint;
:func:`check_resumable_plan` refuses a resume under anything else; :func:`check_plan` fails a launch
early (before any process group) on a missing shard set or an impossible batch.
"""

from __future__ import annotations

import hashlib
import json

from data_shards.manifest import Manifest, load_manifest
from pretrain.config import Config, ConfigError
from pretrain.data.hard_negatives import HardNegatives
from pretrain.data.sampling_plan import changed_settings, plan_settings
from pretrain.data.stream import KEPT_SET_KEY, EpochPlan, plan_for


def check_plan(cfg: Config, world_size: int) -> None:
    """Fail early (before any process group starts) on a missing shard set or impossible batch."""
    manifest = load_manifest(cfg.data.train_shards)  # a path or a URL (data_shards.storage)
    # One plan is enough: every rank gets an equal share of the epoch.
    plan = plan_for(cfg, manifest, world_size, 0)
    plan.batches_per_epoch(0)
    if plan.arranger is not None:
        plan.arranger.check()  # the lengths index (built and cached here once) or the embeddings file


def plan_record(cfg: Config, plan: EpochPlan, epoch: int | None = None) -> dict:
    """What a checkpoint records of its data plan: :func:`plan_settings`, the shard set's digest and
    the plan's own draws (:meth:`EpochPlan.digests`; ``epoch``: the cursor's, for the file of
    ``data.hard_negatives=previous_epoch``); :func:`check_resumable_plan` reads it back (the trainer
    checks the epoch file: :mod:`pretrain.engine.epoch_embeddings`)."""
    return {**plan_settings(cfg), SHARD_SET_KEY: shard_set_digest(plan.manifest), **plan.digests(epoch)}


SHARD_SET_KEY = "data.train_shards content"  # key of :func:`shard_set_digest` in a checkpoint's data plan


def shard_set_digest(manifest: Manifest) -> str:
    """Content identity of a shard set: its shards' names, sample counts and checksums, in manifest order.

    The same shards copied elsewhere (another directory, a bucket) give the same digest; a set with
    any other shard, sample count or byte gives another. The path is not part of it.
    """
    listing = [[s.name, s.num_samples, s.sha256] for s in manifest.shards]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def check_resumable_plan(saved: dict | None, cfg: Config, source: str, manifest: Manifest | None = None) -> None:
    """Refuse to resume a cursor under other plan settings (it would skip or repeat samples).

    Args:
        saved: :func:`plan_settings` of the run being resumed, with :data:`SHARD_SET_KEY` when the
            checkpoint recorded it; None for checkpoints written before they were recorded (accepted).
        source: where ``saved`` comes from, for the message.
        manifest: the train shard set this launch reads; with it, a checkpoint's cursor that
            counts batches of another shard set (other content, wherever it lives) is refused.

    Raises:
        ConfigError: a setting differs, or the shard set is another one.
    """
    if saved is None:
        return
    if manifest is not None and saved.get(SHARD_SET_KEY) not in (None, shard_set_digest(manifest)):
        raise ConfigError(
            f"{source}: the run trained on another shard set than data.train_shards={cfg.data.train_shards} "
            f"(content digest {saved[SHARD_SET_KEY]}, this one {shard_set_digest(manifest)}); its data cursor "
            "would index unrelated samples. Point data.train_shards at the run's shards (a copy elsewhere is "
            "fine), or use a new --run-dir"
        )
    changed = changed_settings(saved, cfg)
    if not changed and manifest is not None and (KEPT_SET_KEY in saved or HardNegatives.DIGEST_KEY in saved):
        drawn = plan_for(cfg, manifest, 1, 0).digests()  # the draw and the embeddings this launch would use
        changed = [
            f"{key} {saved[key]} -> {drawn.get(key)}" for key in drawn if key in saved and saved[key] != drawn[key]
        ]
    if changed:
        raise ConfigError(
            f"{source}: the run's data cursor counts batches of another sampling plan ({', '.join(changed)}); "
            "resuming would skip or repeat samples. Relaunch with the run's values, or use a new --run-dir"
        )
