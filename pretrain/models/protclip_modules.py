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
PDA_ASSIGN = ("vq", "gumbel")  # loss.protclip.pda_assign
PDA_TEXT = ("joint", "per_segment")  # loss.protclip.pda_text


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
       prototype loss out of the total; ``assign="gumbel"`` does the same (below). With ``"vq"``
       (default) the VQ loss is part of ``loss_pda``.

       ``assign="gumbel"`` (ProtCLIP's public code): the assignment is a Gumbel-softmax sample over the
       logits ``cos(z, E) / assign_temperature`` at temperature ``tau`` (training; without the noise in
       eval mode, so evaluation is deterministic), ``q = w · E``, differentiable in both. The prototype
       loss is the public code's mean absolute difference ``mean |q - z|`` over present segments,
       returned for logging only (the objective leaves it out of the total). ``tau`` follows
       ``max(gumbel_min_temperature, gumbel_temperature · exp(-gumbel_decay · t))`` with ``t`` the
       training forwards so far (a buffer saved with the model, so a resumed run continues the
       schedule); the public code starts at 0.9 and never lowers it (``gumbel_decay = 0``).
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
        quantize: ``"soft"`` or ``"ste"`` (``assign="vq"``).
        assign: ``"vq"`` (quantise + VQ loss) or ``"gumbel"`` (Gumbel-softmax, prototype loss logged only).
        assign_temperature: softmax temperature of the soft assignment (the logits' divisor with gumbel).
        gumbel_temperature, gumbel_min_temperature, gumbel_decay: the Gumbel-softmax temperature schedule.
        pool_temperature: softmax temperature of residue pooling.
        commitment: weight of the commitment term of the VQ loss.
        init_temperature, max_logit_scale: the learned InfoNCE scale.

    Shapes:
        residue_states (B, Lp, Dp), residue_mask (B, Lp) bool, text_states (B, Lt, Dt),
        segment_ids (B, Lt) long in [-1, S) (-1: special / padding token); or, instead of the last
        two, ``segment_means`` (B, S, Dt) with ``segment_present`` (B, S) (per-segment text encoding)
        -> dict: ``text`` (B, S, P), ``protein`` (B, S, P), ``present`` (B, S) bool,
        ``vq_loss`` [] (the prototype loss with gumbel), ``codes`` (B, S) long (nearest prototype),
        ``logit_scale`` [1]; with gumbel also ``gumbel_tau`` [1] (the temperature used).
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
        assign: str = "vq",
        assign_temperature: float = 0.1,
        pool_temperature: float = 0.1,
        commitment: float = 0.25,
        init_temperature: float = 0.1,
        max_logit_scale: float = 100.0,
        gumbel_temperature: float = 0.9,
        gumbel_min_temperature: float = 0.9,
        gumbel_decay: float = 0.0,
    ):
        super().__init__()
        if quantize not in ("soft", "ste"):
            raise ValueError(f"PDA quantize must be 'soft' or 'ste', got {quantize!r}")
        if assign not in PDA_ASSIGN:
            raise ValueError(f"PDA assign must be 'vq' or 'gumbel', got {assign!r}")
        self.num_segments = num_segments
        self.quantize = quantize
        self.assign = assign
        self.gumbel_temperature = gumbel_temperature
        self.gumbel_min_temperature = gumbel_min_temperature
        self.gumbel_decay = gumbel_decay
        if assign == "gumbel":  # training forwards so far (the schedule's t); only then: vq state dicts unchanged
            self.register_buffer("gumbel_step", torch.zeros(1, dtype=torch.long))
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

    def gumbel_tau(self) -> float:
        """The Gumbel-softmax temperature at the current training forward (``assign="gumbel"``)."""
        t = int(self.gumbel_step.reshape(-1)[0])
        return max(self.gumbel_min_temperature, self.gumbel_temperature * math.exp(-self.gumbel_decay * t))

    def gumbel_assign(self, z: Tensor, present: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        """Gumbel-softmax prototype mix, the public code's prototype loss (mean |q - z|), argmax codes, tau.

        Noise is drawn from torch's global generator in training mode; eval mode uses the noise-free
        softmax at the same temperature. A training forward with gradients advances the schedule.

        Shapes:
            z (B, S, P) unit-norm, present (B, S) -> z_q (B, S, P), proto_loss [], codes (B, S), tau
        """
        bank = F.normalize(self.prototypes, dim=-1)  # (K, P)
        logits = z @ bank.T / self.assign_temperature  # (B, S, K)
        tau = self.gumbel_tau()
        if self.training:
            weights = F.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
            if torch.is_grad_enabled():  # not the no-grad checks (finite-loss probe, validation)
                self.gumbel_step += 1
        else:
            weights = torch.softmax(logits / tau, dim=-1)
        z_q = weights @ bank  # (B, S, P)
        weight = present.to(z.dtype)
        per_segment = (z_q - z).abs().mean(-1)  # (B, S)
        proto_loss = (per_segment * weight).sum() / weight.sum().clamp(min=1.0)
        return z_q, proto_loss, weights.argmax(-1), tau

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
        self,
        residue_states: Tensor,
        residue_mask: Tensor,
        text_states: Tensor | None = None,
        segment_ids: Tensor | None = None,
        *,
        segment_means: Tensor | None = None,
        segment_present: Tensor | None = None,
    ) -> dict[str, Tensor]:
        if segment_means is not None:  # per-segment text encoding: the means come precomputed
            z, present = F.normalize(self.text_proj(segment_means), dim=-1), segment_present.bool()
        else:
            z, present = self.segment_vectors(text_states, segment_ids)
        extra: dict[str, Tensor] = {}
        if self.assign == "gumbel":
            z_q, vq_loss, codes, tau = self.gumbel_assign(z, present)
            extra["gumbel_tau"] = torch.full((1,), tau, device=z.device)
        else:
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
            **extra,
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


def segment_token_rows(
    text_ids: Tensor, text_attn: Tensor, segment_ids: Tensor, num_segments: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One text row per present segment: ``[CLS] <the segment's tokens> [SEP]``, padded with 0.

    [CLS] is each text's first token and [SEP] its last attended one (``tokenize_segments`` writes
    ``[CLS] seg_a seg_b ... [SEP]``); the segment's tokens keep their order.

    Shapes:
        text_ids, text_attn, segment_ids (B, Lt); -> ids (R, W) long, attn (R, W) long,
        pairs (R, 2) long ((protein, slot) of each row), counts (R,) tokens of each segment;
        R = present segments, W = 2 + the longest segment.
    """
    slots = torch.arange(num_segments, device=segment_ids.device)
    present = (segment_ids.unsqueeze(-1) == slots).any(1)  # (B, S)
    pairs = present.nonzero()  # (R, 2)
    rows, slot = pairs[:, 0], pairs[:, 1]
    member = segment_ids[rows] == slot.unsqueeze(1)  # (R, Lt)
    counts = member.sum(1)  # (R,)
    width = int(counts.max()) + 2 if len(pairs) else 2
    # positions of each segment's tokens first, in their order (stable sort of "not a member")
    order = torch.argsort((~member).to(torch.int8), dim=1, stable=True)[:, : width - 2]  # (R, W-2)
    body = text_ids[rows].gather(1, order)
    pos = torch.arange(width, device=text_ids.device)
    inside = pos[: width - 2].unsqueeze(0) < counts.unsqueeze(1)  # (R, W-2) the segment's own tokens
    ids = torch.zeros((len(pairs), width), dtype=text_ids.dtype, device=text_ids.device)
    ids[:, 1:-1] = torch.where(inside, body, torch.zeros_like(body))
    ids[:, 0] = text_ids[rows, 0]
    last = text_attn.long().sum(1).clamp(min=1) - 1  # (B,) the [SEP] of each text
    ids.scatter_(1, (counts + 1).unsqueeze(1), text_ids[rows, last[rows]].unsqueeze(1))
    attn = (pos.unsqueeze(0) < (counts + 2).unsqueeze(1)).to(text_attn.dtype)
    return ids, attn, pairs, counts


def encode_segments_separately(
    text_encoder: nn.Module, text_ids: Tensor, text_attn: Tensor, segment_ids: Tensor, num_segments: int
) -> tuple[Tensor, Tensor]:
    """PDA's segment means with each segment encoded on its own (ProtCLIP's public code).

    Every present segment becomes its own ``[CLS] segment [SEP]`` text (:func:`segment_token_rows`);
    one text-encoder pass over all of them gives token states, and each segment's mean runs over its
    own tokens ([CLS] / [SEP] excluded, as in the joint encoding). Unlike the public code (which
    encodes the segments under ``torch.no_grad``), the gradient reaches the text encoder, as in the
    joint encoding.

    Shapes:
        text_ids, text_attn, segment_ids (B, Lt) -> means (B, S, H), present (B, S) bool
    """
    ids, attn, pairs, counts = segment_token_rows(text_ids, text_attn, segment_ids, num_segments)
    b = text_ids.shape[0]
    present = torch.zeros((b, num_segments), dtype=torch.bool, device=text_ids.device)
    present[pairs[:, 0], pairs[:, 1]] = True
    if len(pairs) == 0:  # no text in the batch: nothing to encode (every segment absent)
        return torch.zeros((b, num_segments, text_encoder.output_dim), device=text_ids.device), present
    states = text_encoder.token_representations(ids, attn)  # (R, W, H)
    pos = torch.arange(ids.shape[1], device=ids.device)
    body = ((pos >= 1) & (pos <= counts.unsqueeze(1))).to(states.dtype).unsqueeze(-1)  # (R, W, 1)
    seg_means = (states * body).sum(1) / counts.clamp(min=1).to(states.dtype).unsqueeze(-1)  # (R, H)
    means = states.new_zeros((b, num_segments, states.shape[-1]))
    means = means.index_put((pairs[:, 0], pairs[:, 1]), seg_means)
    return means, present
