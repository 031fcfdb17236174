"""The model and the objective a run's recipe trains, built from the full config."""

from __future__ import annotations

from pretrain.config import Config
from pretrain.losses.objective import Objective
from pretrain.losses.registry import build_objective
from pretrain.models.trimodal import TriModalModel


def build_model(cfg: Config, load_pretrained: bool = True, objective: Objective | None = None) -> TriModalModel:
    """The tri-modal model of ``cfg`` with the modules its objective adds and its activation checkpointing.

    Args:
        cfg: the run's full recipe.
        load_pretrained: read the pretrained encoder weights the recipe names; False builds the
            same architecture without them (the caller loads a full state dict: exports, evaluation).
        objective: the objective already built from ``cfg.loss`` (default: build it here).
    """
    model = TriModalModel(cfg.model, objective=objective or build_objective(cfg.loss), load_pretrained=load_pretrained)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    return model
