"""Pure-torch InfoNCE: a chunked, bounded-memory reference and a plain materialised baseline.

``infonce_torch`` has the same semantics as the Triton kernel in ``kernels/infonce_triton.py`` and is the CPU
fallback behind ``kernels.infonce(..., backend="torch")``. It follows the Liger-Kernel layering:
``_infonce_forward`` / ``_infonce_backward`` do the work, ``InfoNCETorchFunction`` only calls them, and
``infonce_torch`` validates arguments.

Memory: rows of ``q`` are processed ``chunk_size`` at a time, so at most one ``chunk × n`` block of
logits exists at once; for backward only the inputs and the per-row log-sum-exp ``(m,)`` are saved and
the logits are recomputed chunk by chunk. Nothing ``m × n`` is ever allocated.

Loss, per valid row ``i`` (``t_i = targets[i]``, ``s = logit_scale``, ``V`` = the valid key columns)::

    loss_i = logsumexp_{j in V}(s * q_i . k_j) - s * q_i . k_{t_i}

and the result is the mean over valid rows. A row is valid when ``t_i >= 0`` and (with ``key_valid``)
its positive column is itself valid; a row without a positive has nothing to contrast and is ignored.
With no valid row the loss is 0 and every gradient is 0.

Gradients, with ``P_ij`` the softmax over ``V`` and ``w_i = grad_output / n_valid`` (0 for ignored
rows), ``D_ij = w_i (P_ij - [j = t_i])``::

    dq = s D k        dk = s D^T q        ds = sum_ij D_ij (q_i . k_j) = sum_i q_i . (D k)_i
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["InfoNCETorchFunction", "infonce_torch", "infonce_eager", "refuse_double_backward"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 / bf16 / fp32 inputs compute in fp32; fp64 stays fp64 (used by gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _row_validity(targets: torch.Tensor, key_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(valid, safe_targets)``: rows with a usable positive, and targets clamped to >= 0."""
    safe = targets.clamp(min=0)
    valid = targets >= 0
    if key_valid is not None:
        valid = valid & key_valid[safe]
    return valid, safe


def _infonce_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor,
    key_valid: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked forward.

    Returns:
        ``(loss, lse, valid, n_valid)``: the scalar loss (compute dtype), the per-row log-sum-exp
        ``(m,)`` (``+inf`` on ignored rows so that the recomputed softmax is exactly 0 there), the
        row-validity mask ``(m,)`` and the number of valid rows (0-dim long tensor, no host sync).
    """
    ct = _compute_dtype(q.dtype)
    m = q.shape[0]
    kf = k.to(ct)
    s = logit_scale.to(ct).reshape(())
    col_masked = None if key_valid is None else ~key_valid
    valid, safe_t = _row_validity(targets, key_valid)
    lse = torch.empty(m, dtype=ct, device=q.device)
    pos = torch.empty(m, dtype=ct, device=q.device)
    for start in range(0, m, chunk_size):
        end = min(start + chunk_size, m)
        logits = (q[start:end].to(ct) @ kf.T).mul_(s)  # (c, n): the only chunk x n buffer
        # n = 0 (every row ignored): nothing to gather
        pos[start:end] = logits.gather(1, safe_t[start:end, None]).squeeze(1) if k.shape[0] else 0.0
        if col_masked is not None:
            logits.masked_fill_(col_masked, float("-inf"))
        lse[start:end] = torch.logsumexp(logits, dim=1)
    n_valid = valid.sum()
    loss = torch.where(valid, lse - pos, 0.0).sum() / n_valid.clamp(min=1)
    lse = torch.where(valid, lse, float("inf"))
    return loss, lse, valid, n_valid


def _infonce_backward(
    grad_output: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor,
    key_valid: torch.Tensor | None,
    lse: torch.Tensor,
    valid: torch.Tensor,
    n_valid: torch.Tensor,
    chunk_size: int,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Chunked backward: recomputes each chunk's logits from ``q``, ``k`` and the saved ``lse``.

    Returns:
        ``(dq, dk, dscale)`` in the dtypes and shapes of ``q``, ``k`` and ``logit_scale``
        (``None`` where ``needs`` is False).
    """
    need_q, need_k, need_s = needs
    ct = _compute_dtype(q.dtype)
    m = q.shape[0]
    kf = k.to(ct)
    s = logit_scale.to(ct).reshape(())
    col_masked = None if key_valid is None else ~key_valid
    safe_t = targets.clamp(min=0)
    w = torch.where(valid, grad_output.to(ct).reshape(()) / n_valid.clamp(min=1), 0.0)  # (m,)
    dq = torch.empty(q.shape, dtype=ct, device=q.device) if need_q else None
    dk = torch.zeros(k.shape, dtype=ct, device=k.device) if need_k else None
    ds = torch.zeros((), dtype=ct, device=q.device)
    for start in range(0, m, chunk_size):
        end = min(start + chunk_size, m)
        qc = q[start:end].to(ct)
        wc = w[start:end, None]
        d = (qc @ kf.T).mul_(s)  # (c, n) logits, turned into D in place
        if col_masked is not None:
            d.masked_fill_(col_masked, float("-inf"))
        d.sub_(lse[start:end, None]).exp_().mul_(wc)  # w_i * P_ij (0 on ignored rows and masked cols)
        if k.shape[0]:  # n = 0: no positive column to subtract from
            d.scatter_add_(1, safe_t[start:end, None], -wc)  # - w_i [j = t_i]
        d_at_k = d @ kf  # (c, d) = (D k) for this chunk
        if need_s:
            ds += (qc * d_at_k).sum()
        if need_q:
            dq[start:end] = d_at_k.mul_(s)
        if need_k:
            dk.addmm_(d.mul_(s).T, qc)
    return (
        dq.to(q.dtype) if need_q else None,
        dk.to(k.dtype) if need_k else None,
        ds.reshape(logit_scale.shape).to(logit_scale.dtype) if need_s else None,
    )


def refuse_double_backward(name: str) -> None:
    """Raise inside an autograd backward run with ``create_graph=True``.

    These losses' backward passes are hand-written and not differentiable themselves: without this
    check a second-order term (a gradient penalty) would silently get no contribution from them.
    """
    if torch.is_grad_enabled():  # autograd runs backward in grad mode exactly when create_graph=True
        raise RuntimeError(f"{name}: double backward (create_graph=True) is not supported")


class InfoNCETorchFunction(torch.autograd.Function):
    """Autograd wrapper around the chunked forward / backward; holds no logic of its own."""

    @staticmethod
    def forward(ctx, q, k, logit_scale, targets, key_valid, chunk_size):
        # autocast would silently run the fp32 matmuls in half precision: opt out explicitly.
        with torch.autocast(q.device.type, enabled=False):
            loss, lse, valid, n_valid = _infonce_forward(q, k, logit_scale, targets, key_valid, chunk_size)
        ctx.save_for_backward(q, k, logit_scale, targets, key_valid, lse, valid, n_valid)
        ctx.chunk_size = chunk_size
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        refuse_double_backward("infonce (torch)")
        q, k, logit_scale, targets, key_valid, lse, valid, n_valid = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, ds = _infonce_backward(
                grad_output, q, k, logit_scale, targets, key_valid, lse, valid, n_valid, ctx.chunk_size, needs
            )
        return dq, dk, ds, None, None, None


def _check_args(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor | None,
    key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """Validates shapes and dtypes (no host sync on values); returns the targets to use."""
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must be (m, d) and (n, d); got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype; got {q.dtype} and {k.dtype}")
    if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1 or logit_scale.dim() > 1:
        raise ValueError("logit_scale must be a tensor of shape [] or [1] (the multiplier, already exp()'d)")
    m, n = q.shape[0], k.shape[0]
    if key_valid is not None and (key_valid.shape != (n,) or key_valid.dtype != torch.bool):
        raise ValueError(f"key_valid must be a bool tensor of shape ({n},)")
    if targets is None:
        if m > n:
            raise ValueError(f"default targets arange(m) need m <= n; got m={m}, n={n}")
        return torch.arange(m, device=q.device)
    if targets.shape != (m,) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"targets must be an integer tensor of shape ({m},); got {targets.dtype} {tuple(targets.shape)}"
        )
    return targets.long()


def infonce_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    key_valid: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """InfoNCE over rows of ``q`` against all rows of ``k``, chunked so memory stays bounded.

    Args:
        q: queries.
        k: keys; row ``targets[i]`` is the positive of query ``i``, every other valid row a negative.
        logit_scale: the multiplier ``s`` (already ``exp()``'d), shape ``[]`` or ``[1]``.
        targets: column of each row's positive; ``-1`` ignores the row. Default ``arange(m)``
            (needs ``m <= n``). Values must lie in ``[-1, n)`` (not checked: that would sync).
        key_valid: optional mask of usable key columns; masked columns are left out of every
            log-sum-exp, and a row whose positive is masked is ignored.
        chunk_size: rows of ``q`` per block; peak extra memory is about ``chunk_size × n`` values.

    Shapes:
        q ``(m, d)``, k ``(n, d)``, targets ``(m,)`` int64, key_valid ``(n,)`` bool.

    Returns:
        Scalar mean loss over valid rows, in fp32 (fp64 for fp64 inputs); 0 when no row is valid.
        Gradients for ``q``, ``k``, ``logit_scale`` come back in their own dtypes.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    targets = _check_args(q, k, logit_scale, targets, key_valid)
    return InfoNCETorchFunction.apply(q, k, logit_scale, targets, key_valid, chunk_size)


def infonce_eager(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Materialised InfoNCE (``s · q @ k.T`` then cross-entropy): test oracle and benchmark baseline.

    Same arguments and semantics as :func:`infonce_torch`, but allocates the full ``m × n`` logits
    (in the input dtype, as open_clip does; the cross-entropy runs in at least fp32).

    Shapes:
        q ``(m, d)``, k ``(n, d)``, targets ``(m,)``, key_valid ``(n,)``.

    Returns:
        Scalar mean loss over valid rows; 0 when no row is valid.
    """
    targets = _check_args(q, k, logit_scale, targets, key_valid)
    logits = logit_scale.reshape(()) * (q @ k.T)  # (m, n)
    logits = logits.to(_compute_dtype(logits.dtype))
    valid, _ = _row_validity(targets, key_valid)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid, float("-inf"))
    targets = torch.where(valid, targets, -1)
    total = F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")
    return total / valid.sum().clamp(min=1)
