"""Align-Pro objective: weighted pairwise cross-modal InfoNCE plus intra-modal auxiliaries.

    L = alpha * L(seq, struct) + beta * L(seq, text) + gamma * L(struct, text)
        + sum_m w_m * L(m view 1, m view 2)

Each term is a symmetric temperature-scaled InfoNCE whose negatives are every rank's
rows (``kernels.gathered_symmetric_infonce``). A protein missing either modality of a
pair is left out of that term, as a query and as a negative, instead of being dropped
from the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import gathered_symmetric_infonce
from pretrain.config import LossConfig

# (metric name, first embedding, second embedding, presence key a, presence key b, weight attribute)
_PAIR_TERMS = (
    ("loss_seq_struct", "sequence", "structure", "alpha"),
    ("loss_seq_text", "sequence", "text", "beta"),
    ("loss_struct_text", "structure", "text", "gamma"),
)
_INTRA_TERMS = (
    ("loss_intra_seq", "sequence", "intra_seq"),
    ("loss_intra_struct", "structure", "intra_struct"),
    ("loss_intra_text", "text", "intra_text"),
)


@dataclass
class AlignProLoss:
    """Callable computing the total loss and its named terms for one rank's batch."""

    cfg: LossConfig

    def needs_views(self) -> dict[str, bool]:
        """Which modalities need a second stochastic view (intra-modal weight > 0)."""
        return {mod: getattr(self.cfg, attr) > 0 for _, mod, attr in _INTRA_TERMS}

    def __call__(self, emb: dict[str, Tensor], present: dict[str, Tensor], logit_scale: Tensor) -> dict[str, Tensor]:
        """Compute the loss on this rank's embeddings.

        Args:
            emb: ``sequence``, ``structure``, ``text`` (B, E) unit-norm embeddings and, for intra
                terms, ``<modality>_view2`` (B, E).
            present: per modality (B,) bool, True where the protein has that modality.
            logit_scale: the softmax multiplier s, shape [1].

        Returns:
            ``loss`` (the weighted total, this rank's share) and every named term (detached
            terms are still tensors; zero-weight terms are omitted).
        """
        out: dict[str, Tensor] = {}
        total = emb["sequence"].new_zeros(())
        kw = {"backend": self.cfg.backend, "strategy": self.cfg.strategy}
        for name, a, b, attr in _PAIR_TERMS:
            w = getattr(self.cfg, attr)
            if w <= 0:
                continue
            valid = present[a] & present[b]
            term = gathered_symmetric_infonce(emb[a], emb[b], logit_scale, valid_local=valid, **kw)
            out[name] = term
            total = total + w * term
        for name, mod, attr in _INTRA_TERMS:
            w = getattr(self.cfg, attr)
            key = f"{mod}_view2"
            if w <= 0 or key not in emb:
                continue
            term = gathered_symmetric_infonce(emb[mod], emb[key], logit_scale, valid_local=present[mod], **kw)
            out[name] = term
            total = total + w * term
        out["loss"] = total
        return out


def detach_terms(terms: dict[str, Tensor]) -> dict[str, float]:
    """Loss terms as Python floats for logging."""
    with torch.no_grad():
        return {k: float(v.detach().float().reshape(-1)[0]) for k, v in terms.items()}
