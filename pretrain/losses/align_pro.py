"""Align-Pro objective: weighted pairwise cross-modal InfoNCE plus intra-modal auxiliaries.

    L = alpha * L(seq, struct) + beta * L(seq, text) + gamma * L(struct, text)
        + sum_m w_m * L(m view 1, m view 2)

Each term is a symmetric temperature-scaled InfoNCE whose negatives are every rank's
rows (``kernels.gathered_symmetric_infonce``). A protein missing either modality of a
pair is left out of that term, as a query and as a negative, instead of being dropped
from the batch.

False negatives (``loss.false_negatives``: ``"text"`` or ``"go"``): different proteins with
identical canonical function text (or the identical GO-id set) are one class in the terms that
contrast *texts*, i.e. ``L(seq, text)``, ``L(struct, text)`` and the intra-modal text term; there
they are never each other's negatives. The terms use
:func:`kernels.grouped_symmetric_infonce` (one representative key per group,
every member's positive is the representative): per-row targets and a per-column key mask on the
fused kernel, no B × B mask. ``L(seq, struct)`` and the intra sequence / structure terms keep every
other protein as a negative: two proteins that share a description are still different molecules,
and telling their sequences and structures apart is what those terms teach.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kernels import check_equal_rows, gathered_sigmoid_loss, gathered_symmetric_infonce, grouped_symmetric_infonce
from pretrain.errors import ConfigError
from pretrain.losses.config import LossConfig
from pretrain.losses.objective import Objective
from pretrain.models.term_bias import TermBias

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
TERMS = tuple(t[0] for t in _PAIR_TERMS + _INTRA_TERMS)  # every term, in the order of the sigmoid biases
# Terms whose keys include texts: the ones where identical texts are false negatives.
_GROUPED_TERMS = frozenset({"loss_seq_text", "loss_struct_text", "loss_intra_text"})


@dataclass
class AlignProLoss(Objective):
    """The Align-Pro objective (``loss.objective: align_pro``): total loss and named terms of one rank's batch."""

    name = "align_pro"
    cfg: LossConfig

    @classmethod
    def from_config(cls, cfg: LossConfig) -> AlignProLoss:
        return cls(cfg)

    @classmethod
    def validate_config(cls, cfg: LossConfig) -> None:
        if not any(w > 0 for w in (cfg.alpha, cfg.beta, cfg.gamma, cfg.intra_seq, cfg.intra_struct, cfg.intra_text)):
            raise ConfigError("loss weights must be >= 0 and at least one must be > 0")

    def __call__(self, out: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """:meth:`compute` on the model's output (its ``logit_scale``) and the batch's ``present`` /
        ``text_group`` (the :class:`~pretrain.losses.objective.Objective` call)."""
        return self.compute(out, batch["present"], out["logit_scale"], batch.get("text_group"), out.get("term_bias"))

    def build_heads(self, model) -> dict:
        """With ``loss.kind: sigmoid``, SigLIP's learned bias per term (``model.siglip``); else nothing."""
        if self.cfg.kind != "sigmoid":
            return {}
        return {"siglip": TermBias(TERMS, self.cfg.sigmoid_init_bias)}

    def needs_views(self) -> dict[str, bool]:
        """Which modalities need a second stochastic view (intra-modal weight > 0)."""
        return {mod: getattr(self.cfg, attr) > 0 for _, mod, attr in _INTRA_TERMS}

    def compute(
        self,
        emb: dict[str, Tensor],
        present: dict[str, Tensor],
        logit_scale: Tensor,
        groups: Tensor | None = None,
        term_bias: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss on this rank's embeddings.

        Args:
            emb: ``sequence``, ``structure``, ``text`` (B, E) unit-norm embeddings and, for intra
                terms, ``<modality>_view2`` (B, E).
            present: per modality (B,) bool, True where the protein has that modality.
            logit_scale: the softmax multiplier s, shape [1].
            groups: (B,) int64 false-negative group ids
                (:func:`pretrain.losses.false_negatives.group_ids`, the batch's ``text_group``);
                required when ``cfg.false_negatives`` is not ``"none"``, ignored otherwise.
            term_bias: (len(TERMS),) learned biases (the model's ``term_bias``), required with
                ``cfg.kind == "sigmoid"``: each term is then SigLIP's pairwise sigmoid loss
                (:func:`kernels.gathered_sigmoid_loss`) with its own bias.

        Returns:
            ``loss`` (the weighted total, this rank's share) and every named term (detached
            terms are still tensors; zero-weight terms are omitted).
        """
        grouped = self.cfg.false_negatives != "none"
        if grouped and groups is None:
            raise KeyError(
                f"loss.false_negatives={self.cfg.false_negatives!r} needs the batch's 'text_group' "
                "(pretrain.losses.false_negatives.group_ids, added by the collate)"
            )
        # Every term gathers B rows from each rank: check that once per step, not in each term
        # (the check is a collective plus a host sync; up to six terms run per step).
        check_equal_rows(emb["sequence"].shape[0], emb["sequence"].device)
        if self.cfg.kind == "sigmoid" and term_bias is None:
            raise KeyError("loss.kind=sigmoid needs the model's 'term_bias' output (built by AlignProLoss.build_heads)")
        out: dict[str, Tensor] = {}
        total = emb["sequence"].new_zeros(())
        for name, a, b, attr in _PAIR_TERMS:
            w = getattr(self.cfg, attr)
            if w <= 0:
                continue
            term = self._term(name, emb[a], emb[b], logit_scale, present[a] & present[b], groups, term_bias)
            out[name] = term
            total = total + w * term
        for name, mod, attr in _INTRA_TERMS:
            w = getattr(self.cfg, attr)
            key = f"{mod}_view2"
            if w <= 0 or key not in emb:
                continue
            term = self._term(name, emb[mod], emb[key], logit_scale, present[mod], groups, term_bias)
            out[name] = term
            total = total + w * term
        out["loss"] = total
        return out

    def _term(
        self,
        name: str,
        a: Tensor,
        b: Tensor,
        logit_scale: Tensor,
        valid: Tensor,
        groups: Tensor | None,
        term_bias: Tensor | None,
    ) -> Tensor:
        """One term over every rank's rows: symmetric InfoNCE (grouped when ``name`` contrasts texts), or
        with ``kind: sigmoid`` the pairwise sigmoid loss with the term's bias (symmetric by construction)."""
        if self.cfg.kind == "sigmoid":
            i = TERMS.index(name)
            return gathered_sigmoid_loss(
                a,
                b,
                logit_scale.reshape(1),
                term_bias[i : i + 1],
                valid_local=valid,
                backend=self.cfg.backend,
                strategy=self.cfg.strategy,
                check_rows=False,
            )
        if self.cfg.false_negatives != "none" and name in _GROUPED_TERMS:
            return grouped_symmetric_infonce(
                a,
                b,
                logit_scale,
                groups.to(a.device),
                valid_local=valid,
                backend=self.cfg.backend,
                strategy=self.cfg.strategy,
                check_rows=False,
            )
        return gathered_symmetric_infonce(
            a,
            b,
            logit_scale,
            valid_local=valid,
            backend=self.cfg.backend,
            strategy=self.cfg.strategy,
            check_rows=False,
        )
