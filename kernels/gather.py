"""Collectives the distributed losses share: world size and rank, all-gathers with and without gradient,
and the equal-local-batch check.

Below both strategies of the gathered loss (``kernels.distributed``: all-gather, ``kernels.ring``: ring)
and the grouped loss (``kernels.grouped``); nothing here computes a loss. Without torch.distributed, or
with one rank, the gathers return their input and the check does nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["check_equal_rows", "gather_no_grad", "gather_with_grad", "world_and_rank"]


def world_and_rank(group=None) -> tuple[int, int]:
    """``(world_size, rank)`` in ``group``; ``(1, 0)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward all-reduces (SUM) the gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        world, rank = world_and_rank(group)
        ctx.group, ctx.rank, ctx.rows = group, rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce is in place; autograd may reuse ``grad``
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather ``x`` along dim 0 with gradients flowing back to every rank's input.

    The backward all-reduces (SUM) the incoming gradient and returns this rank's slice (open_clip's
    ``gather_features(..., gather_with_grad=True)``), so the gradient of ``x`` on rank ``r`` is
    ``sum_r' d(loss_r')/d(x_r)``. Works on gloo and NCCL. Every rank must pass the same shape.

    Args:
        x: this rank's rows.
        group: process group (default: the world).

    Shapes:
        x ``(b, ...)`` → ``(world_size · b, ...)``, ranks in group-rank order.

    Returns:
        The concatenation over ranks; ``x`` itself when torch.distributed is not initialised or the
        world size is 1.
    """
    if world_and_rank(group)[0] == 1:
        return x
    return _GatherWithGrad.apply(x, group)


def gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather ``x`` along dim 0 without autograd: ``(b, ...)`` → ``(world_size · b, ...)``, ranks in
    group-rank order; ``x`` itself without torch.distributed or with one rank. Every rank must pass the
    same shape."""
    if world_and_rank(group)[0] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def check_equal_rows(rows: int, device: torch.device, group=None) -> None:
    """Fail clearly (instead of hanging or mis-slicing) when ranks hold different batch sizes.

    A collective: every rank of ``group`` must call it. Costs one all_gather of one int64 per rank and a
    host sync (``.tolist()``); a no-op without torch.distributed or with one rank.

    Args:
        rows: this rank's local batch size.
        device: where the collective's tensor lives (the process group's device: CUDA for NCCL).
        group: process group (default: the world).

    Raises:
        ValueError: naming every rank's size, on every rank, when they differ.
    """
    if world_and_rank(group)[0] == 1:
        return
    sizes = gather_no_grad(torch.tensor([rows], dtype=torch.int64, device=device), group).tolist()
    if len(set(sizes)) != 1:
        raise ValueError(f"gathered InfoNCE needs the same local batch on every rank; got sizes {sizes}")


STRATEGIES = ("allgather", "ring")  # how a gathered loss gets the other ranks' keys


def check_paired_args(
    strategy: str, a_local: torch.Tensor, b_local: torch.Tensor, valid_local: torch.Tensor | None
) -> None:
    """The argument checks every gathered paired loss makes (InfoNCE, sigmoid); ValueError naming the problem.

    Shapes:
        a_local, b_local ``(b, d)`` equal; valid_local ``(b,)`` bool or None.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    if a_local.shape != b_local.shape:
        raise ValueError(
            f"paired embeddings must have equal shapes; got {tuple(a_local.shape)}, {tuple(b_local.shape)}"
        )
    if valid_local is not None and (valid_local.shape != a_local.shape[:1] or valid_local.dtype != torch.bool):
        raise ValueError(f"valid_local must be a bool tensor of shape ({a_local.shape[0]},)")
