"""The ``loss`` section of a recipe: the objective's name, Align-Pro's weights, the kernel settings.

Align-Pro's weights sit at the top of the section (``loss.alpha`` ...) and ProtCLIP's in its own
subsection (``loss.protclip``), as recipes have always written them. Which objective a run trains
is ``loss.objective``, a name registered in :mod:`pretrain.losses.objective`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pretrain.errors import ConfigError
from pretrain.losses.false_negatives import GROUP_MODES
from pretrain.losses.protclip import ProtCLIPLossConfig

BACKENDS = ("auto", "torch", "triton")  # kernels.infonce backends
STRATEGIES = ("allgather", "ring")  # how negatives cross ranks (kernels.gathered_symmetric_infonce)
KINDS = ("infonce", "sigmoid")  # loss.kind
TEMPERATURES = ("shared", "per_pair", "per_term")  # loss.temperature
SIGMOID_GROUPS = ("exclude", "positive")  # loss.sigmoid_groups (kernels' groups_as)


@dataclass
class LossConfig:
    alpha: float = 1.0  # weight of L(seq, struct)
    beta: float = 1.0  # weight of L(seq, text)
    gamma: float = 1.0  # weight of L(struct, text)
    intra_seq: float = 0.1  # intra-modal auxiliary contrastive weight, sequence views
    intra_struct: float = 0.1  # ... structure views
    intra_text: float = 0.1  # ... text views
    backend: str = "auto"  # kernels.infonce backend: "auto", "torch" or "triton"
    strategy: str = "allgather"  # negatives across ranks: "allgather" or "ring"
    objective: str = "align_pro"  # "align_pro" (the weights above) or "protclip" (GC + MLM + BSR + PDA, below)
    # Align-Pro false negatives: "none", "text" (proteins with identical canonical function text are one
    # class) or "go" (identical GO-id set); applies to the text terms (seq-text, struct-text, intra-text)
    false_negatives: str = "none"
    protclip: ProtCLIPLossConfig = field(default_factory=ProtCLIPLossConfig)  # ProtCLIP terms (objective protclip)
    # Align-Pro's contrastive form: "infonce" (softmax over the negatives) or "sigmoid" (SigLIP's pairwise
    # sigmoid, kernels.gathered_sigmoid_loss, with a learned bias per term; model.init_temperature sets s)
    kind: str = "infonce"
    # With kind infonce: every term in one kernels.trimodal_infonce call, each modality gathered once per step
    # (false: one gathered call per term, as before; the two agree to rounding)
    fuse_terms: bool = True
    sigmoid_init_bias: float = -10.0  # initial value of every term's learned bias with kind sigmoid (SigLIP)
    # With kind sigmoid and false_negatives: a pair of one group (other than a row's own positive) is
    # "exclude"d (no loss, no gradient) or a "positive" (z = +1: multi-positive sigmoid, pulled together)
    sigmoid_groups: str = "exclude"
    # Align-Pro's learned temperatures: "shared" (the model's one logit scale for every term), "per_pair"
    # (one scale per cross-modal pair; the intra-modal terms keep the shared scale) or "per_term" (one per
    # term). Every scale starts at model.init_temperature and is clamped at model.max_logit_scale.
    temperature: str = "shared"

    def validate(self) -> None:
        """Checks shared by every objective; raises ConfigError naming the field.

        The ``protclip`` subsection's own values (ranges, choices) are checked whichever objective is
        selected: a value out of range is wrong whether or not this run reads it. Checks that only
        matter when an objective runs (at least one weight > 0, ...) are the objective's own
        (:func:`pretrain.losses.registry.validate_loss`).
        """
        if self.backend not in BACKENDS:
            raise ConfigError(f"loss.backend={self.backend!r}: expected 'auto', 'torch' or 'triton'")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"loss.strategy={self.strategy!r}: expected 'allgather' or 'ring'")
        if self.false_negatives not in ("none", *GROUP_MODES):
            raise ConfigError(f"loss.false_negatives={self.false_negatives!r}: expected 'none', 'text' or 'go'")
        for name in ("alpha", "beta", "gamma", "intra_seq", "intra_struct", "intra_text"):
            w = getattr(self, name)
            if not (math.isfinite(w) and w >= 0):
                raise ConfigError(f"loss.{name}={w}: weights must be finite numbers >= 0")
        if self.kind not in KINDS:
            raise ConfigError(f"loss.kind={self.kind!r}: expected 'infonce' or 'sigmoid'")
        if self.sigmoid_groups not in SIGMOID_GROUPS:
            raise ConfigError(f"loss.sigmoid_groups={self.sigmoid_groups!r}: expected 'exclude' or 'positive'")
        if self.sigmoid_groups == "positive" and (self.kind != "sigmoid" or self.false_negatives == "none"):
            raise ConfigError(  # it would be ignored: no sigmoid terms, or no groups to make positive
                "loss.sigmoid_groups='positive' needs loss.kind=sigmoid and loss.false_negatives 'text' or 'go' "
                f"(got kind={self.kind!r}, false_negatives={self.false_negatives!r})"
            )
        if self.temperature not in TEMPERATURES:
            raise ConfigError(f"loss.temperature={self.temperature!r}: expected 'shared', 'per_pair' or 'per_term'")
        self.protclip.validate("loss.protclip")
