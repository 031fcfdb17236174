"""ProtCLIP's segment-level heads as the model holds them, and the forward that feeds them.

ProtCLIP (Zhou et al., AAAI 2025, arXiv 2412.20014) adds two segment-wise objectives to the global
protein-text contrast (GC) and ESM-2's masked language modelling (MLM):

- **BSR** (biotext-guided static segment reconstruction): contiguous residue spans are masked and
  reconstructed by a decoder whose residue queries cross-attend to the function text.
- **PDA** (property-grouped dynamic segment alignment): the text is split into property segments
  (name, function, location, ...); each segment vector is quantised against a learnable bank of
  memory prototypes, residues are pooled per segment by their similarity to the segment's
  prototype (a "dynamic segment" of the protein), and segment-level InfoNCE within each protein
  aligns every text segment with its pooled protein vector.

The modules themselves live in :mod:`pretrain.models.protclip_bsr` (:class:`BSRDecoder`),
:mod:`pretrain.models.protclip_pda` (:class:`PDAHead`) and :mod:`pretrain.models.protclip_segments`
(PDA's per-segment text encoding); this module holds ProtCLIP's constants, :class:`ProtCLIPHeads`
and :func:`protclip_forward`, and re-exports the rest (``__all__``), so the code imports all of
them from here. The losses live in :mod:`pretrain.losses.protclip`; :func:`protclip_forward` runs the encoder
passes and these modules and returns what the loss needs. It reads parameters of the model and of
the heads, so under ZeRO-3 it must run inside the engine's forward (from ``TriModalModel.forward``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.protclip_bsr import BSRDecoder
from pretrain.models.protclip_pda import PDA_ASSIGN, PDAHead
from pretrain.models.protclip_segments import encode_segments_separately, segment_token_rows

IGNORE_INDEX = -100  # label of positions without a prediction target (torch cross_entropy default)

# Property segments of a function text, in slot order: segment id k always means SEGMENTS[k].
SEGMENTS = ("name", "function", "location", "similarity", "go_f", "go_p", "go_c", "ec")
NUM_SEGMENTS = len(SEGMENTS)
PDA_TEXT = ("joint", "per_segment")  # loss.protclip.pda_text

__all__ = [
    "IGNORE_INDEX",
    "NUM_SEGMENTS",
    "PDA_ASSIGN",
    "PDA_TEXT",
    "SEGMENTS",
    "BSRDecoder",
    "PDAHead",
    "ProtCLIPHeads",
    "encode_segments_separately",
    "protclip_forward",
    "segment_token_rows",
]


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
                assign=cfg.pda_assign,
                assign_temperature=cfg.pda_assign_temperature,
                pool_temperature=cfg.pda_pool_temperature,
                commitment=cfg.pda_commitment,
                init_temperature=cfg.pda_init_temperature,
                gumbel_temperature=cfg.pda_gumbel_temperature,
                gumbel_min_temperature=cfg.pda_gumbel_min_temperature,
                gumbel_decay=cfg.pda_gumbel_decay,
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
    queries); the text encoder once on the segmented text (GC embedding, BSR keys, PDA segments) and,
    with ``pda_text: per_segment``, once more over every segment as its own text (PDA segments).
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
        if cfg.pda_text == "per_segment":
            means, seg_present = encode_segments_separately(
                text_enc, batch["text_ids"], text_attn, extra["segment_ids"], heads.pda.num_segments
            )
            pda = heads.pda(residues, residue_mask, segment_means=means, segment_present=seg_present)
        else:
            pda = heads.pda(residues, residue_mask, text_states, extra["segment_ids"])
        out.update({f"pda_{k}": v for k, v in pda.items()})
    return out
