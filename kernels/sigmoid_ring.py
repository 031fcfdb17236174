"""SigLIP sigmoid loss over negatives from every rank, by passing key blocks around a ring.

Rank r holds b local rows a_r, b_r. Its share is the all-gather strategy's (``kernels.sigmoid_distributed``)

    L_r = (W / N) · Σ_{i in rank r, valid} Σ_{j valid, any rank} -log σ(z_ij (s a_i·b_j + t))

but no rank ever holds more than its own key block and the one in flight: O(b·d) memory. The loss is
a plain sum over key blocks (no log-sum-exp to merge, unlike InfoNCE), so each step just adds the
block's chunked partial sum (``kernels.sigmoid_reference._sigmoid_forward``).

Forward: the key block b_src travels r → r+1 for W − 1 hops; rank r adds the contribution of its rows
against it. Row i's positive is global key r·b + i, met at step 0 (its own block).

Backward: the blocks go around once more, each with an fp32 accumulator of its own gradient. Rank r
recomputes the chunk logits against the block (``_sigmoid_backward``), keeps its queries' gradient and
adds the block's to the accumulator, then passes both on; after W hops the accumulator is back with
the owner, holding Σ_r' dL_r'/db_r = W · dL/db_r, as the all-gather strategy's gradient. ``a_r`` is
touched by L_r only: its gradient is dL_r/da_r = W · dL/da_r; ds, dt are those of L_r (replicated
parameters, averaged by data parallelism).

Masking (``valid``): an invalid pair is neither a query nor a key anywhere. The (b,) masks are gathered
once up front (W·b bytes; also gives N without a host sync); each block is masked by its owner's slice.
Messages are sent and waited one hop at a time (no compute/communication overlap yet).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.gather import gather_no_grad, world_and_rank
from kernels.infonce_reference import refuse_double_backward
from kernels.sigmoid_reference import _compute_dtype, _sigmoid_backward, _sigmoid_forward

__all__ = ["ring_sigmoid_loss"]

_FEATURE_TAG, _GRAD_TAG = 21, 22
_CHUNK = 4096  # key columns per chunk within a block


class _Ring:
    """Rank bookkeeping and one hop of the ring: send to rank + 1, receive from rank − 1."""

    def __init__(self, group):
        self.group = group
        self.world, self.rank = world_and_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world) if group else (self.rank + 1) % self.world
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world) if group else (self.rank - 1) % self.world

    def source(self, step: int) -> int:
        """Group rank of the owner of the block held at ``step``."""
        return (self.rank - step) % self.world

    def shift(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Sends each tensor to the next rank and returns the previous rank's (same shapes, dtypes)."""
        incoming = [torch.empty_like(x) for x in tensors]
        ops = []
        for tag, (out, into) in enumerate(zip(tensors, incoming)):
            ops.append(dist.P2POp(dist.isend, out.contiguous(), self.next, self.group, _FEATURE_TAG + 2 * tag))
            ops.append(dist.P2POp(dist.irecv, into, self.prev, self.group, _FEATURE_TAG + 2 * tag))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return incoming


def _block_args(ring: _Ring, step: int, rows: int, targets: torch.Tensor, key_valid):
    """This step's block-local targets (out of range: no positive in the block) and key mask."""
    src = ring.source(step)
    kv = None if key_valid is None else key_valid[src * rows : (src + 1) * rows]
    return targets - src * rows, kv


class RingSigmoidLossFunction(torch.autograd.Function):
    """Ring forward / backward of one rank's share; the blocks and accumulators travel in here."""

    @staticmethod
    def forward(ctx, a, b, logit_scale, bias, key_valid, weight, ring):
        rows = a.shape[0]
        ct = _compute_dtype(a.dtype)
        targets = ring.rank * rows + torch.arange(rows, device=a.device)  # (b,) global positive keys
        with torch.autocast(a.device.type, enabled=False):
            af, block = a.to(ct), b
            loss = torch.zeros((), dtype=ct, device=a.device)
            for step in range(ring.world):
                t_blk, kv = _block_args(ring, step, rows, targets, key_valid)
                loss = loss + _sigmoid_forward(af, block, logit_scale, bias, t_blk, kv, weight, _CHUNK)
                if step < ring.world - 1:
                    (block,) = ring.shift(block)
        ctx.save_for_backward(a, b, logit_scale, bias, key_valid, weight, targets)
        ctx.ring = ring
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        refuse_double_backward("ring sigmoid_loss")
        a, b, logit_scale, bias, key_valid, weight, targets = ctx.saved_tensors
        ring, rows = ctx.ring, a.shape[0]
        ct = _compute_dtype(a.dtype)
        needs = (True, True, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        with torch.autocast(a.device.type, enabled=False):
            af = a.to(ct)
            da = torch.zeros(a.shape, dtype=ct, device=a.device)
            acc = torch.zeros(b.shape, dtype=ct, device=b.device)  # travels with its block
            ds = torch.zeros(logit_scale.shape, dtype=ct, device=a.device)
            dt = torch.zeros(bias.shape, dtype=ct, device=a.device)
            block = b
            for step in range(ring.world):
                t_blk, kv = _block_args(ring, step, rows, targets, key_valid)
                s_c, t_c = logit_scale.to(ct), bias.to(ct)  # fp32 grads of s, t: summed over blocks
                g_a, g_b, g_s, g_t = _sigmoid_backward(
                    grad_output, af, block.to(ct), s_c, t_c, t_blk, kv, weight, _CHUNK, needs
                )
                da += g_a
                acc += g_b
                ds = ds + g_s if g_s is not None else ds
                dt = dt + g_t if g_t is not None else dt
                if step < ring.world - 1:
                    block, acc = ring.shift(block, acc)
                else:
                    (acc,) = ring.shift(acc)  # the last hop brings each accumulator home
        return (
            da.to(a.dtype),
            acc.to(b.dtype),
            ds.to(logit_scale.dtype) if needs[2] else None,
            dt.to(bias.dtype) if needs[3] else None,
            None,
            None,
            None,
        )


def ring_sigmoid_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    group=None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's share ``L_r`` of the SigLIP loss over the global batch, keys passed around a ring.

    Same loss and gradients as :func:`kernels.sigmoid_distributed.gathered_sigmoid_loss` with
    ``strategy="allgather"`` (module docstring); torch compute only. A collective: every rank calls it
    with the same number of rows (checked by the caller).

    Args:
        a, b: this rank's paired rows (queries, keys). logit_scale, bias: ``s`` and ``t`` (tensors of
            shape ``[]`` or ``[1]``). group: process group (default: the world).
        valid: optional mask of usable local pairs.

    Shapes:
        a, b ``(b, d)``; valid ``(b,)`` bool.

    Returns:
        Scalar ``L_r`` in fp32 (fp64 for fp64 inputs).
    """
    ring = _Ring(group)
    ct = _compute_dtype(a.dtype)
    if valid is None:
        key_valid = None
        weight = torch.full((a.shape[0],), 1.0 / max(a.shape[0], 1), dtype=ct, device=a.device)  # W / (W·b)
    else:
        key_valid = gather_no_grad(valid.to(torch.uint8), group).bool()  # (W·b,)
        weight = valid.to(ct) * (ring.world / key_valid.sum().clamp(min=1).to(ct))
    return RingSigmoidLossFunction.apply(a, b, logit_scale, bias, key_valid, weight, ring)
