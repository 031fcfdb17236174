"""ProtCLIP's PDA head (property-grouped dynamic segment alignment): memory prototypes, segment
quantisation and similarity pooling of residues per text segment.

The text is split into property segments (name, function, location, ...); each segment vector is
quantised against a learnable bank of memory prototypes, residues are pooled per segment by their
similarity to the segment's prototype (a "dynamic segment" of the protein), and segment-level InfoNCE
within each protein (``loss_pda`` of :mod:`pretrain.losses.protclip`) aligns every text segment with its
pooled protein vector. Built by :class:`pretrain.models.protclip_modules.ProtCLIPHeads`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.key_mask import safe_key_mask

PDA_ASSIGN = ("vq", "gumbel")  # loss.protclip.pda_assign


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
        keep = safe_key_mask(residue_mask.bool())  # (B, Lp)
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
