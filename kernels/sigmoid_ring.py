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
False negatives (``groups``): the group ids are gathered with the masks, in the same one collective
(no gradient); each block's key columns take its owner's slice, and same-group pairs other than a
row's positive are excluded, or positives with ``groups_as="positive"`` (``kernels.sigmoid_reference``).

Messages: :class:`kernels.ring.Ring` (the InfoNCE ring's), block features and gradient accumulators
under their own tags. The next block is already in flight while this one is computed on (forward
and backward); in the backward its accumulator follows once this step's contribution is added.
"""

from __future__ import annotations

import torch

from kernels.gather import gather_no_grad
from kernels.infonce_reference import refuse_double_backward
from kernels.ring import Ring, wait_all
from kernels.sigmoid_reference import _compute_dtype, _sigmoid_backward, _sigmoid_forward, check_groups_as

__all__ = ["gather_pair_info", "ring_sigmoid_loss"]

_CHUNK = 4096  # key columns per chunk within a block


def gather_pair_info(valid, groups, group) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every rank's pair mask and group ids in ONE no-grad collective: ``(key_valid (W·b,) bool or
    None, key_groups (W·b,) int64 or None)``; ``valid`` (b,) bool / ``groups`` (b,) int64 or None."""
    if valid is None and groups is None:
        return None, None
    if groups is None:
        return gather_no_grad(valid.to(torch.uint8), group).bool(), None
    cols = [groups.to(torch.int64)] + ([] if valid is None else [valid.to(torch.int64)])
    gathered = gather_no_grad(torch.stack(cols, dim=1), group)  # (W·b, 1 or 2)
    return (None if valid is None else gathered[:, 1].bool()), gathered[:, 0].contiguous()


def _block_args(ring: Ring, step: int, rows: int, targets: torch.Tensor, key_valid, key_groups):
    """This step's block-local targets (out of range: no positive in the block), key mask, key groups."""
    src = ring.source(step)
    owned = slice(src * rows, (src + 1) * rows)
    kv = None if key_valid is None else key_valid[owned]
    kg = None if key_groups is None else key_groups[owned]
    return targets - src * rows, kv, kg


class RingSigmoidLossFunction(torch.autograd.Function):
    """Ring forward / backward of one rank's share; the blocks and accumulators travel in here."""

    @staticmethod
    def forward(ctx, a, b, logit_scale, bias, key_valid, weight, ring, groups=None, key_groups=None, positive=False):
        rows = a.shape[0]
        ct = _compute_dtype(a.dtype)
        targets = ring.rank * rows + torch.arange(rows, device=a.device)  # (b,) global positive keys
        with torch.autocast(a.device.type, enabled=False):
            af, block = a.to(ct), b
            loss = torch.zeros((), dtype=ct, device=a.device)
            for step in range(ring.world):
                # the next block travels while this one is reduced
                (incoming, _), works = ring.shift_features(block) if step < ring.world - 1 else ((None, None), None)
                t_blk, kv, kg = _block_args(ring, step, rows, targets, key_valid, key_groups)
                loss = loss + _sigmoid_forward(
                    af, block, logit_scale, bias, t_blk, kv, weight, _CHUNK, groups, kg, positive
                )
                wait_all(works)
                block = incoming
        ctx.save_for_backward(a, b, logit_scale, bias, key_valid, weight, targets, groups, key_groups)
        ctx.ring = ring
        ctx.positive = positive
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        refuse_double_backward("ring sigmoid_loss")
        a, b, logit_scale, bias, key_valid, weight, targets, groups, key_groups = ctx.saved_tensors
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
                (incoming, _), works = ring.shift_features(block) if step < ring.world - 1 else ((None, None), None)
                t_blk, kv, kg = _block_args(ring, step, rows, targets, key_valid, key_groups)
                s_c, t_c = logit_scale.to(ct), bias.to(ct)  # fp32 grads of s, t: summed over blocks
                g_a, g_b, g_s, g_t = _sigmoid_backward(
                    grad_output, af, block.to(ct), s_c, t_c, t_blk, kv, weight, _CHUNK, needs, groups, kg, ctx.positive
                )
                da += g_a
                acc += g_b
                ds = ds + g_s if g_s is not None else ds
                dt = dt + g_t if g_t is not None else dt
                # the accumulator follows its block (the last hop brings each one home)
                acc_in, recv = ring.recv_grads(acc)
                sent = ring.send_grads(acc)
                wait_all([*(works or ()), recv, sent])
                block, acc = incoming, acc_in
        return (
            da.to(a.dtype),
            acc.to(b.dtype),
            ds.to(logit_scale.dtype) if needs[2] else None,
            dt.to(bias.dtype) if needs[3] else None,
            None,
            None,
            None,
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
    groups: torch.Tensor | None = None,
    groups_as: str = "exclude",
) -> torch.Tensor:
    """This rank's share ``L_r`` of the SigLIP loss over the global batch, keys passed around a ring.

    Same loss and gradients as :func:`kernels.sigmoid_distributed.gathered_sigmoid_loss` with
    ``strategy="allgather"`` (module docstring); torch compute only. A collective: every rank calls it
    with the same number of rows (checked by the caller).

    Args:
        a, b: this rank's paired rows (queries, keys). logit_scale, bias: ``s`` and ``t`` (tensors of
            shape ``[]`` or ``[1]``). group: process group (default: the world).
        valid: optional mask of usable local pairs.
        groups: optional false-negative group ids of the local pairs (gathered here, no gradient).
        groups_as: same-group pairs are ``"exclude"``-d (default) or ``"positive"`` (``z = +1``).

    Shapes:
        a, b ``(b, d)``; valid ``(b,)`` bool; groups ``(b,)`` int64.

    Returns:
        Scalar ``L_r`` in fp32 (fp64 for fp64 inputs).
    """
    positive = check_groups_as(groups_as)
    ring = Ring(group)
    ct = _compute_dtype(a.dtype)
    key_valid, key_groups = gather_pair_info(valid, groups, group)  # (W·b,) each, or None
    if valid is None:
        weight = torch.full((a.shape[0],), 1.0 / max(a.shape[0], 1), dtype=ct, device=a.device)  # W / (W·b)
    else:
        weight = valid.to(ct) * (ring.world / key_valid.sum().clamp(min=1).to(ct))
    groups = None if groups is None else groups.to(torch.int64)
    return RingSigmoidLossFunction.apply(
        a, b.contiguous(), logit_scale, bias, key_valid, weight, ring, groups, key_groups, positive
    )
