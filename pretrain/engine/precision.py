"""Mixed precision of the training forward: bf16 autocast on CUDA, fp32 on CPU, fp32 losses.

``train.precision`` picks the compute dtype of the encoder and head forward:

- ``"auto"``: bf16 autocast on CUDA, plain fp32 on CPU (CPU bf16 matmuls are slow on most
  machines and the tests compare gradients in fp32).
- ``"bf16"``: bf16 autocast; CUDA only (an error on CPU, rather than a silent fp32 run).
- ``"fp32"``: no autocast anywhere.

Whatever the forward dtype, the embeddings are cast to fp32 before the contrastive loss, so
log-sum-exps and the loss sum accumulate in fp32 (:func:`embeddings_to_fp32`). This is
separate from the DeepSpeed JSON's ``bf16`` block, which stores parameters and gradients in bf16
(and is switched off on CPU by ``pretrain.engine.ds_config``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from pretrain.config import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device``; None means plain fp32.

    Raises:
        ConfigError: unknown value, or ``"bf16"`` on a device other than CUDA.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision={precision!r}: expected one of {PRECISIONS}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if precision == "bf16":
        raise ConfigError(f"train.precision='bf16' needs a CUDA device, got {device}; use 'auto' or 'fp32'")
    return None


def forward_autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the model forward, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def embeddings_to_fp32(emb: dict[str, Tensor]) -> dict[str, Tensor]:
    """Cast every half-precision tensor of a model output (bf16, fp16) to fp32, so the loss accumulates
    in fp32; fp32 and fp64 tensors and integer tensors are returned as they are.

    The cast is differentiable: gradients flow back to the bf16 forward.
    """
    return {k: v.float() if _is_half(v) else v for k, v in emb.items()}


def _is_half(v: object) -> bool:
    return isinstance(v, Tensor) and v.is_floating_point() and v.element_size() < 4
