"""Validation during pretraining: a few hundred held-out proteins, every N steps.

Cross-modal retrieval always; with ``eval.validation_zeroshot`` also zero-shot Fmax (ProtST-style
text prompts per EC class / GO term, :mod:`pretrain.eval.zeroshot`) on the proteins' own labels.
With ``eval.select_metric`` the validator notes the chosen score on the engine, and the checkpoint
of those weights is pinned when it is the best (:mod:`pretrain.engine.best_checkpoint`).

The collated validation batches (and their labels) are built once per (shard set, size, model
config) and kept in memory, so a call costs only the forward passes. Under ZeRO-3 call it on every
rank (the forward passes gather partitioned parameters collectively); each rank computes the same
numbers.
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
from pretrain.engine import best_checkpoint
from pretrain.eval.embed import embed_texts, read_annotations
from pretrain.eval.function import FunctionSettings, evaluate_function
from pretrain.eval.retrieval import retrieval_metrics
from pretrain.models.trimodal import MODALITIES

# eval.validation_zeroshot task -> (evaluate_function task, its result key)
_ZEROSHOT = {"ec": ("ec", "EC"), "go_mf": ("go", "GO-MF"), "go_bp": ("go", "GO-BP"), "go_cc": ("go", "GO-CC")}

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


@functools.lru_cache(maxsize=2)
def _annotations(where: str, max_samples: int):
    """The labels of the first ``max_samples`` proteins, row-aligned with :func:`_batches` (an
    unreadable sample keeps its row in both)."""
    return read_annotations(where, max_samples)


@functools.lru_cache(maxsize=4)
def _ec_names(path: str) -> dict[str, str]:
    from pretrain.eval.zeroshot import load_ec_names

    if not Path(path).is_file():
        raise FileNotFoundError(f"eval.ec_names: {path} does not exist")
    return load_ec_names(path)


def _zeroshot_metrics(model, cfg: Config, arrays: dict, where: str, max_samples: int, prefix: str) -> dict:
    """Zero-shot Fmax of ``eval.validation_zeroshot`` on the validation proteins' own labels."""
    ann = _annotations(where, max_samples)
    if len(ann) != len(arrays["present_sequence"]):
        raise RuntimeError(f"{where}: {len(ann)} annotated proteins for {len(arrays['present_sequence'])} embedded")
    module = getattr(model, "module", model)  # the DeepSpeed engine's model (ZeRO-3 hooks gather on forward)
    names = _ec_names(cfg.eval.ec_names) if cfg.eval.ec_names else None
    test = {"annotations": ann, **arrays}
    tasks = {_ZEROSHOT[t][0] for t in cfg.eval.validation_zeroshot}
    scores = evaluate_function(
        None,
        test,
        tasks,
        FunctionSettings(methods=frozenset({"zeroshot"})),
        embed_text=lambda texts: embed_texts(module, cfg, texts, cfg.eval.batch_size),
        ec_names=names,
    )
    out: dict[str, float] = {}
    for task in cfg.eval.validation_zeroshot:
        methods = scores[_ZEROSHOT[task][1]].get("methods", {})  # absent: no validation protein has a label
        for modality, suffix in (("sequence", ""), ("structure", "/structure")):
            value = methods.get(f"zeroshot/{modality}", {}).get("fmax")
            out[f"{prefix}zeroshot_fmax_{task}{suffix}"] = float("nan") if value is None else float(value)
    return out


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
        directions), ``val/<direction>/R@k``, ``val/<direction>/median_rank``, ``val/time_s``, and
        for each task of ``eval.validation_zeroshot`` ``val/zeroshot_fmax_<task>`` (sequence
        embeddings) and ``val/zeroshot_fmax_<task>/structure`` (NaN when no protein has a label).
    """
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks: dict[str, list] = {m: [] for m in MODALITIES}
    present: dict[str, list] = {m: [] for m in MODALITIES}
    zeroshot: dict[str, float] = {}
    try:
        for batch in _batches(cfg, shard_dir, max_samples, batch_size or cfg.eval.batch_size):
            emb = model(batch_to_device(batch, device))  # the training forward: works on engine and module
            for m in MODALITIES:
                mask = batch["present"][m]
                chunks[m].append((emb[m].float().cpu() * mask[:, None]).numpy())
                present[m].append(mask.numpy().astype(bool))
        arrays = {m: np.concatenate(chunks[m]) for m in MODALITIES}
        arrays.update({f"present_{m}": np.concatenate(present[m]) for m in MODALITIES})
        if cfg.eval.validation_zeroshot:
            where = str(shard_dir) if is_url(shard_dir) else str(Path(shard_dir).resolve())
            zeroshot = _zeroshot_metrics(model, cfg, arrays, where, max_samples, prefix)
    finally:
        model.train(was_training)
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
    out.update(zeroshot)
    out[f"{prefix}time_s"] = time.perf_counter() - t0
    return out


def validator_for(cfg: Config) -> Callable[[torch.nn.Module], dict[str, float]]:
    """The trainer's validation (``train.validate_every``): :func:`validate_model` on the first
    ``eval.validation_samples`` proteins of ``data.eval_shards``. With ``eval.select_metric`` set it
    also notes that score on the engine, for the checkpoint saved next to pin when it is the best
    (:func:`pretrain.engine.best_checkpoint.note_validation`)."""
    validate = functools.partial(
        validate_model, cfg=cfg, shard_dir=cfg.data.eval_shards, max_samples=cfg.eval.validation_samples
    )
    metric = cfg.eval.select_metric
    if metric is None:
        return validate

    def validate_and_note(model: torch.nn.Module) -> dict[str, float]:
        out = validate(model)
        if metric not in out:
            raise KeyError(f"eval.select_metric={metric!r}: validation reported only {sorted(out)}")
        best_checkpoint.note_validation(model, metric, cfg.eval.select_mode, out[metric])
        return out

    return validate_and_note
