"""The one interface every training objective implements.

An objective is built from the recipe's ``loss`` section (:meth:`Objective.from_config`) and called
the same way by the trainer's one-pass step and by the two-pass step::

    terms = objective(out, batch)      # out: the model's forward output, batch: the collated batch
    terms["loss"]                      # the weighted total, this rank's share; other keys are logged

Besides the loss it answers what the rest of the run needs from it: which second stochastic views
the data pipeline must add (:meth:`needs_views`), which modules it adds to the model
(:meth:`build_heads`, e.g. ProtCLIP's BSR decoder and PDA head), and whether the two-pass
(GradCache) step can compute it from cached pooled embeddings (``two_pass``).

Adding an objective: write its class in its own module, add it to
:data:`pretrain.losses.registry.OBJECTIVES`, and name it in a recipe (``loss.objective``). Nothing
in the trainer changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

# The recipe's ``loss`` section, :class:`pretrain.losses.config.LossConfig`. Not imported: that
# module imports the objectives' own config classes, which import this one.
LossSection = Any


class Objective(ABC):
    """Base of the training objectives (see the module docstring)."""

    name: ClassVar[str]  # the ``loss.objective`` value that selects it
    two_pass: ClassVar[bool] = True  # its loss reads only pooled embeddings + logit scale (two-pass step ok)

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: LossSection) -> Objective:
        """Build the objective from the recipe's ``loss`` section."""

    @classmethod
    def validate_config(cls, cfg: LossSection) -> None:
        """Checks of ``cfg`` this objective needs beyond :meth:`LossConfig.validate`; raises ConfigError."""
        return None  # noqa: B027 (optional hook: most objectives need no checks of their own)

    def needs_views(self) -> dict[str, bool]:
        """Per modality, whether training batches must carry a second stochastic view of it."""
        return {}

    def build_heads(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules this objective adds to ``model`` (a ``TriModalModel``), by attribute name.

        Each module has ``claims(batch) -> bool`` and ``run(model, batch) -> dict``: on a batch it
        claims, the model's forward returns ``run``'s output instead of the three embeddings. The
        modules are trained with the projection heads (both stages) and saved with the model.
        """
        return {}

    @abstractmethod
    def __call__(self, out: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """The loss on one rank's batch.

        Args:
            out: the model's forward output (``TriModalModel.forward``), with ``logit_scale`` [1].
            batch: the collated batch the output was computed from (``pretrain.data.collate``).

        Returns:
            ``loss`` (the weighted total, this rank's share) and every named term.
        """


def detach_terms(terms: dict[str, Tensor]) -> dict[str, float]:
    """Loss terms as Python floats for logging."""
    with torch.no_grad():
        return {k: float(v.detach().float().reshape(-1)[0]) for k, v in terms.items()}
