"""The Triton kernels (``@triton.jit``) of the InfoNCE ops: tile helpers, forward, merges, loss, backward.

Nothing here launches anything: the launchers (``kernels.infonce_blocks``, ``kernels.symmetric_infonce_triton``,
``kernels.gathered_infonce_triton``) choose grids and configs and launch through ``kernels.triton_launch``.
The kernels keep Liger-Kernel's ``_op_kernel`` names (leading underscore) although those modules import
them: they are internals of ``kernels/``, never called from outside it.

- ``_infonce_fwd_kernel``: per key split, the partial row LSE and positive logit of a row tile (BOTH_WAYS:
  two directions in one launch); ``_merge_splits_kernel`` merges the splits.
- ``_paired_fwd_kernel``: both directions of the paired loss in one pass over z = s·A·Bᵀ.
- ``_symmetric_loss_kernel``: ends the symmetric loss's forward (merge, live count, the loss itself).
- ``_infonce_bwd_dq_kernel`` / ``_infonce_bwd_dk_kernel``: the fused backward (gradients on chip).
- ``_infonce_grad_chunk_kernel``: the gemm backward's s·dL/dz chunks (cuBLAS does the products).
"""

from __future__ import annotations

from kernels.triton_launch import kernel_interpreted, tl, triton

__all__ = ["interpreter_ready"]


def interpreter_ready() -> bool:
    """Whether kernels can run on CPU: Triton was imported with TRITON_INTERPRET=1 (tl.* interpreted)."""
    return kernel_interpreted(_infonce_fwd_kernel)


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
