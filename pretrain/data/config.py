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
