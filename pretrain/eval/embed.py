"""Embed every protein of a shard set with a trained model, all three modalities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pretrain.config import Config
from pretrain.data.stream import iter_eval_batches
from pretrain.models.trimodal import TriModalModel


@torch.no_grad()
def embed_shards(
    model: TriModalModel, cfg: Config, shard_dir: str | Path, batch_size: int, max_samples: int | None = None
) -> dict[str, np.ndarray | list[str]]:
    """Embeddings of every sample of ``shard_dir`` in manifest order.

    Returns:
        ``ids`` (list of N), ``sequence`` / ``structure`` / ``text`` (N, E) float32 arrays and
        ``present_<modality>`` (N,) bool arrays (rows without a modality hold zeros).
    """
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list] = {"ids": [], "sequence": [], "structure": [], "text": []}
    present: dict[str, list] = {m: [] for m in ("sequence", "structure", "text")}
    for batch, _bad in iter_eval_batches(cfg, shard_dir, batch_size, max_samples):
        batch_dev = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "graph"}
        graph = {k: v.to(device) for k, v in batch["graph"].items()}
        emb = {
            "sequence": model.encode_sequence(batch_dev["seq_tokens"]),
            "structure": model.encode_structure(graph),
            "text": model.encode_text(batch_dev["text_ids"], batch_dev["text_attn"]),
        }
        out["ids"].extend(batch["ids"])
        for m in ("sequence", "structure", "text"):
            mask = batch["present"][m]
            e = emb[m].float().cpu() * mask[:, None]
            out[m].append(e.numpy())
            present[m].append(mask.numpy())
    result: dict = {"ids": out["ids"]}
    for m in ("sequence", "structure", "text"):
        result[m] = np.concatenate(out[m]) if out[m] else np.zeros((0, model.cfg.embed_dim), np.float32)
        result[f"present_{m}"] = np.concatenate(present[m]) if present[m] else np.zeros(0, bool)
    return result
