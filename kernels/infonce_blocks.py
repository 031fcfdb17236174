"""Block primitives of the Triton InfoNCE: launchers that know nothing about the mean or the ignored rows.

``infonce_block_lse`` / ``infonce_block_backward`` (one direction) and ``paired_block_lse`` /
``paired_block_backward`` (both directions of paired rows) run the tile kernels of
``kernels.infonce_tiles``; the caller owns the reduction. The ring strategy (``kernels.ring``) uses them
directly; the ops ``kernels.infonce_triton``, ``kernels.symmetric_infonce_triton`` and
``kernels.gathered_infonce_triton`` build on them and on ``forward_partials``, ``block_backward`` and
``gemm_backward``.

Forward: each program owns BLOCK_M rows and one split of the key axis, walks over its key tiles computing
s·Q·Kᵀ on chip (d in BLOCK_D chunks, fp32 accumulation) with an online log-sum-exp; it writes the partial
row LSE and positive logit (picked out of the tile that holds column t_i) of its split; a small kernel
merges the (m, splits) partials. Splits (FlashDecoding's split-KV) keep small batches from leaving SMs idle. The
column LSE the symmetric loss needs is the row LSE of the swapped call ``infonce_block_lse(k, q, ...)``:
a column reduction inside this row-tile layout would need either atomics on (max, sum) pairs or an
(m / BLOCK_M)×n buffer, which is O(B²); the paired one-pass kernel (``kernels.symmetric_infonce_triton``)
avoids both by giving each program a square group of rows × columns, so its column partials are (m, groups).

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
"""

from __future__ import annotations

import functools

import torch

from kernels.infonce_tiles import (
    _infonce_bwd_dk_kernel,
    _infonce_bwd_dq_kernel,
    _infonce_fwd_kernel,
    _infonce_grad_chunk_kernel,
    _merge_splits_kernel,
)
from kernels.triton_launch import (
    BWD_CONFIGS,
    FWD_CONFIGS,
    GRAD_CONFIGS,
    INTERPRET_META,
    check_operands,
    dot_precision,
    interpreted,
    interpreting,
    kernel_args,
    launch,
    prune_bwd,
    sm_count,
    triton,
)

__all__ = [
    "block_backward",
    "forward_partials",
    "forward_splits",
    "gemm_backward",
    "gemm_chunk_columns",
    "infonce_block_backward",
    "infonce_block_lse",
    "paired_block_backward",
    "paired_block_lse",
    "resolve_method",
]


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
    check_operands(q, k, logit_scale, targets, key_valid)
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
    check_operands(a, b, logit_scale, targets, key_valid)
    if a.shape != b.shape:
        raise ValueError(f"paired rows need equal shapes; got {tuple(a.shape)} and {tuple(b.shape)}")
    return _block_lse(a.contiguous(), b.contiguous(), logit_scale, targets, key_valid, splits, both_ways=True)


def _block_lse(q, k, logit_scale, targets, key_valid, splits, both_ways):
    """(ways, m) LSE and positive logits; ways = 2 runs the swapped call too (same strides: m == n)."""
    ways = 2 if both_ways else 1
    if q.shape[0] == 0:
        return tuple(torch.empty(ways, 0, dtype=torch.float32, device=q.device) for _ in range(2))
    lse, pos = forward_partials(q, k, logit_scale, targets, key_valid, splits, ways)
    if lse.shape[2] == 1:
        return lse[..., 0], pos[..., 0]
    return _merge_splits(lse, pos)


def forward_partials(q, k, logit_scale, targets, key_valid, splits, ways, diag=False, second=None, tgt_offset=0):
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
    scale, tgt, kv = kernel_args(q, logit_scale, targets, key_valid, diag)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    args = (q, k, q1, k1, scale, tgt, kv, lse, pos, m, n, d, split_n, tgt_offset, *strides)
    meta = {"HAS_KEY_VALID": key_valid is not None, "BOTH_WAYS": ways == 2, "DIAG": diag, "PRECISION": dot_precision(q)}
    grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]), splits, ways)  # noqa: E731
    launch(_infonce_fwd_kernel, grid, q, args, meta, FWD_CONFIGS)
    return lse, pos


def _merge_splits(part_lse, part_pos):
    """(ways, m, splits) partials → (ways, m) LSE (logsumexp over splits) and positive logit (sum)."""
    lse = torch.empty(part_lse.shape[:2], dtype=torch.float32, device=part_lse.device)
    pos = torch.empty_like(lse)
    rows, splits = lse.numel(), part_lse.shape[2]
    block_s = triton.next_power_of_2(splits)
    block_r = max(1, 2048 // block_s)  # splits ≤ 4·SMs: at most 2048 partials per program
    kernel = interpreted(_merge_splits_kernel) if interpreting(part_lse, _merge_splits_kernel) else _merge_splits_kernel
    kernel[(triton.cdiv(rows, block_r),)](part_lse, part_pos, lse, pos, rows, splits, BLOCK_R=block_r, BLOCK_S=block_s)
    return lse, pos


def forward_splits(m: int, n: int, device: torch.device) -> int:
    """Key-axis splits of the forward so that small batches still fill the GPU: enough programs for
    about four per SM (four "SMs" in the interpreter), each split at least 256 key columns. The (m, splits)
    partial buffers stay O(m): splits never exceeds 4·SMs."""
    sms = sm_count(device)
    row_tiles = triton.cdiv(m, 64)  # the narrowest BLOCK_M of the configs
    return max(1, min(triton.cdiv(4 * sms, row_tiles), triton.cdiv(n, 256)))


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
    check_operands(q, k, logit_scale, targets, key_valid)
    method = resolve_method(method, q)
    return block_backward(q, k, logit_scale, lse, row_weight, targets, key_valid, method, chunk)


def block_backward(q, k, logit_scale, lse, row_weight, targets, key_valid, method, chunk=None, out_dtype=None):
    """``infonce_block_backward`` after its checks; dq and dk in ``out_dtype`` (default fp32), zeros when
    there is no row or no key."""
    m, n, d = q.shape[0], k.shape[0], q.shape[1]
    if m == 0 or n == 0:
        zeros = functools.partial(torch.zeros, dtype=out_dtype or torch.float32, device=q.device)
        return zeros(m, d), zeros(n, d), zeros((), dtype=torch.float32)
    scale, tgt, kv = kernel_args(q, logit_scale, targets, key_valid)
    w, lse = _fp32(row_weight), _fp32(lse)  # dead rows: handled in the kernels
    meta = {"HAS_KEY_VALID": key_valid is not None, "PRECISION": dot_precision(q)}
    if method == "gemm":
        return gemm_backward(q, k, scale, tgt, kv, lse, w, meta, chunk, out_dtype=out_dtype)
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
    check_operands(a, b, logit_scale, targets, key_valid)
    if a.shape != b.shape or lse.shape != (2, a.shape[0]):
        raise ValueError(
            f"paired rows need equal shapes and a (2, m) lse; got {tuple(a.shape)}, "
            f"{tuple(b.shape)}, lse {tuple(lse.shape)}"
        )
    m, d = a.shape
    if m == 0:
        zeros = functools.partial(torch.zeros, dtype=torch.float32, device=a.device)
        return zeros(m, d), zeros(m, d), zeros(())
    scale, tgt, kv = kernel_args(a, logit_scale, targets, key_valid)
    meta = {"HAS_KEY_VALID": key_valid is not None, "PRECISION": dot_precision(a), "PAIRED": True}
    return gemm_backward(a, b, scale, tgt, kv, _fp32(lse).contiguous(), _fp32(row_weight), meta, chunk)


# Backward method: "fused" keeps the gradient blocks on chip (two kernels, no workspace) but recomputes
# the similarity tile once per BLOCK_OUT slice of d; "gemm" writes dL/dz in column chunks to a bounded
# workspace and hands the two gradient products to cuBLAS (no recompute per slice). "auto" picks gemm on
# CUDA: it was faster at every measured d (H100, bf16, b = 16384: 4.5 vs 7.0 ms at d = 256, 5.7 vs 20.4
# at d = 512, 9.7 vs 62.5 at d = 1024; BENCHMARKS.md), and fused in the interpreter (no workspace).
# The gemm workspace holds at most this many bytes per query row (16·d: half of the 32·m·d bytes the
# loss may use); its column chunk therefore does not grow with n.
_CHUNK_BYTES_PER_DIM = 16


def resolve_method(method: str, q: torch.Tensor) -> str:
    """The backward method to run: ``method`` after its check, "auto" as gemm on CUDA, fused elsewhere."""
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
    launch(
        _infonce_bwd_dq_kernel,
        lambda c: (triton.cdiv(m, c["BLOCK_M"]), triton.cdiv(d, c["BLOCK_OUT"])),
        q,
        (q, k, scale, tgt, kv, lse, w, dq, ds_rows, *common),
        meta,
        BWD_CONFIGS,
        prune_bwd,
    )
    launch(
        _infonce_bwd_dk_kernel,
        lambda c: (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(d, c["BLOCK_OUT"])),
        q,
        (q, k, scale, tgt, kv, lse, w, dk, *common),
        meta,
        BWD_CONFIGS,
        prune_bwd,
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
_GRAD_MIN_TILE = tuple(min(c.kwargs[key] for c in GRAD_CONFIGS) for key in ("BLOCK_M", "BLOCK_N"))


def _ds_slots(m: int, chunk: int, ref: torch.Tensor) -> int:
    """Programs of one gradient-chunk launch at most: cdiv(m, BLOCK_M)·cdiv(chunk, BLOCK_N), O(m·d)."""
    interpret = interpreting(ref, _infonce_grad_chunk_kernel)
    bm, bn = (INTERPRET_META["BLOCK_M"], INTERPRET_META["BLOCK_N"]) if interpret else _GRAD_MIN_TILE
    return triton.cdiv(m, bm) * triton.cdiv(chunk, bn)


def gemm_backward(q, k, scale, tgt, kv, lse, w, meta, chunk=None, cnt=None, out_dtype=None, tgt_offset=0):
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
        launch(_infonce_grad_chunk_kernel, grid, q, args, meta, GRAD_CONFIGS, reset=("ds_ptr",))
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
