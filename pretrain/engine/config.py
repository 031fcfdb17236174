"""The ``optim`` and ``train`` sections of a recipe: the optimizer, the schedule, the step loop.

A section module of the config layer: it imports nothing above ``pretrain.models``, so
``pretrain/config.py`` can compose it while the code beside it imports the composed config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pretrain.errors import ConfigError
from pretrain.models.trimodal import MODALITIES


@dataclass
class EncoderLRMult:
    """Per-encoder multipliers of ``optim.encoder_lr`` (ProtST / ProtCLIP set a ratio per encoder)."""

    sequence: float = 1.0  # multiplier of the ESM-2 encoder's learning rate
    structure: float = 1.0  # ... the GVP-GNN's
    text: float = 1.0  # ... the BERT text encoder's (0: lr 0, it stays put but, unlike frozen_encoders, runs backward)

    def validate(self, where: str = "optim.encoder_lr_mult") -> None:
        """Each multiplier a finite number >= 0; raises ConfigError naming the field."""
        for name in MODALITIES:
            m = getattr(self, name)
            if not (math.isfinite(m) and m >= 0):
                raise ConfigError(f"{where}.{name}={m}: must be a finite number >= 0")

    def of(self, encoder: str) -> float:
        """The multiplier of ``encoder`` ("sequence", "structure" or "text")."""
        if encoder not in MODALITIES:
            raise ValueError(f"unknown encoder {encoder!r}; expected one of {list(MODALITIES)}")
        return float(getattr(self, encoder))


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate of the projection heads and logit scale
    encoder_lr: float = 3e-4  # peak learning rate of the encoders in stage 2
    weight_decay: float = 0.01  # AdamW decay of weight matrices; biases, norm gains and the logit scale get none
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 10  # linear warm-up from 0, then cosine decay to min_lr_ratio x peak
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global gradient norm clip (DeepSpeed gradient_clipping)
    # Per-encoder multipliers of encoder_lr (e.g. {sequence: 1.0, structure: 1.0, text: 0.1}), applied after the
    # schedule; a frozen encoder (stage 1, train.frozen_encoders) still gets 0. Unknown names are errors.
    encoder_lr_mult: EncoderLRMult = field(default_factory=EncoderLRMult)

    def validate(self) -> None:
        """Checks of the section's values; raises ConfigError naming the field."""
        o = self
        for name in ("lr", "eps"):
            if not (math.isfinite(getattr(o, name)) and getattr(o, name) > 0):
                raise ConfigError(f"optim.{name}={getattr(o, name)}: must be a finite number > 0")
        for name in ("encoder_lr", "weight_decay"):  # encoder_lr 0: encoders stay frozen in stage 2
            if not (math.isfinite(getattr(o, name)) and getattr(o, name) >= 0):
                raise ConfigError(f"optim.{name}={getattr(o, name)}: must be a finite number >= 0")
        if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
            raise ConfigError(f"optim.betas={o.betas}: expected two values in [0, 1)")
        if o.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={o.warmup_steps}: must be >= 0")
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio}: expected a value in [0, 1]")
        if not (math.isfinite(o.grad_clip) and o.grad_clip >= 0):
            raise ConfigError(f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 turns clipping off)")
        o.encoder_lr_mult.validate("optim.encoder_lr_mult")


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps in total (both stages)
    stage1_steps: int = 40  # steps with encoders frozen (heads + temperature only); 0 skips stage 1
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 100  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # complete checkpoints kept on disk (and in remote_dir)
    remote_dir: str | None = None  # s3://bucket/runs/x (any fsspec URL) or a shared-FS path: checkpoints + export
    # are published there after each save and resumed from it; RUN/checkpoints is then local staging
    seed: int = 0  # model init, data order and augmentation
    eval_at_end: bool = True  # run retrieval on data.eval_shards after the last step
    max_nonfinite_steps: int = 5  # stop after this many consecutive steps with non-finite loss/gradients
    max_failed_checkpoints: int = 2  # stop after this many consecutive checkpoint saves failed (disk full, I/O)
    validate_every: int = 0  # steps between validation retrievals on data.eval_shards (0: off)
    tensorboard: bool = True  # mirror metrics to RUN/tensorboard (when a writer library is installed)
    wandb: bool = False  # mirror metrics to Weights & Biases (when wandb is installed)
    wandb_project: str = "align-pro"  # W&B project name
    # Large-batch engine (pretrain/engine/two_pass.py, pretrain/engine/precision.py). These live in ``train``, not
    # ``model``: they change how a step is computed, not the weights, so toggling them keeps the
    # model fingerprint (and resuming) intact.
    grad_cache_chunk: int = 0  # rows per chunk of the two-pass (GradCache) step; 0: plain one-pass step
    # Encoders whose layers recompute their activations in backward (torch.utils.checkpoint):
    # any of "sequence" (ESM-2 layers), "structure" (GVP layers), "text" (BERT layers).
    activation_checkpointing: list[str] = field(default_factory=list)
    # Encoders frozen for the whole run, stage 2 included (e.g. [text]: ProtCLIP's frozen
    # PubMedBERT): same names as activation_checkpointing.
    frozen_encoders: list[str] = field(default_factory=list)
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "bf16" (CUDA only); "fp32"

    def validate(self) -> None:
        """Checks of the section's values; raises ConfigError naming the field."""
        t = self
        if not 0 <= t.seed < 2**32:  # numpy's seeding refuses anything else
            raise ConfigError(f"train.seed={t.seed}: expected an integer in [0, 2**32)")
        if t.max_steps < 1:
            raise ConfigError(f"train.max_steps={t.max_steps}: must be >= 1")
        if not 0 <= t.stage1_steps <= t.max_steps:
            raise ConfigError(f"train.stage1_steps={t.stage1_steps}: must be in [0, train.max_steps]")
        if t.grad_cache_chunk < 0:
            raise ConfigError(f"train.grad_cache_chunk={t.grad_cache_chunk}: must be >= 0 (0 is the one-pass step)")
        for key in ("activation_checkpointing", "frozen_encoders"):
            names = getattr(t, key)
            if set(names) - set(MODALITIES) or len(set(names)) != len(names):
                raise ConfigError(f"train.{key}={names}: expected distinct names from {list(MODALITIES)}")
        if t.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision={t.precision!r}: expected 'auto', 'bf16' or 'fp32'")
        if t.validate_every < 0:
            raise ConfigError(f"train.validate_every={t.validate_every}: must be >= 0 (0 turns validation off)")
        at_least_one = (
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "max_nonfinite_steps",
            "max_failed_checkpoints",
        )
        for name in at_least_one:
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name}={getattr(t, name)}: must be >= 1")
        if t.remote_dir is not None and (not t.remote_dir.strip() or t.remote_dir.startswith("pipe:")):
            raise ConfigError(
                f"train.remote_dir={t.remote_dir!r}: expected a writable URL or path (pipe: is read-only)"
            )
