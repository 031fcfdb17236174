"""Embed proteins and texts with a trained model from Python: the space ``python -m pretrain.search`` uses.

    from pretrain.api import load_model
    model = load_model("runs/demo")                     # a run directory or an export (path or URL)
    seqs = model.embed_sequences(["MKTAYIAKQR", "MSTNPKPQRK"])
    texts = model.embed_texts(["ATP-dependent DNA helicase"])
    structs = model.embed_structures(["1abc.pdb", ("7ddo.cif.gz", "C")])
    scores = seqs @ texts.T                             # cosine similarities

Every ``embed_*`` returns a **numpy float32 array (N, E) of unit rows**, row i for input i, computed
exactly as the evaluation and ``pretrain.eval.export_embeddings`` compute them (the same tokenizers,
cropping and :class:`pretrain.data.collate.BatchBuilder` featurisation, ``encode_*`` of the model), so
the rows can be searched against an exported index. Inputs are grouped into batches of similar length
(less padding); results come back in input order and do not depend on the batch size beyond float
rounding (~1e-6).

Structures are read with the shard builder's reader (:func:`data_shards.readers.structures.read_structure`,
``plddt="auto"``: model 1, first altloc, observed residues; pLDDT for AlphaFold models); a file with
several protein chains needs the chain named: ``(path, chain)``.

:func:`load_structure_encoder` reads the ``structure/`` folder written by ``python -m pretrain.hf_export``
(the one encoder transformers has no class for) and embeds files the same way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from data_shards.readers.structures import read_structure
from data_shards.schema import ProteinRecord
from pretrain.config import Config
from pretrain.data.collate import BatchBuilder
from pretrain.engine.export import MODEL_FILE, check_device, load_exported
from pretrain.eval.embed import resolve_device
from pretrain.models.heads import ProjectionHead
from pretrain.models.structure_encoder import StructureEncoder, StructureEncoderConfig
from pretrain.models.text_encoder import build_tokenizer, tokenize_texts

StructureInput = str | Path | tuple[str | Path, str]  # a file, or (file, author chain id)
_HEAD_WEIGHTS = "projection_head.safetensors"  # as pretrain.hf_export writes them
_HEAD_CONFIG = "projection_head.json"


def _resolve_export(path: str | Path) -> str | Path:
    """An export directory or URL; a run directory stands for its ``export/``."""
    from data_shards import storage

    if storage.is_url(path):
        return path
    path = Path(path)
    if not (path / MODEL_FILE).is_file() and (path / "export" / MODEL_FILE).is_file():
        return path / "export"
    return path


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Input indices in batches of similar length (longest first)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _gather(batches: list[list[int]], chunks: list[Tensor], n: int, dim: int) -> np.ndarray:
    out = np.zeros((n, dim), np.float32)
    for rows, chunk in zip(batches, chunks):
        out[rows] = chunk.float().cpu().numpy()
    return out


def _structure_records(items: Sequence[StructureInput]) -> list[ProteinRecord]:
    """One record (sequence + backbone, as the shard builder stores them) per file / (file, chain)."""
    records = []
    for item in items:
        path, chain = item if isinstance(item, tuple) else (item, None)
        parsed = read_structure(path, plddt="auto", chains={chain} if chain is not None else None)
        if chain is not None and chain in parsed.ambiguous:
            raise ValueError(f"{path}: chain id {chain} is used by two different chains ({parsed.ambiguous[chain]})")
        if chain is None:
            if len(parsed.chains) != 1:
                found = [c.chain for c in parsed.chains]
                what = f"protein chains {', '.join(found)}" if found else "no protein chain"
                raise ValueError(f"{path}: has {what}; pass (path, chain) to pick one")
            found_chain = parsed.chains[0]
        else:
            found_chain = parsed.chain(chain)
            if found_chain is None:
                raise ValueError(f"{path}: no protein chain {chain!r} (chains: {[c.chain for c in parsed.chains]})")
        records.append(
            ProteinRecord(f"{path}:{found_chain.chain}", found_chain.sequence, found_chain.backbone, None, {})
        )
    return records


def _embed_structure_records(
    records: list[ProteinRecord],
    builder: BatchBuilder,
    encode: Callable[[dict], Tensor],
    device: torch.device,
    dim: int,
    batch_size: int,
) -> np.ndarray:
    """Featurise with the evaluation collate (start crop, no augmentation) and encode, in input order."""
    batches = _length_batches([len(r.sequence or "") for r in records], batch_size)
    chunks = []
    rng = np.random.default_rng(0)  # unused by an evaluation batch (train=False): no crop or augmentation draws
    for rows in batches:
        batch = builder.build([records[i] for i in rows], rng, False)
        usable = batch["present"]["structure"]
        if not bool(usable.all()):
            bad = [records[rows[j]].id for j in np.flatnonzero(~usable.numpy())]
            raise ValueError(f"no residue with N, CA and C atoms (no structure graph): {bad}")
        chunks.append(encode({k: v.to(device) for k, v in batch["graph"].items()}))
    return _gather(batches, chunks, len(records), dim)


def _temperatures(model, cfg: Config, shared_scale: float) -> dict[str, float]:
    """``1 / s`` of every learned scale the model's loss used (see :class:`EmbeddingModel`)."""
    per_term = getattr(model, "term_temperature", None)  # TermLogitScale, added by the objective
    if per_term is None:
        return {"shared": 1.0 / shared_scale}
    scales = per_term()["term_logit_scale"].reshape(-1).tolist()
    out = {name: 1.0 / s for name, s in zip(per_term.names, scales)}
    if cfg.loss.temperature != "per_term":  # per_pair: the intra-modal terms keep the shared scale
        out["shared"] = 1.0 / shared_scale
    return out


class EmbeddingModel:
    """A trained tri-modal model with embedding methods; build it with :func:`load_model`.

    Attributes:
        model: the :class:`pretrain.models.trimodal.TriModalModel` (eval mode).
        cfg: the run's recipe.
        device: where the model runs.
        embed_dim: E, the width of the shared space.
        logit_scale: the model's shared learned softmax multiplier (clamped). Under
            ``loss.temperature: per_term`` no term used it (it stays at its initial value): read
            :attr:`temperatures` for what the loss used.
        temperatures: the learned temperature ``1 / s`` of each scale the loss used, by name: the
            per-term ones when the model has them (``per_pair``: ``seq_struct``, ``seq_text``,
            ``struct_text`` and ``shared``, which the intra-modal terms keep; ``per_term``: one per term,
            ``seq_struct`` ... ``intra_text``), else ``{"shared": 1 / logit_scale}``.
    """

    def __init__(self, model, cfg: Config):
        self.model = model.eval()
        self.cfg = cfg
        self.device = next(model.parameters()).device
        self.embed_dim = cfg.model.embed_dim
        with torch.no_grad():
            self.logit_scale = float(model.logit_scale().reshape(-1)[0])
            self.temperatures = _temperatures(model, cfg, self.logit_scale)
        self._tokenizer = build_tokenizer(cfg.model.text)
        self._builder: BatchBuilder | None = None

    @torch.inference_mode()
    def embed_sequences(self, sequences: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Amino-acid sequences (one-letter; case and whitespace ignored, unknown letters -> ``<unk>``).

        Longer sequences are cut to their first ``model.sequence.max_length`` residues, as in evaluation.

        Shapes:
            -> (len(sequences), E) float32, unit rows.
        """
        seqs = list(sequences)
        for i, s in enumerate(seqs):
            if not isinstance(s, str) or not "".join(s.split()):
                raise ValueError(f"sequence {i} is empty or not a string: {s!r}")
        encoder = self.model.sequence_encoder
        batches = _length_batches([len(s) for s in seqs], batch_size)
        chunks = [
            self.model.encode_sequence(encoder.tokenize([seqs[i] for i in rows]).to(self.device)) for rows in batches
        ]
        return _gather(batches, chunks, len(seqs), self.embed_dim)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Free texts (function descriptions, queries), truncated to ``model.text.max_length`` tokens.

        Shapes:
            -> (len(texts), E) float32, unit rows.
        """
        texts = list(texts)
        if any(not isinstance(t, str) for t in texts):
            raise ValueError("texts must be strings")
        batches = _length_batches([len(t) for t in texts], batch_size)
        chunks = []
        for rows in batches:
            ids, attn = tokenize_texts(self._tokenizer, [texts[i] for i in rows], self.cfg.model.text.max_length)
            chunks.append(self.model.encode_text(ids.to(self.device), attn.to(self.device)))
        return _gather(batches, chunks, len(texts), self.embed_dim)

    @torch.inference_mode()
    def embed_structures(self, items: Sequence[StructureInput], batch_size: int = 16) -> np.ndarray:
        """PDB / mmCIF files (plain or gzipped), each a path or ``(path, chain)``.

        Raises:
            data_shards.readers.structures.StructureError: a file cannot be read.
            ValueError: a file with several protein chains and none named, a missing chain, a chain
                without any complete backbone residue.

        Shapes:
            -> (len(items), E) float32, unit rows.
        """
        if self._builder is None:
            self._builder = BatchBuilder(self.cfg, views=None)
        records = _structure_records(items)
        return _embed_structure_records(
            records, self._builder, self.model.encode_structure, self.device, self.embed_dim, batch_size
        )


def load_model(path: str | Path, device: str = "cpu") -> EmbeddingModel:
    """Load a run directory's export (``RUN`` or ``RUN/export``, a path or URL) for embedding.

    Args:
        path: run directory, export directory or export URL.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... or ``"auto"`` (CUDA when visible). The model
            runs in fp32.

    Raises:
        FileNotFoundError, ValueError: as :func:`pretrain.engine.export.load_exported` (no export, a
            damaged one, an unusable device).
    """
    model, cfg = load_exported(_resolve_export(path), device=resolve_device(device))
    return EmbeddingModel(model, cfg)


class StructureEmbedder(nn.Module):
    """The GVP-GNN structure encoder and its projection head, read from an hf_export ``structure/`` folder.

    Args:
        encoder_cfg: the encoder's configuration.
        max_residues: residues kept per chain (its first ones), as in training.
        min_plddt: residues of predicted models under this pLDDT leave the graph (None: all kept).
        head: the projection head.

    Shapes:
        forward: graph from ``pretrain.data.featurize.collate_graphs`` (B graphs) -> (B, E) unit rows.
    """

    def __init__(
        self, encoder_cfg: StructureEncoderConfig, max_residues: int, min_plddt: float | None, head: ProjectionHead
    ):
        super().__init__()
        self.encoder = StructureEncoder(encoder_cfg)
        self.head = head
        cfg = Config()  # only the fields the structure featurisation reads matter
        cfg.model.structure = encoder_cfg
        cfg.model.sequence = dataclasses.replace(cfg.model.sequence, max_length=max_residues)
        cfg.data = dataclasses.replace(cfg.data, min_plddt=min_plddt)
        self._builder = BatchBuilder(cfg, views=None)

    def forward(self, graph: dict[str, Tensor]) -> Tensor:
        return F.normalize(self.head(self.encoder(graph)), dim=-1)

    @torch.inference_mode()
    def embed_structures(self, items: Sequence[StructureInput], batch_size: int = 16) -> np.ndarray:
        """As :meth:`EmbeddingModel.embed_structures`: (len(items), E) float32 numpy, unit rows."""
        self.eval()
        device = next(self.parameters()).device
        return _embed_structure_records(
            _structure_records(items), self._builder, self, device, self.head.out_dim, batch_size
        )


def load_structure_encoder(directory: str | Path, device: str = "cpu") -> StructureEmbedder:
    """Read ``structure/`` of a ``python -m pretrain.hf_export`` directory (config.json, model.safetensors,
    projection_head.*); returns the :class:`StructureEmbedder` in eval mode.

    Raises:
        FileNotFoundError: a file is missing. ValueError: not such a folder, or weights that do not fit.
    """
    directory = Path(directory)
    check_device(resolve_device(device))
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory} (expected hf_export's structure/ folder)")
    config = json.loads(config_path.read_text())
    if config.get("format") != "align-pro-gvp":
        raise ValueError(f"{config_path}: not an align-pro GVP-GNN config (format {config.get('format')!r})")
    enc = dict(config["encoder"])
    for key in ("node_hidden", "edge_hidden"):
        enc[key] = tuple(enc[key])
    head_info = json.loads((directory / _HEAD_CONFIG).read_text())
    head = ProjectionHead(head_info["in_dim"], head_info["out_dim"], head_info["hidden_dim"])
    featurize = config["featurize"]
    embedder = StructureEmbedder(StructureEncoderConfig(**enc), featurize["max_residues"], featurize["min_plddt"], head)
    try:
        embedder.encoder.load_state_dict(load_file(str(directory / MODEL_FILE)))
        head.load_state_dict(load_file(str(directory / _HEAD_WEIGHTS)))
    except RuntimeError as e:
        raise ValueError(f"{directory}: weights do not fit its config.json: {' '.join(str(e).split())[:400]}") from None
    return embedder.to(resolve_device(device)).eval()
