"""Shared by the large-batch tests: a real collated demo batch (with second views) and gradient dicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pretrain.config import Config
from pretrain.data.collate import BatchBuilder


def demo_batch(cfg: Config, root: Path, rows: int, *, offset: int = 0, drop_modalities: bool = True) -> dict:
    """``rows`` demo proteins collated for training (all three second views); with ``drop_modalities``
    row 1 has no text and row 2 no structure, so presence masks are exercised."""
    from data_shards.demo_corpus import build_demo_corpus
    from data_shards.reader import iter_records

    if not (root / "train").is_dir():
        build_demo_corpus(root, num_train=96, num_heldout=48, samples_per_shard=48, seed=0)
    records = list(iter_records(sorted((root / "train").glob("*.tar"))[0]))[offset : offset + rows]
    if drop_modalities:
        records[1].text = None
        records[2].backbone = None
    views = {"sequence": True, "structure": True, "text": True}
    return BatchBuilder(cfg, views=views).build(records, np.random.default_rng(0), train=True)


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Cloned ``.grad`` of every parameter that has one, by name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
