"""Symmetric InfoNCE with false negatives deduplicated: rows of one group are one class.

The group ids come from the collate side (``pretrain.losses.false_negatives.group_ids``; ``NO_GROUP``:
a row in no group); this module is the loss on them, a distributed op like ``kernels.distributed``.

Semantics chosen: **deduplication, "a group is one class"**
----------------------------------------------------------
Rows are grouped by a hash of their canonical function text (or of their sorted GO-id set). In
every direction of the symmetric loss, the keys are *one representative per group*, the first
valid row of the group in global (rank-major) order, and every query's positive is its group's
representative::

    loss_i = logsumexp_{j in R}(s · q_i·k_j) - s · q_i·k_{rep(i)}      R = {valid representatives}

mean over valid query rows, symmetric over the two directions. Consequences:

- a batch without duplicate groups gives exactly the plain symmetric InfoNCE;
- no two rows of one group ever face each other as negatives (the brief's requirement);
- each annotation class appears once among the negatives, however many proteins share it (plain
  CLIP would weigh a class of k duplicates k times in every other row's denominator);
- non-representative members still train as queries in both directions, but are not keys: in
  ``seq -> text`` a member's positive is the representative's text (same annotation, possibly
  another rewrite), in ``text -> seq`` its text is pulled toward the representative's sequence.

Why this and not "exclude the query's own group from its log-sum-exp, keep its own positive"
(false-negative elimination): that needs a per-(row, column) mask, which ``kernels.infonce`` cannot
express (it has per-row ``targets`` and a per-column ``key_valid`` only). Deduplication is exactly
a column mask plus retargeted rows, so it runs on the fused kernel (Triton on GPU) and never
allocates a B × B tensor; the representative search is a stable sort, no host sync. Exact FNE would
need a kernel extension (per-row and per-column group ids, masking ``j`` for row ``i`` when
``gid_j == gid_i`` and ``j != t_i``); that is a follow-up.

Distributed: group ids and validity are gathered (no gradient) so every rank sees the same
representatives; keys come from ``kernels.gather_with_grad`` (``strategy="allgather"``), or travel
rank to rank (``"ring"``, ``kernels.ring``: each block's key columns masked by its slice of the key
mask, a row's positive taken when its representative's block comes by). The local mean is rescaled by
``W · N_r / N`` with ``N`` the valid *query* rows (not keys), so ``mean_r L_r`` is the global loss
and DeepSpeed's gradient averaging gives the single-process gradient, as in
``kernels.distributed``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import ring  # the module: ring_symmetric_infonce is looked up when the loss runs
from kernels.functional import infonce
from kernels.gather import check_equal_rows, gather_no_grad, gather_with_grad, world_and_rank

__all__ = ["NO_GROUP", "grouped_symmetric_infonce", "grouped_symmetric_infonce_reference", "representatives"]

NO_GROUP = -1  # group id of a row that shares its class with nobody (no text, empty GO set)


# ----------------------------------------------------------------------------- representatives


def representatives(groups: Tensor, valid: Tensor) -> Tensor:
    """Index of each valid row's group representative: the smallest valid index in its group.

    Invalid rows and ``NO_GROUP`` rows form singleton groups (an invalid row is never a
    representative of anybody). Computed with one stable sort: O(N log N), no N × N tensor, no
    host synchronisation.

    Shapes:
        groups (N,) int64, valid (N,) bool -> (N,) int64, -1 on invalid rows.
    """
    n = groups.shape[0]
    index = torch.arange(n, device=groups.device)
    # Singletons get unique negative ids (hashes are >= 0, so they cannot collide).
    gid = torch.where(valid & (groups != NO_GROUP), groups, -(index + 1))
    sorted_gid, order = torch.sort(gid, stable=True)  # equal ids keep index order
    starts = torch.ones(n, dtype=torch.bool, device=groups.device)
    starts[1:] = sorted_gid[1:] != sorted_gid[:-1]
    run_start = torch.where(starts, index, torch.zeros_like(index)).cummax(0).values  # (N,) in sorted order
    rep = torch.empty_like(index).scatter_(0, order, order[run_start])
    return torch.where(valid, rep, torch.full_like(rep, -1))


# ----------------------------------------------------------------------------- losses


def grouped_symmetric_infonce(
    a_local: Tensor,
    b_local: Tensor,
    logit_scale: Tensor,
    groups_local: Tensor,
    *,
    valid_local: Tensor | None = None,
    group=None,
    backend: str = "auto",
    strategy: str = "allgather",
    check_rows: bool = True,
) -> Tensor:
    """This rank's share of the symmetric InfoNCE with same-group rows deduplicated (module doc).

    Drop-in for ``kernels.gathered_symmetric_infonce``: ``mean_r L_r`` is the single-process loss on
    the global batch and gradients follow the same ``W ×`` rule; without torch.distributed (or world
    size 1) it is the single-process loss itself.

    Args:
        a_local, b_local: paired unit-norm embeddings of this rank (row i pairs with row i).
        logit_scale: the multiplier ``s``, shape ``[]`` or ``[1]``.
        groups_local: group ids from ``pretrain.losses.false_negatives.group_ids`` (``NO_GROUP``: singleton).
        valid_local: optional mask of usable pairs (both modalities present).
        group: process group (default: the world).
        backend: ``kernels.infonce`` backend.
        strategy: ``"allgather"`` (gather every rank's keys with gradient) or ``"ring"`` (pass key
            blocks around, ``kernels.ring``: O(b·d) feature memory; only the group ids and masks,
            O(W·b) numbers, are gathered).
        check_rows: run ``kernels.check_equal_rows`` first (a tiny collective and a host sync);
            ``False`` when the caller already checked this step's batch on every rank.

    Shapes:
        a_local, b_local (b, d); groups_local (b,) int64; valid_local (b,) bool; b equal on all ranks.

    Returns:
        Scalar ``L_r``.
    """
    if a_local.shape != b_local.shape:
        raise ValueError(
            f"paired embeddings must have equal shapes; got {tuple(a_local.shape)}, {tuple(b_local.shape)}"
        )
    rows = a_local.shape[0]
    if groups_local.shape != (rows,):
        raise ValueError(f"groups_local must have shape ({rows},), got {tuple(groups_local.shape)}")
    if valid_local is None:
        valid_local = torch.ones(rows, dtype=torch.bool, device=a_local.device)
    world, rank = world_and_rank(group)
    if check_rows:  # ragged batches would mis-slice the gathered keys: fail clearly instead
        check_equal_rows(rows, a_local.device, group)
    if strategy not in ("allgather", "ring"):
        raise ValueError(f"strategy must be 'allgather' or 'ring'; got {strategy!r}")
    groups_all = gather_no_grad(groups_local.to(device=a_local.device, dtype=torch.int64), group)
    valid_all = gather_no_grad(valid_local.to(device=a_local.device, dtype=torch.uint8), group).bool()
    rep = representatives(groups_all, valid_all)  # (W·b,)
    key_valid = valid_all & (rep == torch.arange(rep.shape[0], device=rep.device))
    targets = rep[rank * rows : (rank + 1) * rows]  # -1 on invalid rows
    if strategy == "ring":  # the ring's L_r has the same W·N_r/N scaling (N: valid query rows)
        return ring.ring_symmetric_infonce(
            a_local, b_local, logit_scale, group=group, backend=backend, targets=targets, key_valid=key_valid
        )
    a_all = gather_with_grad(a_local, group)  # (W·b, d)
    b_all = gather_with_grad(b_local, group)
    loss = 0.5 * (
        infonce(a_local, b_all, logit_scale, targets, key_valid=key_valid, backend=backend)
        + infonce(b_local, a_all, logit_scale, targets, key_valid=key_valid, backend=backend)
    )
    if world == 1:
        return loss
    n_local = valid_local.sum().to(loss.dtype)
    n_global = valid_all.sum().clamp(min=1).to(loss.dtype)
    return loss * (world * n_local / n_global)


def grouped_symmetric_infonce_reference(
    a: Tensor, b: Tensor, logit_scale: Tensor, groups: Tensor, valid: Tensor | None = None
) -> Tensor:
    """Test oracle: the same loss on one process with an explicit N × N mask (do not train with it).

    Built independently of :func:`representatives`: same-group pairs from an N × N comparison, a
    column is a representative when no earlier valid row shares its group, and
    ``mask[i, j] = is_representative[j]`` is applied to materialised logits.

    Shapes:
        a, b (N, d); groups (N,) int64; valid (N,) bool -> scalar.
    """
    n = a.shape[0]
    valid = torch.ones(n, dtype=torch.bool, device=a.device) if valid is None else valid
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    grouped = (groups != NO_GROUP) & valid
    same = (groups[:, None] == groups[None, :]) & grouped[:, None] & grouped[None, :] | eye  # (N, N)
    earlier = torch.arange(n, device=a.device)[:, None] < torch.arange(n, device=a.device)[None, :]
    is_rep = valid & ~(same & earlier & valid[:, None]).any(0)  # (N,)
    target = (same & is_rep[None, :]).to(torch.int64).argmax(1)  # (N,) column of each row's class
    s = logit_scale.reshape(())

    def direction(q: Tensor, k: Tensor) -> Tensor:
        logits = s * q @ k.T  # (N, N)
        masked = logits.masked_fill(~is_rep[None, :], float("-inf"))
        per_row = torch.logsumexp(masked, dim=1) - logits.gather(1, target[:, None]).squeeze(1)
        return torch.where(valid, per_row, torch.zeros_like(per_row)).sum() / valid.sum().clamp(min=1)

    return 0.5 * (direction(a, b) + direction(b, a))
