"""A learned bias per loss term, the parameter SigLIP's pairwise sigmoid loss adds to the logits.

An objective adds it to the model (``Objective.build_heads``) when ``loss.kind`` is ``sigmoid``; the
model's forward returns it as ``out["term_bias"]`` (computed inside the forward: under ZeRO-3 a
parameter is only gathered there), and the two-pass step treats it like the logit scale
(:data:`pretrain.models.trimodal.SHARED_OUTPUTS`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TermBias(nn.Module):
    """One learned scalar bias per named loss term, shape ``[len(terms)]``.

    Args:
        terms: the term names, in the order of the bias vector (``index(name)`` finds one).
        init: initial value of every bias (SigLIP: -10, so that the few positives are not
            overwhelmed by the many negatives at the start).
    """

    adds_outputs = True  # the model's forward merges forward()'s dict into its output

    def __init__(self, terms: tuple[str, ...], init: float):
        super().__init__()
        self.terms = tuple(terms)
        self.bias = nn.Parameter(torch.full((len(self.terms),), float(init)))

    def index(self, term: str) -> int:
        return self.terms.index(term)

    def claims(self, batch: dict) -> bool:
        """Never replaces the model's forward; it only adds an output."""
        return False

    def forward(self) -> dict[str, Tensor]:
        """``{"term_bias": (T,)}``."""
        return {"term_bias": self.bias}
