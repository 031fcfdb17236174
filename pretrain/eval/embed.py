"""Embed the proteins of a shard set (and free texts) with a trained model.

One pass over the shards gives both the embeddings and the annotations the evaluation needs
(canonical text, GO terms, EC numbers, sequence, metadata), so nothing is read twice. Batches
are built exactly as :func:`pretrain.data.stream.iter_eval_batches` builds them (manifest order,
deterministic evaluation collate).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_shards.manifest import load_manifest
from data_shards.reader import BadSampleError, BadShardError, ShardReader
from data_shards.schema import ProteinRecord
from data_shards.text_rules import canonical_text
from pretrain.config import Config
from pretrain.data.collate import BatchBuilder
from pretrain.models.text_encoder import build_tokenizer, tokenize_texts
from pretrain.models.trimodal import MODALITIES, TriModalModel


@dataclass
class Annotations:
    """Per-protein labels and texts of a shard set, row-aligned with its embeddings.

    Unreadable samples keep their row: id "" and empty fields.
    """

    ids: list[str] = field(default_factory=list)
    sequences: list[str | None] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # canonical text ("" without text)
    go: list[list[dict]] = field(default_factory=list)  # text.go entries: {"id", "aspect", "name"}
    ec: list[list[str]] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, rec: ProteinRecord | None) -> None:
        text = (rec.text or {}) if rec is not None else {}
        self.ids.append(rec.id if rec is not None else "")
        self.sequences.append(rec.sequence if rec is not None else None)
        self.texts.append(canonical_text(text) if text else "")
        self.go.append(list(text.get("go") or []))
        self.ec.append(list(text.get("ec") or []))
        self.meta.append(dict(rec.meta) if rec is not None else {})


def resolve_device(device: str = "auto") -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"; anything else is returned as is."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _sample_refs(shard_dir: str | Path, max_samples: int | None) -> list[tuple[str, int]]:
    manifest = load_manifest(shard_dir)  # a path or a URL (data_shards.storage)
    refs = [(str(s.path), i) for s in manifest.shards for i in range(s.num_samples)]
    return refs if max_samples is None else refs[:max_samples]


def count_samples(shard_dir: str | Path, max_samples: int | None = None) -> int:
    """Rows :func:`iter_embedded_batches` will produce for ``shard_dir``."""
    return len(_sample_refs(shard_dir, max_samples))


def _read(readers: dict, path: str, idx: int) -> ProteinRecord | None:
    if path not in readers:
        try:
            readers[path] = ShardReader(path)
        except BadShardError:
            readers[path] = None
    reader = readers[path]
    if reader is None:
        return None
    try:
        return reader.read(idx)
    except BadSampleError:
        return None


@torch.no_grad()
def iter_embedded_batches(
    model: TriModalModel,
    cfg: Config,
    shard_dir: str | Path,
    batch_size: int,
    max_samples: int | None = None,
    modalities: Sequence[str] = MODALITIES,
) -> Iterator[tuple[list[ProteinRecord | None], dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Yield ``(records, embeddings, present)`` batch by batch in manifest order.

    Shapes:
        embeddings[m] (B, E) float32 (zero rows where the modality is absent), present[m] (B,) bool,
        for each requested modality ``m``; ``records[i]`` is None for an unreadable sample.
    """
    model.eval()
    device = next(model.parameters()).device
    builder = BatchBuilder(cfg, views=None)
    refs = _sample_refs(shard_dir, max_samples)
    readers: dict = {}
    try:
        for start in range(0, len(refs), batch_size):
            records = [_read(readers, p, i) for p, i in refs[start : start + batch_size]]
            # same rng key as iter_eval_batches: identical batches
            batch = builder.build(records, np.random.default_rng([cfg.train.seed, start]), False)
            emb, present = {}, {}
            for m in modalities:
                if m == "sequence":
                    e = model.encode_sequence(batch["seq_tokens"].to(device))
                elif m == "structure":
                    e = model.encode_structure({k: v.to(device) for k, v in batch["graph"].items()})
                elif m == "text":
                    e = model.encode_text(batch["text_ids"].to(device), batch["text_attn"].to(device))
                else:
                    raise ValueError(f"unknown modality {m!r}; expected one of {MODALITIES}")
                mask = batch["present"][m]
                emb[m] = (e.float().cpu() * mask[:, None]).numpy()
                present[m] = mask.numpy().astype(bool)
            yield records, emb, present
    finally:
        for reader in readers.values():
            if reader is not None:
                reader.close()


def embed_shards(
    model: TriModalModel,
    cfg: Config,
    shard_dir: str | Path,
    batch_size: int,
    max_samples: int | None = None,
    modalities: Sequence[str] = MODALITIES,
    progress: bool = False,
) -> dict:
    """Embeddings and annotations of every sample of ``shard_dir`` in manifest order.

    Returns:
        ``ids`` (list of N), ``<modality>`` (N, E) float32 arrays and ``present_<modality>`` (N,)
        bool arrays for each requested modality (rows without a modality hold zeros), and
        ``annotations`` (:class:`Annotations`, same row order).
    """
    ann = Annotations()
    chunks: dict[str, list] = {m: [] for m in modalities}
    present: dict[str, list] = {m: [] for m in modalities}
    batches = iter_embedded_batches(model, cfg, shard_dir, batch_size, max_samples, modalities)
    if progress:
        from tqdm import tqdm

        n = count_samples(shard_dir, max_samples)
        batches = tqdm(batches, total=-(-n // batch_size), desc=f"embed {shard_dir}", unit="batch")
    for records, emb, pres in batches:
        for rec in records:
            ann.add(rec)
        for m in modalities:
            chunks[m].append(emb[m])
            present[m].append(pres[m])
    result: dict = {"ids": list(ann.ids), "annotations": ann}
    for m in modalities:
        result[m] = np.concatenate(chunks[m]) if chunks[m] else np.zeros((0, model.cfg.embed_dim), np.float32)
        result[f"present_{m}"] = np.concatenate(present[m]) if present[m] else np.zeros(0, bool)
    return result


@torch.no_grad()
def embed_texts(model: TriModalModel, cfg: Config, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embed free texts (queries, zero-shot prompts) with the text encoder.

    Shapes:
        -> (len(texts), E) float32, unit norm.
    """
    model.eval()
    device = next(model.parameters()).device
    tokenizer = build_tokenizer(cfg.model.text)
    out = []
    for start in range(0, len(texts), batch_size):
        ids, attn = tokenize_texts(tokenizer, list(texts[start : start + batch_size]), cfg.model.text.max_length)
        out.append(model.encode_text(ids.to(device), attn.to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.cfg.embed_dim), np.float32)


def read_annotations(shard_dir: str | Path, max_samples: int | None = None) -> Annotations:
    """The :class:`Annotations` of ``shard_dir`` alone (no model, no featurisation), same row order."""
    ann = Annotations()
    readers: dict = {}
    try:
        for path, idx in _sample_refs(shard_dir, max_samples):
            ann.add(_read(readers, path, idx))
    finally:
        for reader in readers.values():
            if reader is not None:
                reader.close()
    return ann
