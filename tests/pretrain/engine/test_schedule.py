"""Per-group learning rates of the two-stage schedule (pretrain/engine/schedule.py): optim.encoder_lr_mult."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.engine.schedule import frozen_encoders, lr_factor, set_group_lrs
from pretrain.models.trimodal import MODALITIES, NO_DECAY

MULT = ["optim.encoder_lr_mult={sequence: 1.0, structure: 0.5, text: 0.1}"]


def _optimizer() -> tuple[torch.optim.AdamW, dict[str, torch.nn.Parameter]]:
    """A real AdamW with the trainer's group names: a matrix and a bias per encoder, and the heads."""
    params, groups = {}, []
    for part in [f"encoder_{m}" for m in MODALITIES] + ["heads"]:
        for suffix, shape in (("", (3, 2)), (NO_DECAY, (3,))):
            p = torch.nn.Parameter(torch.ones(shape))
            params[part + suffix] = p
            groups.append({"params": [p], "name": part + suffix})
    return torch.optim.AdamW(groups, lr=1.0), params


def test_multipliers_scale_each_encoder_after_the_schedule_and_stage1_stays_zero():
    cfg = load_config(overrides=[*MULT, "optim.warmup_steps=2", "train.max_steps=20", "train.stage1_steps=4"])
    opt, _ = _optimizer()
    mult = {"sequence": 1.0, "structure": 0.5, "text": 0.1}
    for step in (0, 3, 4, 11, 19):
        stage = 1 if step < cfg.train.stage1_steps else 2
        heads_lr = set_group_lrs(opt, cfg, step, frozen_encoders(stage, cfg))
        base = lr_factor(step, cfg)
        assert heads_lr == pytest.approx(cfg.optim.lr * base)
        for g in opt.param_groups:
            name = g["name"]
            decays = not name.endswith(NO_DECAY)
            if name.startswith("heads"):
                assert g["lr"] == pytest.approx(cfg.optim.lr * base)
                assert g["weight_decay"] == (cfg.optim.weight_decay if decays else 0.0)
                continue
            enc = name.removeprefix("encoder_").removesuffix(NO_DECAY)
            if stage == 1:  # frozen: no learning rate and no decay, whatever the multiplier
                assert (g["lr"], g["weight_decay"]) == (0.0, 0.0), (step, name)
            else:
                assert g["lr"] == pytest.approx(cfg.optim.encoder_lr * base * mult[enc]), (step, name)
                assert g["weight_decay"] == (cfg.optim.weight_decay if decays else 0.0)


def test_default_multipliers_leave_the_schedule_unchanged_and_frozen_encoders_stay_zero():
    plain = load_config(overrides=["train.frozen_encoders=[text]"])
    assert (plain.optim.encoder_lr_mult.sequence, plain.optim.encoder_lr_mult.text) == (1.0, 1.0)
    opt, _ = _optimizer()
    set_group_lrs(opt, plain, 50, frozen_encoders(2, plain))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    base = lr_factor(50, plain)
    assert lrs["encoder_sequence"] == lrs["encoder_structure"] == pytest.approx(plain.optim.encoder_lr * base)
    assert lrs["encoder_text"] == lrs["encoder_text" + NO_DECAY] == 0.0


def test_a_zero_multiplier_keeps_its_encoder_in_place_through_real_adamw_steps():
    cfg = load_config(overrides=["optim.encoder_lr_mult.text=0.0", "train.stage1_steps=0", "optim.warmup_steps=0"])
    opt, params = _optimizer()
    before = {k: p.detach().clone() for k, p in params.items()}
    for step in range(3):
        set_group_lrs(opt, cfg, step, frozen_encoders(2, cfg))
        for p in params.values():
            p.grad = torch.full_like(p, 0.3)
        opt.step()
    for name, p in params.items():
        moved = not torch.equal(p.detach(), before[name])
        assert moved == (not name.startswith("encoder_text")), name


def test_bad_multipliers_are_config_errors_naming_the_field():
    with pytest.raises(ConfigError, match="unknown config key 'optim.encoder_lr_mult.protein'"):
        load_config(overrides=["optim.encoder_lr_mult.protein=0.5"])
    with pytest.raises(ConfigError, match=r"optim.encoder_lr_mult.text=-0.1: must be a finite number >= 0"):
        load_config(overrides=["optim.encoder_lr_mult.text=-0.1"])
    with pytest.raises(ConfigError, match="optim.encoder_lr_mult.structure"):
        load_config(overrides=["optim.encoder_lr_mult={structure: fast}"])
