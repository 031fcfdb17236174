"""The tri-modal model: three encoders, a projection head per modality, a learned temperature.

``encode_*`` return L2-normalised embeddings in the shared space (open_clip style); the
learned log logit scale starts at log(1 / T0) and is clamped at ``max_logit_scale``.
An objective may add modules of its own (``objective.build_heads``, e.g. ProtCLIP's heads as
``self.protclip``); the forward hands a batch such a module claims to it (ProtCLIP's training
batches, which carry ``protclip`` targets). The model knows no objective by name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.errors import ConfigError
from pretrain.models.heads import ProjectionHead
from pretrain.models.sequence_encoder import SequenceEncoder, SequenceEncoderConfig
from pretrain.models.structure_encoder import StructureEncoder, StructureEncoderConfig
from pretrain.models.text_encoder import TextEncoder, TextEncoderConfig

MODALITIES = ("sequence", "structure", "text")
# Outputs of the forward that are parameters shared by the batch, not rows: the two-pass step does not
# split them into chunks and back-propagates them once (pretrain.engine.two_pass).
SHARED_OUTPUTS = ("logit_scale", "term_bias", "term_logit_scale")
NO_DECAY = "_no_decay"  # suffix of the parameter groups AdamW does not decay (see parameter_groups)


@dataclass
class ModelConfig:
    sequence: SequenceEncoderConfig = field(default_factory=SequenceEncoderConfig)
    structure: StructureEncoderConfig = field(default_factory=StructureEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 256  # shared embedding dimension of the three projection heads
    head_hidden_dim: int | None = None  # hidden width of each 2-layer head (None: the encoder width)
    head_dropout: float = 0.0  # dropout between the two head layers
    init_temperature: float = 0.07  # CLIP's initial softmax temperature; logit scale = 1 / T
    max_logit_scale: float = 100.0  # clamp of the learned logit scale (CLIP)

    def validate(self) -> None:
        """Checks of the ``model`` section and its encoder subsections; raises ConfigError naming the field."""
        self.sequence.validate("model.sequence")
        self.structure.validate("model.structure")
        self.text.validate("model.text")
        if self.embed_dim < 1:
            raise ConfigError(f"model.embed_dim={self.embed_dim}: must be >= 1")
        if self.head_hidden_dim is not None and self.head_hidden_dim < 1:
            raise ConfigError(
                f"model.head_hidden_dim={self.head_hidden_dim}: must be >= 1 (or null: the encoder width)"
            )
        if not 0.0 <= self.head_dropout < 1.0:
            raise ConfigError(f"model.head_dropout={self.head_dropout}: expected a value in [0, 1)")
        # isfinite too: the loader refuses nan / inf, but a section may be built in code.
        for name in ("init_temperature", "max_logit_scale"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"model.{name}={getattr(self, name)}: must be a finite number > 0")


class TriModalModel(nn.Module):
    """ESM-2 + GVP-GNN + BERT encoders with 2-layer projection heads to ``cfg.embed_dim``.

    Args:
        cfg: the model recipe.
        text_vocab_size: overrides the text encoder's vocabulary size.
        objective: the training objective (``pretrain.losses.objective.Objective``) whose
            ``build_heads(model)`` modules the model adds (e.g. ProtCLIP's BSR decoder and PDA
            head as ``self.protclip``); None adds none.
        load_pretrained: read ``sequence.weights`` and ``text.pretrained_dir``'s weights; False
            builds the same architecture without them (the caller loads a full state dict).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        text_vocab_size: int | None = None,
        objective=None,
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
        extra = objective.build_heads(self) if objective is not None else {}
        for name, module in extra.items():
            self.add_module(name, module)
        self.objective_heads = tuple(extra)  # attribute names of the objective's modules, in build order

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
        second stochastic views for the intra-modal losses. A batch that one of the objective's
        modules claims (ProtCLIP's, with ``protclip`` targets) gets that module's output instead.
        """
        for name in self.objective_heads:
            module = getattr(self, name)
            if module.claims(batch):
                return module.run(self, batch)
        out = {
            "sequence": self.encode_sequence(batch["seq_tokens"]),
            "structure": self.encode_structure(batch["graph"]),
            "text": self.encode_text(batch["text_ids"], batch["text_attn"]),
            # Computed inside forward: under ZeRO-3 parameters are only gathered during forward.
            "logit_scale": self.logit_scale(),
        }
        for name in self.objective_heads:  # modules that add outputs (e.g. SigLIP's term biases)
            module = getattr(self, name)
            if getattr(module, "adds_outputs", False):
                out.update(module())
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

        The three encoders (``encoder_*``) and the heads + scale (``heads``, with the objective's
        modules when it added any), each split in two: ``<name>`` holds the matrices, which AdamW decays, and
        ``<name>_no_decay`` every parameter with fewer than two dimensions (biases, norm gains, the
        logit scale), which it must not: decay would pull layer-norm gains and the temperature
        toward 0 (the rule of BERT and open_clip). Empty groups are left out.
        """
        heads = list(self.heads.parameters()) + [self.log_logit_scale]
        for name in self.objective_heads:
            heads += list(getattr(self, name).parameters())
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
