"""The ``data`` section of a recipe: shards, loader, augmentation and bad-sample limits.

A section module of the config layer: it imports nothing above ``pretrain.models``, so
``pretrain/config.py`` can compose it while the code beside it imports the composed config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pretrain.errors import ConfigError


@dataclass
class DataConfig:
    train_shards: str = "data/demo/train"  # directory with WebDataset shards + manifest.json
    eval_shards: str = "data/demo/heldout"  # held-out shard directory used by evaluation
    batch_size: int = 32  # per-rank micro batch; the global batch is batch_size x world size
    loader: str = "ray"  # "ray" (reader actors) or "local" (same code, in-process; tests, eval)
    readers_per_rank: int = 2  # Ray reader actors owned by each training rank
    prefetch_batches: int = 4  # batches kept in flight per rank
    text_augment: bool = True  # varied descriptions of the annotations (train; protclip uses its own text)
    text_rewrite_prob: float = 0.5  # with text_augment: chance of a stored LLM rewrite (text.rewrites) when present
    text_definition_prob: float = 0.3  # with text_augment: chance per GO term with a stored definition of using it
    property_sampling: bool = False  # ProtCLIP property-driven sampling from the shards' sample_props
    # with property_sampling: "per_epoch" redraws the kept samples every epoch; "once" draws them one time from
    # train.seed and keeps that set for every epoch (ProtCLIP's ProtAnno-D); the checkpoint records its digest
    property_sampling_mode: str = "per_epoch"
    # Length-aware batching (pretrain/data/batching.py): "window" sorts each run of length_window batches of a
    # rank's shuffled stream by sequence length, cuts it into batches and shuffles those; "none" keeps the order
    length_grouping: str = "none"
    length_window: int = 64  # with length_grouping=window: batches per sorted window
    length_cache: str = "~/.cache/align-pro/lengths"  # per-shard sequence-length index (built once per shard)
    # Hard-negative batches (pretrain/data/hard_negatives.py): an exported embeddings file (<modality>.npy of
    # pretrain.eval.export_embeddings over data.train_shards, rows in manifest order); "previous_epoch" for the
    # run's own embeddings of the train shards at the end of the previous epoch (epoch 0: random batches,
    # pretrain/engine/epoch_embeddings.py); or null for random batches
    hard_negatives: str | None = None
    hard_negative_modality: str = "sequence"  # with hard_negatives=previous_epoch: the embeddings searched
    hard_negative_ratio: float = 0.5  # share of each batch that is one protein and its nearest neighbours
    hard_negative_k: int = 64  # neighbours kept per protein when a batch's hard group is composed
    seq_mask_prob: float = 0.15  # token masking of the second sequence view (intra-modal loss)
    coord_noise: float = 0.5  # Gaussian noise (angstrom) on the second structure view
    residue_drop_prob: float = 0.1  # residues dropped from the second structure view
    # Predicted models (AlphaFold): residues whose pLDDT is below this leave the structure graph
    # (SaProt masks below 70); None keeps every residue. Experimental structures carry no pLDDT.
    min_plddt: float | None = None
    max_bad_sample_ratio: float = 0.05  # stop the run when more samples than this were unreadable
    bad_ratio_min_samples: int = 1000  # the ratio is of at least this many samples (early batches)
    ray_timeout_s: float = 300.0  # hard timeout on any wait for a reader actor
    reader_resource: str | None = None  # custom Ray resource each reader actor needs 1 of (e.g. "reader_slot"):
    # advertised only by CPU reader nodes, it keeps readers off the GPU nodes (launch/ray_cluster_aws.yaml)

    def validate(self) -> None:
        """Checks of the section's values; raises ConfigError naming the field."""
        d = self
        if d.batch_size < 2:
            raise ConfigError(f"data.batch_size={d.batch_size}: contrastive training needs at least 2 per rank")
        if d.loader not in ("ray", "local"):
            raise ConfigError(f"data.loader={d.loader!r}: expected 'ray' or 'local'")
        for name in ("readers_per_rank", "prefetch_batches"):
            if getattr(d, name) < 1:
                raise ConfigError(f"data.{name}={getattr(d, name)}: must be >= 1")
        if d.property_sampling_mode not in ("per_epoch", "once"):
            raise ConfigError(
                f"data.property_sampling_mode={d.property_sampling_mode!r}: expected 'per_epoch' or 'once'"
            )
        if d.length_grouping not in ("none", "window"):
            raise ConfigError(f"data.length_grouping={d.length_grouping!r}: expected 'none' or 'window'")
        for name in ("length_window", "hard_negative_k"):
            if getattr(d, name) < 1:
                raise ConfigError(f"data.{name}={getattr(d, name)}: must be >= 1")
        if not d.length_cache.strip():
            raise ConfigError("data.length_cache: expected a directory for the sequence-length index")
        if d.hard_negatives is not None and not d.hard_negatives.strip():
            raise ConfigError("data.hard_negatives: expected an embeddings .npy file, 'previous_epoch' or null")
        if d.hard_negative_modality not in ("sequence", "structure", "text"):
            raise ConfigError(
                f"data.hard_negative_modality={d.hard_negative_modality!r}: expected 'sequence', 'structure' or 'text'"
            )
        if not 0.0 <= d.hard_negative_ratio <= 1.0:
            raise ConfigError(f"data.hard_negative_ratio={d.hard_negative_ratio}: expected a value in [0, 1]")
        if d.hard_negatives is not None and d.length_grouping != "none":
            raise ConfigError(
                "data.hard_negatives and data.length_grouping=window both compose batches: choose one "
                "(set data.length_grouping=none or data.hard_negatives=null)"
            )
        if d.reader_resource is not None and not d.reader_resource.strip():
            raise ConfigError("data.reader_resource: expected a Ray resource name or null")
        # 0 is meaningful: the bad-sample ratio is then taken from the first sample on.
        if d.bad_ratio_min_samples < 0:
            raise ConfigError(f"data.bad_ratio_min_samples={d.bad_ratio_min_samples}: must be >= 0")
        # not (0 <= x <= 1) rather than (x < 0 or x > 1): nan fails it too (a section built in code).
        probabilities = ("max_bad_sample_ratio", "text_rewrite_prob", "text_definition_prob", "seq_mask_prob")
        for name in (*probabilities, "residue_drop_prob"):
            if not 0.0 <= getattr(d, name) <= 1.0:
                raise ConfigError(f"data.{name}={getattr(d, name)}: expected a value in [0, 1]")
        if d.min_plddt is not None and not 0.0 <= d.min_plddt <= 100.0:
            raise ConfigError(f"data.min_plddt={d.min_plddt}: expected a pLDDT in [0, 100] or null")
        if not (math.isfinite(d.coord_noise) and d.coord_noise >= 0):
            raise ConfigError(f"data.coord_noise={d.coord_noise}: must be a finite number >= 0 (angstrom)")
        if not (math.isfinite(d.ray_timeout_s) and d.ray_timeout_s > 0):
            raise ConfigError(f"data.ray_timeout_s={d.ray_timeout_s}: must be a finite number of seconds > 0")
