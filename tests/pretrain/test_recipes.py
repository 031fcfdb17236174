"""The real-size recipes load with every key checked, and the 35M one builds."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml

from pretrain.config import CONFIGS_DIR, config_from_dict, load_config
from pretrain.losses.protclip import ProtCLIPLossConfig, validate_protclip_config
from pretrain.models.sequence_encoder import resolve_preset

RECIPES = {
    "align_pro_35M": "esm2_t12_35M",
    "align_pro_650M": "esm2_t33_650M",
    "protclip_650M": "esm2_t33_650M",
    "align_pro_3B": "esm2_t36_3B",
    "align_pro_15B": "esm2_t48_15B",
}


def _path(name: str) -> Path:
    return CONFIGS_DIR / "recipes" / f"{name}.yaml"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_and_round_trips(name):
    cfg = load_config(_path(name))
    m = cfg.model
    assert m.sequence.preset == RECIPES[name] and m.sequence.num_layers is None  # the preset's own size
    assert m.sequence.weights and m.text.pretrained_dir  # real runs start from pretrained encoders
    assert m.text.preset == "pubmedbert-base" and m.embed_dim == 512
    assert m.structure.node_hidden == (100, 16) and m.structure.num_layers == 3
    assert 0 <= cfg.train.stage1_steps < cfg.train.max_steps and cfg.optim.warmup_steps < cfg.train.max_steps
    assert config_from_dict(cfg.to_dict()) == cfg


def test_protclip_loss_section_is_typed_and_valid():
    section = yaml.safe_load(_path("protclip_650M").read_text())["loss"]
    assert section["objective"] == "protclip"
    hints = typing.get_type_hints(ProtCLIPLossConfig)
    assert set(section["protclip"]) <= set(hints), sorted(set(section["protclip"]) - set(hints))
    for key, value in section["protclip"].items():
        want = hints[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else type(value) is want
        assert ok, f"{key}: {value!r} is not {want}"
    cfg = load_config(_path("protclip_650M")).loss.protclip
    validate_protclip_config(cfg)
    assert (cfg.gc, cfg.mlm, cfg.bsr, cfg.pda) == (1.0, 0.3, 0.7, 1.0)
    assert (cfg.bsr_min_span, cfg.bsr_max_span, cfg.bsr_ratio) == (5, 10, 0.15)


def test_650M_presets_resolve():
    assert resolve_preset("esm2_t33_650M") == (33, 1280, 20)
    assert resolve_preset("esm2_t12_35M") == (12, 480, 20)


def test_35M_recipe_builds():
    from pretrain.models.trimodal import TriModalModel

    # no weight files here: build the same architecture from scratch
    cfg = load_config(_path("align_pro_35M"), ["model.sequence.weights=null", "model.text.pretrained_dir=null"])
    model = TriModalModel(cfg.model)
    assert model.sequence_encoder.output_dim == 480 and model.text_encoder.output_dim == 768
    assert 30e6 < sum(p.numel() for p in model.sequence_encoder.parameters()) < 40e6
    assert all(head.out_dim == 512 for head in model.heads.values())
