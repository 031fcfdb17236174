"""ProtCLIP's segment-level modules: the BSR decoder, the PDA head, and the forward that feeds them.

ProtCLIP (Zhou et al., AAAI 2025, arXiv 2412.20014) adds two segment-wise objectives to the global
protein-text contrast (GC) and ESM-2's masked language modelling (MLM):

- **BSR** (biotext-guided static segment reconstruction): contiguous residue spans are masked and
  reconstructed by a decoder whose residue queries cross-attend to the function text.
- **PDA** (property-grouped dynamic segment alignment): the text is split into property segments
  (name, function, location, ...); each segment vector is quantised against a learnable bank of
  memory prototypes, residues are pooled per segment by their similarity to the segment's
  prototype (a "dynamic segment" of the protein), and segment-level InfoNCE within each protein
  aligns every text segment with its pooled protein vector.

The losses live in :mod:`pretrain.losses.protclip`; :func:`protclip_forward` runs the encoder
passes and these modules and returns what the loss needs. It reads parameters of the model and of
the heads, so under ZeRO-3 it must run inside the engine's forward (from ``TriModalModel.forward``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # label of positions without a prediction target (torch cross_entropy default)

# Property segments of a function text, in slot order: segment id k always means SEGMENTS[k].
SEGMENTS = ("name", "function", "location", "similarity", "go_f", "go_p", "go_c", "ec")
NUM_SEGMENTS = len(SEGMENTS)


def _safe_key_mask(valid: Tensor) -> Tensor:
    """``valid`` with position 0 switched on in rows that have no valid position at all.

    Attention / softmax over a row with every key masked gives NaN, and NaN poisons gradients even
    when the row is later excluded from the loss (0 · NaN = NaN). Such rows (a protein without text
    or without residues) attend to position 0 instead; the loss masks them out.
    """
    empty = ~valid.any(dim=-1, keepdim=True)
    first = torch.zeros_like(valid)
    first[..., 0] = True
    return valid | (empty & first)


class _CrossBlock(nn.Module):
    """Pre-norm cross-attention (queries: residues, keys/values: text tokens) + MLP, both residual."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * hidden, hidden)
        )

    def forward(self, x: Tensor, memory: Tensor, key_padding_mask: Tensor) -> Tensor:
        attended, _ = self.attn(self.norm_q(x), memory, memory, key_padding_mask=key_padding_mask, need_weights=False)
        x = x + attended
        return x + self.mlp(self.norm_mlp(x))


class BSRDecoder(nn.Module):
    """Predicts masked residues from span-masked residue states and the function text.

    Residue states (queries) cross-attend to the text token states (keys / values, padding masked)
    in ``layers`` pre-norm blocks; a LayerNorm + linear layer gives amino-acid logits at every
    position (the loss reads the masked spans only). There is no self-attention among residues:
    context from the rest of the protein is already in the encoder's states, and what the span
    lost must come from the text.

    Unlike the public ProtCLIP code, which runs the projections and the decoder under
    ``torch.no_grad()`` (so BSR trains only its output head and neither encoder), nothing here is
    detached: the BSR gradient reaches the decoder, the protein encoder and the text encoder, which
    is what "biotext-guided" reconstruction needs to shape both representations.

    Args:
        protein_dim: width of the residue states (ESM-2 embed dim).
        text_dim: width of the text token states (BERT hidden size).
        hidden: decoder width.
        layers: cross-attention blocks.
        heads: attention heads (must divide ``hidden``).
        vocab_size: output classes (the ESM alphabet, 33).
        dropout: attention and MLP dropout.

    Shapes:
        protein_states (B, Lp, Dp), text_states (B, Lt, Dt), text_mask (B, Lt) bool/int (1 = token)
        -> logits (B, Lp, vocab_size)
    """

    def __init__(
        self,
        protein_dim: int,
        text_dim: int,
        hidden: int = 512,
        layers: int = 1,
        heads: int = 8,
        vocab_size: int = 33,
        dropout: float = 0.0,
    ):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"BSR hidden {hidden} is not divisible by heads {heads}")
        self.query_in = nn.Linear(protein_dim, hidden)
        self.memory_in = nn.Sequential(nn.Linear(text_dim, hidden), nn.LayerNorm(hidden))
        self.blocks = nn.ModuleList(_CrossBlock(hidden, heads, dropout) for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, vocab_size))

    def forward(self, protein_states: Tensor, text_states: Tensor, text_mask: Tensor) -> Tensor:
        x = self.query_in(protein_states)  # (B, Lp, H)
        memory = self.memory_in(text_states)  # (B, Lt, H)
        pad = ~_safe_key_mask(text_mask.bool())  # (B, Lt) True = ignore
        for block in self.blocks:
            x = block(x, memory, pad)
        return self.out(x)  # (B, Lp, V)


class PDAHead(nn.Module):
    """Memory prototypes, segment quantisation and similarity pooling of residues per segment.

    1. Segment vectors: the mean of each segment's text token states, projected to ``proj_dim``
       and L2-normalised: ``z`` (B, S, P).
    2. Quantisation against the prototype bank ``E`` (``num_prototypes`` × ``proj_dim``, compared
       by cosine): ``"soft"`` (default) uses ``q = softmax(cos(z, E) / assign_temperature) · E``,
       differentiable in both; ``"ste"`` uses the nearest prototype with the straight-through
       estimator (value of the prototype, gradient of ``z``). The VQ-VAE loss
       ``|sg(z) - q|² + commitment · |z - sg(q)|²`` (mean over present segments) trains the bank
       and keeps segment vectors near it. The public code uses a Gumbel-softmax mix and leaves its
       prototype loss out of the total; here it is part of ``loss_pda``.
    3. Pooling: residue states are projected and normalised; each segment's attention over residues
       is ``softmax_r(cos(q_s, r) / pool_temperature)`` with padding (and BOS/EOS) masked, and the
       pooled protein segment vector is the attention-weighted mean of residue vectors.

    Both outputs come back L2-normalised, with the learned scale of the segment-level InfoNCE
    (init ``1 / init_temperature``, clamped at ``max_logit_scale``). The projections are the head's
    own (the public code reuses the global projection heads), so PDA does not pull the global
    embedding space toward segment-level geometry.

    Args:
        protein_dim, text_dim: encoder widths.
        proj_dim: width of segment vectors and prototypes.
        num_prototypes: size of the memory bank.
        num_segments: property slots S (``NUM_SEGMENTS``).
        quantize: ``"soft"`` or ``"ste"``.
        assign_temperature: softmax temperature of the soft assignment.
        pool_temperature: softmax temperature of residue pooling.
        commitment: weight of the commitment term of the VQ loss.
        init_temperature, max_logit_scale: the learned InfoNCE scale.

    Shapes:
        residue_states (B, Lp, Dp), residue_mask (B, Lp) bool, text_states (B, Lt, Dt),
        segment_ids (B, Lt) long in [-1, S) (-1: special / padding token)
        -> dict: ``text`` (B, S, P), ``protein`` (B, S, P), ``present`` (B, S) bool,
        ``vq_loss`` [], ``codes`` (B, S) long (nearest prototype), ``logit_scale`` [1].
    """

    def __init__(
        self,
        protein_dim: int,
        text_dim: int,
        proj_dim: int = 512,
        num_prototypes: int = 512,
        num_segments: int = 8,
        *,
        quantize: str = "soft",
        assign_temperature: float = 0.1,
        pool_temperature: float = 0.1,
        commitment: float = 0.25,
        init_temperature: float = 0.1,
        max_logit_scale: float = 100.0,
    ):
        super().__init__()
        if quantize not in ("soft", "ste"):
            raise ValueError(f"PDA quantize must be 'soft' or 'ste', got {quantize!r}")
        self.num_segments = num_segments
        self.quantize = quantize
        self.assign_temperature = assign_temperature
        self.pool_temperature = pool_temperature
        self.commitment = commitment
        self.max_logit_scale = max_logit_scale
        self.text_proj = nn.Linear(text_dim, proj_dim)
        self.protein_proj = nn.Linear(protein_dim, proj_dim)
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, proj_dim) / math.sqrt(proj_dim))
        # Shape [1], not []: deepspeed 0.19.8 fails at start-up on 0-dim parameters.
        self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))

    def segment_vectors(self, text_states: Tensor, segment_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Mean token state per segment, projected and normalised; and which segments have tokens.

        Shapes:
            text_states (B, Lt, Dt), segment_ids (B, Lt) -> z (B, S, P), present (B, S) bool
        """
        member = F.one_hot(segment_ids.clamp(min=0), self.num_segments).to(text_states.dtype)  # (B, Lt, S)
        member = member * (segment_ids >= 0).unsqueeze(-1).to(text_states.dtype)
        counts = member.sum(1)  # (B, S)
        means = member.transpose(1, 2) @ text_states / counts.clamp(min=1.0).unsqueeze(-1)  # (B, S, Dt)
        return F.normalize(self.text_proj(means), dim=-1), counts > 0

    def quantise(self, z: Tensor, present: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Prototype-quantised segment vectors, the VQ loss over present segments, nearest codes.

        Shapes:
            z (B, S, P) unit-norm, present (B, S) -> z_q (B, S, P), vq_loss [], codes (B, S)
        """
        bank = F.normalize(self.prototypes, dim=-1)  # (K, P)
        sim = z @ bank.T  # (B, S, K)
        codes = sim.argmax(-1)
        if self.quantize == "soft":
            z_q = torch.softmax(sim / self.assign_temperature, dim=-1) @ bank
            # the codebook term moves the prototypes only: its soft assignment must not carry z's gradient
            q_bank = torch.softmax(z.detach() @ bank.T / self.assign_temperature, dim=-1) @ bank
            q = z_q
        else:
            q = q_bank = bank[codes]
            z_q = z + (q - z).detach()  # straight-through: value of q, gradient of z
        weight = present.to(z.dtype)
        per_segment = ((z.detach() - q_bank) ** 2).sum(-1) + self.commitment * ((z - q.detach()) ** 2).sum(-1)
        vq_loss = (per_segment * weight).sum() / weight.sum().clamp(min=1.0)
        return z_q, vq_loss, codes

    def forward(
        self, residue_states: Tensor, residue_mask: Tensor, text_states: Tensor, segment_ids: Tensor
    ) -> dict[str, Tensor]:
        z, present = self.segment_vectors(text_states, segment_ids)
        z_q, vq_loss, codes = self.quantise(z, present)
        anchors = F.normalize(z_q, dim=-1)  # (B, S, P)
        residues = F.normalize(self.protein_proj(residue_states), dim=-1)  # (B, Lp, P)
        keep = _safe_key_mask(residue_mask.bool())  # (B, Lp)
        scores = anchors @ residues.transpose(1, 2) / self.pool_temperature  # (B, S, Lp)
        scores = scores.masked_fill(~keep.unsqueeze(1), float("-inf"))
        pooled = torch.softmax(scores, dim=-1) @ residues  # (B, S, P)
        has_residues = residue_mask.bool().any(-1, keepdim=True)  # (B, 1)
        scale = self.log_logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()
        return {
            "text": anchors,
            "protein": F.normalize(pooled, dim=-1),
            "present": present & has_residues,
            "vq_loss": vq_loss,
            "codes": codes,
            "logit_scale": scale,
        }


class ProtCLIPHeads(nn.Module):
    """The modules ProtCLIP adds to a :class:`~pretrain.models.trimodal.TriModalModel`.

    Built from a ``ProtCLIPLossConfig`` (``pretrain.losses.protclip``) and the encoder widths by
    ``ProtCLIPLoss.build_heads``; the model holds it as ``model.protclip`` and puts its parameters
    in the "heads" group (trained in both stages). A submodule whose weight is 0 is not built.
    """

    def __init__(self, cfg, protein_dim: int, text_dim: int, vocab_size: int, num_segments: int = 8):
        super().__init__()
        self.cfg = cfg
        self.bsr = (
            BSRDecoder(
                protein_dim,
                text_dim,
                cfg.bsr_hidden,
                cfg.bsr_layers,
                cfg.bsr_heads,
                vocab_size,
                cfg.bsr_dropout,
            )
            if cfg.bsr > 0
            else None
        )
        self.pda = (
            PDAHead(
                protein_dim,
                text_dim,
                cfg.pda_proj_dim,
                cfg.pda_prototypes,
                num_segments,
                quantize=cfg.pda_quantize,
                assign_temperature=cfg.pda_assign_temperature,
                pool_temperature=cfg.pda_pool_temperature,
                commitment=cfg.pda_commitment,
                init_temperature=cfg.pda_init_temperature,
            )
            if cfg.pda > 0
            else None
        )

    @classmethod
    def for_model(cls, cfg, model: nn.Module) -> ProtCLIPHeads:
        """Heads sized for ``model``'s sequence and text encoders."""
        seq = model.sequence_encoder
        return cls(cfg, seq.output_dim, model.text_encoder.output_dim, len(seq.alphabet), NUM_SEGMENTS)

    def claims(self, batch: dict) -> bool:
        """Whether the model's forward on ``batch`` is ProtCLIP's (a training batch with ``protclip`` targets)."""
        return "protclip" in batch

    def run(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        """:func:`protclip_forward` of ``model`` with these heads (called inside the model's forward)."""
        return protclip_forward(model, self, batch)


def _pool_text(text_encoder: nn.Module, hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """``TextEncoder.forward``'s pooling applied to token states computed once."""
    if text_encoder.cfg.pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def protclip_forward(model: nn.Module, heads: ProtCLIPHeads, batch: dict) -> dict[str, Tensor]:
    """Encoder passes and ProtCLIP modules for one batch.

    Passes: the sequence encoder on the clean tokens (GC embedding; residue states for PDA), on the
    MLM-masked tokens (ESM-2's own LM head gives the MLM logits) and on the span-masked tokens (BSR
    queries); the text encoder once on the segmented text (GC embedding, BSR keys, PDA segments).
    A pass whose loss weight is 0 is skipped.

    Args:
        model: a ``TriModalModel``.
        heads: its :class:`ProtCLIPHeads`.
        batch: a collated batch with ``seq_tokens``, ``text_ids``, ``text_attn`` (the segmented
            text) and ``protclip`` = :func:`pretrain.data.masking.protclip_inputs` output.

    Returns:
        ``sequence``, ``text`` (B, E) unit-norm; ``logit_scale`` [1]; ``mlm_logits`` and
        ``bsr_logits`` (B, Ls, V); ``pda_text``, ``pda_protein`` (B, S, P), ``pda_present`` (B, S),
        ``pda_vq_loss`` [], ``pda_logit_scale`` [1], ``pda_codes`` (B, S).
    """
    cfg = heads.cfg
    extra = batch["protclip"]
    seq_enc, text_enc = model.sequence_encoder, model.text_encoder
    tokens = batch["seq_tokens"]
    residues = seq_enc.residue_representations(tokens)  # (B, Ls, D)
    residue_mask = seq_enc.residue_mask(tokens)  # (B, Ls)
    weights = residue_mask.unsqueeze(-1).to(residues.dtype)
    pooled = (residues * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    text_attn = batch["text_attn"]
    text_states = text_enc.token_representations(batch["text_ids"], text_attn)  # (B, Lt, H)
    out: dict[str, Tensor] = {
        "sequence": F.normalize(model.heads["sequence"](pooled), dim=-1),
        "text": F.normalize(model.heads["text"](_pool_text(text_enc, text_states, text_attn)), dim=-1),
        "logit_scale": model.logit_scale(),
    }
    if cfg.mlm > 0:
        out["mlm_logits"] = seq_enc.mlm_forward(extra["mlm_tokens"])[1]
    if heads.bsr is not None:
        span_states = seq_enc.residue_representations(extra["bsr_tokens"])
        out["bsr_logits"] = heads.bsr(span_states, text_states, text_attn)
    if heads.pda is not None:
        pda = heads.pda(residues, residue_mask, text_states, extra["segment_ids"])
        out.update({f"pda_{k}": v for k, v in pda.items()})
    return out
