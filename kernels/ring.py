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

Order of point-to-point messages on each link r → r+1 (identical on both ends, as NCCL requires):
features(0), grads(0), features(1), grads(1), …; gloo additionally gets distinct tags.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["ring_symmetric_infonce"]

_FEATURE_TAG, _GRAD_TAG = 11, 12
_TORCH_CHUNK_ELEMS = 1 << 24  # rows per torch chunk = this / n: a (chunk, n) fp32 tile is <= 64 MiB


class _BlockOps(NamedTuple):
    """lse(q, k, s) -> (m,) fp32; backward(q, k, s, lse, w) -> (dq fp32, dk fp32, ds 0-dim fp32)."""

    lse: object
    backward: object


def _torch_block_lse(q, k, s):
    kf = k.float()
    chunk = max(1, _TORCH_CHUNK_ELEMS // max(k.shape[0], 1))
    return torch.cat([torch.logsumexp(s * (qc.float() @ kf.T), dim=1) for qc in q.split(chunk)])


def _torch_block_backward(q, k, s, lse, w):
    kf = k.float()
    chunk = max(1, _TORCH_CHUNK_ELEMS // max(k.shape[0], 1))
    dq, dk, ds = [], torch.zeros_like(kf), torch.zeros((), dtype=torch.float32, device=q.device)
    for qc, lc, wc in zip(q.float().split(chunk), lse.split(chunk), w.split(chunk)):
        dots = qc @ kf.T  # (chunk, n)
        g = torch.exp(s * dots - lc[:, None]) * wc[:, None]  # dL/dz
        ds = ds + (g * dots).sum()
        dq.append(s * (g @ kf))
        dk.addmm_(g.T, qc, alpha=s)
    return torch.cat(dq), dk, ds


def _triton_ops(deterministic):
    from kernels.infonce_triton import infonce_block_backward, infonce_block_lse

    def lse(q, k, s):
        return infonce_block_lse(q, k, s)[0]

    def backward(q, k, s, lse_rows, w):
        return infonce_block_backward(q, k, s, lse_rows, w, deterministic=deterministic)

    return _BlockOps(lse, backward)


def _block_ops(backend, device, deterministic):
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return _BlockOps(_torch_block_lse, _torch_block_backward)
    if backend == "triton":
        return _triton_ops(deterministic)
    raise ValueError(f"backend must be 'auto', 'torch' or 'triton'; got {backend!r}")


class _Ring:
    """Rank bookkeeping and the two kinds of messages; a world of one never communicates."""

    def __init__(self, group):
        self.group = group
        on = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if on else 1
        self.rank = dist.get_rank(group) if on else 0
        self.next, self.prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world

    def source(self, step):
        """Owner of the block this rank holds at ``step``."""
        return (self.rank - step) % self.world

    def shift_features(self, block):
        """Start sending ``block`` to the next rank and receiving the previous rank's; (buffer, works)."""
        incoming = torch.empty_like(block)
        ops = [
            dist.P2POp(dist.isend, block, group=self.group, tag=_FEATURE_TAG, group_peer=self.next),
            dist.P2POp(dist.irecv, incoming, group=self.group, tag=_FEATURE_TAG, group_peer=self.prev),
        ]
        return incoming, dist.batch_isend_irecv(ops)

    def send_grads(self, acc):
        return dist.isend(acc, group=self.group, tag=_GRAD_TAG, group_dst=self.next)

    def recv_grads(self, like):
        buf = torch.empty_like(like)
        return buf, dist.irecv(buf, group=self.group, tag=_GRAD_TAG, group_src=self.prev)


def _wait(works):
    for work in works or ():
        work.wait()


def ring_forward(a, b, scale, ring, ops):
    """Returns (loss 0-dim fp32, lse_a (b,), lse_b (b,)): LSE of local rows against every rank's block."""
    n_local = a.shape[0]
    lse_a = torch.full((n_local,), float("-inf"), dtype=torch.float32, device=a.device)
    lse_b = torch.full_like(lse_a, float("-inf"))
    block = torch.cat([a, b])  # (2b, d): what travels, in the input dtype
    for step in range(ring.world):
        incoming, works = ring.shift_features(block) if step < ring.world - 1 else (None, None)
        a_src, b_src = block[:n_local], block[n_local:]
        lse_a = torch.logaddexp(lse_a, ops.lse(a, b_src, scale))
        lse_b = torch.logaddexp(lse_b, ops.lse(b, a_src, scale))
        _wait(works)
        block = incoming
    pos = scale * (a.float() * b.float()).sum(dim=1)
    loss = 0.5 * ((lse_a - pos).mean() + (lse_b - pos).mean())
    return loss, lse_a, lse_b


def ring_backward(grad, a, b, scale, lse_a, lse_b, ring, ops):
    """Returns (da, db fp32 (b, d): Σ over ranks' losses; ds 0-dim fp32: of this rank's loss)."""
    n_local = a.shape[0]
    grad = grad.float()
    w = torch.full((n_local,), 0.5 / max(n_local, 1), dtype=torch.float32, device=a.device) * grad
    da = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
    db = torch.zeros_like(da)
    ds = torch.zeros((), dtype=torch.float32, device=a.device)
    block = torch.cat([a, b])
    pending_send, sent = None, None  # keep the sent accumulator alive until its send completes
    for step in range(ring.world):
        acc_in, acc_work = (
            ring.recv_grads(torch.empty(block.shape, dtype=torch.float32, device=a.device))
            if step > 0
            else (None, None)
        )
        incoming, works = ring.shift_features(block) if step < ring.world - 1 else (None, None)
        a_src, b_src = block[:n_local], block[n_local:]
        dq_a, dk_b, ds_a = ops.backward(a, b_src, scale, lse_a, w)  # rows a_r vs keys b_src
        dq_b, dk_a, ds_b = ops.backward(b, a_src, scale, lse_b, w)  # rows b_r vs keys a_src
        da += dq_a
        db += dq_b
        ds = ds + ds_a + ds_b
        acc = torch.cat([dk_a, dk_b])  # gradient of block src's (a, b) rows from this rank's loss
        if acc_work is not None:
            acc_work.wait()
            acc += acc_in
        if ring.world > 1:
            _wait([pending_send] if pending_send is not None else None)
            pending_send, sent = ring.send_grads(acc), acc
        else:
            own = acc
        _wait(works)
        block = incoming
    if ring.world > 1:
        own, work = ring.recv_grads(acc)
        work.wait()
        pending_send.wait()
        del sent
    # Positive logits s·a_i·b_i (both directions): d/da_i = −s·b_i·g/b, and symmetrically.
    coef = grad / max(n_local, 1)
    af, bf = a.float(), b.float()
    da += own[:n_local] - coef * scale * bf
    db += own[n_local:] - coef * scale * af
    ds = ds - coef * (af * bf).sum()
    return da, db, ds


class RingInfoNCEFunction(torch.autograd.Function):
    """Autograd wrapper around ``ring_forward`` / ``ring_backward``; saves only (b, d) and (b,) tensors."""

    @staticmethod
    def forward(ctx, a, b, logit_scale, ring, ops):
        scale = logit_scale.detach().reshape(()).float()
        loss, lse_a, lse_b = ring_forward(a, b, scale, ring, ops)
        ctx.save_for_backward(a, b, logit_scale, lse_a, lse_b)
        ctx.ring, ctx.ops = ring, ops
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        a, b, logit_scale, lse_a, lse_b = ctx.saved_tensors
        scale = logit_scale.detach().reshape(()).float()
        da, db, ds = ring_backward(grad_output, a, b, scale, lse_a, lse_b, ctx.ring, ctx.ops)
        return da.to(a.dtype), db.to(b.dtype), ds.reshape(logit_scale.shape).to(logit_scale.dtype), None, None


def ring_symmetric_infonce(a, b, logit_scale, *, group=None, backend="auto", deterministic=False):
    """Symmetric InfoNCE with negatives from every rank, features passed around a ring.

    Every rank of ``group`` must call it (and its backward) with the same b_local and d.

    Args:
        a, b: (b_local, d) this rank's rows of the two modalities, row i of a pairs with row i of b;
            fp32 / fp16 / bf16 (same dtype), already normalised if the model wants that.
        logit_scale: the multiplier s (already exponentiated), shape [] or [1]; gets a gradient.
        group: process group (default: the world; no process group initialised: a world of one).
        backend: "torch" (chunked matmuls), "triton" (``kernels.infonce_triton`` block kernels) or "auto"
            (triton on CUDA, torch otherwise).
        deterministic: with backend "triton", dk without atomics.
    Returns:
        0-dim fp32 loss L_r = 0.5·(infonce(a, B_global, r·b + arange(b)) + infonce(b, A_global, same)).
        Gradients reaching a and b are d(Σ_r L_r)/d(local rows) = world · d(global loss)/d(local rows).
    Shapes:
        Memory per rank: O(b_local · d); no (b_local, world · b_local) tensor with backend "triton".
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must both be (b_local, d); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype; got {a.dtype} and {b.dtype}")
    ops = _block_ops(backend, a.device, deterministic)
    return RingInfoNCEFunction.apply(a.contiguous(), b.contiguous(), logit_scale, _Ring(group), ops)
