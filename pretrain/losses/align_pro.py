"""Align-Pro objective: weighted pairwise cross-modal InfoNCE plus intra-modal auxiliaries.

    L = alpha * L(seq, struct) + beta * L(seq, text) + gamma * L(struct, text)
        + sum_m w_m * L(m view 1, m view 2)

Each term is a symmetric temperature-scaled InfoNCE whose negatives are every rank's
rows. By default (``loss.fuse_terms``) every InfoNCE term of a step runs in one
``kernels.trimodal_infonce`` call that gathers each embedding once (one backward all-reduce) instead
of once per term; ``fuse_terms: false`` calls ``kernels.gathered_symmetric_infonce`` per term. A
protein missing either modality of a pair is left out of that term, as a query and as a negative,
instead of being dropped from the batch.

False negatives (``loss.false_negatives``: ``"text"`` or ``"go"``): different proteins with
identical canonical function text (or the identical GO-id set) are one class in the terms that
contrast *texts*, i.e. ``L(seq, text)``, ``L(struct, text)`` and the intra-modal text term; there
they are never each other's negatives. The terms use
:func:`kernels.grouped_symmetric_infonce` (one representative key per group,
every member's positive is the representative): per-row targets and a per-column key mask on the
fused kernel, no B × B mask. With ``kind: sigmoid`` the same terms pass the group ids to
:func:`kernels.gathered_sigmoid_loss`: a pair of one group (other than a row's own positive) is
neither a positive nor a negative; every protein keeps its own text as its positive (the kernels'
docstring, ``kernels/sigmoid_reference.py``, says why this differs from the InfoNCE form). With
``loss.sigmoid_groups: positive`` such a pair is a positive instead (``z = +1``, a multi-positive
sigmoid loss: proteins of one group are pulled together, not only no longer pushed apart).
``L(seq, struct)`` and the intra sequence / structure terms keep every
other protein as a negative: two proteins that share a description are still different molecules,
and telling their sequences and structures apart is what those terms teach.

Temperatures (``loss.temperature``): ``"shared"`` uses the model's one learned logit scale for every
term (the state dict is the plain model's). ``"per_pair"`` learns one scale per cross-modal pair
(the three pairs are weighed for their different alignment strengths, so each may want its own
sharpness) while the intra-modal terms keep the shared scale: they are auxiliaries of the same
embedding space, and one scale for them keeps the new parameters to the three the pairs need.
``"per_term"`` learns one scale per term (six). The extra scales are :class:`TermLogitScale`
(``model.term_temperature``, ``out["term_logit_scale"]``), with the shared scale's init and clamp;
each computed term's temperature 1 / s is returned as a detached metric ``temp_<term>`` (e.g.
``temp_seq_struct``), and with ``kind: sigmoid`` each term's bias as ``bias_<term>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kernels import (
    Term,
    check_equal_rows,
    gathered_sigmoid_loss,
    gathered_symmetric_infonce,
    grouped_symmetric_infonce,
    trimodal_infonce,
)
from pretrain.errors import ConfigError
from pretrain.losses.config import LossConfig
from pretrain.losses.objective import Objective
from pretrain.models.term_bias import TermBias, TermLogitScale

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
# The extra learned scales of each loss.temperature mode other than "shared", named by short term name
# (the order of TermLogitScale's vector); a term without one of its own uses the model's shared scale.
_PAIR_SCALES = tuple(t[0].removeprefix("loss_") for t in _PAIR_TERMS)
_TERM_SCALES = tuple(t.removeprefix("loss_") for t in TERMS)
SCALE_NAMES = {"per_pair": _PAIR_SCALES, "per_term": _TERM_SCALES}
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
        return self.compute(
            out,
            batch["present"],
            out["logit_scale"],
            batch.get("text_group"),
            out.get("term_bias"),
            out.get("term_logit_scale"),
        )

    def build_heads(self, model) -> dict:
        """The objective's parameters beyond the plain model: with ``loss.kind: sigmoid`` SigLIP's learned
        bias per term (``model.siglip``); with ``loss.temperature`` other than ``shared`` the extra
        learned scales (``model.term_temperature``, init and clamp from ``model.cfg``). None by default,
        so the default state dict is the plain model's."""
        heads: dict = {}
        if self.cfg.kind == "sigmoid":
            heads["siglip"] = TermBias(TERMS, self.cfg.sigmoid_init_bias)
        if self.cfg.temperature != "shared":
            names = SCALE_NAMES[self.cfg.temperature]
            heads["term_temperature"] = TermLogitScale(names, model.cfg.init_temperature, model.cfg.max_logit_scale)
        return heads

    def term_scale(self, name: str, logit_scale: Tensor, term_logit_scale: Tensor | None) -> Tensor:
        """The logit scale term ``name`` uses under ``loss.temperature``, shape [1].

        Args:
            name: a term of :data:`TERMS` (``loss_seq_struct`` ...).
            logit_scale: the model's shared scale, [1].
            term_logit_scale: the model's ``term_logit_scale`` (:class:`TermLogitScale`), (N,) with N
                the names of :data:`SCALE_NAMES` of the mode; None with ``temperature: shared``.
        """
        mode = self.cfg.temperature
        short = name.removeprefix("loss_")
        if mode == "shared" or short not in SCALE_NAMES[mode]:
            return logit_scale.reshape(1)
        if term_logit_scale is None:
            raise KeyError(
                f"loss.temperature={mode} needs the model's 'term_logit_scale' output "
                "(built by AlignProLoss.build_heads)"
            )
        i = SCALE_NAMES[mode].index(short)
        return term_logit_scale[i : i + 1]

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
        term_logit_scale: Tensor | None = None,
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
            term_logit_scale: (N,) learned scales (the model's ``term_logit_scale``), required with
                ``cfg.temperature`` other than ``"shared"`` (:meth:`term_scale` maps terms onto them).

        Returns:
            ``loss`` (the weighted total, this rank's share) and every named term (detached
            terms are still tensors; zero-weight terms are omitted); with ``temperature`` other than
            ``shared`` the detached metric ``temp_<term>`` (1 / s) of every computed term, with
            ``kind: sigmoid`` its ``bias_<term>``.
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
        jobs = [(name, a, b, present[a] & present[b], getattr(self.cfg, attr)) for name, a, b, attr in _PAIR_TERMS]
        jobs += [
            (name, mod, f"{mod}_view2", present[mod], getattr(self.cfg, attr))
            for name, mod, attr in _INTRA_TERMS
            if f"{mod}_view2" in emb
        ]
        jobs = [job for job in jobs if job[4] > 0]
        scales = {name: self.term_scale(name, logit_scale, term_logit_scale) for name, *_ in jobs}
        fused = self._fused_terms(jobs, emb, present, scales, groups) if self.fused else {}
        metrics: dict[str, Tensor] = {}
        for name, a, b, valid, w in jobs:
            scale = scales[name]
            term = fused[name] if fused else self._term(name, emb[a], emb[b], scale, valid, groups, term_bias)
            out[name] = term
            total = total + w * term
            short = name.removeprefix("loss_")
            if self.cfg.temperature != "shared":
                metrics[f"temp_{short}"] = 1.0 / scale.detach().reshape(())
            if self.cfg.kind == "sigmoid":
                metrics[f"bias_{short}"] = term_bias[TERMS.index(name)].detach()
        out.update(metrics)
        out["loss"] = total
        return out

    @property
    def fused(self) -> bool:
        """Whether :meth:`compute` runs every InfoNCE term in one :func:`kernels.trimodal_infonce` call
        (``loss.fuse_terms`` with ``kind: infonce``; the sigmoid loss stays per term)."""
        return self.cfg.fuse_terms and self.cfg.kind == "infonce"

    def _fused_terms(
        self,
        jobs: list[tuple],
        emb: dict[str, Tensor],
        present: dict[str, Tensor],
        scales: dict[str, Tensor],
        groups: Tensor | None,
    ) -> dict[str, Tensor]:
        """Every term of ``jobs`` (name, a, b, valid, weight) from one gather of each embedding key:
        this rank's share per term, equal to the per-term :meth:`_term` calls."""
        if not jobs:
            return {}
        grouped = self.cfg.false_negatives != "none"
        terms = [
            Term(name, a, b, grouped=grouped and name in _GROUPED_TERMS, present=None if b in present else (a,))
            for name, a, b, _, _ in jobs
        ]
        return trimodal_infonce(
            emb,
            terms,
            [scales[t.name] for t in terms],
            present=present,
            groups=groups.to(emb["sequence"].device) if grouped else None,
            backend=self.cfg.backend,
            strategy=self.cfg.strategy,
            check_rows=False,  # checked once in compute
        )

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
        """One term over every rank's rows: symmetric InfoNCE, or with ``kind: sigmoid`` the pairwise
        sigmoid loss with the term's bias (symmetric by construction); either grouped (false negatives)
        when ``name`` contrasts texts. ``logit_scale`` [1] is this term's own scale (:meth:`term_scale`)."""
        grouped = self.cfg.false_negatives != "none" and name in _GROUPED_TERMS
        if self.cfg.kind == "sigmoid":
            i = TERMS.index(name)
            return gathered_sigmoid_loss(
                a,
                b,
                logit_scale.reshape(1),
                term_bias[i : i + 1],
                valid_local=valid,
                groups_local=groups.to(a.device) if grouped else None,
                groups_as=self.cfg.sigmoid_groups,
                backend=self.cfg.backend,
                strategy=self.cfg.strategy,
                check_rows=False,
            )
        if grouped:
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
