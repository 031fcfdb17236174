"""Fused similarity + InfoNCE in Triton, one op: O((m + n)·d) memory, never an m×n tensor.

loss = mean_{i valid} [ logsumexp_j(s·q_i·k_j) − s·q_i·k_{t_i} ]      (t_i = −1: row ignored)

Layering (Liger-Kernel style): the tile kernels (``kernels.infonce_tiles``) → the block primitives
``infonce_block_lse`` / ``infonce_block_backward`` (``kernels.infonce_blocks``, which also explains the
forward and the two backward methods) → ``infonce_forward`` / ``infonce_backward`` →
``InfoNCETritonFunction`` → ``infonce_triton``. The paired loss is ``kernels.symmetric_infonce_triton``,
one rank's share of the gathered loss ``kernels.gathered_infonce_triton``.
"""

from __future__ import annotations

import torch

from kernels.infonce_blocks import block_backward, infonce_block_lse, resolve_method
from kernels.infonce_reference import refuse_double_backward
from kernels.triton_launch import check_operands

__all__ = ["InfoNCETritonFunction", "infonce_backward", "infonce_forward", "infonce_triton"]


# ---------------------------------------------------------------------------------------------------------
# Loss-level launchers, autograd, functional wrapper.


def _valid_rows(q, targets, key_valid, n):
    """(targets, valid): targets default to the diagonal; valid rows have t >= 0 and a valid positive."""
    if targets is None:
        if q.shape[0] > n:
            raise ValueError(f"default targets arange(m) need m <= n; got m={q.shape[0]}, n={n}")
        targets = torch.arange(q.shape[0], device=q.device)
    elif not targets.is_cuda:  # free off the GPU; on CUDA an async device assert (no host sync)
        if targets.numel() and int(targets.max()) >= n:
            raise ValueError(f"targets must lie in [-1, n={n}); got max {int(targets.max())}")
    else:
        torch._assert_async((targets < n).all(), "infonce: targets must lie in [-1, n)")
    valid = targets >= 0
    if key_valid is not None:
        valid = valid & key_valid.bool()[targets.clamp_min(0)]
    return targets, valid


def infonce_forward(q, k, logit_scale, targets=None, *, key_valid=None):
    """Mean InfoNCE over valid rows. Returns (loss 0-dim fp32, lse (m,) fp32) for the backward."""
    loss, lse, *_ = _forward(q, k, logit_scale, targets, key_valid)
    return loss, lse


def _forward(q, k, logit_scale, targets, key_valid):
    """(loss, lse, targets, valid, count): the row bookkeeping is kept for the backward."""
    check_operands(q, k, logit_scale, targets, key_valid)
    targets, valid = _valid_rows(q, targets, key_valid, k.shape[0])
    count = valid.sum().clamp_min(1)
    lse, pos = infonce_block_lse(q, k, logit_scale, targets, key_valid=key_valid)
    return torch.where(valid, lse - pos, 0.0).sum() / count, lse, targets, valid, count


def infonce_backward(grad_output, q, k, logit_scale, lse, targets=None, *, key_valid=None, method="auto"):
    """Gradients of ``grad_output · infonce_forward(...)[0]``: (dq, dk, d logit_scale) in input dtypes.

    ``method``: as ``infonce_block_backward``."""
    check_operands(q, k, logit_scale, targets, key_valid)
    targets, valid = _valid_rows(q, targets, key_valid, k.shape[0])
    return _backward(grad_output, q, k, logit_scale, lse, targets, valid, valid.sum().clamp_min(1), key_valid, method)


def _backward(grad_output, q, k, logit_scale, lse, targets, valid, count, key_valid, method):
    row_weight = valid * (grad_output.to(torch.float32) / count)  # (m,) fp32
    method = resolve_method(method, q)
    dq, dk, ds = block_backward(q, k, logit_scale, lse, row_weight, targets, key_valid, method, out_dtype=q.dtype)
    return dq, dk, ds.reshape(logit_scale.shape).to(logit_scale.dtype)


class InfoNCETritonFunction(torch.autograd.Function):
    """Autograd wrapper: forward/backward only call the launchers; saves q, k, the (m,) LSE and the
    rows' targets and validity."""

    @staticmethod
    def forward(ctx, q, k, logit_scale, targets, key_valid, method="auto"):
        loss, lse, targets, valid, count = _forward(q, k, logit_scale, targets, key_valid)
        ctx.save_for_backward(q, k, logit_scale, lse, targets, key_valid, valid, count)
        ctx.method = method
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        refuse_double_backward("infonce (triton)")
        q, k, logit_scale, lse, targets, key_valid, valid, count = ctx.saved_tensors
        dq, dk, ds = _backward(grad_output, q, k, logit_scale, lse, targets, valid, count, key_valid, ctx.method)
        return dq, dk, ds, None, None, None


def infonce_triton(q, k, logit_scale, targets=None, *, key_valid=None, backward="auto"):
    """Fused InfoNCE (Triton): mean_i [logsumexp_j(s·q_i·k_j) − s·q_i·k_{t_i}] over rows with t_i ≥ 0.

    Args:
        q: (m, d) queries; k: (n, d) keys; fp32, fp16 or bf16 (same dtype), any d, any m and n.
        logit_scale: s, the multiplier (already exponentiated), shape [] or [1]; gets a gradient.
        targets: (m,) int64 positive column per row, default arange(m); −1 ignores the row
            (mean over valid rows, 0 when none is valid). Targets ≥ n raise ValueError (on CUDA a
            device-side assert instead, so that no host sync is needed).
        key_valid: optional (n,) bool, False columns are excluded from every row's LSE, and a row whose
            positive is such a column is ignored (same semantics as ``infonce_torch``).
        backward: "auto", "fused" or "gemm": the backward method (``infonce_block_backward``).
    Returns:
        0-dim fp32 loss. Memory: O((m + n)·d); nothing m×n is allocated, forward or backward (the gemm
        backward's workspace is m × chunk, chunk ∝ d and independent of n).
        The backward uses no atomics: gradients are bitwise repeatable run to run.
    """
    return InfoNCETritonFunction.apply(q, k, logit_scale, targets, key_valid, backward)
