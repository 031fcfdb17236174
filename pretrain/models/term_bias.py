"""Learned per-term parameters an objective adds to the model: SigLIP's biases and per-term temperatures.

An objective adds them to the model (``Objective.build_heads``): :class:`TermBias` when ``loss.kind``
is ``sigmoid``, :class:`TermLogitScale` when ``loss.temperature`` is ``per_pair`` or ``per_term``. The
model's forward returns their values (``out["term_bias"]``, ``out["term_logit_scale"]``), computed
inside the forward (under ZeRO-3 a parameter is only gathered there), and the two-pass step treats
them like the logit scale (:data:`pretrain.models.trimodal.SHARED_OUTPUTS`).
"""

from __future__ import annotations

import math

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


class TermLogitScale(nn.Module):
    """One learned logit scale (softmax multiplier s = 1 / temperature) per named group of loss terms.

    The same rules as the model's shared scale (``TriModalModel.logit_scale``): the parameter is the
    log scale, it starts at ``log(1 / init_temperature)`` and the scale is clamped at
    ``max_logit_scale``. The parameter is 1-D (``[len(names)]``, never 0-dim: deepspeed 0.19.8 fails
    at start-up on 0-dim parameters); it has fewer than two dimensions, so AdamW never decays it
    (``TriModalModel.parameter_groups``).

    Args:
        names: the scales' names, in the order of the vector (the objective maps terms onto them).
        init_temperature: initial temperature T0 of every scale (``model.init_temperature``).
        max_logit_scale: clamp of every scale (``model.max_logit_scale``).

    Shapes:
        forward() -> ``{"term_logit_scale": (len(names),)}``
    """

    adds_outputs = True  # the model's forward merges forward()'s dict into its output

    def __init__(self, names: tuple[str, ...], init_temperature: float, max_logit_scale: float):
        super().__init__()
        if not names:
            raise ValueError("TermLogitScale needs at least one name")
        self.names = tuple(names)
        self.max_logit_scale = float(max_logit_scale)
        self.log_logit_scale = nn.Parameter(torch.full((len(self.names),), math.log(1.0 / init_temperature)))

    def index(self, name: str) -> int:
        return self.names.index(name)

    def claims(self, batch: dict) -> bool:
        """Never replaces the model's forward; it only adds an output."""
        return False

    def forward(self) -> dict[str, Tensor]:
        """``{"term_logit_scale": (N,)}``: exp of the clamped log scales."""
        return {"term_logit_scale": self.log_logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()}
