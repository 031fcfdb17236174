"""Reading checkpoint files without arbitrary unpickling, around DeepSpeed's own loaders."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def _safe_globals() -> list:
    """The only non-tensor classes DeepSpeed puts in its checkpoint files (plain data holders:
    the loss scaler, the ZeRO stage enum, ZeRO-1/2's (numel, start) fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Inside the block every ``torch.load`` is a ``weights_only=True`` load with DeepSpeed's allowlist.

    DeepSpeed's checkpoint loader and its universal conversion call ``torch.load(weights_only=False)``
    in many places. :func:`verify_safe` checks the files beforehand, but a file replaced between
    that check and DeepSpeed's read would still be unpickled; run inside this block, it cannot be.
    Not thread-safe (it swaps ``torch.load`` for the duration): use it where nothing else loads.
    """
    real_load = torch.load

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        return real_load(f, map_location, weights_only=True, **kwargs)

    with torch.serialization.safe_globals(_safe_globals()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = real_load


def verify_safe(tag_dir: Path, recursive: bool = False) -> None:
    """Refuse a checkpoint whose files need arbitrary unpickling.

    DeepSpeed's own loader and its universal conversion unpickle with ``weights_only=False``;
    every file is first read with ``weights_only=True`` and an allowlist of DeepSpeed's state
    classes, so a crafted file carrying a pickle payload is rejected before DeepSpeed touches it.
    ``recursive`` also checks subdirectories (a universal checkpoint keeps one per parameter).
    """
    with torch.serialization.safe_globals(_safe_globals()):
        for path in sorted(Path(tag_dir).glob("**/*.pt" if recursive else "*.pt")):
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure means we must not unpickle it
                raise RuntimeError(f"refusing checkpoint file {path}: not loadable safely ({e})") from None
