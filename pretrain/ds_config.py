"""Resolve a DeepSpeed JSON (ZeRO stage, precision, communication) against the recipe.

The JSON owns how to distribute (ZeRO stage and its knobs, precision, the optimizer type);
the recipe owns what to train (batch size, learning rates, clipping). The fields the recipe
owns are filled in here, and a JSON that contradicts them is an error rather than a silent
override.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from pretrain.config import CONFIGS_DIR, Config, ConfigError


def find_deepspeed_config(name: str) -> Path:
    """A path as given, else a bare name (``zero3.json`` or ``zero3``) under ``configs/``."""
    for candidate in (Path(name), CONFIGS_DIR / name, CONFIGS_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"DeepSpeed config not found: {name} (looked in . and {CONFIGS_DIR})")


def load_deepspeed_config(name: str) -> dict:
    path = find_deepspeed_config(name)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"DeepSpeed config {path}: top level must be an object")
    raw["_source"] = str(path)
    return raw


def resolve_deepspeed_config(raw: dict, cfg: Config, world_size: int, use_cuda: bool) -> dict:
    """Fill the recipe-owned fields of a DeepSpeed config and check the rest.

    Args:
        raw: the JSON as loaded by :func:`load_deepspeed_config`.
        cfg: the resolved recipe.
        world_size: number of data-parallel ranks.
        use_cuda: False on CPU, where half precision is switched off.
    """
    ds = copy.deepcopy(raw)
    source = ds.pop("_source", "DeepSpeed config")
    if "zero_optimization" not in ds or "stage" not in ds["zero_optimization"]:
        raise ConfigError(f"{source}: needs zero_optimization.stage (0-3)")
    if ds["zero_optimization"]["stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3")
    if "scheduler" in ds:
        raise ConfigError(f"{source}: remove 'scheduler'; the recipe's optim section schedules the learning rate")
    ga = ds.get("gradient_accumulation_steps", 1)
    if ga != 1:
        raise ConfigError(f"{source}: gradient_accumulation_steps={ga} is not supported (use data.batch_size)")
    micro = cfg.data.batch_size
    want = micro * world_size
    if "train_batch_size" in ds and ds["train_batch_size"] not in ("auto", want):
        raise ConfigError(
            f"{source}: train_batch_size={ds['train_batch_size']} contradicts data.batch_size={micro} "
            f"x {world_size} ranks = {want}"
        )
    if "train_micro_batch_size_per_gpu" in ds and ds["train_micro_batch_size_per_gpu"] not in ("auto", micro):
        raise ConfigError(
            f"{source}: train_micro_batch_size_per_gpu={ds['train_micro_batch_size_per_gpu']} "
            f"contradicts data.batch_size={micro}"
        )
    ds["train_batch_size"] = want
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = 1
    o = cfg.optim
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("type", "AdamW")
    params = opt.setdefault("params", {})
    params.update(
        {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay, "torch_adam": True}
    )
    ds["gradient_clipping"] = o.grad_clip
    if not use_cuda:
        for key in ("fp16", "bf16"):
            if ds.get(key, {}).get("enabled"):
                ds[key]["enabled"] = False  # half precision training is GPU-only here
    ds.setdefault("steps_per_print", 10**9)  # our own progress line replaces DeepSpeed's
    ds.setdefault("wall_clock_breakdown", False)
    return ds
