"""One rank's share of the gathered symmetric InfoNCE in Triton (``kernels.distributed``, "allgather").

``L_r = (world·N_r / N) · 0.5 · (InfoNCE(a, b_all) + InfoNCE(b, a_all))``: this rank's rows as queries
against every rank's rows as keys. Layering: ``forward_partials`` / ``gemm_backward`` / ``block_backward``
(``kernels.infonce_blocks``) and the paired loss's ``symmetric_loss`` / ``two_way_fused_backward``
(``kernels.symmetric_infonce_triton``) → ``GatheredSymmetricInfoNCEFunction`` →
``gathered_symmetric_infonce_triton``.

The gathered loss cannot share tiles: on a rank its two directions have different key sets (rows of a
against the gathered b, rows of b against the gathered a). It still shares launches: BOTH_WAYS with the
second way's own pointers gives both directions' LSE in one forward launch, the loss kernel merges them,
counts the live keys and applies the rank's rescale, and the DIAG rows take their positive at the rank's
offset.
"""

from __future__ import annotations

import torch

from kernels.infonce_blocks import forward_partials, gemm_backward, resolve_method
from kernels.infonce_reference import refuse_double_backward
from kernels.symmetric_infonce_triton import symmetric_loss, two_way_fused_backward
from kernels.triton_launch import check_operands, dot_precision, mask_bytes

__all__ = ["GatheredSymmetricInfoNCEFunction", "gathered_symmetric_infonce_triton"]


def _gathered_loss(a, b, a_all, b_all, logit_scale, key_valid, offset, world):
    """(loss, lse (2, m), count (1,)) of a rank's share in two launches: the BOTH_WAYS forward (rows of a
    against keys b_all, rows of b against keys a_all, positives at offset + i) and the loss kernel."""
    m = a.shape[0]
    parts, pos = forward_partials(
        a, b_all, logit_scale, None, key_valid, None, ways=2, diag=True, second=(b, a_all), tgt_offset=offset
    )
    return symmetric_loss(parts, parts, m * parts.shape[2], pos, key_valid, a, b_all.shape[0], offset, world)


def _gathered_gemm_backward(grad_output, a, b, a_all, b_all, logit_scale, lse, key_valid, count, offset):
    """(da, db, da_all, db_all, ds) in the inputs' dtype: one gemm backward per direction, targets and row
    weights (½·grad_output / count on live rows) computed in the chunk kernel."""
    meta = {"HAS_KEY_VALID": key_valid is not None, "PRECISION": dot_precision(a), "DIAG": True}
    kv = mask_bytes(key_valid, a)
    common = {"cnt": count, "out_dtype": a.dtype, "tgt_offset": offset}
    da, db_all, ds0 = gemm_backward(a, b_all, logit_scale, a, kv, lse[0], grad_output, meta, **common)
    db, da_all, ds1 = gemm_backward(b, a_all, logit_scale, b, kv, lse[1], grad_output, meta, **common)
    return da, db, da_all, db_all, ds0 + ds1


def _gathered_fused_backward(grad_output, a, b, a_all, b_all, logit_scale, lse, key_valid, count, offset):
    """(da, db, da_all, db_all, ds) from the two directions' fused backwards (no workspace)."""
    da, db, da_all, db_all, ds = two_way_fused_backward(
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
        gemm = resolve_method(ctx.method, a) == "gemm"
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
    check_operands(a, b_all, logit_scale, None, key_valid)
    check_operands(b, a_all, logit_scale, None, key_valid)
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
