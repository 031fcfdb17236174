"""SigLIP sigmoid loss over negatives from every data-parallel rank.

This module chooses the strategy: ``"allgather"`` runs here (keys gathered with gradient), ``"ring"`` in
``kernels.sigmoid_ring`` (key blocks passed rank to rank, O(b·d) memory); same loss and gradients.

Take ``W`` ranks, each holding ``b`` paired rows (``a_r``, ``b_r``); the global batch is their
concatenation ``A``, ``B`` (``W·b`` rows, rank order) and the single-process loss is

    L = sigmoid_loss(A, B, s, t)  = -(1/N) Σ_{i valid} Σ_{j valid} log σ(z_ij (s a_i·b_j + t))

with ``N`` the valid global rows. The sum runs over every (row, key) pair, so it splits by query rank:
rank ``r`` takes its own rows against every rank's keys, ``t_r = r·b + arange(b)``:

    L_r = (W · N_r / N) · sigmoid_loss(a_r, B, s, t, t_r)   (a local mean over its N_r valid rows)
        = (W / N) · Σ_{i in rank r} Σ_j (...)

hence ``mean_r L_r = L``. Only the keys are gathered: the pair (i, j) is counted once, on the rank of
query ``i`` (SigLIP's loss is symmetric by construction; no second direction is needed).

Gradients, as for InfoNCE (``kernels/distributed.py``): ``B`` comes from :func:`gather_with_grad`, whose
backward sums the gradient every rank sends to the gathered tensor, so the gradient reaching ``b_r`` is
``Σ_r' dL_r'/db_r = W · dL/db_r``, and ``a_r`` (touched only by ``L_r``) gets ``W · dL/da_r``. DeepSpeed's
data-parallel averaging then yields the single-process parameter gradient; ``logit_scale`` and
``bias`` are replicated, ``Σ_r dL_r/ds = W · dL/ds``, and averaging gives ``dL/ds`` (``dL/dt`` alike).

Masking (``valid_local``): an invalid pair is neither a query nor a key anywhere (the masks are
gathered, which also gives ``N`` without another collective or a host sync).

False negatives (``groups_local``): every rank's group ids are gathered (no gradient); a query's row
group is its own id, each key column's the gathered one, and a same-group pair other than the query's
own positive is excluded, or a positive with ``groups_as="positive"`` (``kernels.sigmoid_reference``).
``N`` (valid rows) is unchanged by grouping.

All ranks must hold the same number of rows (:func:`check_equal_rows`, on by default).
"""

from __future__ import annotations

import torch

from kernels.gather import check_equal_rows, check_paired_args, gather_with_grad, world_and_rank
from kernels.sigmoid import sigmoid_loss
from kernels.sigmoid_reference import check_groups_as
from kernels.sigmoid_ring import gather_pair_info, ring_sigmoid_loss

__all__ = ["gathered_sigmoid_loss", "rank_sigmoid_loss"]


def rank_sigmoid_loss(
    a: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    offset: int,
    world: int,
    key_valid: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    groups_as: str = "exclude",
    backend: str = "auto",
) -> torch.Tensor:
    """One rank's share ``L_r = (W · N_r / N) · sigmoid_loss(a, b_all, s, t, offset + arange(m))``.

    Args:
        a: this rank's queries. b_all: every rank's keys in rank order (``b_all[offset + i]`` pairs
            with ``a[i]``). logit_scale, bias: ``s`` and ``t``, shape ``[]`` or ``[1]``.
        offset: this rank's first global row. world: number of ranks.
        key_valid: optional gathered mask of usable pairs; a masked pair is neither a query nor a key.
        groups, key_groups: optional false-negative group ids of this rank's rows and of every rank's
            rows (gathered); same-group pairs other than a row's positive are excluded.
        groups_as: ``"exclude"`` (default) or ``"positive"``: those pairs are positives (``z = +1``).
        backend: as for :func:`kernels.sigmoid_loss`.

    Shapes:
        a ``(m, d)``; b_all ``(world · m, d)``; key_valid ``(world · m,)`` bool; groups ``(m,)`` and
        key_groups ``(world · m,)`` int64.

    Returns:
        Scalar ``L_r``; ``mean_r L_r`` is the single-process loss over the global batch.
    """
    m = a.shape[0]
    targets = offset + torch.arange(m, device=a.device)  # (m,) global column of each positive
    grouping = {"groups": groups, "key_groups": key_groups, "groups_as": groups_as}
    if key_valid is None:
        return sigmoid_loss(a, b_all, logit_scale, bias, targets, backend=backend, **grouping)
    live = key_valid[offset : offset + m]  # (m,) this rank's usable pairs
    targets = torch.where(live, targets, -1)
    loss = sigmoid_loss(a, b_all, logit_scale, bias, targets, key_valid=key_valid, backend=backend, **grouping)
    # The local mean is over N_r rows; rescale so that mean_r L_r is the mean over all N valid rows.
    n_local = live.sum().to(loss.dtype)
    n_global = key_valid.sum().clamp(min=1).to(loss.dtype)
    return loss * (world * n_local / n_global)


def gathered_sigmoid_loss(
    a_local: torch.Tensor,
    b_local: torch.Tensor,
    logit_scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    group=None,
    strategy: str = "allgather",
    backend: str = "auto",
    valid_local: torch.Tensor | None = None,
    groups_local: torch.Tensor | None = None,
    groups_as: str = "exclude",
    check_rows: bool = True,
) -> torch.Tensor:
    """This rank's share ``L_r`` of the SigLIP loss over the global (all-rank) batch.

    Local rows of ``a`` are the queries; every rank's rows of ``b`` are the keys. ``mean_r L_r`` is
    the single-process loss on the concatenated batch and ``L_r.backward()`` on every rank gives local
    embeddings ``world_size ×`` the single-process gradient (module docstring), which DeepSpeed's
    gradient averaging turns into the exact single-process parameter gradient.

    Args:
        a_local: this rank's embeddings of one modality; row ``i`` pairs with row ``i`` of ``b_local``.
        b_local: this rank's embeddings of the other modality.
        logit_scale: the multiplier ``s`` (already ``exp()``'d), shape ``[]`` or ``[1]``.
        bias: the learned bias ``t``, shape ``[]`` or ``[1]``.
        group: process group (default: the world).
        strategy: ``"allgather"`` (gather keys with :func:`gather_with_grad`) or ``"ring"``
            (:func:`kernels.sigmoid_ring.ring_sigmoid_loss`: torch compute, O(b·d) memory).
        backend: as for :func:`kernels.sigmoid_loss` (the ring computes with torch whatever it is).
        valid_local: optional mask of usable local pairs; invalid pairs are neither queries nor keys
            on any rank.
        groups_local: optional false-negative group ids of the local pairs
            (``pretrain.losses.false_negatives.group_ids``; ``kernels.grouped.NO_GROUP``: none); a pair
            of rows of one group (any ranks) is neither positive nor negative, except each row's own.
        groups_as: what such a pair is: ``"exclude"`` (default, above) or ``"positive"`` (``z = +1``,
            a multi-positive sigmoid loss).
        check_rows: run :func:`check_equal_rows` first (one tiny collective and a host sync).

    Shapes:
        a_local ``(b, d)``, b_local ``(b, d)``, valid_local ``(b,)`` bool, groups_local ``(b,)`` int64;
        ``b`` equal on all ranks.

    Returns:
        Scalar ``L_r``. Log ``mean_r L_r`` (an all-reduce AVG of the detached value) as the loss.
    """
    check_paired_args(strategy, a_local, b_local, valid_local)
    check_groups_as(groups_as)  # before any collective: a typo fails on every rank alike
    logit_scale, bias = (
        x if isinstance(x, torch.Tensor) else torch.tensor(float(x), device=a_local.device) for x in (logit_scale, bias)
    )
    world, rank = world_and_rank(group)
    rows = a_local.shape[0]
    if world > 1 and check_rows:
        check_equal_rows(rows, a_local.device, group)
    if groups_local is not None:
        if groups_local.shape != (rows,) or groups_local.dtype not in (torch.int64, torch.int32):
            got = f"{groups_local.dtype} {tuple(groups_local.shape)}"
            raise ValueError(f"groups_local must be an integer tensor of shape ({rows},); got {got}")
        groups_local = groups_local.to(device=a_local.device, dtype=torch.int64)
    if world > 1 and strategy == "ring":
        return ring_sigmoid_loss(
            a_local,
            b_local,
            logit_scale,
            bias,
            group=group,
            valid=valid_local,
            groups=groups_local,
            groups_as=groups_as,
        )
    b_all = gather_with_grad(b_local, group)  # (W·b, d); b_local itself on one rank
    key_valid, key_groups = gather_pair_info(valid_local, groups_local, group)  # (W·b,) each, or None
    return rank_sigmoid_loss(
        a_local,
        b_all,
        logit_scale,
        bias,
        offset=rank * rows,
        world=world,
        key_valid=key_valid,
        groups=groups_local,
        key_groups=key_groups,
        groups_as=groups_as,
        backend=backend,
    )
