"""Symmetric InfoNCE over negatives from every rank, by passing key blocks around a ring.

Rank r holds b local rows a_r, b_r (the two modalities). Its loss is

    L_r = 0.5 · ( infonce(a_r, B, t = r·b + arange(b)) + infonce(b_r, A, t = r·b + arange(b)) )

with A, B the global batches: exactly what the all-gather strategy (``kernels/distributed.py``) computes,
but no rank ever holds more than two feature blocks (its own and the one in flight): O(b·d) memory.

Forward: the block (a_src, b_src) travels r → r+1 for W − 1 hops. At each step the next block is already
being sent / received (``batch_isend_irecv``) while this one is reduced to per-row partial LSEs of
s·a_r·b_srcᵀ and s·b_r·a_srcᵀ, merged online (``logaddexp``). Positives are local (a_i·b_i), no ring.

Backward: the blocks go around once more, each with an fp32 accumulator of its own gradient. Rank r
recomputes its tiles against the block from the saved LSE, adds its contribution to the block's
accumulator and passes it on; after W hops the accumulator is back with the owner, holding
Σ_r' dL_r'/d(own rows). With W ranks that is W · d(global loss)/d(local rows), so DeepSpeed's data-
parallel averaging yields the single-process gradient; d logit_scale is dL_r/ds (averaged likewise).
The incoming accumulator travels while this step's contribution is computed.

Masking (``valid``, the presence masks of ``kernels.distributed.gathered_symmetric_infonce``): an
invalid pair is neither a query nor a key anywhere. Each block travels with its (b,) uint8 mask, which
masks that block's key columns out of every LSE; the forward keeps the W masks it saw (W·b bytes, in
block order) for the backward, and their total gives N, the number of valid global rows, without
another collective. With N_r valid local rows the loss is the all-gather strategy's

    L_r = (W · N_r / N) · 0.5 · (masked mean_ab + masked mean_ba) = 0.5 · (W / N) · Σ_{i valid} (…)

so ``mean_r L_r`` is the mean over the N valid global rows; unmasked, N = W·b and this is the plain
mean. Each row's weight w_i = 0.5·W/N·valid_i is what the block backward receives (0 for invalid rows).

Retargeted rows (``targets``, ``key_valid``: the false-negative deduplication of
``kernels.grouped``): row i's positive is the global key t_i, possibly another rank's,
and only the global rows marked in ``key_valid`` (W·b bools, the same on every rank) are keys. The
block of rank src masks its key columns with its slice of ``key_valid``; a row's positive logit
s·a_i·b_{t_i} (and s·b_i·a_{t_i}) is taken when t_i's block comes by, and in the backward its key's
gradient goes into that block's travelling accumulator. The presence mask still travels, to count the
N valid query rows.

Order of point-to-point messages on each link r → r+1 (identical on both ends, as NCCL requires):
features(0) [+ mask(0)], grads(0), features(1) [+ mask(1)], grads(1), …; gloo additionally gets
distinct tags.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from kernels.gather import world_and_rank
from kernels.infonce_reference import refuse_double_backward

# Ring, block_ops and wait_all are also the fused tri-modal ring's (kernels.trimodal_blocks)
__all__ = ["Ring", "block_ops", "ring_symmetric_infonce", "wait_all"]

_FEATURE_TAG, _GRAD_TAG, _MASK_TAG = 11, 12, 13
_TORCH_CHUNK_ELEMS = 1 << 24  # rows per torch chunk = this / n: a (chunk, n) fp32 tile is <= 64 MiB


class _BlockOps(NamedTuple):
    """lse(q, k, s, key_valid) -> (m,) fp32 (−inf where no column is valid);
    backward(q, k, s, lse, w, key_valid) -> (dq fp32, dk fp32, ds 0-dim fp32); key_valid (n,) bool or None.
    Rows with w = 0 contribute nothing to the backward (whatever their lse)."""

    lse: object
    backward: object


def _torch_block_lse(q, k, s, key_valid=None):
    kf = k.float()
    chunk = max(1, _TORCH_CHUNK_ELEMS // max(k.shape[0], 1))
    out = []
    for qc in q.split(chunk):
        z = s * (qc.float() @ kf.T)
        if key_valid is not None:
            z = z.masked_fill(~key_valid, float("-inf"))
        out.append(torch.logsumexp(z, dim=1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float32, device=q.device)


def _torch_block_backward(q, k, s, lse, w, key_valid=None):
    kf = k.float()
    chunk = max(1, _TORCH_CHUNK_ELEMS // max(k.shape[0], 1))
    dq, dk, ds = [], torch.zeros_like(kf), torch.zeros((), dtype=torch.float32, device=q.device)
    lse = torch.where(w != 0, lse, float("inf"))  # weightless rows (maybe lse = −inf): p = 0, not nan
    for qc, lc, wc in zip(q.float().split(chunk), lse.split(chunk), w.split(chunk)):
        dots = qc @ kf.T  # (chunk, n)
        p = torch.exp(s * dots - lc[:, None])
        if key_valid is not None:
            p = p.masked_fill(~key_valid, 0.0)
        g = p * wc[:, None]  # dL/dz
        ds = ds + (g * dots).sum()
        dq.append(s * (g @ kf))
        dk.addmm_(g.T, qc, alpha=s)
    return (torch.cat(dq) if dq else torch.zeros_like(q, dtype=torch.float32)), dk, ds


def _triton_ops():
    from kernels.infonce_blocks import infonce_block_backward, infonce_block_lse

    def lse(q, k, s, key_valid=None):
        return infonce_block_lse(q, k, s, key_valid=key_valid)[0]

    def backward(q, k, s, lse_rows, w, key_valid=None):
        return infonce_block_backward(q, k, s, lse_rows, w, key_valid=key_valid)

    return _BlockOps(lse, backward)


def block_ops(backend, device):
    """The block LSE / backward pair of ``backend`` ("auto" picks Triton on CUDA) for blocks on ``device``."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return _BlockOps(_torch_block_lse, _torch_block_backward)
    if backend == "triton":
        return _triton_ops()
    raise ValueError(f"backend must be 'auto', 'torch' or 'triton'; got {backend!r}")


class Ring:
    """Rank bookkeeping and the two kinds of messages; a world of one never communicates."""

    def __init__(self, group):
        self.group = group
        self.world, self.rank = world_and_rank(group)
        self.next, self.prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world

    def source(self, step):
        """Owner of the block this rank holds at ``step``."""
        return (self.rank - step) % self.world

    def shift_features(self, block, mask=None):
        """Start sending ``block`` (and its uint8 ``mask``, if any) to the next rank and receiving the
        previous rank's; returns ((block buffer, mask buffer or None), works)."""
        incoming = torch.empty_like(block)
        ops = [
            dist.P2POp(dist.isend, block, group=self.group, tag=_FEATURE_TAG, group_peer=self.next),
            dist.P2POp(dist.irecv, incoming, group=self.group, tag=_FEATURE_TAG, group_peer=self.prev),
        ]
        incoming_mask = None
        if mask is not None:
            incoming_mask = torch.empty_like(mask)
            ops += [
                dist.P2POp(dist.isend, mask, group=self.group, tag=_MASK_TAG, group_peer=self.next),
                dist.P2POp(dist.irecv, incoming_mask, group=self.group, tag=_MASK_TAG, group_peer=self.prev),
            ]
        return (incoming, incoming_mask), dist.batch_isend_irecv(ops)

    def send_grads(self, acc):
        return dist.isend(acc, group=self.group, tag=_GRAD_TAG, group_dst=self.next)

    def recv_grads(self, like):
        buf = torch.empty_like(like)
        return buf, dist.irecv(buf, group=self.group, tag=_GRAD_TAG, group_src=self.prev)


def wait_all(works):
    """Waits for every pending send / receive of ``works`` (None: nothing pending)."""
    for work in works or ():
        work.wait()


class _Positives(NamedTuple):
    """Which local rows have their positive key in the block of one source rank."""

    hit: torch.Tensor  # (b,) bool: t_i is a row of this block
    index: torch.Tensor  # (b,) int64: its row in the block (clamped to 0 where not hit)


def _positives_in_block(targets, src, n_local) -> _Positives:
    """No host sync: rows without a hit get index 0 and must be weighted out by the caller."""
    local = targets - src * n_local
    hit = (local >= 0) & (local < n_local)
    return _Positives(hit, torch.where(hit, local, torch.zeros_like(local)))


def ring_forward(a, b, scale, ring, ops, valid=None, targets=None, key_valid=None):
    """LSE of local rows against every rank's block, and the loss.

    With ``targets`` (b,) int64 global key indices (−1: not a query) and optionally ``key_valid`` (W·b,)
    bool, rows are retargeted and keys masked (module docstring); ``valid`` is then the query mask.

    Returns (loss 0-dim fp32, lse_a (b,), lse_b (b,), row_weight (b,) fp32, masks): ``row_weight`` is
    each local row's weight in the loss (0.5·W/N, 0 for an invalid row), ``masks`` the key mask (bool or
    None) of the block held at each step, for the backward.
    """
    n_local = a.shape[0]
    lse_a = torch.full((n_local,), float("-inf"), dtype=torch.float32, device=a.device)
    lse_b = torch.full_like(lse_a, float("-inf"))
    pos_a, pos_b = torch.zeros_like(lse_a), torch.zeros_like(lse_a)  # retargeted positives, block by block
    af, bf = a.float(), b.float()
    block = torch.cat([a, b])  # (2b, d): what travels, in the input dtype
    mask = None if valid is None else valid.to(torch.uint8).contiguous()  # travels with its block
    masks, counts = [], []
    for step in range(ring.world):
        (incoming, incoming_mask), works = (
            ring.shift_features(block, mask) if step < ring.world - 1 else ((None, None), None)
        )
        a_src, b_src = block[:n_local], block[n_local:]
        src = ring.source(step)
        if mask is not None:
            counts.append(mask.sum())
        if targets is None:
            key_mask = None if mask is None else mask.bool()
        else:
            key_mask = None if key_valid is None else key_valid[src * n_local : (src + 1) * n_local]
            hit, index = _positives_in_block(targets, src, n_local)
            pos_a += torch.where(hit, (af * b_src[index].float()).sum(dim=1), 0.0)  # a_i · b_{t_i}
            pos_b += torch.where(hit, (bf * a_src[index].float()).sum(dim=1), 0.0)  # b_i · a_{t_i}
        masks.append(key_mask)
        lse_a = torch.logaddexp(lse_a, ops.lse(a, b_src, scale, key_mask))
        lse_b = torch.logaddexp(lse_b, ops.lse(b, a_src, scale, key_mask))
        wait_all(works)
        block, mask = incoming, incoming_mask
    if targets is None:
        pos_a = pos_b = (af * bf).sum(dim=1)
    per_row = lse_a + lse_b - scale * (pos_a + pos_b)
    if valid is None:
        row_weight = torch.full((n_local,), 0.5 / max(n_local, 1), dtype=torch.float32, device=a.device)
    else:
        n_global = torch.stack(counts).sum().clamp(min=1).to(torch.float32)
        row_weight = valid.to(torch.float32) * (0.5 * ring.world / n_global)
        per_row = torch.where(valid, per_row, 0.0)  # an invalid row's lse may be −inf
    loss = (row_weight * per_row).sum()
    return loss, lse_a, lse_b, row_weight, masks


def ring_backward(grad, a, b, scale, lse_a, lse_b, row_weight, masks, ring, ops, targets=None):
    """Returns (da, db fp32 (b, d): Σ over ranks' losses; ds 0-dim fp32: of this rank's loss).

    ``row_weight`` and ``masks`` are what ``ring_forward`` returned (the blocks come by in the same order);
    ``targets`` what it was given.
    """
    n_local = a.shape[0]
    grad = grad.float()
    w = row_weight * grad
    da = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
    db = torch.zeros_like(da)
    ds = torch.zeros((), dtype=torch.float32, device=a.device)
    block = torch.cat([a, b])
    af, bf = a.float(), b.float()
    pending_send, sent = None, None  # keep the sent accumulator alive until its send completes
    for step in range(ring.world):
        acc_in, acc_work = (
            ring.recv_grads(torch.empty(block.shape, dtype=torch.float32, device=a.device))
            if step > 0
            else (None, None)
        )
        (incoming, _), works = ring.shift_features(block) if step < ring.world - 1 else ((None, None), None)
        a_src, b_src = block[:n_local], block[n_local:]
        dq_a, dk_b, ds_a = ops.backward(a, b_src, scale, lse_a, w, masks[step])  # rows a_r vs keys b_src
        dq_b, dk_a, ds_b = ops.backward(b, a_src, scale, lse_b, w, masks[step])  # rows b_r vs keys a_src
        da += dq_a
        db += dq_b
        ds = ds + ds_a + ds_b
        if targets is not None:  # retargeted positives in this block: −w_i·s·a_i·b_{t_i} − w_i·s·b_i·a_{t_i}
            hit, index = _positives_in_block(targets, ring.source(step), n_local)
            w_hit = torch.where(hit, w, 0.0)[:, None]  # (b, 1)
            b_pos, a_pos = b_src[index].float(), a_src[index].float()  # (b, d): each row's positive keys
            da -= w_hit * scale * b_pos
            db -= w_hit * scale * a_pos
            ds = ds - (w_hit * (af * b_pos + bf * a_pos)).sum()
            dk_b.index_add_(0, index, -w_hit * scale * af)
            dk_a.index_add_(0, index, -w_hit * scale * bf)
        acc = torch.cat([dk_a, dk_b])  # gradient of block src's (a, b) rows from this rank's loss
        if acc_work is not None:
            acc_work.wait()
            acc += acc_in
        if ring.world > 1:
            wait_all([pending_send] if pending_send is not None else None)
            pending_send, sent = ring.send_grads(acc), acc
        else:
            own = acc
        wait_all(works)
        block = incoming
    if ring.world > 1:
        own, work = ring.recv_grads(acc)
        work.wait()
        pending_send.wait()
        del sent
    if targets is not None:  # the positives were taken block by block
        return da + own[:n_local], db + own[n_local:], ds
    # Positive logits s·a_i·b_i, in both directions: the loss holds −2·w_i·s·a_i·b_i, so
    # d/da_i = −2·w_i·s·b_i (w_i = 0.5/b unmasked), and symmetrically.
    coef = (2 * w)[:, None]
    da += own[:n_local] - coef * scale * bf
    db += own[n_local:] - coef * scale * af
    ds = ds - (coef * af * bf).sum()
    return da, db, ds


class RingInfoNCEFunction(torch.autograd.Function):
    """Autograd wrapper around ``ring_forward`` / ``ring_backward``; saves only (b, d) and (b,) tensors
    (and, with retargeted rows, the (W·b,) key mask)."""

    @staticmethod
    def forward(ctx, a, b, logit_scale, valid, ring, ops, targets=None, key_valid=None):
        scale = logit_scale.detach().reshape(()).float()
        loss, lse_a, lse_b, row_weight, masks = ring_forward(a, b, scale, ring, ops, valid, targets, key_valid)
        ctx.save_for_backward(a, b, logit_scale, lse_a, lse_b, row_weight)
        ctx.masks = masks  # W bool (b,) tensors or Nones: no autograd history
        ctx.ring, ctx.ops, ctx.targets = ring, ops, targets
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        refuse_double_backward("ring infonce")
        a, b, logit_scale, lse_a, lse_b, row_weight = ctx.saved_tensors
        scale = logit_scale.detach().reshape(()).float()
        da, db, ds = ring_backward(
            grad_output, a, b, scale, lse_a, lse_b, row_weight, ctx.masks, ctx.ring, ctx.ops, ctx.targets
        )
        ds = ds.reshape(logit_scale.shape).to(logit_scale.dtype)
        return da.to(a.dtype), db.to(b.dtype), ds, None, None, None, None, None


def ring_symmetric_infonce(a, b, logit_scale, *, group=None, backend="auto", valid=None, targets=None, key_valid=None):
    """Symmetric InfoNCE with negatives from every rank, features passed around a ring.

    Every rank of ``group`` must call it (and its backward) with the same b_local and d.

    Args:
        a, b: (b_local, d) this rank's rows of the two modalities, row i of a pairs with row i of b;
            fp32 / fp16 / bf16 (same dtype), already normalised if the model wants that.
        logit_scale: the multiplier s (already exponentiated), shape [] or [1]; gets a gradient.
        group: process group (default: the world; no process group initialised: a world of one).
        backend: "torch" (chunked matmuls), "triton" (``kernels.infonce_blocks`` block kernels) or "auto"
            (triton on CUDA, torch otherwise).
        valid: optional (b_local,) bool presence mask; an invalid pair is neither a query nor a key on
            any rank (``gathered_symmetric_infonce``'s ``valid_local``). Every rank passes one or none.
        targets: optional (b_local,) int64: the global row (rank-major) of each local row's positive key,
            −1 for a row that is no query (retargeted rows, module docstring). Every rank passes one or none.
        key_valid: optional (world · b_local,) bool, with ``targets`` only: which global rows are keys
            (the same tensor on every rank); without it every row is a key. With ``targets``, ``valid``
            masks queries only.
    Returns:
        0-dim fp32 loss L_r = 0.5·(infonce(a, B_global, r·b + arange(b)) + infonce(b, A_global, same))
        (with ``targets``: those targets, and only the ``key_valid`` rows as keys);
        with ``valid``, (W·N_r/N)·0.5·(the two masked means), so that mean_r L_r is the mean over the N
        valid global rows (0 when none is valid).
        Gradients reaching a and b are d(Σ_r L_r)/d(local rows) = world · d(global loss)/d(local rows).
    Shapes:
        Memory per rank: O(b_local · d); no (b_local, world · b_local) tensor with backend "triton".
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must both be (b_local, d); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype; got {a.dtype} and {b.dtype}")
    if valid is not None and (valid.shape != a.shape[:1] or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a bool tensor of shape ({a.shape[0]},)")
    ring = Ring(group)
    if targets is not None:
        if targets.shape != a.shape[:1] or targets.dtype != torch.int64:
            raise ValueError(f"targets must be an int64 tensor of shape ({a.shape[0]},)")
        query = targets >= 0
        valid = query if valid is None else valid & query
        if key_valid is not None and (key_valid.shape != (ring.world * a.shape[0],) or key_valid.dtype != torch.bool):
            raise ValueError(f"key_valid must be a bool tensor of shape ({ring.world * a.shape[0]},)")
    elif key_valid is not None:
        raise ValueError("key_valid masks the keys of retargeted rows: pass targets with it")
    ops = block_ops(backend, a.device)
    return RingInfoNCEFunction.apply(a.contiguous(), b.contiguous(), logit_scale, valid, ring, ops, targets, key_valid)
