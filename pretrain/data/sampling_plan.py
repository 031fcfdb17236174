"""What decides which samples an epoch holds: ProtCLIP keep probabilities, the once-drawn kept set, and
the recipe values a data cursor is counted in (:func:`plan_settings`).

``data.property_sampling_mode: once`` (ProtCLIP samples its noisy ProtAnno-D one time) draws the kept
samples one time, in manifest order, from the run seed: every epoch and every world size then holds
the same set. A checkpoint records the set's digest (:func:`kept_digest`), so that a resume whose draw
would differ (another keep rule, other sample properties) is refused rather than silently retrained
on another set.
"""

from __future__ import annotations

import hashlib

import numpy as np

from data_shards.manifest import ShardInfo
from data_shards.sampling import keep_probability
from pretrain.config import Config
from pretrain.data.hard_negatives import PREVIOUS_EPOCH


def keep_probabilities(shard: ShardInfo) -> np.ndarray:
    """Per-sample keep probability of one shard (ProtCLIP: p = sqrt(o/4)/e^3 with drop rules).

    Samples without recorded properties (e.g. the demo corpus) are always kept.
    """
    props = shard.sample_props or {}
    n = shard.num_samples
    existence = props.get("existence") or [None] * n
    coverage = props.get("coverage") or [None] * n
    reviewed = props.get("reviewed") or [False] * n
    return np.array(
        [
            1.0 if o is None else keep_probability(e, o, reviewed=bool(rv))
            for e, o, rv in zip(existence, coverage, reviewed)
        ]
    )


def draw_once(keep_prob: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """One draw of the kept samples: per shard a (num_samples,) bool mask, drawn in manifest order."""
    p = np.concatenate([np.zeros(0), *keep_prob])
    kept = rng.random(len(p)) < p
    return np.split(kept, np.cumsum([len(x) for x in keep_prob])[:-1])


def kept_digest(kept: list[np.ndarray]) -> str:
    """Identity of a kept set (sha256 of its packed masks in manifest order, 16 hex digits)."""
    return hashlib.sha256(np.packbits(np.concatenate(kept)).tobytes()).hexdigest()[:16]


def plan_settings(cfg: Config) -> dict:
    """The recipe values a saved cursor (epoch, batch number) is counted in; a resume needs the same.

    A value that does not change the plan (the window with length grouping off, ...) is None.
    """
    d = cfg.data
    grouping = d.length_grouping != "none"
    previous_epoch = d.hard_negatives == PREVIOUS_EPOCH
    return {
        "data.batch_size": d.batch_size,
        "data.property_sampling": d.property_sampling,
        "data.property_sampling_mode": d.property_sampling_mode if d.property_sampling else None,
        "data.length_grouping": d.length_grouping,
        "data.length_window": d.length_window if grouping else None,
        # an export: True (its content digest is recorded beside); the run's previous epoch: "previous_epoch"
        "data.hard_negatives": PREVIOUS_EPOCH if previous_epoch else d.hard_negatives is not None,
        "data.hard_negative_modality": d.hard_negative_modality if previous_epoch else None,
        "data.hard_negative_ratio": d.hard_negative_ratio if d.hard_negatives is not None else None,
        "data.hard_negative_k": d.hard_negative_k if d.hard_negatives is not None else None,
        "train.seed": cfg.train.seed,
    }


# Settings added after checkpoints began recording plan_settings: a record without one had this value.
ADDED_SETTINGS = {
    "data.property_sampling_mode": None,
    "data.length_grouping": "none",
    "data.length_window": None,
    "data.hard_negatives": False,
    "data.hard_negative_ratio": None,
    "data.hard_negative_k": None,
    "data.hard_negative_modality": None,
}


def changed_settings(saved: dict, cfg: Config) -> list[str]:
    """``"key old -> new"`` for each :func:`plan_settings` value of ``cfg`` that differs from ``saved``."""
    out = []
    for key, value in plan_settings(cfg).items():
        old = saved.get(key, ADDED_SETTINGS.get(key))
        if old != value:
            out.append(f"{key} {old!r} -> {value!r}")
    return out
