"""Retrieval validation during pretraining: a few hundred held-out proteins, every N steps.

The collated validation batches are built once per (shard set, size, model config) and kept in
memory, so a call costs only the forward passes. Under ZeRO-3 call it on every rank (the forward
passes gather partitioned parameters collectively); each rank computes the same numbers.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from data_shards.storage import is_url
from pretrain.config import Config
from pretrain.data.collate import batch_to_device
from pretrain.data.stream import iter_eval_batches
from pretrain.eval.retrieval import retrieval_metrics
from pretrain.models.trimodal import MODALITIES

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 2


def _batches(cfg: Config, shard_dir: str | Path, max_samples: int, batch_size: int) -> list[dict]:
    where = str(shard_dir) if is_url(shard_dir) else str(Path(shard_dir).resolve())  # Path() folds s3:// to s3:/
    # Everything that shapes a batch: the model section (tokenisers, crops), the data section
    # (min_plddt, ...) and the seed.
    key = (where, max_samples, batch_size, cfg.fingerprint(("model", "data")), cfg.train.seed)
    if key not in _CACHE:
        _CACHE[key] = [b for b, _bad in iter_eval_batches(cfg, shard_dir, batch_size, max_samples)]
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key]


@torch.no_grad()
def validate_model(
    model: torch.nn.Module,
    cfg: Config,
    shard_dir: str | Path,
    max_samples: int = 256,
    *,
    batch_size: int | None = None,
    prefix: str = "val/",
) -> dict[str, float]:
    """Cross-modal retrieval of the first ``max_samples`` proteins of ``shard_dir``.

    Args:
        model: the :class:`TriModalModel`, or the DeepSpeed engine wrapping it (called like in
            training: ``model(batch)``); its train / eval mode is restored on return.
        cfg: the run's config (tokenisation and featurisation settings, ``eval.ks``).
        shard_dir: held-out shard directory.
        max_samples: proteins used (chance R@10 is 10 / max_samples).
        batch_size: forward batch (default ``eval.batch_size``).
        prefix: prepended to every key.

    Returns:
        Flat scalars for metrics.jsonl: ``val/num_proteins``, ``val/mean_R@k`` (mean over the six
        directions), ``val/<direction>/R@k``, ``val/<direction>/median_rank`` and ``val/time_s``.
    """
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks: dict[str, list] = {m: [] for m in MODALITIES}
    present: dict[str, list] = {m: [] for m in MODALITIES}
    try:
        for batch in _batches(cfg, shard_dir, max_samples, batch_size or cfg.eval.batch_size):
            emb = model(batch_to_device(batch, device))  # the training forward: works on engine and module
            for m in MODALITIES:
                mask = batch["present"][m]
                chunks[m].append((emb[m].float().cpu() * mask[:, None]).numpy())
                present[m].append(mask.numpy().astype(bool))
    finally:
        model.train(was_training)
    arrays = {m: np.concatenate(chunks[m]) for m in MODALITIES}
    arrays.update({f"present_{m}": np.concatenate(present[m]) for m in MODALITIES})
    metrics = retrieval_metrics(arrays, cfg.eval.ks, curve_max_k=1)
    out: dict[str, float] = {f"{prefix}num_proteins": int(len(arrays["present_sequence"]))}
    dirs = {name: d for name, d in metrics["directions"].items() if d.get("n")}
    for k in cfg.eval.ks:
        if dirs:
            out[f"{prefix}mean_R@{k}"] = float(np.mean([d[f"R@{k}"] for d in dirs.values()]))
    for name, d in dirs.items():
        for k in cfg.eval.ks:
            out[f"{prefix}{name}/R@{k}"] = d[f"R@{k}"]
        out[f"{prefix}{name}/median_rank"] = d["median_rank"]
    out[f"{prefix}time_s"] = time.perf_counter() - t0
    return out


def validator_for(cfg: Config) -> Callable[[torch.nn.Module], dict[str, float]]:
    """The trainer's validation (``train.validate_every``): :func:`validate_model` on the first
    ``eval.validation_samples`` proteins of ``data.eval_shards``."""
    return functools.partial(
        validate_model, cfg=cfg, shard_dir=cfg.data.eval_shards, max_samples=cfg.eval.validation_samples
    )
