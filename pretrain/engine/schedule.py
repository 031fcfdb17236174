"""The two-stage schedule: learning rates per parameter group, encoder freezing, and seeding.

Two-stage freezing follows the verified recipe in DESIGN.md: every parameter is given to
``deepspeed.initialize`` in named groups; while an encoder is frozen its groups get lr = 0 and
weight_decay = 0 (so AdamW cannot move them) and ``requires_grad`` False (so their backward is
skipped); unfreezing restores both. The per-group factor is applied after the learning-rate
schedule each step. Groups named ``*_no_decay`` (biases, norm gains, the logit scale:
``TriModalModel.parameter_groups``) always get weight_decay = 0.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from pretrain.config import Config
from pretrain.models.trimodal import MODALITIES, NO_DECAY


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio``; ``step`` counts from 0."""
    o, total = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return (step + 1) / max(1, o.warmup_steps)
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def frozen_encoders(stage: int, cfg: Config) -> set[str]:
    """Encoders ("sequence", "structure", "text") frozen in ``stage``: all of them in stage 1,
    ``train.frozen_encoders`` in stage 2."""
    return set(MODALITIES) if stage == 1 else set(cfg.train.frozen_encoders)


def apply_freezing(model: torch.nn.Module, frozen: set[str]) -> None:
    """Turn ``requires_grad`` off for the parameters of the ``frozen`` encoders of a
    ``TriModalModel``, on for the other encoders'."""
    for name, enc in zip(MODALITIES, model.encoders()):  # as TriModalModel pairs them
        for p in enc.parameters():
            p.requires_grad_(name not in frozen)


def set_group_lrs(optimizer, cfg: Config, step: int, frozen: set[str]) -> float:
    """Set every parameter group's lr and weight decay for ``step``; returns the heads' lr.

    Encoder groups (``encoder_<name>[_no_decay]``) follow ``optim.encoder_lr`` times
    ``optim.encoder_lr_mult.<name>`` and get 0 while ``<name>`` is in ``frozen``; every other group
    follows ``optim.lr``. The multiplier scales the learning rate only: AdamW's decoupled decay is
    ``lr · weight_decay``, so it follows the encoder's own learning rate.
    """
    base = lr_factor(step, cfg)
    o = cfg.optim
    for g in optimizer.param_groups:
        name = str(g.get("name", ""))
        decay = 0.0 if name.endswith(NO_DECAY) else o.weight_decay
        if name.startswith("encoder"):  # encoder_<sequence|structure|text>[_no_decay]
            encoder = name.removeprefix("encoder_").removesuffix(NO_DECAY)
            factor = 0.0 if encoder in frozen else 1.0
            g["lr"] = o.encoder_lr * base * factor * o.encoder_lr_mult.of(encoder)
            g["weight_decay"] = decay * factor
        else:
            g["lr"] = o.lr * base
            g["weight_decay"] = decay
    return o.lr * base


def reset_encoder_optimizer_state(optimizer) -> None:
    """Give the encoder groups a fresh AdamW state at the switch to stage 2.

    Under ZeRO 1-3 the frozen encoders sit in flat partitions that get zero gradients during
    stage 1, and AdamW still counts those steps: its moments stay 0 but the bias corrections
    of stage 2 would start at t = stage1_steps + 1 and shrink the first encoder updates about
    twofold. ZeRO-0 skips parameters without gradients; resetting makes every stage the same.

    Args:
        optimizer: the DeepSpeed engine's optimizer (a ZeRO optimizer wrapping AdamW, or AdamW).
    """
    opt = optimizer
    inner = getattr(opt, "optimizer", opt)
    is_encoder = [str(g.get("name", "")).startswith("encoder") for g in inner.param_groups]
    if hasattr(opt, "sub_group_to_group_id"):  # ZeRO-3: state keyed by each sub-group's fp32 partition
        keys = [opt.fp32_partitioned_groups_flat[i] for i, gid in opt.sub_group_to_group_id.items() if is_encoder[gid]]
    else:
        keys = [p for g, enc in zip(inner.param_groups, is_encoder) if enc for p in g["params"]]
    for key in keys:
        state = inner.state.get(key) or {}
        for name, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif name == "step":
                state[name] = 0
