"""Contrastive loss over negatives from every data-parallel rank.

This module chooses the strategy: ``"allgather"`` runs here (keys gathered with gradient), ``"ring"`` in
``kernels.ring`` (key blocks passed rank to rank); both stand on the collectives of ``kernels.gather``.

Why the gradients come out right
--------------------------------
Take ``W`` ranks, each holding ``b`` paired rows (``a_r``, ``b_r``); the global batch is their
concatenation ``A``, ``B`` (``W·b`` rows, rank order). The single-process loss is

    L = 0.5 · (infonce(A, B) + infonce(B, A))       (mean over the global rows)

Rank ``r`` computes only its own rows as queries, against every rank's rows as keys:

    L_r = 0.5 · (infonce(a_r, B, t_r) + infonce(b_r, A, t_r)),   t_r = r·b + arange(b)

Each term is a mean over ``b`` rows, so ``mean_r L_r = L`` (the row sum splits by rank), i.e.
``sum_r L_r = W · L``.

The keys ``A``, ``B`` come from :func:`gather_with_grad` (``kernels.gather``), whose backward *sums* the
gradient that every rank sends to the gathered tensor and hands each rank its own slice. So the gradient
reaching ``a_r`` is the direct term ``dL_r/da_r`` plus ``sum_r' dL_r'/dA[slice r]``, which is
``d(sum_r' L_r')/da_r = W · dL/da_r``. Replicated parameters then see, on rank ``r``, the gradient
of ``L_r`` with the encoder's local contribution scaled by ``W``; summed over ranks this is
``W · dL/dθ``, and DeepSpeed's data-parallel *averaging* (divide by ``W``) yields exactly ``dL/dθ``,
the single-process gradient. ``logit_scale`` is not gathered: ``sum_r dL_r/ds = W · dL/ds`` directly,
and averaging again gives ``dL/ds``. (Do not all-reduce the loss itself for backward; average it only
for logging.)

Masking (``valid_local``): invalid pairs are neither queries nor keys anywhere (key masks are
gathered). Then ``L`` is a mean over the ``N`` valid global rows while rank ``r`` holds ``N_r`` of
them, so the local mean is rescaled: ``L_r = (W · N_r / N) · (local masked mean)``, which keeps
``mean_r L_r = L`` and every statement above. ``N`` comes from the gathered mask: no extra
collective and no host sync.

``L_r`` itself is :func:`kernels.functional.rank_symmetric_infonce`: two unpaired losses and the
rescale on the torch backend; on Triton one fused function (both directions in one forward launch,
the rescale in its loss kernel).

All ranks must hold the same number of rows ``b``; ragged global batches are out of scope.
:func:`check_equal_rows` verifies it with one tiny collective and a host sync. The losses run it by
default; a caller with several terms per step (``pretrain.losses.align_pro``) checks once and passes
``check_rows=False`` to each term, so a step pays for one sync, not one per term.
"""

from __future__ import annotations

import torch

from kernels import ring  # the module: ring_symmetric_infonce is looked up when the loss runs
from kernels.functional import rank_symmetric_infonce, symmetric_infonce
from kernels.gather import check_equal_rows, check_paired_args, gather_no_grad, gather_with_grad, world_and_rank

__all__ = ["gathered_symmetric_infonce"]


def gathered_symmetric_infonce(
    a_local: torch.Tensor,
    b_local: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    group=None,
    strategy: str = "allgather",
    backend: str = "auto",
    valid_local: torch.Tensor | None = None,
    check_rows: bool = True,
) -> torch.Tensor:
    """This rank's share ``L_r`` of the symmetric InfoNCE over the global (all-rank) batch.

    Local rows are the queries; every rank's rows are the keys. ``mean_r L_r`` equals the
    single-process symmetric loss on the concatenated batch, and ``L_r.backward()`` on every rank
    gives local embeddings ``world_size ×`` the single-process gradient, which DeepSpeed's gradient
    averaging turns into the exact single-process parameter gradient (see the module docstring).

    Args:
        a_local: this rank's embeddings of one modality; row ``i`` pairs with row ``i`` of ``b_local``.
        b_local: this rank's embeddings of the other modality.
        logit_scale: the multiplier ``s`` (already ``exp()``'d), shape ``[]`` or ``[1]``.
        group: process group (default: the world).
        strategy: ``"allgather"`` (gather keys with :func:`gather_with_grad`) or ``"ring"``
            (``kernels.ring.ring_symmetric_infonce``: key blocks passed rank to rank, O(b·d) memory;
            same loss and gradients, masks included).
        backend: InfoNCE backend, as for :func:`kernels.infonce`.
        valid_local: optional mask of usable local pairs; invalid pairs are neither queries nor
            negatives on any rank.
        check_rows: run :func:`check_equal_rows` first (one tiny collective and a host sync). Pass
            ``False`` only when the caller has already checked this step's batch on every rank.

    Shapes:
        a_local ``(b, d)``, b_local ``(b, d)``, valid_local ``(b,)`` bool; ``b`` equal on all ranks.

    Returns:
        Scalar ``L_r``. Log ``mean_r L_r`` (an all-reduce AVG of the detached value) as the loss.
    """
    check_paired_args(strategy, a_local, b_local, valid_local)
    world, rank = world_and_rank(group)
    if world == 1:
        return symmetric_infonce(a_local, b_local, logit_scale, valid=valid_local, backend=backend)
    rows = a_local.shape[0]
    if check_rows:
        check_equal_rows(rows, a_local.device, group)
    if strategy == "ring":
        return ring.ring_symmetric_infonce(
            a_local, b_local, logit_scale, group=group, backend=backend, valid=valid_local
        )

    a_all = gather_with_grad(a_local, group)  # (W·b, d)
    b_all = gather_with_grad(b_local, group)  # (W·b, d)
    key_valid = None if valid_local is None else gather_no_grad(valid_local.to(torch.uint8), group).bool()  # (W·b,)
    return rank_symmetric_infonce(
        a_local,
        b_local,
        a_all,
        b_all,
        logit_scale,
        offset=rank * rows,
        world=world,
        key_valid=key_valid,
        backend=backend,
    )
