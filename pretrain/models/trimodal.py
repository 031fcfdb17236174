"""The tri-modal model: three encoders, a projection head per modality, a learned temperature.

``encode_*`` return L2-normalised embeddings in the shared space (open_clip style); the
learned log logit scale starts at log(1 / T0) and is clamped at ``max_logit_scale``.
Built with a ``ProtCLIPLossConfig`` the model also owns the ProtCLIP heads (``self.protclip``)
and its forward runs :func:`~pretrain.models.protclip_modules.protclip_forward` on batches that
carry ``protclip`` targets (training batches of ``loss.objective: protclip``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import Config, ModelConfig
from pretrain.losses.protclip import ProtCLIPLossConfig
from pretrain.models.heads import ProjectionHead
from pretrain.models.protclip_modules import ProtCLIPHeads, protclip_forward
from pretrain.models.sequence_encoder import SequenceEncoder
from pretrain.models.structure_encoder import StructureEncoder
from pretrain.models.text_encoder import TextEncoder

MODALITIES = ("sequence", "structure", "text")
NO_DECAY = "_no_decay"  # suffix of the parameter groups AdamW does not decay (see parameter_groups)


class TriModalModel(nn.Module):
    """ESM-2 + GVP-GNN + BERT encoders with 2-layer projection heads to ``cfg.embed_dim``.

    Args:
        cfg: the model recipe.
        text_vocab_size: overrides the text encoder's vocabulary size.
        protclip: with a ``ProtCLIPLossConfig``, also build the ProtCLIP heads (BSR decoder, PDA
            head) as ``self.protclip``; None (Align-Pro) builds none.
        load_pretrained: read ``sequence.weights`` and ``text.pretrained_dir``'s weights; False
            builds the same architecture without them (the caller loads a full state dict).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        text_vocab_size: int | None = None,
        protclip: ProtCLIPLossConfig | None = None,
        load_pretrained: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        seq_cfg = cfg.sequence if load_pretrained else dataclasses.replace(cfg.sequence, weights=None)
        self.sequence_encoder = SequenceEncoder(seq_cfg)
        self.structure_encoder = StructureEncoder(cfg.structure)
        self.text_encoder = TextEncoder(cfg.text, vocab_size=text_vocab_size, load_weights=load_pretrained)
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
        self.protclip = ProtCLIPHeads.for_model(protclip, self) if protclip is not None else None

    @classmethod
    def from_config(cls, cfg: Config, load_pretrained: bool = True) -> TriModalModel:
        """The model a run's full recipe trains: with the ProtCLIP heads when ``loss.objective`` is protclip."""
        model = cls(
            cfg.model,
            protclip=cfg.loss.protclip if cfg.loss.objective == "protclip" else None,
            load_pretrained=load_pretrained,
        )
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        return model

    def set_activation_checkpointing(self, encoders: list[str] | tuple[str, ...]) -> None:
        """Checkpoint the layers of the named encoders (``sequence``, ``structure``, ``text``), not the others."""
        unknown = sorted(set(encoders) - set(MODALITIES))
        if unknown:
            raise ValueError(f"unknown encoders for activation checkpointing: {unknown}; expected {list(MODALITIES)}")
        for name, enc in zip(MODALITIES, self.encoders()):
            enc.set_activation_checkpointing(name in encoders)

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
        second stochastic views for the intra-modal losses. A batch with ``protclip`` targets on
        a model with ProtCLIP heads gets :func:`protclip_forward`'s output instead.
        """
        if self.protclip is not None and "protclip" in batch:
            return protclip_forward(self, self.protclip, batch)
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
        """Named groups for the two-stage schedule and weight decay.

        The three encoders (``encoder_*``) and the heads + scale (``heads``, with the ProtCLIP heads
        when built), each split in two: ``<name>`` holds the matrices, which AdamW decays, and
        ``<name>_no_decay`` every parameter with fewer than two dimensions (biases, norm gains, the
        logit scale), which it must not: decay would pull layer-norm gains and the temperature
        toward 0 (the rule of BERT and open_clip). Empty groups are left out.
        """
        heads = list(self.heads.parameters()) + [self.log_logit_scale]
        if self.protclip is not None:
            heads += list(self.protclip.parameters())
        by_part = {
            "encoder_sequence": list(self.sequence_encoder.parameters()),
            "encoder_structure": list(self.structure_encoder.parameters()),
            "encoder_text": list(self.text_encoder.parameters()),
            "heads": heads,
        }
        groups = {}
        for name, params in by_part.items():
            groups[name] = [p for p in params if p.ndim >= 2]
            groups[name + NO_DECAY] = [p for p in params if p.ndim < 2]
        return {name: params for name, params in groups.items() if params}

    def encoders(self) -> list[nn.Module]:
        return [self.sequence_encoder, self.structure_encoder, self.text_encoder]
