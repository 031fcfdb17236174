"""Functional entry points: backend dispatch for InfoNCE and the paired (symmetric) loss.

``infonce`` is the contract in DESIGN.md ("Fused InfoNCE"). Backends:

- ``"torch"``: :func:`kernels.infonce_reference.infonce_torch` (chunked, bounded memory, any device).
- ``"triton"``: :func:`kernels.infonce_triton.infonce_triton` (never allocates ``m × n``), imported
  lazily so this package imports without Triton; ``symmetric_infonce`` uses
  :func:`kernels.symmetric_infonce_triton.symmetric_infonce_triton`, which shares launches and similarity
  tiles between the two directions, and ``rank_symmetric_infonce``
  :func:`kernels.gathered_infonce_triton.gathered_symmetric_infonce_triton`.
- ``"auto"``: Triton when ``q`` is on CUDA and the kernel imports, else torch.

Both backends implement ignored rows (``targets == -1``) and ``key_valid`` natively, with the same
semantics, and neither syncs with the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from kernels.infonce_reference import infonce_torch

__all__ = ["infonce", "rank_symmetric_infonce", "symmetric_infonce"]

_BACKENDS = ("auto", "torch", "triton")


def _load_triton(paired: bool = False, gathered: bool = False):
    """Returns ``infonce_triton``, ``symmetric_infonce_triton`` when ``paired``, or
    ``gathered_symmetric_infonce_triton`` when ``gathered`` (raises ImportError when Triton is
    unavailable)."""
    if gathered:
        from kernels.gathered_infonce_triton import gathered_symmetric_infonce_triton

        return gathered_symmetric_infonce_triton
    if paired:
        from kernels.symmetric_infonce_triton import symmetric_infonce_triton

        return symmetric_infonce_triton
    from kernels.infonce_triton import infonce_triton

    return infonce_triton


@functools.cache
def triton_available() -> bool:
    """Whether the InfoNCE Triton ops import here (Triton installed); cached."""
    try:
        _load_triton()
    except ImportError:
        return False
    return True


def resolve_backend(
    backend: str, x: torch.Tensor, triton_available: Callable[[], bool], dtypes: tuple | None = None
) -> str:
    """``"torch"`` or ``"triton"`` for an op on ``x``: ``"auto"`` is Triton for CUDA tensors (of
    ``dtypes`` when given) when the op's Triton module imports, else torch; ValueError on a bad name."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    if backend == "auto":
        fused = x.is_cuda and (dtypes is None or x.dtype in dtypes)
        return "triton" if fused and triton_available() else "torch"
    return backend


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    return resolve_backend(backend, q, triton_available)


def infonce(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    key_valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean InfoNCE of queries ``q`` against keys ``k`` (DESIGN.md "Fused InfoNCE", contract).

    ``loss = mean_i [logsumexp_j(s · q_i·k_j) − s · q_i·k_{t_i}]`` over valid rows ``i``.

    Args:
        q: queries (usually L2-normalised embeddings).
        k: keys; every valid row that is not a query's positive acts as its negative.
        logit_scale: the multiplier ``s`` (already ``exp()``'d), a tensor of shape ``[]`` or ``[1]``.
        targets: column of each row's positive; ``-1`` ignores the row (excluded from the mean).
            Default ``arange(m)``, which needs ``m <= n``.
        key_valid: optional mask of usable key columns; masked columns are excluded from every
            log-sum-exp and rows whose positive is masked are ignored.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see module docstring).
            A float ``logit_scale`` is accepted too (no gradient then).

    Shapes:
        q ``(m, d)``, k ``(n, d)``, targets ``(m,)`` int64 in ``[-1, n)``, key_valid ``(n,)`` bool.

    Returns:
        Scalar loss, differentiable w.r.t. ``q``, ``k`` and ``logit_scale``; 0 (with zero gradients)
        when no row is valid.
    """
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), dtype=torch.float32, device=q.device)
    if _resolve_backend(backend, q) == "torch":
        return infonce_torch(q, k, logit_scale, targets, key_valid=key_valid)
    return _load_triton()(q, k, logit_scale, targets, key_valid=key_valid)


def symmetric_infonce(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """CLIP loss for paired rows: ``0.5 · (infonce(a, b) + infonce(b, a))``.

    Args:
        a: embeddings of one modality; row ``i`` pairs with row ``i`` of ``b``.
        b: embeddings of the other modality.
        logit_scale: the multiplier ``s``, shape ``[]`` or ``[1]``.
        valid: optional mask of usable pairs (e.g. both modalities present); an invalid pair is
            neither a query nor a negative in either direction.
        backend: as for :func:`infonce`.

    Shapes:
        a ``(b, d)``, b ``(b, d)``, valid ``(b,)`` bool.

    Returns:
        Scalar loss (mean over valid pairs of both directions).
    """
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have equal shapes; got {tuple(a.shape)} and {tuple(b.shape)}")
    if _resolve_backend(backend, a) == "triton":  # both directions in shared launches
        if not isinstance(logit_scale, torch.Tensor):
            logit_scale = torch.tensor(float(logit_scale), dtype=torch.float32, device=a.device)
        return _load_triton(paired=True)(a, b, logit_scale, valid=valid)
    if valid is None:
        return 0.5 * (infonce(a, b, logit_scale, backend=backend) + infonce(b, a, logit_scale, backend=backend))
    targets = torch.where(valid, torch.arange(a.shape[0], device=a.device), -1)
    loss_ab = infonce(a, b, logit_scale, targets, key_valid=valid, backend=backend)
    loss_ba = infonce(b, a, logit_scale, targets, key_valid=valid, backend=backend)
    return 0.5 * (loss_ab + loss_ba)


def rank_symmetric_infonce(
    a: torch.Tensor,
    b: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    offset: int,
    world: int,
    key_valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One rank's share ``L_r`` of the symmetric loss over a gathered batch (``kernels.distributed``).

    ``L_r = (world · N_r / N) · 0.5 · (infonce(a, b_all, t) + infonce(b, a_all, t))`` with
    ``t_i = offset + i``: the rank's rows as queries against every rank's rows as keys, N the live keys
    and N_r the live local pairs (``N_r = m``, ``N = world · m`` unmasked), so that ``mean_r L_r`` is
    the single-process loss. The Triton backend runs both directions in one forward launch and computes
    the rescale in its loss kernel.

    Args:
        a, b: this rank's paired rows. a_all, b_all: every rank's rows in rank order, so that
            ``a_all[offset + i]`` is ``a[i]``. logit_scale: ``s``, shape ``[]`` or ``[1]``.
        offset: this rank's first global row. world: number of ranks.
        key_valid: optional gathered mask of usable pairs; a masked pair is neither a query nor a key.
        backend: as for :func:`infonce`.

    Shapes:
        a, b ``(m, d)``; a_all, b_all ``(world · m, d)``; key_valid ``(world · m,)`` bool.

    Returns:
        Scalar ``L_r``.
    """
    m = a.shape[0]
    if _resolve_backend(backend, a) == "triton":
        if not isinstance(logit_scale, torch.Tensor):
            logit_scale = torch.tensor(float(logit_scale), dtype=torch.float32, device=a.device)
        fn = _load_triton(gathered=True)
        return fn(a, b, a_all, b_all, logit_scale, offset=offset, world=world, key_valid=key_valid)
    targets = offset + torch.arange(m, device=a.device)  # (m,) global column of each positive
    if key_valid is None:
        return 0.5 * (
            infonce(a, b_all, logit_scale, targets, backend="torch")
            + infonce(b, a_all, logit_scale, targets, backend="torch")
        )
    live = key_valid[offset : offset + m]  # (m,) this rank's usable pairs
    targets = torch.where(live, targets, -1)
    loss_ab = infonce(a, b_all, logit_scale, targets, key_valid=key_valid, backend="torch")
    loss_ba = infonce(b, a_all, logit_scale, targets, key_valid=key_valid, backend="torch")
    loss = 0.5 * (loss_ab + loss_ba)
    # Local means are over N_r rows; rescale so that mean_r L_r is the mean over all N valid rows.
    n_local = live.sum().to(loss.dtype)
    n_global = key_valid.sum().clamp(min=1).to(loss.dtype)
    return loss * (world * n_local / n_global)
