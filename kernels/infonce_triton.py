"""Fused similarity + InfoNCE in Triton: O((m + n)·d) memory, never an m×n tensor.

loss = mean_{i valid} [ logsumexp_j(s·q_i·k_j) − s·q_i·k_{t_i} ]      (t_i = −1: row ignored)

Layering (Liger-Kernel style):
  ``_infonce_fwd_kernel`` / ``_infonce_bwd_dq_kernel`` / ``_infonce_bwd_dk_kernel`` /
  ``_infonce_grad_chunk_kernel`` (Triton)
  → block primitives ``infonce_block_lse`` / ``infonce_block_backward`` (launchers that know nothing
    about the mean or the ignored rows; the ring strategy in ``kernels/ring.py`` uses them directly)
  → ``infonce_forward`` / ``infonce_backward`` → ``InfoNCEFunction`` → ``infonce_triton``;
  paired rows (the single-process symmetric loss): ``paired_block_lse`` / ``paired_block_backward``
  → ``SymmetricInfoNCEFunction`` → ``symmetric_infonce_triton``; one rank's share of the gathered loss
  (``kernels.distributed``): ``GatheredSymmetricInfoNCEFunction`` → ``gathered_symmetric_infonce_triton``.

Forward: each program owns BLOCK_M rows and one split of the key axis, walks over its key tiles computing
s·Q·Kᵀ on chip (d in BLOCK_D chunks, fp32 accumulation) with an online log-sum-exp; it writes the partial
row LSE and positive logit (picked out of the tile that holds column t_i) of its split; a small kernel
merges the (m, splits) partials. Splits (FlashDecoding's split-KV) keep small batches from leaving SMs idle. The
column LSE the symmetric loss needs is the row LSE of the swapped call ``infonce_block_lse(k, q, ...)``:
a column reduction inside this row-tile layout would need either atomics on (max, sum) pairs or an
(m / BLOCK_M)×n buffer, which is O(B²); the paired one-pass kernel (below) avoids both by giving each
program a square group of rows × columns, so its column partials are (m, groups).

Backward, with G_ij = w_i·(p_ij − [j = t_i]), p_ij = exp(s·q_i·k_j − lse_i), w_i = g·valid_i / #valid:
dq = s·G·K, dk = s·Gᵀ·Q, ds = Σ_ij G_ij·(q_i·k_j). Tiles are recomputed from the saved LSE, in two
kernels laid out like FlashAttention-2's: the dq kernel's programs own (row tile, BLOCK_OUT gradient
columns) and walk over the key tiles, the dk kernel's own (key tile, BLOCK_OUT columns) and walk over
the row tiles. Each keeps its gradient block in registers and stores it once: no atomics, no
read-modify-write of global memory, a fixed summation order (bitwise repeatable). The price is
recomputing the similarity tiles (once per kernel, and once per BLOCK_OUT slice when d > BLOCK_OUT).
ds is written per row by the dq kernel and summed by torch.

Backward "gemm" (the default on CUDA; "fused" above is the interpreter's default and an option with no
workspace): the fused kernels' per-slice recompute grows as d²/BLOCK_OUT, so instead
``_infonce_grad_chunk_kernel`` (a GEMM tile with an epilogue) writes G = dL/dz for a chunk of key columns
into a workspace of m × chunk elements in the input dtype (chunk ∝ d, 16·d bytes per row: independent
of n), already multiplied by s, and cuBLAS computes dq += (s·G)·K_chunk and dk_chunk = (s·G)ᵀ·Q (fp32
outputs, or the input dtype straight away when one chunk covers every key); the chunk kernel also sums
its tile's share of ds into a per-program slot, so ds needs no extra pass. Each similarity tile is
computed once per backward.

Paired rows (a_i with b_i, m == n, shared targets and key mask): the symmetric loss's two directions are
z = s·A·Bᵀ and zᵀ. The forward runs both in one launch (a third grid axis swaps q and k), and the gemm
backward adds the swapped direction's gradient into the same G tile (column j is that direction's query
row: G_ij += w_j·(p'_ij − [i = t_j]), p'_ij = exp(z_ij − lse'_j)), so one tile, one workspace and two
cuBLAS products serve both directions: 12·m²·d of work instead of 16, and half the launches. The gathered
loss cannot share tiles: on a rank its two directions have different key sets (rows of a against the
gathered b, rows of b against the gathered a). It still shares launches: BOTH_WAYS with the second way's
own pointers gives both directions' LSE in one forward launch, the loss kernel merges them, counts the
live keys and applies the rank's rescale, and the DIAG rows take their positive at the rank's offset.
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

CPU: kernels run under the Triton interpreter, which Triton only enables when TRITON_INTERPRET=1 is set
before triton is imported (its own ``tl.max`` / ``tl.sum`` are decorated at import). This module sets it
when it is the first to import triton on a machine without CUDA; if triton came first without it, CPU
launches raise a clear error. The interpreter gets one fixed config and upcasts dot operands to fp32
(its bf16 ``tl.dot`` is wrong). On CUDA the kernels are autotuned over a few Hopper-sized configs
(H100 figures in BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import math
import os
import sys

import torch

# Triton reads TRITON_INTERPRET when functions are decorated (its own tl.* helpers at import), so it
# must be set before triton is first imported. Without CUDA the interpreter is the only way to run.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels.infonce_reference import refuse_double_backward  # noqa: E402

__all__ = [
    "GatheredSymmetricInfoNCEFunction",
    "InfoNCEFunction",
    "SymmetricInfoNCEFunction",
    "forward_splits",
    "gathered_symmetric_infonce_triton",
    "gemm_chunk_columns",
    "infonce_backward",
    "infonce_block_backward",
    "infonce_block_lse",
    "infonce_forward",
    "infonce_triton",
    "interpreter_ready",
    "paired_block_backward",
    "paired_block_lse",
    "paired_groups",
    "symmetric_infonce_triton",
]

_INTERPRET_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32, "BLOCK_OUT": 32}


def _gpu_configs(shapes):
    return [
        triton.Config(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_OUT"), blocks)), num_warps=w, num_stages=st)
        for *blocks, w, st in shapes
    ]


# fmt: off
# Forward: (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages). Backward: (BLOCK_M, BLOCK_N, BLOCK_D,
# BLOCK_OUT, num_warps, num_stages), BLOCK_OUT the gradient columns a program keeps on chip.
_FWD_CONFIGS = _gpu_configs([(128, 64, 64, 8, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 4),
                             (64, 128, 64, 4, 3), (128, 128, 64, 8, 3)])
# The paired one-pass forward (groups are multiples of its widest block, so every block divides them).
_PAIRED_FWD_CONFIGS = _gpu_configs([(128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 4, 3),
                                    (64, 64, 64, 4, 4), (128, 128, 32, 8, 3)])
_PAIRED_GROUP_UNIT = max(c.kwargs[key] for c in _PAIRED_FWD_CONFIGS for key in ("BLOCK_M", "BLOCK_N"))
_BWD_CONFIGS = _gpu_configs([(64, 64, 64, 64, 4, 3), (128, 64, 64, 128, 8, 3), (64, 64, 64, 256, 8, 3),
                             (128, 128, 64, 128, 8, 2)])
# Gradient chunks (GEMM-shaped tiles): (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages).
_GRAD_CONFIGS = _gpu_configs([(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                              (64, 128, 64, 4, 4)])
# fmt: on

# Backward method: "fused" keeps the gradient blocks on chip (two kernels, no workspace) but recomputes
# the similarity tile once per BLOCK_OUT slice of d; "gemm" writes dL/dz in column chunks to a bounded
# workspace and hands the two gradient products to cuBLAS (no recompute per slice). "auto" picks gemm on
# CUDA: it was faster at every measured d (H100, bf16, b = 16384: 4.5 vs 7.0 ms at d = 256, 5.7 vs 20.4
# at d = 512, 9.7 vs 62.5 at d = 1024; BENCHMARKS.md), and fused in the interpreter (no workspace).
# The gemm workspace holds at most this many bytes per query row (16·d: half of the 32·m·d bytes the
# loss may use); its column chunk therefore does not grow with n.
_CHUNK_BYTES_PER_DIM = 16


def _prune_bwd(configs, named_args, **kwargs):
    """Drop gradient-column blocks wider than d needs (they would only compute masked zeros)."""
    widest = max(64, triton.next_power_of_2(named_args["d"]))
    return [c for c in configs if c.kwargs["BLOCK_OUT"] <= widest]


# fmt: off
@triton.jit
def _load_chunk(ptr, idx, ok, dd, d_ok, stride_row, stride_col, UPCAST: tl.constexpr):
    """Rows ``idx`` × columns ``dd`` of a row-major-ish matrix; zeros outside; fp32 when UPCAST."""
    x = tl.load(ptr + idx[:, None] * stride_row + dd[None, :] * stride_col,
                mask=ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong
        x = x.to(tl.float32)
    return x


@triton.jit
def _dot_tile(a_ptr, b_ptr, a_idx, b_idx, a_ok, b_ok, d, sa_row, sa_col, sb_row, sb_col,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_A, BLOCK_B) fp32 tile of A[a_idx] · B[b_idx]ᵀ, the d axis in BLOCK_D chunks."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    for start_d in range(0, d, BLOCK_D):
        dd = start_d + tl.arange(0, BLOCK_D)
        a = _load_chunk(a_ptr, a_idx, a_ok, dd, dd < d, sa_row, sa_col, UPCAST)
        b = _load_chunk(b_ptr, b_idx, b_ok, dd, dd < d, sb_row, sb_col, UPCAST)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _live_columns(kv_ptr, cols, col_ok, HAS_KEY_VALID: tl.constexpr):
    if HAS_KEY_VALID:
        col_ok = col_ok & (tl.load(kv_ptr + cols, mask=col_ok, other=0) != 0)
    return col_ok


@triton.jit
def _online_lse(m_i, l_i, z):
    """One step of the online log-sum-exp over the columns of tile ``z`` (BM, BN): running row max m_i
    and sum l_i of exp(z − m_i); −inf entries count as absent."""
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile must not give nan
    return m_new, l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)


@triton.jit
def _row_step(m_i, l_i, pos, z, cols, tgt, col_live):
    """Row-direction update by tile ``z``: the positive logit where column == target, and the online LSE
    over the live columns."""
    pos += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    m_i, l_i = _online_lse(m_i, l_i, tl.where(col_live[None, :], z, float("-inf")))
    return m_i, l_i, pos


@triton.jit
def _infonce_fwd_kernel(q_ptr, k_ptr, q1_ptr, k1_ptr, scale_ptr, tgt_ptr, kv_ptr, lse_ptr, pos_ptr,
                        m, n, d, split_n, tgt_offset, stride_qm, stride_qd, stride_kn, stride_kd,
                        HAS_KEY_VALID: tl.constexpr, BOTH_WAYS: tl.constexpr, DIAG: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (i, c, w) owns row tile i against the key columns [c·split_n, (c + 1)·split_n) and writes
    # the partial LSE and positive logit of its rows to column c of (ways, m, splits) buffers (merged by
    # ``_merge_splits_kernel`` or ``_symmetric_loss_kernel``). BOTH_WAYS (the symmetric loss: shared
    # targets and key mask): programs with w = 1 run rows of q1 against the keys k1 (q1 shaped and strided
    # like q, k1 like k), so one launch gives both directions: paired rows pass q1 = k, k1 = q; a rank of
    # the gathered loss passes its local rows of each modality and the other modality's gathered keys.
    # DIAG: row i's positive is column tgt_offset + i (tgt_ptr is not read).
    if BOTH_WAYS:
        if tl.program_id(2) == 1:
            q_ptr, k_ptr = q1_ptr, k1_ptr
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < m
    lo = tl.program_id(1) * split_n
    hi = tl.minimum(lo + split_n, n)
    s = tl.load(scale_ptr).to(tl.float32)
    if DIAG:
        tgt = rows + tgt_offset
    else:
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        z = s * _dot_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, d, stride_qm, stride_qd, stride_kn,
                          stride_kd, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)  # (BM, BN)
        m_i, l_i, pos = _row_step(m_i, l_i, pos, z, cols, tgt, _live_columns(kv_ptr, cols, col_ok, HAS_KEY_VALID))
    out = (tl.program_id(2) * m + rows) * tl.num_programs(1) + tl.program_id(1)
    # l_i >= 1 when a column is valid; otherwise m_i = -inf and so is the LSE (no log(0) warning)
    tl.store(lse_ptr + out, m_i + tl.log(tl.maximum(l_i, 1e-30)), mask=row_ok)
    tl.store(pos_ptr + out, pos, mask=row_ok)


@triton.jit
def _merged_lse(part_ptr, r, splits, rows, BLOCK_S: tl.constexpr):
    """LSE of rows ``r`` from (rows, splits) partial LSEs: the logsumexp over the splits."""
    c = tl.arange(0, BLOCK_S)
    ok = (r[:, None] < rows) & (c[None, :] < splits)
    part = tl.load(part_ptr + r[:, None] * splits + c[None, :], mask=ok, other=float("-inf"))
    mx = tl.max(part, axis=1)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(tl.exp(part - mx_safe[:, None]), axis=1)  # >= 1 unless every partial is −inf
    return tl.where(mx == float("-inf"), float("-inf"), mx_safe + tl.log(tl.maximum(total, 1e-30)))


@triton.jit
def _summed(part_ptr, r, splits, rows, BLOCK_S: tl.constexpr):
    """Sum over the splits of (rows, splits) partials, for rows ``r``."""
    c = tl.arange(0, BLOCK_S)
    ok = (r[:, None] < rows) & (c[None, :] < splits)
    return tl.sum(tl.load(part_ptr + r[:, None] * splits + c[None, :], mask=ok, other=0.0), axis=1)


@triton.jit
def _merged_rows(part_lse_ptr, part_pos_ptr, r, splits, rows, BLOCK_S: tl.constexpr):
    """(lse, pos) of rows ``r`` from (rows, splits) partials: logsumexp over the splits, and their sum."""
    return _merged_lse(part_lse_ptr, r, splits, rows, BLOCK_S), _summed(part_pos_ptr, r, splits, rows, BLOCK_S)


@triton.jit
def _logaddexp(x, y):
    """log(exp(x) + exp(y)), −inf when both are."""
    mx = tl.maximum(x, y)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    out = mx_safe + tl.log(tl.exp(x - mx_safe) + tl.exp(y - mx_safe))
    return tl.where(mx == float("-inf"), float("-inf"), out)


@triton.jit
def _paired_fwd_kernel(a_ptr, b_ptr, scale_ptr, kv_ptr, row_part_ptr, col_part_ptr, pos_part_ptr,
                       m, d, group, stride_m, stride_d,
                       HAS_KEY_VALID: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Both directions of the paired loss from ONE pass over z = s·A·Bᵀ (half the forward's matrix work of
    # the BOTH_WAYS launch): z_ij is a logit of query a_i (row direction) and of query b_j (column
    # direction). Program (g, h) owns rows [g·group, (g + 1)·group) × columns [h·group, (h + 1)·group)
    # and walks its tiles row tile by row tile. Row LSE: online in registers over the program's columns,
    # stored to row_part[i, h] (m, C) with the positive z_ii to pos_part[i, h] (0 off the diagonal
    # group). Column LSE: each tile's column LSE is folded (logaddexp) into col_part[j, g] (m, R), which
    # only this program touches; a barrier orders its store before the next row tile's load. Masked
    # pairs are no keys of the row direction (columns) and no keys of the column direction (rows).
    # Partials stay O(m·(R + C)) with R, C ≤ a few dozen; the autotuner's reruns rewrite everything.
    g = tl.program_id(0)
    h = tl.program_id(1)
    n_col_groups = tl.num_programs(1)
    n_row_groups = tl.num_programs(0)
    s = tl.load(scale_ptr).to(tl.float32)
    row_lo = g * group
    col_lo = h * group
    for row0 in range(row_lo, tl.minimum(row_lo + group, m), BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m
        row_live = _live_columns(kv_ptr, rows, row_ok, HAS_KEY_VALID)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        pos = tl.zeros([BLOCK_M], tl.float32)
        for col0 in range(col_lo, tl.minimum(col_lo + group, m), BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            col_ok = cols < m
            z = s * _dot_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, d, stride_m, stride_d, stride_m,
                              stride_d, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)  # (BM, BN)
            col_live = _live_columns(kv_ptr, cols, col_ok, HAS_KEY_VALID)
            m_i, l_i, pos = _row_step(m_i, l_i, pos, z, cols, rows, col_live)  # row direction
            # column direction: this tile's LSE over live rows, folded into the program's partial
            zc = tl.where(row_live[:, None], z, float("-inf"))
            c_max = tl.max(zc, axis=0)
            c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
            c_sum = tl.sum(tl.exp(zc - c_safe[None, :]), axis=0)
            c_lse = tl.where(c_max == float("-inf"), float("-inf"), c_safe + tl.log(tl.maximum(c_sum, 1e-30)))
            slot = col_part_ptr + cols * n_row_groups + g
            old = tl.load(slot, mask=col_ok, other=float("-inf"))  # not yet written on the first row tile
            old = tl.where(row0 == row_lo, float("-inf"), old)
            tl.store(slot, _logaddexp(old, c_lse), mask=col_ok)
            tl.debug_barrier()
        out = rows * n_col_groups + h
        tl.store(row_part_ptr + out, m_i + tl.log(tl.maximum(l_i, 1e-30)), mask=row_ok)
        tl.store(pos_part_ptr + out, pos, mask=row_ok)


@triton.jit
def _merge_splits_kernel(part_lse_ptr, part_pos_ptr, lse_ptr, pos_ptr, rows, splits,
                         BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    # Merges the forward's (rows, splits) partials: lse = logsumexp over splits, pos = their sum. One
    # launch instead of torch's logsumexp + sum (about 0.2 ms of host time per call at small batches).
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    lse, pos = _merged_rows(part_lse_ptr, part_pos_ptr, r, splits, rows, BLOCK_S)
    tl.store(lse_ptr + r, lse, mask=r < rows)
    tl.store(pos_ptr + r, pos, mask=r < rows)


@triton.jit
def _symmetric_loss_kernel(lse0_ptr, lse1_ptr, lse1_offset, pos_ptr, kv_ptr, lse_ptr, count_ptr, loss_ptr, m,
                           splits0, splits1, row_offset, n, world, HAS_KEY_VALID: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_S0: tl.constexpr, BLOCK_S1: tl.constexpr):
    # One program ends the symmetric loss's forward without a torch op: merges the two directions' partial
    # LSEs, (m, splits0) at lse0_ptr and (m, splits1) at lse1_ptr + lse1_offset, into the (2, m) row LSE,
    # sums the (m, splits0) positive partials (the pair's logit, the same for both directions), and writes
    # count = max(N, 1) / world and loss = ½·Σ_live (lse0 + lse1 − 2·pos) / count, N = #live keys of the
    # (n,) key mask. Row i is the pair of key row_offset + i. Paired rows: row_offset = 0, n = m, world = 1
    # (the mean over live pairs). A rank of the gathered loss: its rows start at row_offset of the world·m
    # gathered keys, and ½·world·Σ / N is its share L_r (``kernels.distributed``: mean_r L_r = L).
    # Its read is O(m·splits) floats, microseconds next to the forward kernel even at m = 128k; the row
    # loop keeps the sum order fixed.
    total = tl.zeros([BLOCK_R], tl.float32)
    count = tl.zeros([BLOCK_R], tl.float32)
    for r0 in range(0, m, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        live = _live_columns(kv_ptr, row_offset + r, r < m, HAS_KEY_VALID)  # a masked pair is no query
        pos = _summed(pos_ptr, r, splits0, m, BLOCK_S0)
        lse0 = _merged_lse(lse0_ptr, r, splits0, m, BLOCK_S0)
        lse1 = _merged_lse(lse1_ptr + lse1_offset, r, splits1, m, BLOCK_S1)
        tl.store(lse_ptr + r, lse0, mask=r < m)
        tl.store(lse_ptr + m + r, lse1, mask=r < m)
        total += tl.where(live, lse0 + lse1 - 2.0 * pos, 0.0)
    for c0 in range(0, n, BLOCK_R):
        c = c0 + tl.arange(0, BLOCK_R)
        count += _live_columns(kv_ptr, c, c < n, HAS_KEY_VALID).to(tl.float32)
    n_live = tl.maximum(tl.sum(count, axis=0), 1.0) / world
    tl.store(count_ptr, n_live)
    tl.store(loss_ptr, 0.5 * tl.sum(total, axis=0) / n_live)


@triton.jit
def _live_lse(lse_ptr, w, idx, ok):
    """LSE of rows ``idx`` with weights ``w``; a dead row (w = 0, or no valid column: lse = −inf) gets
    lse = +inf, so its p = exp(z − lse) is 0, not the nan of 0·inf."""
    lse = tl.load(lse_ptr + idx, mask=ok, other=float("inf"))
    return tl.where((w != 0.0) & (lse != float("-inf")), lse, float("inf"))


@triton.jit
def _row_stats(lse_ptr, w_ptr, idx, ok):
    """(lse, w) of rows ``idx``: loaded weights, dead rows' lse = +inf (``_live_lse``)."""
    w = tl.load(w_ptr + idx, mask=ok, other=0.0)
    return _live_lse(lse_ptr, w, idx, ok), w


@triton.jit
def _targets_weights(tgt_ptr, w_ptr, cnt_ptr, kv_ptr, idx, ok, tgt_offset, HAS_KEY_VALID: tl.constexpr,
                     DIAG: tl.constexpr):
    """(t, w) of rows ``idx``: loaded, or DIAG (the symmetric loss's own rows): t_i = tgt_offset + i and one
    weight ½·grad_output / count (w_ptr: the upstream gradient, cnt_ptr: the forward's count) on rows
    whose pair is live (key t_i), 0 on masked ones."""
    if DIAG:
        tgt = idx + tgt_offset
        w = tl.load(w_ptr).to(tl.float32) * 0.5 / tl.load(cnt_ptr)
        w = tl.where(_live_columns(kv_ptr, tgt, ok, HAS_KEY_VALID), w, 0.0)
    else:
        tgt = tl.load(tgt_ptr + idx, mask=ok, other=-1)
        w = tl.load(w_ptr + idx, mask=ok, other=0.0)
    return tgt, w


@triton.jit
def _grad_tile(dots, s, lse, w, tgt, cols, live):
    """dL/dz for a (rows, cols) tile: w_i·(p_ij − [j = t_i]), p = exp(s·dots − lse) on live columns."""
    p = tl.where(live[None, :], tl.exp(dots * s - lse[:, None]), 0.0)
    return w[:, None] * (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0))


@triton.jit
def _infonce_bwd_dq_kernel(q_ptr, k_ptr, scale_ptr, tgt_ptr, kv_ptr, lse_ptr, w_ptr, dq_ptr, ds_ptr,
                           m, n, d, stride_qm, stride_qd, stride_kn, stride_kd,
                           HAS_KEY_VALID: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_OUT: tl.constexpr):
    # Program (i, j) owns dq[row tile i, columns j·BLOCK_OUT ...] and accumulates it on chip over every
    # key tile: one writer, one store, no atomics. Programs along j recompute the same (BM, BN) dots.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < m
    out = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_ok = out < d
    s = tl.load(scale_ptr).to(tl.float32)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    lse, w = _row_stats(lse_ptr, w_ptr, rows, row_ok)
    acc = tl.zeros([BLOCK_M, BLOCK_OUT], tl.float32)
    ds_acc = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        dots = _dot_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, d, stride_qm, stride_qd, stride_kn,
                         stride_kd, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)  # (BM, BN)
        g = _grad_tile(dots, s, lse, w, tgt, cols, _live_columns(kv_ptr, cols, col_ok, HAS_KEY_VALID))
        ds_acc += tl.sum(g * dots, axis=1)
        k_out = _load_chunk(k_ptr, cols, col_ok, out, out_ok, stride_kn, stride_kd, UPCAST)  # (BN, BOUT)
        acc = tl.dot((g * s).to(k_out.dtype), k_out, acc, input_precision=PRECISION)
    tl.store(dq_ptr + rows[:, None] * d + out[None, :], acc, mask=row_ok[:, None] & out_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(ds_ptr + rows, ds_acc, mask=row_ok)


@triton.jit
def _infonce_bwd_dk_kernel(q_ptr, k_ptr, scale_ptr, tgt_ptr, kv_ptr, lse_ptr, w_ptr, dk_ptr,
                           m, n, d, stride_qm, stride_qd, stride_kn, stride_kd,
                           HAS_KEY_VALID: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_OUT: tl.constexpr):
    # Program (j, c) owns dk[key tile j, columns c·BLOCK_OUT ...] and walks over the row tiles in order.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    out = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_ok = out < d
    s = tl.load(scale_ptr).to(tl.float32)
    live = _live_columns(kv_ptr, cols, col_ok, HAS_KEY_VALID)
    acc = tl.zeros([BLOCK_N, BLOCK_OUT], tl.float32)
    for start_m in range(0, m, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < m
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        lse, w = _row_stats(lse_ptr, w_ptr, rows, row_ok)
        dots_t = _dot_tile(k_ptr, q_ptr, cols, rows, col_ok, row_ok, d, stride_kn, stride_kd, stride_qm,
                           stride_qd, UPCAST, PRECISION, BLOCK_N, BLOCK_M, BLOCK_D)  # (BN, BM)
        p_t = tl.where(live[:, None], tl.exp(dots_t * s - lse[None, :]), 0.0)
        g_t = w[None, :] * (p_t - tl.where(cols[:, None] == tgt[None, :], 1.0, 0.0))  # (dL/dz)ᵀ
        q_out = _load_chunk(q_ptr, rows, row_ok, out, out_ok, stride_qm, stride_qd, UPCAST)  # (BM, BOUT)
        acc = tl.dot((g_t * s).to(q_out.dtype), q_out, acc, input_precision=PRECISION)
    tl.store(dk_ptr + cols[:, None] * d + out[None, :], acc, mask=col_ok[:, None] & out_ok[None, :])


@triton.jit
def _infonce_grad_chunk_kernel(q_ptr, k_ptr, scale_ptr, tgt_ptr, kv_ptr, lse_ptr, w_ptr, cnt_ptr, g_ptr, ds_ptr,
                               m, n, d, col0, chunk_n, tgt_offset, stride_qm, stride_qd, stride_kn, stride_kd,
                               stride_gm,
                               HAS_KEY_VALID: tl.constexpr, PAIRED: tl.constexpr, DIAG: tl.constexpr,
                               UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (i, j) writes s·G[row tile i, key tile j of the chunk that starts at column col0], where
    # G_ij = w_i·(p_ij − [j = t_i]) = dL/dz_ij, rounded to the input dtype once (a GEMM tile with an
    # epilogue; dq = (s·G)·K and dk = (s·G)ᵀ·Q need no scaling after cuBLAS), and adds its tile's share
    # of dL/ds = Σ G_ij·(q_i·k_j) to slot ds_ptr[i·programs(1) + j] (one writer per slot per launch;
    # chunks run in stream order, so the sums are repeatable).
    # PAIRED (m == n; the swapped loss over zᵀ shares targets, key mask and weights; its row LSE is row 1
    # of the (2, m) lse): G also gets that loss's gradient, w_j·(p'_ij − [i = t_j]) with
    # p'_ij = exp(z_ij − lse'_j) over live rows i, so one tile serves both directions of the symmetric
    # loss (tgt_offset is 0 then). DIAG: targets and weights come from ``_targets_weights``'s rule.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < m
    local = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col0 + local
    col_ok = (local < chunk_n) & (cols < n)
    s = tl.load(scale_ptr).to(tl.float32)
    tgt, w = _targets_weights(tgt_ptr, w_ptr, cnt_ptr, kv_ptr, rows, row_ok, tgt_offset, HAS_KEY_VALID, DIAG)
    lse = _live_lse(lse_ptr, w, rows, row_ok)
    dots = _dot_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, d, stride_qm, stride_qd, stride_kn, stride_kd,
                     UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)  # (BM, BN)
    g = _grad_tile(dots, s, lse, w, tgt, cols, _live_columns(kv_ptr, cols, col_ok, HAS_KEY_VALID))
    if PAIRED:  # the swapped direction's gradient, laid out as this tile (column j is its query row)
        tgt2, w2 = _targets_weights(tgt_ptr, w_ptr, cnt_ptr, kv_ptr, cols, col_ok, 0, HAS_KEY_VALID, DIAG)
        lse2 = _live_lse(lse_ptr + m, w2, cols, col_ok)
        live_rows = _live_columns(kv_ptr, rows, row_ok, HAS_KEY_VALID)
        p2 = tl.where(live_rows[:, None], tl.exp(dots * s - lse2[None, :]), 0.0)
        g += w2[None, :] * (p2 - tl.where(rows[:, None] == tgt2[None, :], 1.0, 0.0))
    slot = ds_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(slot, tl.load(slot) + tl.sum(tl.sum(g * dots, axis=1), axis=0))
    tl.store(g_ptr + rows[:, None] * stride_gm + local[None, :], (g * s).to(g_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
# fmt: on


# ---------------------------------------------------------------------------------------------------------
# Launch plumbing: interpreter on CPU, autotuned compiled kernels on CUDA.


def interpreter_ready() -> bool:
    """Whether kernels can run on CPU: Triton was imported with TRITON_INTERPRET=1 (tl.* interpreted)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.max, InterpretedFunction) and isinstance(_infonce_fwd_kernel, InterpretedFunction)


def _interpreting(t: torch.Tensor) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return t.device.type != "cuda" or isinstance(_infonce_fwd_kernel, InterpretedFunction)


def _interpreted(kernel):
    if not interpreter_ready():
        raise RuntimeError(
            "infonce_triton got non-CUDA tensors but Triton was imported without TRITON_INTERPRET=1; "
            "set TRITON_INTERPRET=1 before anything imports triton (or use backend='torch')"
        )
    return kernel


@functools.cache
def _autotuned(kernel, configs, prune, reset):
    prune_by = {"early_config_prune": prune} if prune else None
    # reset: accumulated outputs, zeroed before each timed config and before the chosen config's run
    return triton.autotune(
        configs=list(configs), key=["m", "n", "d"], prune_configs_by=prune_by, reset_to_zero=list(reset) or None
    )(kernel)


# Best config per (kernel, meta, launch arguments with tensors reduced to their dtype): later launches
# call the JIT kernel directly with it. Triton's autotuner wrapper costs ~25 us of host time per
# launch (H200 host, triton 3.6), which is a tenth of a whole small-batch step.
_BEST_CONFIGS: dict = {}


def _launch(kernel, grid, ref, args, meta, configs=(), prune=None, reset=()):
    """Run ``kernel`` on ``grid(meta)`` programs: the interpreter unless on CUDA, else autotuned
    (``reset``: names of arguments the kernel accumulates into, zeroed around the autotuner's timing runs)."""
    if _interpreting(ref):
        meta = {**meta, **_INTERPRET_META, "UPCAST": True}
        meta = {key: value for key, value in meta.items() if key in kernel.arg_names}
        _interpreted(kernel)[grid(meta)](*args, **meta)
        return
    key = (kernel, *meta.items(), *(a.dtype if isinstance(a, torch.Tensor) else a for a in args))
    best = _BEST_CONFIGS.get(key)
    if best is not None:
        kernel[grid](*args, **meta, UPCAST=False, **best)
        return
    tuner = _autotuned(kernel, tuple(configs), prune, tuple(reset))
    tuner[grid](*args, **meta, UPCAST=False)
    _BEST_CONFIGS[key] = tuner.best_config.all_kwargs()


def _precision(x: torch.Tensor) -> str:
    """fp32 dots: tf32 when torch allows it; else ieee in the interpreter and, on CUDA, 3×tf32 (split
    operands on the tensor cores, about fp32 accuracy; plain ieee dots run on the FMA units, 8.6× eager's
    time on an H100). Other dtypes ignore it."""
    if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3" if x.is_cuda else "ieee"
    return "tf32"  # Triton's default


def _check(q, k, logit_scale, targets, key_valid):
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q (m, d) and k (n, d) must share d; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q and k must share a dtype in fp32/fp16/bf16; got {q.dtype}, {k.dtype}")
    if max(q.numel(), k.numel()) >= 2**31:
        # Offsets inside the kernels are 32-bit; the ring strategy keeps every block at b_local rows.
        raise ValueError(
            f"q {tuple(q.shape)} / k {tuple(k.shape)}: 2^31 elements or more per operand are not supported by the "
            "Triton kernels (32-bit offsets); use loss.strategy=ring or a smaller per-call batch"
        )
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must have one element; got shape {tuple(logit_scale.shape)}")
    if targets is not None and targets.shape != (q.shape[0],):
        raise ValueError(f"targets must have shape ({q.shape[0]},); got {tuple(targets.shape)}")
    if key_valid is not None and key_valid.shape != (k.shape[0],):
        raise ValueError(f"key_valid must have shape ({k.shape[0]},); got {tuple(key_valid.shape)}")


def _args_common(q, logit_scale, targets, key_valid, diag=False):
    """(scale, targets, key mask) as the kernels take them, with as few torch ops as possible (each costs
    host time that small batches feel): the kernels read the scale's one element in its own dtype,
    int64 targets (−1 when absent; ``diag``: never read), the mask's bytes; ``q`` is the dummy pointer
    for whatever a kernel will not read."""
    if diag:
        targets = q
    elif targets is None:
        targets = torch.full((q.shape[0],), -1, dtype=torch.int64, device=q.device)
    elif targets.dtype != torch.int64:
        targets = targets.to(torch.int64)
    return logit_scale, targets, _mask_bytes(key_valid, q)


def _mask_bytes(key_valid, dummy):
    """A bool mask as int8 (a view: same bytes), or ``dummy`` when there is none."""
    if key_valid is None:
        return dummy
    key_valid = key_valid.contiguous()
    return key_valid.view(torch.int8) if key_valid.dtype == torch.bool else key_valid.to(torch.int8)


# ---------------------------------------------------------------------------------------------------------
# Block primitives (no mean, no ignored rows: the caller owns the reduction).


def infonce_block_lse(q, k, logit_scale, targets=None, *, key_valid=None, splits=None):
    """Row log-sum-exp of s·q·kᵀ and the positive logit, without materialising the tile matrix.

    Args:
        q, k: (m, d), (n, d) fp32/fp16/bf16, same dtype. logit_scale: multiplier s, 1 element.
        targets: (m,) int column of each row's positive, −1 for none (positive logit 0).
        key_valid: optional (n,) bool; False columns are left out of the LSE (not out of the positive).
        splits: key-axis splits (programs per row tile); default ``forward_splits(m, n, device)``.
    Returns:
        lse (m,) fp32 (−inf for a row without any valid column), pos (m,) fp32 = s·q_i·k_{t_i}.
    """
    _check(q, k, logit_scale, targets, key_valid)
    lse, pos = _block_lse(q, k, logit_scale, targets, key_valid, splits, both_ways=False)
    return lse[0], pos[0]


def paired_block_lse(a, b, logit_scale, targets=None, *, key_valid=None, splits=None):
    """Both directions of a paired (symmetric) loss in one launch: ``infonce_block_lse(a, b, ...)`` and
    ``infonce_block_lse(b, a, ...)`` with the same targets and key mask (rows i of a and b are pairs).

    Args:
        a, b: (m, d) each; the rest as ``infonce_block_lse`` (key_valid (m,) masks rows of both).
    Returns:
        lse (2, m) fp32: row 0 over a·bᵀ, row 1 over b·aᵀ; pos (2, m) fp32 likewise.
    """
    _check(a, b, logit_scale, targets, key_valid)
    if a.shape != b.shape:
        raise ValueError(f"paired rows need equal shapes; got {tuple(a.shape)} and {tuple(b.shape)}")
    return _block_lse(a.contiguous(), b.contiguous(), logit_scale, targets, key_valid, splits, both_ways=True)


def _block_lse(q, k, logit_scale, targets, key_valid, splits, both_ways):
    """(ways, m) LSE and positive logits; ways = 2 runs the swapped call too (same strides: m == n)."""
    ways = 2 if both_ways else 1
    if q.shape[0] == 0:
        return tuple(torch.empty(ways, 0, dtype=torch.float32, device=q.device) for _ in range(2))
    lse, pos = _forward_partials(q, k, logit_scale, targets, key_valid, splits, ways)
    if lse.shape[2] == 1:
        return lse[..., 0], pos[..., 0]
    return _merge_splits(lse, pos)


def _forward_partials(q, k, logit_scale, targets, key_valid, splits, ways, diag=False, second=None, tgt_offset=0):
    """The forward kernel's (ways, m, splits) partial LSE and positive logits (m > 0); ``diag``: row i's
    positive is column tgt_offset + i (``targets`` unused). ways = 2 runs ``second`` = (q1, k1) too, rows
    of q1 against keys k1 (same shapes and strides as q, k); default (k, q), the paired swap (m == n)."""
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    q1, k1 = second or (k, q)
    splits = splits or forward_splits(ways * m, n, q.device)
    split_n = triton.cdiv(triton.cdiv(max(n, 1), splits), 128) * 128  # whole widest key tiles per split
    splits = max(1, triton.cdiv(n, split_n))
    lse = torch.empty(ways, m, splits, dtype=torch.float32, device=q.device)  # partial LSE per split
    pos = torch.empty(ways, m, splits, dtype=torch.float32, device=q.device)
    scale, tgt, kv = _args_common(q, logit_scale, targets, key_valid, diag)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    args = (q, k, q1, k1, scale, tgt, kv, lse, pos, m, n, d, split_n, tgt_offset, *strides)
    meta = {"HAS_KEY_VALID": key_valid is not None, "BOTH_WAYS": ways == 2, "DIAG": diag, "PRECISION": _precision(q)}
    grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]), splits, ways)  # noqa: E731
    _launch(_infonce_fwd_kernel, grid, q, args, meta, _FWD_CONFIGS)
    return lse, pos


def _merge_splits(part_lse, part_pos):
    """(ways, m, splits) partials → (ways, m) LSE (logsumexp over splits) and positive logit (sum)."""
    lse = torch.empty(part_lse.shape[:2], dtype=torch.float32, device=part_lse.device)
    pos = torch.empty_like(lse)
    rows, splits = lse.numel(), part_lse.shape[2]
    block_s = triton.next_power_of_2(splits)
    block_r = max(1, 2048 // block_s)  # splits ≤ 4·SMs: at most 2048 partials per program
    kernel = _interpreted(_merge_splits_kernel) if _interpreting(part_lse) else _merge_splits_kernel
    kernel[(triton.cdiv(rows, block_r),)](part_lse, part_pos, lse, pos, rows, splits, BLOCK_R=block_r, BLOCK_S=block_s)
    return lse, pos


def forward_splits(m: int, n: int, device: torch.device) -> int:
    """Key-axis splits of the forward so that small batches still fill the GPU: enough programs for
    about four per SM (four "SMs" in the interpreter), each split at least 256 key columns. The (m, splits)
    partial buffers stay O(m): splits never exceeds 4·SMs."""
    sms = _sm_count(device)
    row_tiles = triton.cdiv(m, 64)  # the narrowest BLOCK_M of the configs
    return max(1, min(triton.cdiv(4 * sms, row_tiles), triton.cdiv(n, 256)))


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (asked once: the forward runs on a hot path); 4
    pretend SMs in the interpreter, so that the CPU tests see several programs per grid axis."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def infonce_block_backward(
    q, k, logit_scale, lse, row_weight, targets=None, *, key_valid=None, method="auto", chunk=None
):
    """Gradients of Σ_i w_i·(lse_i − z_{i,t_i}), z = s·q·kᵀ, given the rows' full LSE.

    ``lse`` may come from more keys than ``k`` (a ring step passes the LSE merged over every block):
    p_ij = exp(z_ij − lse_i) is then the softmax restricted to this block, which is what the gradient
    of the global loss needs. Rows with w_i = 0 contribute nothing (not even nan). No atomics: every
    output element has one writer and a fixed summation order, so the result is bitwise repeatable.

    Args:
        q, k, logit_scale, targets, key_valid: as ``infonce_block_lse``.
        lse: (m,) fp32 row LSE. row_weight: (m,) fp32 w_i (upstream grad / #valid rows, 0 if ignored).
        method: "fused" (gradients accumulated on chip, no workspace; recomputes each similarity tile per
            slice of d), "gemm" (dL/dz written chunk by chunk to a workspace of at most 16·m·d bytes,
            products by cuBLAS) or "auto" (gemm on CUDA, fused in the interpreter).
        chunk: gemm only: key columns per chunk (default: 16·d bytes per row of the workspace).
    Returns:
        dq (m, d) fp32, dk (n, d) fp32, ds (0-dim fp32: dL/ds).
    """
    _check(q, k, logit_scale, targets, key_valid)
    method = _resolve_method(method, q)
    return _block_backward(q, k, logit_scale, lse, row_weight, targets, key_valid, method, chunk)


def _block_backward(q, k, logit_scale, lse, row_weight, targets, key_valid, method, chunk=None, out_dtype=None):
    """``infonce_block_backward`` after its checks; dq and dk in ``out_dtype`` (default fp32), zeros when
    there is no row or no key."""
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    if m == 0 or n == 0:
        zeros = functools.partial(torch.zeros, dtype=out_dtype or torch.float32, device=q.device)
        return zeros(m, d), zeros(n, d), zeros((), dtype=torch.float32)
    scale, tgt, kv = _args_common(q, logit_scale, targets, key_valid)
    w, lse = _fp32(row_weight), _fp32(lse)  # dead rows: handled in the kernels
    meta = {"HAS_KEY_VALID": key_valid is not None, "PRECISION": _precision(q)}
    if method == "gemm":
        return _gemm_backward(q, k, scale, tgt, kv, lse, w, meta, chunk, out_dtype=out_dtype)
    dq, dk, ds = _fused_backward(q, k, scale, tgt, kv, lse, w, meta)
    if out_dtype not in (None, torch.float32):
        dq, dk = dq.to(out_dtype), dk.to(out_dtype)
    return dq, dk, ds


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def paired_block_backward(a, b, logit_scale, lse, row_weight, targets=None, *, key_valid=None, chunk=None):
    """Gradients of Σ_i w_i·(lse_i − z_{i,t_i}) + Σ_j w_j·(lse'_j − z'_{j,t_j}), z = s·a·bᵀ, z' = zᵀ: both
    directions of a paired loss (``paired_block_lse``) from one gemm backward. Each similarity tile is
    computed once for the two directions; G = dL/dz sums both, dA = s·G·B, dB = s·Gᵀ·A.

    Args:
        a, b: (m, d) paired rows. lse: (2, m) fp32, the two rows of ``paired_block_lse``.
        row_weight: (m,) fp32 w_i, the same for both directions. targets, key_valid, chunk: as
            ``infonce_block_backward`` (shared by both directions).
    Returns:
        da (m, d) fp32, db (m, d) fp32, ds (0-dim fp32).
    """
    _check(a, b, logit_scale, targets, key_valid)
    if a.shape != b.shape or lse.shape != (2, a.shape[0]):
        raise ValueError(
            f"paired rows need equal shapes and a (2, m) lse; got {tuple(a.shape)}, "
            f"{tuple(b.shape)}, lse {tuple(lse.shape)}"
        )
    m, d = a.shape
    if m == 0:
        zeros = functools.partial(torch.zeros, dtype=torch.float32, device=a.device)
        return zeros(m, d), zeros(m, d), zeros(())
    scale, tgt, kv = _args_common(a, logit_scale, targets, key_valid)
    meta = {"HAS_KEY_VALID": key_valid is not None, "PRECISION": _precision(a), "PAIRED": True}
    return _gemm_backward(a, b, scale, tgt, kv, _fp32(lse).contiguous(), _fp32(row_weight), meta, chunk)


def _resolve_method(method: str, q: torch.Tensor) -> str:
    if method not in ("auto", "fused", "gemm"):
        raise ValueError(f"method must be 'auto', 'fused' or 'gemm'; got {method!r}")
    if method == "auto":
        return "gemm" if q.is_cuda else "fused"
    return method


def _fused_backward(q, k, scale, tgt, kv, lse, w, meta):
    """Two kernels (dq over row tiles, dk over key tiles), each output block accumulated on chip."""
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    # Every element of these is written exactly once by the kernels.
    dq = torch.empty(m, d, dtype=torch.float32, device=q.device)
    dk = torch.empty(n, d, dtype=torch.float32, device=q.device)
    ds_rows = torch.empty(m, dtype=torch.float32, device=q.device)
    common = (m, n, d, q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    _launch(
        _infonce_bwd_dq_kernel,
        lambda c: (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(d, c["BLOCK_OUT"])),
        q,
        (q, k, scale, tgt, kv, lse, w, dq, ds_rows, *common),
        meta,
        _BWD_CONFIGS,
        _prune_bwd,
    )
    _launch(
        _infonce_bwd_dk_kernel,
        lambda c: (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(d, c["BLOCK_OUT"])),
        q,
        (q, k, scale, tgt, kv, lse, w, dk, *common),
        meta,
        _BWD_CONFIGS,
        _prune_bwd,
    )
    return dq, dk, ds_rows.sum()


def gemm_chunk_columns(m: int, d: int, element_size: int) -> int:
    """Key columns per chunk of the gemm backward: 16·d bytes of workspace per query row, a multiple of
    128 columns (at least 128), and fewer than 2^31 workspace elements (32-bit offsets)."""
    cols = max(128, (_CHUNK_BYTES_PER_DIM * d // element_size) // 128 * 128)
    return max(128, min(cols, (2**31 - 1) // max(m, 1) // 128 * 128))


def _mm_fp32(a, b):
    """a @ b accumulated and returned in fp32 (cuBLAS bf16/fp16 GEMM with an fp32 output on CUDA)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without mm's out_dtype
            return (a @ b).float()
    return a.float() @ b.float()  # CPU (interpreter tests): exact products of the rounded operands


def _mm(a, b, out_dtype):
    """a @ b accumulated in fp32, returned in ``out_dtype`` (fp32 or the operands' dtype, rounded once)."""
    if out_dtype == a.dtype and (a.is_cuda or a.dtype == torch.float32):
        return a @ b  # cuBLAS: fp32 accumulation, one rounding of the output; no cast kernel
    out = _mm_fp32(a, b)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


# The gradient-chunk kernel's narrowest tiles (most programs per launch): the ds slots a launch may use.
_GRAD_MIN_TILE = tuple(min(c.kwargs[key] for c in _GRAD_CONFIGS) for key in ("BLOCK_M", "BLOCK_N"))


def _ds_slots(m: int, chunk: int, ref: torch.Tensor) -> int:
    """Programs of one gradient-chunk launch at most: cdiv(m, BLOCK_M)·cdiv(chunk, BLOCK_N), O(m·d)."""
    bm, bn = (_INTERPRET_META["BLOCK_M"], _INTERPRET_META["BLOCK_N"]) if _interpreting(ref) else _GRAD_MIN_TILE
    return triton.cdiv(m, bm) * triton.cdiv(chunk, bn)


def _gemm_backward(q, k, scale, tgt, kv, lse, w, meta, chunk=None, cnt=None, out_dtype=None, tgt_offset=0):
    """s·dL/dz in column chunks G (m, chunk) in the input dtype, then dq = Σ G·K_c, dk_c = Gᵀ·Q by cuBLAS.

    ds = Σ_ij dL/dz_ij·(q_i·k_j) is summed by the chunk kernel into per-program slots (no extra pass).
    meta["PAIRED"] (paired rows, m == n, ``lse`` (2, m)): G also holds the swapped direction's gradient
    (``paired_block_backward``); meta["DIAG"]: the symmetric loss's own rows, ``w`` is the upstream
    gradient, ``cnt`` the forward's count, row i's pair is key tgt_offset + i (``_targets_weights``). dq and
    dk come back in ``out_dtype`` (default fp32); with one chunk cuBLAS writes them in that dtype directly.
    Each chunk's kernel writes every workspace element of that chunk once; all sums have a fixed order.
    """
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    out_dtype = out_dtype or torch.float32
    chunk = min(n, chunk or gemm_chunk_columns(m, d, q.element_size()))
    if m * chunk >= 2**31:
        raise ValueError(f"gemm backward: workspace of {m}×{chunk} needs 32-bit offsets; pass a smaller chunk")
    g = torch.empty(m, chunk, dtype=q.dtype, device=q.device)  # workspace: ≤ 16·m·d bytes by default
    ds_slots = torch.zeros(_ds_slots(m, chunk, q), dtype=torch.float32, device=q.device)
    dq = dk = None
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), g.stride(0))
    meta = {"PAIRED": False, "DIAG": False, **meta}
    for col0 in range(0, n, chunk):
        cols = min(chunk, n - col0)
        cnt_or_w = w if cnt is None else cnt
        args = (q, k, scale, tgt, kv, lse, w, cnt_or_w, g, ds_slots, m, n, d, col0, cols, tgt_offset, *strides)
        grid = lambda c, cols=cols: (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(cols, c["BLOCK_N"]))  # noqa: E731
        _launch(_infonce_grad_chunk_kernel, grid, q, args, meta, _GRAD_CONFIGS, reset=("ds_ptr",))
        if chunk == n:  # one chunk: every key column, products straight into out_dtype
            return _mm(g, k, out_dtype), _mm(g.T, q, out_dtype), ds_slots.sum()
        g_c = g[:, :cols]  # (m, cols)
        gk = _mm_fp32(g_c, k[col0 : col0 + cols])  # (m, d)
        dq = gk if dq is None else dq.add_(gk)
        if dk is None:
            dk = torch.empty(n, d, dtype=torch.float32, device=q.device)
        dk[col0 : col0 + cols] = _mm_fp32(g_c.T, q)  # (cols, d)
    if out_dtype != torch.float32:
        dq, dk = dq.to(out_dtype), dk.to(out_dtype)
    return dq, dk, ds_slots.sum()


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
    _check(q, k, logit_scale, targets, key_valid)
    targets, valid = _valid_rows(q, targets, key_valid, k.shape[0])
    count = valid.sum().clamp_min(1)
    lse, pos = infonce_block_lse(q, k, logit_scale, targets, key_valid=key_valid)
    return torch.where(valid, lse - pos, 0.0).sum() / count, lse, targets, valid, count


def infonce_backward(grad_output, q, k, logit_scale, lse, targets=None, *, key_valid=None, method="auto"):
    """Gradients of ``grad_output · infonce_forward(...)[0]``: (dq, dk, d logit_scale) in input dtypes.

    ``method``: as ``infonce_block_backward``."""
    _check(q, k, logit_scale, targets, key_valid)
    targets, valid = _valid_rows(q, targets, key_valid, k.shape[0])
    return _backward(grad_output, q, k, logit_scale, lse, targets, valid, valid.sum().clamp_min(1), key_valid, method)


def _backward(grad_output, q, k, logit_scale, lse, targets, valid, count, key_valid, method):
    row_weight = valid * (grad_output.to(torch.float32) / count)  # (m,) fp32
    method = _resolve_method(method, q)
    dq, dk, ds = _block_backward(q, k, logit_scale, lse, row_weight, targets, key_valid, method, out_dtype=q.dtype)
    return dq, dk, ds.reshape(logit_scale.shape).to(logit_scale.dtype)


class InfoNCEFunction(torch.autograd.Function):
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
    return InfoNCEFunction.apply(q, k, logit_scale, targets, key_valid, backward)


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
        lse0, pos = _forward_partials(a, b, logit_scale, None, valid, None, ways=2, diag=True)
        lse1, lse1_offset = lse0, m * lse0.shape[2]
    return _symmetric_loss(lse0, lse1, lse1_offset, pos, valid, a, m)


def _symmetric_loss(lse0, lse1, lse1_offset, pos, key_valid, ref, n, row_offset=0, world=1):
    """(loss 0-dim, lse (2, m), count (1,)) from the two directions' partials by ``_symmetric_loss_kernel``
    (one launch, no torch op); m rows, row i the pair of key row_offset + i of the n keys; count is
    max(#live keys, 1) / world (``ref``: a tensor on the device)."""
    m, splits0, splits1 = pos.shape[-2], lse0.shape[-1], lse1.shape[-1]
    lse = torch.empty(2, m, dtype=torch.float32, device=ref.device)
    count = torch.empty(1, dtype=torch.float32, device=ref.device)
    loss = torch.empty((), dtype=torch.float32, device=ref.device)
    block_s0, block_s1 = triton.next_power_of_2(splits0), triton.next_power_of_2(splits1)
    if _interpreting(ref):  # small row blocks: the CPU tests walk the row loop
        kernel, block_r = _interpreted(_symmetric_loss_kernel), 64
    else:
        kernel, block_r = _symmetric_loss_kernel, max(1, 2048 // max(block_s0, block_s1))
    kv = _mask_bytes(key_valid, ref)
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
    unit = _INTERPRET_META["BLOCK_M"] if device.type != "cuda" else _PAIRED_GROUP_UNIT
    tiles = triton.cdiv(m, unit)
    per_axis = max(1, min(tiles, math.isqrt(4 * _sm_count(device))))
    group = triton.cdiv(tiles, per_axis) * unit
    return triton.cdiv(m, group), group


def _paired_tiled_partials(a, b, logit_scale, valid):
    """(row LSE (m, C), column LSE (m, R), positive (m, C)) partials of ``_paired_fwd_kernel`` (m > 0)."""
    m, d = a.shape
    groups, group = paired_groups(m, a.device)
    row_part = torch.empty(m, groups, dtype=torch.float32, device=a.device)
    col_part = torch.empty(m, groups, dtype=torch.float32, device=a.device)
    pos_part = torch.empty(m, groups, dtype=torch.float32, device=a.device)
    kv, strides = _mask_bytes(valid, a), (a.stride(0), a.stride(1))  # a and b: same (contiguous) strides
    args = (a, b, logit_scale, kv, row_part, col_part, pos_part, m, d, group, *strides)
    meta = {"HAS_KEY_VALID": valid is not None, "PRECISION": _precision(a)}
    _launch(_paired_fwd_kernel, lambda c: (groups, groups), a, args, meta, _PAIRED_FWD_CONFIGS)
    return row_part, col_part, pos_part


def _paired_gemm_backward(grad_output, a, b, logit_scale, lse, valid, count):
    """(da, db, ds) of the paired loss in a's dtype: one gradient-chunk launch per chunk with the DIAG rows
    (targets, weights and mask computed in the kernel) and two cuBLAS products."""
    meta = {"HAS_KEY_VALID": valid is not None, "PRECISION": _precision(a), "PAIRED": True, "DIAG": True}
    kv = _mask_bytes(valid, a)
    return _gemm_backward(a, b, logit_scale, a, kv, lse, grad_output, meta, cnt=count, out_dtype=a.dtype)


def _two_way_fused_backward(grad_output, a, b, a_keys, b_keys, logit_scale, lse, key_valid, count, offset=0):
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
    da, db_keys, ds0 = _block_backward(a, b_keys, logit_scale, lse[0], weight, targets, key_valid, "fused")
    db, da_keys, ds1 = _block_backward(b, a_keys, logit_scale, lse[1], weight, targets, key_valid, "fused")
    return da, db, da_keys, db_keys, ds0 + ds1


def _paired_fused_backward(grad_output, a, b, logit_scale, lse, valid, count):
    """(da, db, ds) of the paired loss from the two directions' fused backwards (no workspace)."""
    da, db, da_keys, db_keys, ds = _two_way_fused_backward(grad_output, a, b, a, b, logit_scale, lse, valid, count)
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
        backward = _paired_gemm_backward if _resolve_method(ctx.method, a) == "gemm" else _paired_fused_backward
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
    _check(a, b, logit_scale, None, valid)
    if a.shape != b.shape:
        raise ValueError(f"paired rows need equal shapes; got {tuple(a.shape)} and {tuple(b.shape)}")
    if valid is not None and valid.shape != a.shape[:1]:
        raise ValueError(f"valid must have shape ({a.shape[0]},); got {tuple(valid.shape)}")
    # the forward swaps a and b inside one launch: both need the same (row-major) strides
    return SymmetricInfoNCEFunction.apply(a.contiguous(), b.contiguous(), logit_scale, valid, backward, forward)


# ---------------------------------------------------------------------------------------------------------
# One rank's share of the gathered symmetric loss (``kernels.distributed``, strategy "allgather").


def _gathered_loss(a, b, a_all, b_all, logit_scale, key_valid, offset, world):
    """(loss, lse (2, m), count (1,)) of a rank's share in two launches: the BOTH_WAYS forward (rows of a
    against keys b_all, rows of b against keys a_all, positives at offset + i) and the loss kernel."""
    m = a.shape[0]
    parts, pos = _forward_partials(
        a, b_all, logit_scale, None, key_valid, None, ways=2, diag=True, second=(b, a_all), tgt_offset=offset
    )
    return _symmetric_loss(parts, parts, m * parts.shape[2], pos, key_valid, a, b_all.shape[0], offset, world)


def _gathered_gemm_backward(grad_output, a, b, a_all, b_all, logit_scale, lse, key_valid, count, offset):
    """(da, db, da_all, db_all, ds) in the inputs' dtype: one gemm backward per direction, targets and row
    weights (½·grad_output / count on live rows) computed in the chunk kernel."""
    meta = {"HAS_KEY_VALID": key_valid is not None, "PRECISION": _precision(a), "DIAG": True}
    kv = _mask_bytes(key_valid, a)
    common = {"cnt": count, "out_dtype": a.dtype, "tgt_offset": offset}
    da, db_all, ds0 = _gemm_backward(a, b_all, logit_scale, a, kv, lse[0], grad_output, meta, **common)
    db, da_all, ds1 = _gemm_backward(b, a_all, logit_scale, b, kv, lse[1], grad_output, meta, **common)
    return da, db, da_all, db_all, ds0 + ds1


def _gathered_fused_backward(grad_output, a, b, a_all, b_all, logit_scale, lse, key_valid, count, offset):
    """(da, db, da_all, db_all, ds) from the two directions' fused backwards (no workspace)."""
    da, db, da_all, db_all, ds = _two_way_fused_backward(
        grad_output, a, b, a_all, b_all, logit_scale, lse, key_valid, count, offset
    )
    return da.to(a.dtype), db.to(a.dtype), da_all.to(a.dtype), db_all.to(a.dtype), ds


class GatheredSymmetricInfoNCEFunction(torch.autograd.Function):
    """Autograd for one rank's share of the gathered symmetric loss: one forward launch for both
    directions plus the loss kernel (no torch op on the loss), one gemm backward per direction; saves the
    four inputs, the (2, m) LSE and the count. Gradients reach the local rows directly and the gathered
    keys (``gather_with_grad`` sums those over ranks)."""

    @staticmethod
    def forward(ctx, a, b, a_all, b_all, logit_scale, key_valid, offset, world, method="auto"):
        loss, lse, count = _gathered_loss(a, b, a_all, b_all, logit_scale, key_valid, offset, world)
        ctx.save_for_backward(a, b, a_all, b_all, logit_scale, lse, key_valid, count)
        ctx.offset, ctx.method = offset, method
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        refuse_double_backward("gathered symmetric infonce (triton)")
        a, b, a_all, b_all, logit_scale, lse, key_valid, count = ctx.saved_tensors
        gemm = _resolve_method(ctx.method, a) == "gemm"
        backward = _gathered_gemm_backward if gemm else _gathered_fused_backward
        grads = backward(grad_output, a, b, a_all, b_all, logit_scale, lse, key_valid, count, ctx.offset)
        da, db, da_all, db_all, ds = grads
        return da, db, da_all, db_all, ds.reshape(logit_scale.shape).to(logit_scale.dtype), None, None, None, None


def gathered_symmetric_infonce_triton(
    a, b, a_all, b_all, logit_scale, *, offset, world, key_valid=None, backward="auto"
):
    """One rank's share ``L_r`` of the symmetric loss over the global batch, fused (``kernels.distributed``).

    Equal to ``(world·N_r / N) · 0.5 · (infonce_triton(a, b_all, s, t, key_valid=key_valid) +
    infonce_triton(b, a_all, s, t, key_valid=key_valid))`` with t_i = offset + i (−1 where the pair is
    masked), N the live keys, N_r the live local rows; in two forward launches and no torch op on the
    loss, instead of two unpaired losses and the rescale.

    Args:
        a, b: (m, d) this rank's paired rows (row i of a pairs with row i of b), same dtype.
        a_all, b_all: (world·m, d) every rank's rows in rank order (``gather_with_grad``), so that
            a_all[offset + i] is a[i]. logit_scale: s, shape [] or [1].
        offset: this rank's first global row (rank·m). world: the number of ranks.
        key_valid: optional (world·m,) bool, the gathered presence mask; a masked pair is neither a
            query nor a key in either direction.
        backward: "auto", "fused" or "gemm" (as ``infonce_triton``).
    Returns:
        0-dim fp32 ``L_r``; ``mean_r L_r`` is the single-process loss on the global batch.
    """
    _check(a, b_all, logit_scale, None, key_valid)
    _check(b, a_all, logit_scale, None, key_valid)
    m = a.shape[0]
    if a.shape != b.shape or a_all.shape != b_all.shape or a_all.shape[0] != world * m:
        raise ValueError(
            f"gathered rows need a, b (m, d) and a_all, b_all (world·m, d) with world={world}; got "
            f"{tuple(a.shape)}, {tuple(b.shape)}, {tuple(a_all.shape)}, {tuple(b_all.shape)}"
        )
    if not 0 <= offset <= a_all.shape[0] - m:
        raise ValueError(f"offset {offset} leaves the gathered rows (world·m = {a_all.shape[0]}, m = {m})")
    if m == 0:
        return (a.sum() + b.sum() + a_all.sum() + b_all.sum() + logit_scale.sum()).float() * 0.0
    a, b, a_all, b_all = (x.contiguous() for x in (a, b, a_all, b_all))  # one launch: equal strides per role
    return GatheredSymmetricInfoNCEFunction.apply(a, b, a_all, b_all, logit_scale, key_valid, offset, world, backward)
