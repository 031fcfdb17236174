"""The tri-modal model: three encoders, a projection head per modality, a learned temperature.

``encode_*`` return L2-normalised embeddings in the shared space (open_clip style); the
learned log logit scale starts at log(1 / T0) and is clamped at ``max_logit_scale``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.models.heads import ProjectionHead
from pretrain.models.sequence_encoder import SequenceEncoder
from pretrain.models.structure_encoder import StructureEncoder
from pretrain.models.text_encoder import TextEncoder

MODALITIES = ("sequence", "structure", "text")


class TriModalModel(nn.Module):
    """ESM-2 + GVP-GNN + BERT encoders with 2-layer projection heads to ``cfg.embed_dim``."""

    def __init__(self, cfg: ModelConfig, text_vocab_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.sequence_encoder = SequenceEncoder(cfg.sequence)
        self.structure_encoder = StructureEncoder(cfg.structure)
        self.text_encoder = TextEncoder(cfg.text, vocab_size=text_vocab_size)
        heads = {}
        for name, enc in (
            ("sequence", self.sequence_encoder),
            ("structure", self.structure_encoder),
            ("text", self.text_encoder),
        ):
            hidden = cfg.head_hidden_dim or enc.output_dim
            heads[name] = ProjectionHead(enc.output_dim, cfg.embed_dim, hidden, dropout=cfg.head_dropout)
        self.heads = nn.ModuleDict(heads)
        # Shape [1], not []: deepspeed 0.19.8 fails at start-up on 0-dim parameters.
        self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.init_temperature)))

    # ------------------------------------------------------------------ encoders
    def encode_sequence(self, tokens: Tensor) -> Tensor:
        """tokens (B, L) ESM alphabet -> (B, E) unit-norm embeddings."""
        return F.normalize(self.heads["sequence"](self.sequence_encoder(tokens)), dim=-1)

    def encode_structure(self, graph: dict[str, Tensor]) -> Tensor:
        """graph from ``collate_graphs`` (B graphs) -> (B, E) unit-norm embeddings."""
        return F.normalize(self.heads["structure"](self.structure_encoder(graph)), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask (B, L) -> (B, E) unit-norm embeddings."""
        return F.normalize(self.heads["text"](self.text_encoder(input_ids, attention_mask)), dim=-1)

    def logit_scale(self) -> Tensor:
        """The softmax multiplier s = exp(log_logit_scale), clamped; shape [1]."""
        return self.log_logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Embed every modality of a collated batch (see ``pretrain.data.collate``).

        Returns a dict with ``sequence``, ``structure``, ``text`` (B, E) embeddings, and
        ``sequence_view2`` / ``structure_view2`` / ``text_view2`` when the batch carries
        second stochastic views for the intra-modal losses.
        """
        out = {
            "sequence": self.encode_sequence(batch["seq_tokens"]),
            "structure": self.encode_structure(batch["graph"]),
            "text": self.encode_text(batch["text_ids"], batch["text_attn"]),
            # Computed inside forward: under ZeRO-3 parameters are only gathered during forward.
            "logit_scale": self.logit_scale(),
        }
        views = batch.get("views") or {}
        if "seq_tokens" in views:
            out["sequence_view2"] = self.encode_sequence(views["seq_tokens"])
        if "graph" in views:
            out["structure_view2"] = self.encode_structure(views["graph"])
        if "text_ids" in views:
            out["text_view2"] = self.encode_text(views["text_ids"], views["text_attn"])
        return out

    # ------------------------------------------------------------------ parameter groups
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups for the two-stage schedule: the three encoders, and the heads + scale."""
        return {
            "encoder_sequence": list(self.sequence_encoder.parameters()),
            "encoder_structure": list(self.structure_encoder.parameters()),
            "encoder_text": list(self.text_encoder.parameters()),
            "heads": list(self.heads.parameters()) + [self.log_logit_scale],
        }

    def encoders(self) -> list[nn.Module]:
        return [self.sequence_encoder, self.structure_encoder, self.text_encoder]
