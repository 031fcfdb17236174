"""Fused similarity + SigLIP sigmoid loss in Triton, one op: O((m + n)·d) memory, never an m×n tensor.

``loss = -(1/|R|) Σ_{i in R} Σ_{j in V} log σ(z_ij (s·a_i·b_j + t))`` with the semantics of
``kernels.sigmoid_reference`` (which also derives the gradients). Liger-Kernel layering:
``_sigmoid_fwd_kernel`` / ``_sigmoid_bwd_kernel`` → ``sigmoid_forward`` / ``sigmoid_backward`` →
``SigmoidLossTritonFunction`` → ``sigmoid_loss_triton``.

Forward: program i owns a row tile and sweeps every key tile, recomputing ``s·a·bᵀ + t`` tile by tile
(``_dot_tile`` of ``kernels.infonce_tiles``) and summing ``-log σ(z x)`` over live columns into a
per-row sum ``(m,)``; the loss is its weighted sum (``valid / |R|``).

Backward (no atomics, bitwise repeatable): one kernel, launched twice. Rows side: program (i, c) owns
row tile i and gradient columns c; it sweeps the key tiles, rebuilds ``D = w z (σ(z x) − 1)``
(``= ∓ w σ(−z x)``) and accumulates ``s · D b`` for its columns, plus per-row partials of ``ds = Σ D ∘
(a bᵀ)`` and ``dt = Σ D``. Keys side (``KEY_SIDE``): the same on the transposed problem, ``s · Dᵀ a`` per
key tile. Both recompute the tiles; only ``(m + n)·d`` gradients and ``(m,)`` partials are written.

False negatives (``GROUPED``): each tile also loads the rows' and the keys' group ids and drops the
same-group pairs that are not the row's positive from ``live`` (excluded: no loss, no gradient), or
with ``GROUPS_POSITIVE`` (``groups_as="positive"``) adds them to ``pos`` (``z = +1``), the semantics of
``kernels.sigmoid_reference``; nothing larger than a tile is built.

In the interpreter (CPU) operands are upcast to fp32 (its bf16 ``tl.dot`` is wrong) and one fixed config
runs (``kernels.triton_launch.launch``); on CUDA the configs are autotuned.
"""

from __future__ import annotations

import torch

from kernels.infonce_reference import refuse_double_backward
from kernels.infonce_tiles import _dot_tile, _live_columns, _load_chunk
from kernels.sigmoid_reference import _check_args, _row_weights, check_groups, check_groups_as
from kernels.triton_launch import (
    BWD_CONFIGS,
    FWD_CONFIGS,
    dot_precision,
    kernel_args,
    launch,
    prune_bwd,
    tl,
    triton,
)

__all__ = ["SigmoidLossTritonFunction", "sigmoid_backward", "sigmoid_forward", "sigmoid_loss_triton"]


# fmt: off
@triton.jit
def _same_group(row_groups, key_groups, pos):
    """(BM, BN) bool: pairs whose row and key share a group (not NO_GROUP = −1), other than positives."""
    return (row_groups[:, None] == key_groups[None, :]) & (row_groups[:, None] != -1) & ~pos


@triton.jit
def _sigmoid_fwd_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, tgt_ptr, kv_ptr, rg_ptr, kg_ptr, row_sum_ptr, m, n, d,
                        stride_am, stride_ad, stride_bn, stride_bd,
                        HAS_KEY_VALID: tl.constexpr, GROUPED: tl.constexpr, GROUPS_POSITIVE: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < m
    s = tl.load(scale_ptr).to(tl.float32)
    t = tl.load(bias_ptr).to(tl.float32)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    if GROUPED:
        rg = tl.load(rg_ptr + rows, mask=row_ok, other=-1)  # row group ids (−1: NO_GROUP)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        x = s * _dot_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, d, stride_am, stride_ad, stride_bn,
                          stride_bd, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D) + t  # (BM, BN)
        pos = cols[None, :] == tgt[:, None]
        live = row_ok[:, None] & _live_columns(kv_ptr, cols, col_ok, HAS_KEY_VALID)[None, :]
        if GROUPED:
            same = _same_group(rg, tl.load(kg_ptr + cols, mask=col_ok, other=-1), pos)
            if GROUPS_POSITIVE:
                pos = pos | same  # z = +1 on same-group pairs
            else:
                live = live & ~same  # excluded
        u = tl.where(pos, x, -x)  # z · x
        nll = tl.maximum(-u, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(u)))  # -log σ(u), stable
        acc += tl.sum(tl.where(live, nll, 0.0), axis=1)
    tl.store(row_sum_ptr + rows, acc, mask=row_ok)


@triton.jit
def _sigmoid_bwd_kernel(own_ptr, other_ptr, scale_ptr, bias_ptr, tgt_ptr, kv_ptr, rg_ptr, kg_ptr, w_ptr, grad_ptr,
                        ds_ptr, dt_ptr, n_own, n_other, d, stride_om, stride_od, stride_pm, stride_pd,
                        KEY_SIDE: tl.constexpr, HAS_KEY_VALID: tl.constexpr, GROUPED: tl.constexpr,
                        GROUPS_POSITIVE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_OUT: tl.constexpr):
    # Program (i, c): own rows tile i (queries, or keys when KEY_SIDE), gradient columns tile c.
    # grad[own] = s · Σ_other D · other, with D (own × other) = D_ij (rows side) or D_ji (keys side).
    own = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    own_ok = own < n_own
    out = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_ok = out < d
    s = tl.load(scale_ptr).to(tl.float32)
    t = tl.load(bias_ptr).to(tl.float32)
    if KEY_SIDE:
        own_live = _live_columns(kv_ptr, own, own_ok, HAS_KEY_VALID)
        if GROUPED:
            own_g = tl.load(kg_ptr + own, mask=own_ok, other=-1)  # the keys' group ids
    else:
        tgt = tl.load(tgt_ptr + own, mask=own_ok, other=-1)
        w = tl.load(w_ptr + own, mask=own_ok, other=0.0)
        if GROUPED:
            own_g = tl.load(rg_ptr + own, mask=own_ok, other=-1)  # the rows' group ids
    acc = tl.zeros([BLOCK_M, BLOCK_OUT], tl.float32)
    ds_row = tl.zeros([BLOCK_M], tl.float32)
    dt_row = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, n_other, BLOCK_N):
        oth = start_n + tl.arange(0, BLOCK_N)
        oth_ok = oth < n_other
        dots = _dot_tile(own_ptr, other_ptr, own, oth, own_ok, oth_ok, d, stride_om, stride_od, stride_pm,
                         stride_pd, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)  # (BM, BN)
        x = s * dots + t
        if KEY_SIDE:
            tgt_o = tl.load(tgt_ptr + oth, mask=oth_ok, other=-1)
            w_o = tl.load(w_ptr + oth, mask=oth_ok, other=0.0)
            pos = tgt_o[None, :] == own[:, None]
            live = own_live[:, None] & oth_ok[None, :]
            wt = w_o[None, :]
            if GROUPED:  # (key, row) tile: transpose the roles of _same_group
                rg_o = tl.load(rg_ptr + oth, mask=oth_ok, other=-1)
                same = (own_g[:, None] == rg_o[None, :]) & (rg_o[None, :] != -1) & ~pos
        else:
            pos = oth[None, :] == tgt[:, None]
            live = own_ok[:, None] & _live_columns(kv_ptr, oth, oth_ok, HAS_KEY_VALID)[None, :]
            wt = w[:, None]
            if GROUPED:
                same = _same_group(own_g, tl.load(kg_ptr + oth, mask=oth_ok, other=-1), pos)
        if GROUPED:
            if GROUPS_POSITIVE:
                pos = pos | same  # z = +1 on same-group pairs
            else:
                live = live & ~same  # excluded
        u = tl.where(pos, x, -x)
        sig = tl.sigmoid(-u)  # D = z (σ(u) − 1) · w = −σ(−u) w on positives, +σ(−u) w on negatives
        dz = tl.where(live, tl.where(pos, -sig, sig) * wt, 0.0)
        if not KEY_SIDE:
            if tl.program_id(1) == 0:
                ds_row += tl.sum(dz * dots, axis=1)
                dt_row += tl.sum(dz, axis=1)
        other = _load_chunk(other_ptr, oth, oth_ok, out, out_ok, stride_pm, stride_pd, True)
        acc = tl.dot(dz, other, acc, input_precision=PRECISION)
    tl.store(grad_ptr + own[:, None] * d + out[None, :], s * acc, mask=own_ok[:, None] & out_ok[None, :])
    if not KEY_SIDE:
        if tl.program_id(1) == 0:
            tl.store(ds_ptr + own, ds_row, mask=own_ok)
            tl.store(dt_ptr + own, dt_row, mask=own_ok)
# fmt: on


def _prepared(a, b, logit_scale, bias, targets, key_valid):
    """Checks the operands; returns (targets int64, key mask bytes or a dummy pointer)."""
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"sigmoid_loss_triton takes fp32/fp16/bf16 embeddings; got {a.dtype}")
    if max(a.numel(), b.numel()) >= 2**31:
        raise ValueError("2^31 elements or more per operand are not supported by the Triton kernels")
    targets = _check_args(a, b, logit_scale, bias, targets, key_valid)
    _, targets, kv = kernel_args(a, logit_scale, targets, key_valid)
    return targets, kv


def _group_ptrs(groups, key_groups, targets):
    """The kernels' (row groups, key groups) pointers: int64 contiguous, or ``targets`` as a dummy."""
    if groups is None:
        return targets, targets
    return groups.contiguous(), key_groups.contiguous()


def sigmoid_forward(
    a, b, logit_scale, bias, targets, key_valid, weight, groups=None, key_groups=None, groups_positive=False
):
    """Weighted loss ``Σ_i weight_i Σ_j -log σ(z_ij x_ij)`` (0-dim fp32); ``targets`` int64 (m,);
    ``groups`` (m,) / ``key_groups`` (n,) int64 or None (same-group pairs excluded, or positives with
    ``groups_positive``)."""
    m, n, d = a.shape[0], b.shape[0], a.shape[1]
    if m == 0 or n == 0:
        return torch.zeros((), dtype=torch.float32, device=a.device)
    _, _, kv = kernel_args(a, logit_scale, targets, key_valid)
    rg, kg = _group_ptrs(groups, key_groups, targets)
    row_sum = torch.empty(m, dtype=torch.float32, device=a.device)
    strides = (a.stride(0), a.stride(1), b.stride(0), b.stride(1))
    args = (a, b, logit_scale, bias, targets, kv, rg, kg, row_sum, m, n, d, *strides)
    meta = {
        "HAS_KEY_VALID": key_valid is not None,
        "GROUPED": groups is not None,
        "GROUPS_POSITIVE": groups is not None and groups_positive,
        "PRECISION": dot_precision(a),
    }
    launch(_sigmoid_fwd_kernel, lambda c: (triton.cdiv(m, c["BLOCK_M"]),), a, args, meta, FWD_CONFIGS)
    return (row_sum * weight).sum()


def _side(own, other, logit_scale, bias, targets, kv, groups, w, has_kv, key_side):
    n_own, d = own.shape
    grad = torch.empty(n_own, d, dtype=torch.float32, device=own.device)
    ds = torch.empty(n_own if not key_side else 0, dtype=torch.float32, device=own.device)
    dt = torch.empty_like(ds)
    strides = (own.stride(0), own.stride(1), other.stride(0), other.stride(1))
    rg, kg, grouped, positive = groups
    args = (own, other, logit_scale, bias, targets, kv, rg, kg, w, grad, ds, dt, n_own, other.shape[0], d, *strides)
    meta = {
        "KEY_SIDE": key_side,
        "HAS_KEY_VALID": has_kv,
        "GROUPED": grouped,
        "GROUPS_POSITIVE": grouped and positive,
        "PRECISION": dot_precision(own),
    }
    grid = lambda c: (triton.cdiv(n_own, c["BLOCK_M"]), triton.cdiv(d, c["BLOCK_OUT"]))  # noqa: E731
    launch(_sigmoid_bwd_kernel, grid, own, args, meta, BWD_CONFIGS, prune=prune_bwd)
    return grad, ds, dt


def sigmoid_backward(
    grad_output,
    a,
    b,
    logit_scale,
    bias,
    targets,
    key_valid,
    weight,
    groups=None,
    key_groups=None,
    groups_positive=False,
):
    """Gradients of ``grad_output · sigmoid_forward(...)``: (da, db, ds, dt) in the inputs' dtypes."""
    m, n = a.shape[0], b.shape[0]
    w = weight * grad_output.to(torch.float32)  # (m,)
    if m == 0 or n == 0:
        da, db = torch.zeros_like(a), torch.zeros_like(b)
        zero = torch.zeros((), device=a.device)
        return da, db, zero.reshape(logit_scale.shape).to(logit_scale.dtype), zero.reshape(bias.shape).to(bias.dtype)
    _, _, kv = kernel_args(a, logit_scale, targets, key_valid)
    has_kv = key_valid is not None
    grp = (*_group_ptrs(groups, key_groups, targets), groups is not None, groups_positive)
    da, ds_rows, dt_rows = _side(a, b, logit_scale, bias, targets, kv, grp, w, has_kv, key_side=False)
    db, _, _ = _side(b, a, logit_scale, bias, targets, kv, grp, w, has_kv, key_side=True)
    return (
        da.to(a.dtype),
        db.to(b.dtype),
        ds_rows.sum().reshape(logit_scale.shape).to(logit_scale.dtype),
        dt_rows.sum().reshape(bias.shape).to(bias.dtype),
    )


class SigmoidLossTritonFunction(torch.autograd.Function):
    """Autograd wrapper: forward / backward only call the launchers; saves the inputs and row weights."""

    @staticmethod
    def forward(ctx, a, b, logit_scale, bias, targets, key_valid, groups=None, key_groups=None, groups_positive=False):
        _, weight, _ = _row_weights(targets, key_valid, torch.float32)
        loss = sigmoid_forward(a, b, logit_scale, bias, targets, key_valid, weight, groups, key_groups, groups_positive)
        ctx.save_for_backward(a, b, logit_scale, bias, targets, key_valid, weight, groups, key_groups)
        ctx.groups_positive = groups_positive
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        refuse_double_backward("sigmoid_loss (triton)")
        a, b, logit_scale, bias, targets, key_valid, weight, groups, key_groups = ctx.saved_tensors
        grads = sigmoid_backward(
            grad_output, a, b, logit_scale, bias, targets, key_valid, weight, groups, key_groups, ctx.groups_positive
        )
        return (*grads, None, None, None, None, None)


def sigmoid_loss_triton(
    a, b, logit_scale, bias, targets=None, *, key_valid=None, groups=None, key_groups=None, groups_as="exclude"
):
    """Fused SigLIP sigmoid loss (Triton), same arguments and semantics as
    :func:`kernels.sigmoid_reference.sigmoid_loss_torch` (no ``chunk_size``).

    Args:
        a: (m, d) queries; b: (n, d) keys; fp32, fp16 or bf16 (same dtype), any m, n, d.
        logit_scale, bias: ``s`` and ``t``, shape [] or [1]; both get gradients.
        targets: (m,) int positive column per row, default arange(m); −1 ignores the row.
        key_valid: optional (n,) bool: masked keys are neither positives nor negatives.
        groups, key_groups: optional (m,) / (n,) int false-negative group ids (``key_groups`` defaults
            to ``groups`` when m == n): same-group pairs other than a row's positive are excluded.
        groups_as: ``"exclude"`` (default) or ``"positive"``: those pairs are positives (``z = +1``).

    Returns:
        0-dim fp32 loss. Memory: O((m + n)·d); nothing m×n is allocated, forward or backward.
    """
    positive = check_groups_as(groups_as)
    targets, _ = _prepared(a, b, logit_scale, bias, targets, key_valid)
    groups, key_groups = check_groups(groups, key_groups, a.shape[0], b.shape[0], a.device)
    return SigmoidLossTritonFunction.apply(
        a.contiguous(), b.contiguous(), logit_scale, bias, targets, key_valid, groups, key_groups, positive
    )
