"""Consolidated export: one safetensors file + the recipe, usable without DeepSpeed.

``RUN/export/model.safetensors`` holds the full fp32 state dict (ZeRO-3 partitions are
gathered first) and ``RUN/export/config.yaml`` the model recipe. :func:`load_exported`
rebuilds the :class:`TriModalModel` from those two files alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pretrain.config import Config, load_run_config, save_config
from pretrain.models.trimodal import TriModalModel

MODEL_FILE = "model.safetensors"


def export_engine(engine, cfg: Config, out_dir: Path) -> Path | None:
    """Gather the (possibly ZeRO-3 partitioned) parameters and write the export on rank 0.

    Collective: call on every rank. Returns the directory on rank 0, None elsewhere.
    """
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank == 0:
            state = {
                k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in module.state_dict().items()
            }
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    return write_export(state, cfg, out_dir)


def write_export(state: dict[str, torch.Tensor], cfg: Config, out_dir: Path) -> Path:
    """Write ``state`` and ``cfg`` to ``out_dir`` atomically (temp dir, then rename)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt", "producer": "align-pro"})
    save_config(cfg, tmp / "config.yaml")
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def load_exported(export_dir: Path, device: str = "cpu") -> tuple[TriModalModel, Config]:
    """Rebuild the model from an export directory (safetensors only: nothing is unpickled)."""
    export_dir = Path(export_dir)
    weights = export_dir / MODEL_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in export directory {export_dir}")
    cfg, _ = load_run_config(export_dir)
    model = TriModalModel(cfg.model)
    state = load_file(str(weights), device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{weights}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model.to(device).eval(), cfg
