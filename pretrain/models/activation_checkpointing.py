"""Activation checkpointing of encoder layers (``train.activation_checkpointing``), per encoder.

A checkpointed layer keeps only its inputs during the forward and recomputes its activations
when the backward reaches it (``torch.utils.checkpoint`` with ``use_reentrant=False``, which
also restores the RNG so the recomputed dropout masks equal the forward's). Memory per layer
drops from all its intermediate tensors to one input; the price is one more forward per layer.

The layer's ``forward`` is wrapped on the instance, not the module replaced by a wrapper module,
so parameter names, state dicts, checkpoints and exports are unchanged. Module hooks (ZeRO-3
parameter gathering) stay outside the checkpoint, as transformers does for its own layers; the
submodules' hooks run again during the recomputation and gather their parameters then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class _CheckpointedForward:
    """Calls ``forward`` through ``torch.utils.checkpoint`` when autograd records the graph."""

    def __init__(self, forward: Callable):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)  # nothing to save: no recomputation needed
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def set_layer_checkpointing(layers: Iterable[nn.Module], enabled: bool) -> None:
    """Turn activation checkpointing of each module in ``layers`` on or off (idempotent)."""
    for layer in layers:
        wrapped = isinstance(layer.__dict__.get("forward"), _CheckpointedForward)
        if enabled and not wrapped:
            layer.forward = _CheckpointedForward(type(layer).forward.__get__(layer))
        elif not enabled and wrapped:
            del layer.forward


def is_layer_checkpointed(layer: nn.Module) -> bool:
    """True when :func:`set_layer_checkpointing` wrapped ``layer``."""
    return isinstance(layer.__dict__.get("forward"), _CheckpointedForward)
