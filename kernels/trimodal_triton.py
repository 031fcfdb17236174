"""The fused tri-modal step in Triton (all-gather strategy): every term's both directions in ONE forward launch.

Layering: ``_trimodal_fwd_kernel`` (this file; tile helpers of ``kernels.infonce_tiles``) →
``_forward`` / ``_backward`` → ``TrimodalTritonFunction`` → ``trimodal_infonce_triton``; called by
``kernels.trimodal`` with the plan of ``kernels.trimodal_blocks.Plan``.

Inputs are the stacked local rows X (b, K, d) of the K embedding keys and their one gathered copy
G (W·b, K, d) (``gather_with_grad`` of X: one collective for every key). A *direction* j is one term's
query key against its other key; the forward's third grid axis walks the directions, each program reading
its direction's query key, key key and term (three int32 tables), then that term's scale, targets and
key mask, so the 2·T directions of T terms with T different scales run in one launch (the existing
BOTH_WAYS launch takes one scale and two ways, i.e. one term). Its (2T, b, splits) partial LSEs and
positive logits are merged and turned into the T losses by five torch ops.

What is shared and what is not:

- shared: one forward launch for every direction of every term (instead of one per term plus a loss
  kernel per term); the gathered buffer (one gather, one backward all-reduce); the saved LSEs.
- not shared: similarity tiles. A query set's tiles against different key sets are different products,
  and each program reloads its query tile per key tile as the existing forward does (no cross-direction
  reuse of the loaded q tile). The backward runs ``kernels.infonce_blocks.block_backward`` once per
  direction (its gradient-chunk kernel and two cuBLAS products with "gemm", the two fused kernels with
  "fused"): the chunk kernel takes one scale per launch, and the paired trick of
  ``kernels.symmetric_infonce_triton`` (one tile for both directions) needs a direction's keys to be the
  other's queries, which a rank of the gathered loss does not have (b local rows vs W·b keys).
"""

from __future__ import annotations

import functools

import torch

from kernels.infonce_blocks import block_backward, forward_splits, resolve_method
from kernels.infonce_reference import refuse_double_backward
from kernels.infonce_tiles import _dot_tile, _live_columns, _row_step
from kernels.triton_launch import FWD_CONFIGS, dot_precision, launch, mask_bytes, tl, triton

__all__ = ["TrimodalTritonFunction", "trimodal_infonce_triton"]


# fmt: off
@triton.jit
def _trimodal_fwd_kernel(x_ptr, g_ptr, dir_q_ptr, dir_k_ptr, dir_t_ptr, scale_ptr, tgt_ptr, kv_ptr, lse_ptr,
                         pos_ptr, m, n, d, split_n, stride_xk, stride_xm, stride_xd, stride_gk, stride_gn,
                         stride_gd,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (i, c, j): direction j's row tile i (local rows of its query key, X[:, q_j]) against key split
    # c of its key key's gathered rows (G[:, k_j]), with term t_j's scale, targets (global columns, −1: no
    # query) and key mask; writes the partial LSE and positive logit to (directions, m, splits) buffers.
    j = tl.program_id(2)
    q_key = tl.load(dir_q_ptr + j)
    k_key = tl.load(dir_k_ptr + j)
    term = tl.load(dir_t_ptr + j)
    q_base = x_ptr + q_key * stride_xk
    k_base = g_ptr + k_key * stride_gk
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < m
    lo = tl.program_id(1) * split_n
    hi = tl.minimum(lo + split_n, n)
    s = tl.load(scale_ptr + term).to(tl.float32)
    tgt = tl.load(tgt_ptr + term * m + rows, mask=row_ok, other=-1)
    kv = kv_ptr + term * n
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        z = s * _dot_tile(q_base, k_base, rows, cols, row_ok, col_ok, d, stride_xm, stride_xd, stride_gn,
                          stride_gd, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)  # (BM, BN)
        m_i, l_i, pos = _row_step(m_i, l_i, pos, z, cols, tgt, _live_columns(kv, cols, col_ok, True))
    out = (j * m + rows) * tl.num_programs(1) + tl.program_id(1)
    tl.store(lse_ptr + out, m_i + tl.log(tl.maximum(l_i, 1e-30)), mask=row_ok)
    tl.store(pos_ptr + out, pos, mask=row_ok)
# fmt: on


@functools.lru_cache(maxsize=64)
def _tables(directions: tuple, device: torch.device):
    """int32 (query key, key key, term) per direction, and the term of each direction as int64; cached per
    term layout and device, so the host-to-device copy (a host sync) happens once, not every step."""
    table = torch.tensor(directions, dtype=torch.int32).T.contiguous().to(device)  # (3, n_dirs)
    return table[1], table[2], table[0], table[0].long()


def _forward(plan, scales, x, g):
    """(losses (T,) fp32, lse (2T, b) fp32) of every term, one forward launch for all directions."""
    b, _, d = x.shape
    n = g.shape[0]
    n_dirs = len(plan.directions)
    dir_q, dir_k, dir_t, dir_term = _tables(plan.directions, x.device)
    splits = forward_splits(n_dirs * b, n, x.device)
    split_n = triton.cdiv(triton.cdiv(max(n, 1), splits), 128) * 128  # whole widest key tiles per split
    splits = max(1, triton.cdiv(n, split_n))
    part_lse = torch.empty(n_dirs, b, splits, dtype=torch.float32, device=x.device)
    part_pos = torch.empty_like(part_lse)
    tgt = plan.targets.contiguous()  # (T, b) int64
    kv = mask_bytes(plan.key_valid, x)  # (T, n) int8
    args = (x, g, dir_q, dir_k, dir_t, scales, tgt, kv, part_lse, part_pos, b, n, d, split_n,
            x.stride(1), x.stride(0), x.stride(2), g.stride(1), g.stride(0), g.stride(2))  # fmt: skip
    grid = lambda c: (triton.cdiv(b, c["BLOCK_M"]), splits, n_dirs)  # noqa: E731
    launch(_trimodal_fwd_kernel, grid, x, args, {"PRECISION": dot_precision(x)}, FWD_CONFIGS)
    lse = torch.logsumexp(part_lse, dim=2)  # (2T, b); −inf where a row has no live key
    live = plan.targets[dir_term] >= 0  # (2T, b)
    per_dir = torch.where(live, lse - part_pos.sum(dim=2), 0.0).sum(dim=1)  # (2T,)
    losses = torch.zeros(len(plan.coef), dtype=torch.float32, device=x.device).index_add_(0, dir_term, per_dir)
    return losses * plan.coef.float(), lse


def _backward(plan, grad_losses, scales, x, g, lse, method):
    """(dscales (T,), dX (b, K, d), dG (W·b, K, d)) in fp32: ``block_backward`` once per direction."""
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    dg = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
    ds = torch.zeros(len(plan.coef), dtype=torch.float32, device=x.device)
    w_term = grad_losses.float() * plan.coef.float()  # (T,)
    for j, (t, qk, kk) in enumerate(plan.directions):
        targets = plan.targets[t]
        w = (targets >= 0).float() * w_term[t]  # (b,)
        dq, dk, ds_j = block_backward(x[:, qk], g[:, kk], scales[t], lse[j], w, targets, plan.key_valid[t], method)
        dx[:, qk] += dq
        dg[:, kk] += dk
        ds[t] += ds_j
    return ds, dx, dg


class TrimodalTritonFunction(torch.autograd.Function):
    """Autograd for every term of the step: the one-launch forward, per-direction backward; saves X, G, the
    scales and the (2T, b) LSE."""

    @staticmethod
    def forward(ctx, plan, scales, x, g, method="auto"):
        losses, lse = _forward(plan, scales, x, g)
        ctx.save_for_backward(scales, x, g, lse)
        ctx.plan, ctx.method = plan, method
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        refuse_double_backward("trimodal infonce (triton)")
        scales, x, g, lse = ctx.saved_tensors
        method = resolve_method(ctx.method, x)
        ds, dx, dg = _backward(ctx.plan, grad_losses, scales, x, g, lse, method)
        return None, ds.to(scales.dtype), dx.to(x.dtype), dg.to(g.dtype), None


def trimodal_infonce_triton(plan, scales, x, g, *, backward="auto"):
    """Every term's ``L_r`` (module doc), fused: (T,) fp32 losses, differentiable in scales, X and G.

    Args:
        plan: ``kernels.trimodal_blocks.Plan`` (directions, targets, key masks, coefficients).
        scales: (T,) the terms' multipliers. x: (b, K, d) local rows of the K keys. g: (W·b, K, d)
            every rank's rows (``gather_with_grad(x)``), fp32 / fp16 / bf16 like x.
        backward: "auto", "fused" or "gemm" (``kernels.infonce_blocks.infonce_block_backward``).
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or g.dtype != x.dtype:
        raise TypeError(f"trimodal triton: x and g must share a dtype in fp32/fp16/bf16; got {x.dtype}, {g.dtype}")
    if x.dim() != 3 or g.dim() != 3 or g.shape[1:] != x.shape[1:] or g.shape[0] != plan.world * x.shape[0]:
        raise ValueError(f"trimodal triton: need x (b, K, d), g (W·b, K, d); got {tuple(x.shape)}, {tuple(g.shape)}")
    if max(x.numel(), g.numel()) >= 2**31:
        raise ValueError("trimodal triton: 2^31 elements or more per operand (32-bit offsets); use strategy=ring")
    if x.shape[0] == 0:  # no rows: zero losses, zero gradients
        return (x.sum() + g.sum() + scales.sum()).float() * torch.zeros_like(scales, dtype=torch.float32)
    return TrimodalTritonFunction.apply(plan, scales.contiguous(), x, g, backward)
