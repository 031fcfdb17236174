"""The objectives a recipe can name (``loss.objective``), and building / checking one from its section."""

from __future__ import annotations

from pretrain.errors import ConfigError
from pretrain.losses.align_pro import AlignProLoss
from pretrain.losses.config import LossConfig
from pretrain.losses.objective import Objective
from pretrain.losses.protclip import ProtCLIPLoss

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (AlignProLoss, ProtCLIPLoss)}


def objective_class(name: str) -> type[Objective]:
    """The objective registered as ``name``; ConfigError naming the choices otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        choices = " or ".join(repr(n) for n in OBJECTIVES)
        raise ConfigError(f"loss.objective={name!r}: expected {choices}") from None


def validate_loss(cfg: LossConfig) -> None:
    """The ``loss`` section's checks: the shared ones, then the selected objective's."""
    objective = objective_class(cfg.objective)
    cfg.validate()
    objective.validate_config(cfg)


def build_objective(cfg: LossConfig) -> Objective:
    """The objective ``cfg.objective`` names, built from the ``loss`` section."""
    return objective_class(cfg.objective).from_config(cfg)
