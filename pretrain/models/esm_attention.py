"""ESM-2 self-attention through ``torch.nn.functional.scaled_dot_product_attention`` (``model.sequence.attention``).

fair-esm's ``MultiheadAttention`` (rotary ESM-2 layers) computes ``softmax(q·kᵀ)`` with ``torch.bmm``
and keeps every head's L × L probabilities (fp32) and their copy for the product with v until the
backward: the ``6·a·s²·b`` term of the activation-memory formula in BENCHMARKS.md. The fused path
runs the same computation through SDPA, whose flash kernels (CUDA, and the CPU one torch picks for
fp32 / bf16 without dropout) keep q, k, v, the output and one log-sum-exp per row instead.

What is identical to fair-esm: the same ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` modules
(so parameter names, state dicts and ZeRO-3 module hooks are unchanged); q scaled by
``head_dim**-0.5`` *before* the rotary embedding (fair-esm's order, then ``scale=1`` in SDPA); the
layer's own ``RotaryEmbedding`` applied to q and k; ``key_padding_mask`` (True at padding) as a
boolean keep-mask; attention dropout ``self.dropout`` in training (0.0 for ESM-2, and fair-esm's
``F.dropout(p=0)`` draws no random numbers, so RNG streams agree too).

The fused forward is installed on the module *instance* (as ``activation_checkpointing`` does for
layers): the class, the parameters and ``type(module).forward`` stay fair-esm's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from esm.multihead_attention import MultiheadAttention
from torch import Tensor, nn

ATTENTION_MODES = ("fused", "reference")


class _FusedAttentionForward:
    """``module.forward`` replacement: SDPA for ESM-2 self-attention, fair-esm's own code otherwise."""

    def __init__(self, module: MultiheadAttention):
        self.module = module

    def __call__(
        self,
        query: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        key_padding_mask: Tensor | None = None,
        incremental_state: dict | None = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Tensor | None = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        m = self.module
        reference = (
            need_head_weights  # per-head probabilities (contact head): SDPA does not return them
            or before_softmax
            or incremental_state is not None
            or static_kv
            or attn_mask is not None
            or m.rot_emb is None
            or m.bias_k is not None
            or m.add_zero_attn
            or key is not query
            or value is not query
        )
        if reference:
            return type(m).forward(
                m,
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                incremental_state=incremental_state,
                need_weights=need_weights,
                static_kv=static_kv,
                attn_mask=attn_mask,
                before_softmax=before_softmax,
                need_head_weights=need_head_weights,
            )
        return fused_self_attention(m, query, key_padding_mask), None


def fused_self_attention(module: MultiheadAttention, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """fair-esm rotary self-attention of ``module``'s weights computed by SDPA.

    Args:
        module: a fair-esm ``MultiheadAttention`` with rotary embeddings (ESM-2 layer's ``self_attn``).
        x: the layer-normed layer input, time first as in fair-esm.
        key_padding_mask: True at padding keys (``tokens.eq(padding_idx)``), or None.

    Shapes:
        x (T, B, E), key_padding_mask (B, T) -> (T, B, E)
    """
    length, batch, dim = x.shape
    heads, head_dim = module.num_heads, module.head_dim

    def split(t: Tensor) -> Tensor:  # (T, B, E) -> (B, H, T, Dh)
        return t.view(length, batch, heads, head_dim).permute(1, 2, 0, 3)

    q = split(module.q_proj(x) * module.scaling)  # fair-esm scales q before the rotation
    k = split(module.k_proj(x))
    v = split(module.v_proj(x))
    q, k = module.rot_emb(q, k)  # rotary tables are fp32: under autocast q, k come back fp32
    q, k = q.to(v.dtype), k.to(v.dtype)  # what bmm under autocast (or the module's own dtype) uses
    keep = None
    if key_padding_mask is not None:
        keep = ~key_padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T), True = attend
    dropout = module.dropout if module.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout, scale=1.0)  # (B, H, T, Dh)
    out = out.permute(2, 0, 1, 3).reshape(length, batch, dim)  # (T, B, E)
    return module.out_proj(out)


def _attention_modules(model: nn.Module) -> Iterable[MultiheadAttention]:
    return (m for m in model.modules() if isinstance(m, MultiheadAttention))


def set_esm_attention(model: nn.Module, mode: str) -> None:
    """Run every fair-esm ``MultiheadAttention`` in ``model`` fused (SDPA) or as fair-esm does (idempotent).

    Calls that need attention probabilities (``need_head_weights`` / ``return_contacts``, i.e. the
    contact head) always run fair-esm's reference code, whatever the mode: SDPA cannot return them.
    Plain calls in fused mode return ``None`` as the head-averaged weights ``TransformerLayer`` asks
    for (``ESM2.forward`` discards them unless ``need_head_weights``).

    Args:
        model: an ``esm.model.esm2.ESM2`` or any module holding its layers.
        mode: ``"fused"`` or ``"reference"``.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    for module in _attention_modules(model):
        fused = isinstance(module.__dict__.get("forward"), _FusedAttentionForward)
        if mode == "fused" and not fused:
            module.forward = _FusedAttentionForward(module)
        elif mode == "reference" and fused:
            del module.forward


def esm_attention_mode(model: nn.Module) -> str:
    """``"fused"`` when every fair-esm attention in ``model`` runs SDPA, else ``"reference"``."""
    modules = list(_attention_modules(model))
    fused = modules and all(isinstance(m.__dict__.get("forward"), _FusedAttentionForward) for m in modules)
    return "fused" if fused else "reference"
