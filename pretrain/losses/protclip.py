"""ProtCLIP objective: global contrast + MLM + biotext-guided span reconstruction + segment alignment.

    L = w_gc · GC + w_mlm · MLM + w_bsr · BSR + w_pda · (segment InfoNCE + w_vq · VQ)

with ProtCLIP's weights 1 / 0.3 / 0.7 / 1 (Zhou et al., AAAI 2025, arXiv 2412.20014; the public
code adds ``0.3 · MLM`` and ``0.7 · BSR`` to the contrastive loss). Terms:

- ``loss_gc``: symmetric sequence <-> text InfoNCE over every rank's rows
  (``kernels.gathered_symmetric_infonce``), or its deduplicated variant
  (:mod:`pretrain.losses.false_negatives`) when ``false_negatives`` is set.
- ``loss_mlm``: cross-entropy of ESM-2's LM head at BERT-masked residues.
- ``loss_bsr``: cross-entropy of :class:`~pretrain.models.protclip_modules.BSRDecoder` at the
  masked spans, for proteins that have a text.
- ``loss_pda``: segment-level InfoNCE inside each protein (:func:`segment_infonce`) plus the
  prototype VQ loss; ``loss_pda_nce`` and ``loss_pda_vq`` are logged too. With ``pda_assign:
  gumbel`` (the public code's Gumbel-softmax assignment) ``loss_pda`` is the InfoNCE alone and the
  prototype loss is logged as ``loss_pda_proto`` (detached), with the temperature ``pda_gumbel_tau``.
  ``pda_text: per_segment`` encodes each text segment on its own for PDA (the public code) instead
  of pooling the jointly encoded text by segment.

Token-level terms are means over this rank's labelled positions; with DeepSpeed's gradient
averaging they become the mean of per-rank means (ranks with unequal label counts are weighted
equally), the usual data-parallel convention for MLM. Only GC uses cross-rank negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import gathered_symmetric_infonce, grouped_symmetric_infonce
from pretrain.errors import ConfigError
from pretrain.losses.false_negatives import GROUP_MODES
from pretrain.losses.objective import LossSection, Objective
from pretrain.models.protclip_modules import IGNORE_INDEX, PDA_ASSIGN, PDA_TEXT, ProtCLIPHeads


@dataclass
class ProtCLIPLossConfig:
    gc: float = 1.0  # weight of the global sequence <-> text contrastive loss (GC)
    mlm: float = 0.3  # weight of masked language modelling on the sequence encoder (ProtCLIP: 0.3)
    bsr: float = 0.7  # weight of biotext-guided static segment reconstruction (ProtCLIP: 0.7)
    pda: float = 1.0  # weight of property-grouped dynamic segment alignment (ProtCLIP: 1.0)
    pda_vq: float = 1.0  # weight of the prototype VQ loss inside the PDA term
    pda_symmetric: bool = False  # also contrast each pooled protein segment against the text segments
    mlm_prob: float = 0.15  # BERT selection probability per residue (80% <mask>, 10% random, 10% kept)
    bsr_min_span: int = 5  # shortest masked residue span of BSR
    bsr_max_span: int = 10  # longest masked residue span of BSR
    bsr_ratio: float = 0.15  # spans are added until at least this fraction of each protein is masked
    bsr_hidden: int = 512  # width of the BSR cross-attention decoder
    bsr_layers: int = 1  # cross-attention blocks of the BSR decoder
    bsr_heads: int = 8  # attention heads of the BSR decoder (must divide bsr_hidden)
    bsr_dropout: float = 0.1  # dropout inside the BSR decoder
    pda_proj_dim: int = 512  # width of segment vectors and memory prototypes
    pda_prototypes: int = 512  # memory prototypes in the bank (ProtCLIP's public config: 512)
    pda_quantize: str = "soft"  # "soft" (softmax mix of prototypes) or "ste" (nearest, straight-through)
    pda_assign_temperature: float = 0.1  # softmax temperature of the soft prototype assignment
    pda_pool_temperature: float = 0.1  # softmax temperature of residue pooling per segment
    pda_commitment: float = 0.25  # VQ-VAE commitment weight (beta)
    pda_init_temperature: float = 0.1  # initial temperature of the segment InfoNCE (learned scale)
    shuffle_segments: bool = True  # random order of the text segments after the name (training)
    # PDA prototype assignment: "vq" (pda_quantize + the VQ loss, weighted by pda_vq, in the total) or "gumbel"
    # (ProtCLIP's public code: Gumbel-softmax mix of prototypes; its prototype loss mean |q - z| is logged as
    # loss_pda_proto and left out of the total)
    pda_assign: str = "vq"
    pda_gumbel_temperature: float = 0.9  # Gumbel-softmax temperature at step 0 (public code: 0.9)
    pda_gumbel_min_temperature: float = 0.9  # floor of the schedule tau = max(min, tau0 * exp(-decay * t))
    pda_gumbel_decay: float = 0.0  # per training forward; 0: constant tau (the public code never lowers it)
    # PDA text segments: "joint" (the text encoded once, segments pooled by their token ids) or "per_segment"
    # (each segment encoded as its own text, ProtCLIP's public code; one more text-encoder pass)
    pda_text: str = "joint"
    false_negatives: str = "none"  # GC deduplication by group: "none", "text" (same text) or "go" (same GO set)

    def validate(self, where: str = "loss.protclip") -> None:
        """Ranges and choices of each field; raises ConfigError (a ValueError) naming ``where.<field>``.

        Checked whichever objective a run selects (:meth:`pretrain.losses.config.LossConfig.validate`);
        :func:`validate_protclip_config` adds the checks that only matter when ProtCLIP trains.
        """
        for name in ("gc", "mlm", "bsr", "pda", "pda_vq", "pda_commitment"):
            w = getattr(self, name)
            if not (math.isfinite(w) and w >= 0):
                raise ConfigError(f"{where}.{name}={w}: must be a finite number >= 0")
        for name in ("pda_assign_temperature", "pda_pool_temperature", "pda_init_temperature"):
            t = getattr(self, name)
            if not (math.isfinite(t) and t > 0):
                raise ConfigError(f"{where}.{name}={t}: must be a finite number > 0")
        if not 0.0 < self.mlm_prob < 1.0:
            raise ConfigError(f"{where}.mlm_prob={self.mlm_prob}: expected a value in (0, 1)")
        if not 0.0 < self.bsr_ratio <= 1.0:
            raise ConfigError(f"{where}.bsr_ratio={self.bsr_ratio}: expected a value in (0, 1]")
        if not 0.0 <= self.bsr_dropout < 1.0:
            raise ConfigError(f"{where}.bsr_dropout={self.bsr_dropout}: expected a value in [0, 1)")
        sizes = (
            "bsr_min_span",
            "bsr_max_span",
            "bsr_hidden",
            "bsr_layers",
            "bsr_heads",
            "pda_proj_dim",
            "pda_prototypes",
        )
        for name in sizes:
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}={getattr(self, name)}: must be >= 1")
        if self.bsr_min_span > self.bsr_max_span:
            raise ConfigError(
                f"{where}.bsr_min_span={self.bsr_min_span} > {where}.bsr_max_span={self.bsr_max_span}: need min <= max"
            )
        if self.pda_quantize not in ("soft", "ste"):
            raise ConfigError(f"{where}.pda_quantize={self.pda_quantize!r}: expected 'soft' or 'ste'")
        if self.false_negatives not in ("none", *GROUP_MODES):
            raise ConfigError(f"{where}.false_negatives={self.false_negatives!r}: expected 'none', 'text' or 'go'")
        if self.pda_assign not in PDA_ASSIGN:
            raise ConfigError(f"{where}.pda_assign={self.pda_assign!r}: expected 'vq' or 'gumbel'")
        if self.pda_text not in PDA_TEXT:
            raise ConfigError(f"{where}.pda_text={self.pda_text!r}: expected 'joint' or 'per_segment'")
        for name in ("pda_gumbel_temperature", "pda_gumbel_min_temperature"):
            t = getattr(self, name)
            if not (math.isfinite(t) and t > 0):
                raise ConfigError(f"{where}.{name}={t}: must be a finite number > 0")
        if self.pda_gumbel_min_temperature > self.pda_gumbel_temperature:
            raise ConfigError(
                f"{where}.pda_gumbel_min_temperature={self.pda_gumbel_min_temperature} > "
                f"{where}.pda_gumbel_temperature={self.pda_gumbel_temperature}: the schedule only lowers tau"
            )
        if not (math.isfinite(self.pda_gumbel_decay) and self.pda_gumbel_decay >= 0):
            raise ConfigError(f"{where}.pda_gumbel_decay={self.pda_gumbel_decay}: must be a finite number >= 0")


def validate_protclip_config(cfg: ProtCLIPLossConfig) -> None:
    """Field ranges (:meth:`ProtCLIPLossConfig.validate`), then the checks that matter when ProtCLIP trains.

    Raises ValueError naming the field (wrap it in the caller's error type).
    """
    cfg.validate()
    if not any(getattr(cfg, k) > 0 for k in ("gc", "mlm", "bsr", "pda")):
        raise ValueError("at least one of gc, mlm, bsr, pda must be > 0")
    if cfg.bsr_hidden % cfg.bsr_heads:
        raise ValueError(f"bsr_hidden={cfg.bsr_hidden} is not divisible by bsr_heads={cfg.bsr_heads}")


def masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over positions whose label is not ``IGNORE_INDEX``; 0 when there are none.

    Shapes:
        logits (B, L, V), labels (B, L) long -> scalar (fp32)
    """
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def segment_infonce(
    text: Tensor, protein: Tensor, present: Tensor, logit_scale: Tensor, symmetric: bool = False
) -> Tensor:
    """InfoNCE between the segments of each protein (PDA), never across proteins.

    For protein b and present segment i: ``logsumexp_{j present}(s · t_bi·p_bj) - s · t_bi·p_bi``;
    the mean runs over present segments of proteins with at least two present segments (a lone
    segment has no negative). With ``symmetric`` the protein -> text direction is averaged in.

    Args:
        text: unit-norm text segment vectors.
        protein: unit-norm pooled protein segment vectors (row i pairs with text row i).
        present: usable segments.
        logit_scale: the multiplier ``s``, shape ``[]`` or ``[1]``.

    Shapes:
        text, protein (B, S, P); present (B, S) bool -> scalar; 0 when no row qualifies.
    """
    s = logit_scale.reshape(())
    rows = present & (present.sum(1, keepdim=True) >= 2)  # (B, S)
    logits = s * (text.float() @ protein.float().transpose(1, 2))  # (B, S, S)

    def one_direction(lg: Tensor) -> Tensor:
        masked = lg.masked_fill(~present.unsqueeze(1), float("-inf"))
        masked = torch.where(rows.unsqueeze(-1), masked, torch.zeros_like(masked))  # no all -inf row
        per_row = torch.logsumexp(masked, dim=-1) - torch.diagonal(lg, dim1=1, dim2=2)
        per_row = torch.where(rows, per_row, torch.zeros_like(per_row))
        return per_row.sum() / rows.sum().clamp(min=1)

    loss = one_direction(logits)
    if symmetric:
        loss = 0.5 * (loss + one_direction(logits.transpose(1, 2)))
    return loss


class ProtCLIPLoss(Objective):
    """The ProtCLIP objective (``loss.objective: protclip``): total and named terms of one rank's batch.

    It adds :class:`~pretrain.models.protclip_modules.ProtCLIPHeads` to the model as ``protclip``
    (:meth:`build_heads`); its training batches carry ``protclip`` targets and no second views. Its
    MLM / BSR / PDA terms read per-token states, not only pooled embeddings, so the two-pass step
    cannot compute it (``two_pass = False``).

    Args:
        cfg: loss weights and settings.
        backend: ``kernels.infonce`` backend of GC (``loss.backend``).
        strategy: cross-rank negatives of GC (``loss.strategy``: "allgather" or "ring", with or without
            deduplication).
    """

    def __init__(self, cfg: ProtCLIPLossConfig, *, backend: str = "auto", strategy: str = "allgather"):
        validate_protclip_config(cfg)
        self.cfg = cfg
        self.backend = backend
        self.strategy = strategy

    name = "protclip"
    two_pass = False

    @classmethod
    def from_config(cls, cfg: LossSection) -> ProtCLIPLoss:
        """From the ``loss`` section: its ``protclip`` subsection, GC's ``backend`` and ``strategy``."""
        return cls(cfg.protclip, backend=cfg.backend, strategy=cfg.strategy)

    @classmethod
    def validate_config(cls, cfg: LossSection) -> None:
        if cfg.kind != "infonce":
            raise ConfigError(f"loss.kind={cfg.kind!r}: the protclip objective's global contrast is InfoNCE")
        if cfg.false_negatives != "none":
            raise ConfigError(
                "loss.false_negatives is the align_pro objective's switch; use loss.protclip.false_negatives"
            )
        if cfg.temperature != "shared":
            raise ConfigError(
                f"loss.temperature={cfg.temperature!r}: the protclip objective has one global contrast (GC); "
                "per-pair / per-term temperatures are the align_pro objective's"
            )
        try:
            validate_protclip_config(cfg.protclip)
        except ValueError as e:
            raise ConfigError(f"loss.protclip: {e}") from None

    def build_heads(self, model: nn.Module) -> dict[str, nn.Module]:
        """The BSR decoder and PDA head, sized for ``model``'s encoders, as ``model.protclip``."""
        return {"protclip": ProtCLIPHeads.for_model(self.cfg, model)}

    def __call__(self, out: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """:meth:`compute` on the batch's ``present`` and ``protclip`` targets (the
        :class:`~pretrain.losses.objective.Objective` call)."""
        return self.compute(out, batch["present"], batch["protclip"])

    def compute(self, out: dict[str, Tensor], present: dict[str, Tensor], targets: dict) -> dict[str, Tensor]:
        """Compute the loss.

        Args:
            out: :func:`pretrain.models.protclip_modules.protclip_forward` output.
            present: per modality (B,) bool (the batch's ``present``).
            targets: the batch's ``protclip`` dict: ``mlm_labels``, ``bsr_labels`` (B, Ls) and,
                with ``false_negatives``, ``text_group`` (B,) int64.

        Returns:
            ``loss`` (weighted total, this rank's share) and ``loss_gc``, ``loss_mlm``,
            ``loss_bsr``, ``loss_pda``, ``loss_pda_nce``, ``loss_pda_vq`` for the terms with a
            weight > 0 (with ``pda_assign: gumbel``: ``loss_pda_proto`` and ``pda_gumbel_tau``,
            detached, instead of ``loss_pda_vq``).
        """
        cfg = self.cfg
        seq_ok, text_ok = present["sequence"], present["text"]
        pair_ok = seq_ok & text_ok
        terms: dict[str, Tensor] = {}
        total = out["sequence"].new_zeros((), dtype=torch.float32)
        if cfg.gc > 0:
            if cfg.false_negatives != "none":
                if "text_group" not in targets:
                    raise KeyError(
                        f"false_negatives={cfg.false_negatives!r} needs the batch's protclip['text_group'] "
                        "(pretrain.losses.false_negatives.group_ids in the collate)"
                    )
                gc = grouped_symmetric_infonce(
                    out["sequence"],
                    out["text"],
                    out["logit_scale"],
                    targets["text_group"].to(out["sequence"].device),
                    valid_local=pair_ok,
                    backend=self.backend,
                    strategy=self.strategy,
                )
            else:
                gc = gathered_symmetric_infonce(
                    out["sequence"],
                    out["text"],
                    out["logit_scale"],
                    valid_local=pair_ok,
                    backend=self.backend,
                    strategy=self.strategy,
                )
            terms["loss_gc"] = gc
            total = total + cfg.gc * gc
        if cfg.mlm > 0:
            labels = targets["mlm_labels"].masked_fill(~seq_ok.unsqueeze(1), IGNORE_INDEX)
            terms["loss_mlm"] = masked_cross_entropy(out["mlm_logits"], labels)
            total = total + cfg.mlm * terms["loss_mlm"]
        if cfg.bsr > 0:
            labels = targets["bsr_labels"].masked_fill(~pair_ok.unsqueeze(1), IGNORE_INDEX)
            terms["loss_bsr"] = masked_cross_entropy(out["bsr_logits"], labels)
            total = total + cfg.bsr * terms["loss_bsr"]
        if cfg.pda > 0:
            usable = out["pda_present"] & pair_ok.unsqueeze(1)
            nce = segment_infonce(
                out["pda_text"], out["pda_protein"], usable, out["pda_logit_scale"], cfg.pda_symmetric
            )
            terms["loss_pda_nce"] = nce
            if cfg.pda_assign == "gumbel":  # the public code logs its prototype loss but leaves it out
                terms["loss_pda_proto"] = out["pda_vq_loss"].detach()
                terms["pda_gumbel_tau"] = out["pda_gumbel_tau"].detach().reshape(())
                terms["loss_pda"] = nce
            else:
                terms["loss_pda_vq"] = out["pda_vq_loss"]
                terms["loss_pda"] = nce + cfg.pda_vq * out["pda_vq_loss"]
            total = total + cfg.pda * terms["loss_pda"]
        terms["loss"] = total
        return terms
