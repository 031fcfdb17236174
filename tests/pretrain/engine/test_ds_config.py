"""Resolving a DeepSpeed JSON against the recipe (pretrain/engine/ds_config.py): the recipe owns what it owns."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.engine.ds_config import load_deepspeed_config, resolve_deepspeed_config


def _resolve(raw: dict, *overrides: str, use_cuda: bool = False) -> dict:
    return resolve_deepspeed_config({"_source": "my.json", **raw}, load_config(overrides=list(overrides)), 2, use_cuda)


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero3.json"])
def test_shipped_configs_take_the_recipe_values(name):
    cfg = load_config()
    ds = resolve_deepspeed_config(load_deepspeed_config(name), cfg, 2, use_cuda=True)
    o = cfg.optim
    assert ds["optimizer"]["params"] == {
        "lr": o.lr,
        "betas": list(o.betas),
        "eps": o.eps,
        "weight_decay": o.weight_decay,
        "torch_adam": True,
    }
    assert ds["gradient_clipping"] == o.grad_clip and ds["train_batch_size"] == 2 * cfg.data.batch_size
    assert ds["bf16"]["enabled"]
    assert not resolve_deepspeed_config(load_deepspeed_config(name), cfg, 2, use_cuda=False)["bf16"]["enabled"]


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"gradient_clipping": 0.1}, "gradient_clipping=0.1 contradicts optim.grad_clip"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.5}}}, "lr=0.5 contradicts optim.lr"),
        ({"optimizer": {"type": "AdamW", "params": {"betas": [0.8, 0.9]}}}, "betas=.* contradicts optim.betas"),
        ({"optimizer": {"type": "Adagrad", "params": {}}}, "optimizer.type='Adagrad' is not supported"),
        ({"optimizer": "AdamW"}, "'optimizer' must be an object"),
        ({"bf16": True}, "'bf16' must be an object"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "cannot both be enabled"),
    ],
)
def test_contradictions_and_malformed_blocks_are_errors_naming_the_json(raw, needle):
    with pytest.raises(ConfigError, match=f"my.json: .*{needle}"):
        _resolve({"zero_optimization": {"stage": 2}, **raw})


@pytest.mark.parametrize("zero", [None, {"stage": True}, {"stage": 4}, {}])
def test_zero_stage_must_be_a_stage(zero):
    with pytest.raises(ConfigError, match="zero_optimization"):
        _resolve({"zero_optimization": zero})


def test_agreeing_values_and_fp32_precision():
    ds = _resolve(
        {
            "zero_optimization": {"stage": 1},
            "gradient_clipping": 1.0,
            "optimizer": {"params": {"lr": 1e-3, "eps": "auto"}},
        },
        "optim.lr=1e-3",
        "optim.grad_clip=1.0",
    )
    assert ds["optimizer"]["params"]["lr"] == 1e-3
    with pytest.raises(ConfigError, match="train.precision='fp32'"):  # bf16 parameters would ignore fp32
        _resolve({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}, "train.precision=fp32", use_cuda=True)
