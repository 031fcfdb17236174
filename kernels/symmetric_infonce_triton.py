"""The paired (symmetric) InfoNCE in Triton: 0.5·(InfoNCE(a, b) + InfoNCE(b, a)) in shared launches.

Layering: ``paired_block_lse`` / ``paired_block_backward`` and the shared launchers of
``kernels.infonce_blocks`` → ``SymmetricInfoNCEFunction`` → ``symmetric_infonce_triton``.
``symmetric_loss`` (the loss kernel's launcher) and ``two_way_fused_backward`` also serve one rank's
share of the gathered loss (``kernels.gathered_infonce_triton``).

Paired rows (a_i with b_i, m == n, shared targets and key mask): the symmetric loss's two directions are
z = s·A·Bᵀ and zᵀ. The forward runs both in one launch (a third grid axis swaps q and k), and the gemm
backward adds the swapped direction's gradient into the same G tile (column j is that direction's query
row: G_ij += w_j·(p'_ij − [i = t_j]), p'_ij = exp(z_ij − lse'_j)), so one tile, one workspace and two
cuBLAS products serve both directions: 12·m²·d of work instead of 16, and half the launches.
With forward="tiled" (``_paired_fwd_kernel``, the default from ``_TILED_FORWARD_MIN_ROWS`` pairs on) the
paired forward computes each tile once for both directions too: its programs own square groups of
rows × columns, keep the row LSE online in registers and fold each tile's column LSE into a per-program
(m, groups) partial, so 10·m²·d in all; it measured faster than the two-way launch only at the largest
batches (H200).

Host time: at b ≤ 4096 a step is bound by the host (launches and small torch ops, tens of µs each on
the H200 machine), not by the GPU. The paired loss therefore does its bookkeeping in the kernels: the
forward ends in ``_symmetric_loss_kernel`` (merge, row LSE, live-pair count and the loss itself), and with
DIAG the kernels take t_i = i and the row weight ½·grad_output / count from the saved count, so a paired
fwd+bwd is 3 Triton launches, 2 cuBLAS products and about 50 torch ops (110 before; profile with
``benchmarks/infonce_breakdown.py --host``).
"""

from __future__ import annotations

import functools
import math

import torch

from kernels.infonce_blocks import block_backward, forward_partials, gemm_backward, resolve_method
from kernels.infonce_reference import refuse_double_backward
from kernels.infonce_tiles import _paired_fwd_kernel, _symmetric_loss_kernel
from kernels.triton_launch import (
    INTERPRET_META,
    PAIRED_FWD_CONFIGS,
    PAIRED_GROUP_UNIT,
    check_operands,
    dot_precision,
    interpreted,
    interpreting,
    launch,
    mask_bytes,
    sm_count,
    triton,
)

__all__ = [
    "SymmetricInfoNCEFunction",
    "paired_groups",
    "symmetric_infonce_triton",
    "symmetric_loss",
    "two_way_fused_backward",
]


def _paired_loss(a, b, logit_scale, valid, forward):
    """(loss 0-dim, lse (2, m), count (1,)): the paired loss's forward in two launches (the forward
    kernel, then ``_symmetric_loss_kernel``) and no other torch op; count = max(#live pairs, 1), fp32. The
    loss is a tensor of its own (not a view), so callers may modify it in place."""
    m = a.shape[0]
    if m == 0:
        f32 = functools.partial(torch.full, dtype=torch.float32, device=a.device)
        return f32((), 0.0), torch.empty(2, 0, dtype=torch.float32, device=a.device), f32((1,), 1.0)
    if forward == "tiled":  # row LSE (m, C), column LSE (m, R), positives (m, C)
        lse0, lse1, pos = _paired_tiled_partials(a, b, logit_scale, valid)
        lse1_offset = 0
    else:  # the BOTH_WAYS launch: (2, m, splits) partials of each, way 1 at offset m·splits
        lse0, pos = forward_partials(a, b, logit_scale, None, valid, None, ways=2, diag=True)
        lse1, lse1_offset = lse0, m * lse0.shape[2]
    return symmetric_loss(lse0, lse1, lse1_offset, pos, valid, a, m)


def symmetric_loss(lse0, lse1, lse1_offset, pos, key_valid, ref, n, row_offset=0, world=1):
    """(loss 0-dim, lse (2, m), count (1,)) from the two directions' partials by ``_symmetric_loss_kernel``
    (one launch, no torch op); m rows, row i the pair of key row_offset + i of the n keys; count is
    max(#live keys, 1) / world (``ref``: a tensor on the device)."""
    m, splits0, splits1 = pos.shape[-2], lse0.shape[-1], lse1.shape[-1]
    lse = torch.empty(2, m, dtype=torch.float32, device=ref.device)
    count = torch.empty(1, dtype=torch.float32, device=ref.device)
    loss = torch.empty((), dtype=torch.float32, device=ref.device)
    block_s0, block_s1 = triton.next_power_of_2(splits0), triton.next_power_of_2(splits1)
    if interpreting(ref, _symmetric_loss_kernel):  # small row blocks: the CPU tests walk the row loop
        kernel, block_r = interpreted(_symmetric_loss_kernel), 64
    else:
        kernel, block_r = _symmetric_loss_kernel, max(1, 2048 // max(block_s0, block_s1))
    kv = mask_bytes(key_valid, ref)
    kernel[(1,)](lse0, lse1, lse1_offset, pos, kv, lse, count, loss, m, splits0, splits1, row_offset, n, world,
                 HAS_KEY_VALID=key_valid is not None, BLOCK_R=block_r, BLOCK_S0=block_s0,
                 BLOCK_S1=block_s1)  # fmt: skip
    return loss, lse, count


# forward="auto" takes the one-pass kernel from this many pairs on. H200, bf16 (BENCHMARKS.md): at
# b = 16384 the BOTH_WAYS launch was faster (fwd+bwd 3.6 vs 5.4 ms at d = 512, 6.0 vs 7.5 at d = 1024),
# at b = 131072, d = 1024 the one-pass kernel (378.3 vs 401.3 ms); sizes in between were not measured.
_TILED_FORWARD_MIN_ROWS = 131072


def _paired_forward(forward: str, m: int) -> str:
    if forward not in ("auto", "tiled", "split"):
        raise ValueError(f"forward must be 'auto', 'tiled' or 'split'; got {forward!r}")
    if forward == "auto":
        return "tiled" if m >= _TILED_FORWARD_MIN_ROWS else "split"
    return forward


def paired_groups(m: int, device: torch.device) -> tuple[int, int]:
    """(groups per axis, rows per group) of ``_paired_fwd_kernel``: about 4 programs per SM (4 "SMs" in
    the interpreter) in a square grid, groups whole multiples of the widest tile."""
    unit = INTERPRET_META["BLOCK_M"] if device.type != "cuda" else PAIRED_GROUP_UNIT
    tiles = triton.cdiv(m, unit)
    per_axis = max(1, min(tiles, math.isqrt(4 * sm_count(device))))
    group = triton.cdiv(tiles, per_axis) * unit
    return triton.cdiv(m, group), group


def _paired_tiled_partials(a, b, logit_scale, valid):
    """(row LSE (m, C), column LSE (m, R), positive (m, C)) partials of ``_paired_fwd_kernel`` (m > 0)."""
    m, d = a.shape
    groups, group = paired_groups(m, a.device)
    row_part = torch.empty(m, groups, dtype=torch.float32, device=a.device)
    col_part = torch.empty(m, groups, dtype=torch.float32, device=a.device)
    pos_part = torch.empty(m, groups, dtype=torch.float32, device=a.device)
    kv, strides = mask_bytes(valid, a), (a.stride(0), a.stride(1))  # a and b: same (contiguous) strides
    args = (a, b, logit_scale, kv, row_part, col_part, pos_part, m, d, group, *strides)
    meta = {"HAS_KEY_VALID": valid is not None, "PRECISION": dot_precision(a)}
    launch(_paired_fwd_kernel, lambda c: (groups, groups), a, args, meta, PAIRED_FWD_CONFIGS)
    return row_part, col_part, pos_part


def _paired_gemm_backward(grad_output, a, b, logit_scale, lse, valid, count):
    """(da, db, ds) of the paired loss in a's dtype: one gradient-chunk launch per chunk with the DIAG rows
    (targets, weights and mask computed in the kernel) and two cuBLAS products."""
    meta = {"HAS_KEY_VALID": valid is not None, "PRECISION": dot_precision(a), "PAIRED": True, "DIAG": True}
    kv = mask_bytes(valid, a)
    return gemm_backward(a, b, logit_scale, a, kv, lse, grad_output, meta, cnt=count, out_dtype=a.dtype)


def two_way_fused_backward(grad_output, a, b, a_keys, b_keys, logit_scale, lse, key_valid, count, offset=0):
    """fp32 (da, db, da_keys, db_keys, ds) of the symmetric loss's two directions, rows of a against the
    keys b_keys and rows of b against a_keys (row i's pair: key offset + i), from fused backwards (no
    workspace). Paired rows pass the rows themselves as keys; a rank of the gathered loss the gathered ones."""
    m = a.shape[0]
    targets = offset + torch.arange(m, device=a.device)
    weight = (grad_output.to(torch.float32) * 0.5 / count).expand(m)  # (m,)
    if key_valid is not None:
        live = key_valid[offset : offset + m]
        targets, weight = torch.where(live, targets, -1), weight * live
    weight = weight.contiguous()  # the kernels index it
    da, db_keys, ds0 = block_backward(a, b_keys, logit_scale, lse[0], weight, targets, key_valid, "fused")
    db, da_keys, ds1 = block_backward(b, a_keys, logit_scale, lse[1], weight, targets, key_valid, "fused")
    return da, db, da_keys, db_keys, ds0 + ds1


def _paired_fused_backward(grad_output, a, b, logit_scale, lse, valid, count):
    """(da, db, ds) of the paired loss from the two directions' fused backwards (no workspace)."""
    da, db, da_keys, db_keys, ds = two_way_fused_backward(grad_output, a, b, a, b, logit_scale, lse, valid, count)
    return (da + da_keys).to(a.dtype), (db + db_keys).to(b.dtype), ds


class SymmetricInfoNCEFunction(torch.autograd.Function):
    """Autograd for the paired loss 0.5·(InfoNCE(a, b) + InfoNCE(b, a)): two forward launches for both
    directions (no torch op on the loss), and (method "gemm") one backward whose tiles serve both;
    saves a, b, the (2, m) LSE and the live-pair count."""

    @staticmethod
    def forward(ctx, a, b, logit_scale, valid, method="auto", forward="auto"):
        loss, lse, count = _paired_loss(a, b, logit_scale, valid, _paired_forward(forward, a.shape[0]))
        ctx.save_for_backward(a, b, logit_scale, lse, valid, count)
        ctx.method = method
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        refuse_double_backward("symmetric infonce (triton)")
        a, b, logit_scale, lse, valid, count = ctx.saved_tensors
        if a.shape[0] == 0:
            return torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(logit_scale), None, None, None
        backward = _paired_gemm_backward if resolve_method(ctx.method, a) == "gemm" else _paired_fused_backward
        da, db, ds = backward(grad_output, a, b, logit_scale, lse, valid, count)
        return da, db, ds.reshape(logit_scale.shape).to(logit_scale.dtype), None, None, None


def symmetric_infonce_triton(a, b, logit_scale, *, valid=None, backward="auto", forward="auto"):
    """Fused CLIP loss for paired rows, 0.5·(InfoNCE(a, b) + InfoNCE(b, a)), positives on the diagonal.

    Equal to ``0.5 * (infonce_triton(a, b, s, t, key_valid=valid) + infonce_triton(b, a, s, t,
    key_valid=valid))`` with t_i = i (−1 where invalid), in fewer launches: the forward runs both
    directions in one kernel launch, and the "gemm" backward (the default on CUDA) computes each
    similarity tile once for both directions (12·m²·d instead of 16·m²·d of work; the gathered loss of
    ``kernels.distributed`` cannot share tiles, its two directions have different key sets).

    Args:
        a, b: (m, d) paired embeddings, same dtype (fp32/fp16/bf16). logit_scale: s, shape [] or [1].
        valid: optional (m,) bool; an invalid pair is neither a query nor a key in either direction.
        backward: "auto", "fused" (two on-chip backwards, no workspace) or "gemm".
        forward: "tiled" (one pass over z = s·A·Bᵀ gives both directions' LSE: half the matrix work),
            "split" (one launch, each tile computed once per direction, key axis split for small batches)
            or "auto" (tiled from ``_TILED_FORWARD_MIN_ROWS`` pairs on, where it measured faster).
    Returns:
        0-dim fp32 loss, the mean over valid pairs of both directions (0 when none is valid).
    """
    _paired_forward(forward, a.shape[0])  # validates before anything runs
    check_operands(a, b, logit_scale, None, valid)
    if a.shape != b.shape:
        raise ValueError(f"paired rows need equal shapes; got {tuple(a.shape)} and {tuple(b.shape)}")
    if valid is not None and valid.shape != a.shape[:1]:
        raise ValueError(f"valid must have shape ({a.shape[0]},); got {tuple(valid.shape)}")
    # the forward swaps a and b inside one launch: both need the same (row-major) strides
    return SymmetricInfoNCEFunction.apply(a.contiguous(), b.contiguous(), logit_scale, valid, backward, forward)
