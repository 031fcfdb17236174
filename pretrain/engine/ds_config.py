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
    if not isinstance(ds.get("zero_optimization"), dict) or "stage" not in ds["zero_optimization"]:
        raise ConfigError(f"{source}: needs zero_optimization.stage (0-3)")
    stage = ds["zero_optimization"]["stage"]
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
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
    if not isinstance(opt, dict) or not isinstance(opt.setdefault("params", {}), dict):
        raise ConfigError(f"{source}: 'optimizer' must be an object with a 'params' object")
    opt.setdefault("type", "AdamW")
    if str(opt["type"]).lower() not in ("adam", "adamw"):
        # the recipe's optim section (betas, eps, torch_adam) and the trainer's param groups are AdamW's
        raise ConfigError(f"{source}: optimizer.type={opt['type']!r} is not supported; use AdamW (or Adam)")
    params = opt["params"]
    owned = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    # (JSON key, its value there, recipe field, recipe value)
    checks = [(key, params.get(key), key, value) for key, value in owned.items()]
    checks.append(("gradient_clipping", ds.get("gradient_clipping"), "grad_clip", o.grad_clip))
    for key, have, field_name, want_value in checks:
        if have not in (None, "auto") and have != want_value:  # "auto": the HF-integration placeholder
            raise ConfigError(
                f"{source}: {key}={have!r} contradicts optim.{field_name}={want_value!r}; "
                f"remove it from the JSON and set it in the recipe"
            )
    params.update({**owned, "torch_adam": True})
    ds["gradient_clipping"] = o.grad_clip
    for key in ("fp16", "bf16"):
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"{source}: '{key}' must be an object like {{\"enabled\": true}}")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{source}: fp16 and bf16 cannot both be enabled")
    if use_cuda and cfg.train.precision == "fp32" and any(ds.get(k, {}).get("enabled") for k in ("fp16", "bf16")):
        raise ConfigError(
            f"{source}: train.precision='fp32' but the JSON enables half-precision parameters "
            f"(fp16/bf16 block); disable it there or use train.precision=auto/bf16"
        )
    if not use_cuda:
        for key in ("fp16", "bf16"):
            if ds.get(key, {}).get("enabled"):
                ds[key]["enabled"] = False  # half precision training is GPU-only here
    ds.setdefault("steps_per_print", 10**9)  # our own progress line replaces DeepSpeed's
    ds.setdefault("wall_clock_breakdown", False)
    return ds
