"""Functional entry point of the SigLIP sigmoid loss: backend dispatch like :func:`kernels.infonce`.

Backends:

- ``"torch"``: :func:`kernels.sigmoid_reference.sigmoid_loss_torch` (chunked over key columns, bounded
  memory, custom backward; any device, fp64 included).
- ``"triton"``: :func:`kernels.sigmoid_triton.sigmoid_loss_triton` (fused, never allocates ``m × n``;
  fp32 / fp16 / bf16), imported lazily so this package imports without Triton; on CPU it runs in the
  Triton interpreter (slow: tests only).
- ``"auto"``: Triton when ``a`` is a CUDA fp32 / fp16 / bf16 tensor and the kernel imports, else torch.
"""

from __future__ import annotations

import functools

import torch

from kernels.functional import resolve_backend
from kernels.sigmoid_reference import sigmoid_loss_torch

__all__ = ["sigmoid_loss"]


def _load_triton():
    """``sigmoid_loss_triton`` (raises ImportError when Triton is unavailable)."""
    from kernels.sigmoid_triton import sigmoid_loss_triton

    return sigmoid_loss_triton


@functools.cache
def triton_available() -> bool:
    """Whether the sigmoid Triton op import here (Triton installed); cached."""
    try:
        _load_triton()
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, a: torch.Tensor) -> str:
    return resolve_backend(backend, a, triton_available, dtypes=(torch.float32, torch.float16, torch.bfloat16))


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    """A float ``logit_scale`` / ``bias`` becomes an fp32 tensor on ``like``'s device (no gradient)."""
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float32, device=like.device)


def sigmoid_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    bias: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    key_valid: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    groups_as: str = "exclude",
    backend: str = "auto",
) -> torch.Tensor:
    """SigLIP pairwise sigmoid loss of queries ``a`` against keys ``b`` (Zhai et al. 2023).

    ``loss = -(1/|R|) Σ_{i in R} Σ_{j in V} log σ(z_ij · (s · a_i·b_j + t))`` with ``z_ij = +1`` at row
    ``i``'s positive ``targets[i]`` and ``-1`` elsewhere, ``R`` the valid rows and ``V`` the valid keys
    (``kernels/sigmoid_reference.py`` has the full semantics and the gradients).

    Args:
        a: queries (usually L2-normalised embeddings).
        b: keys; every valid key that is not a row's positive is one of its negatives.
        logit_scale: the multiplier ``s`` (already ``exp()``'d), shape ``[]`` or ``[1]``; a float is
            accepted too (no gradient then).
        bias: the learned bias ``t``, shape ``[]`` or ``[1]``; a float is accepted too.
        targets: column of each row's positive; ``-1`` ignores the row. Default ``arange(m)``
            (needs ``m <= n``).
        key_valid: optional mask of usable key columns; masked keys are neither positives nor
            negatives, and rows whose positive is masked are ignored.
        groups: optional false-negative group id of each row (``kernels.grouped.NO_GROUP``: none): a
            key of the row's group other than its own positive is excluded for that row, neither a
            positive nor a negative (``kernels/sigmoid_reference.py`` says why).
        key_groups: group id of each key; default ``groups`` (needs ``m == n``).
        groups_as: what those same-group pairs are: ``"exclude"`` (default, above) or ``"positive"``
            (``z = +1``, a multi-positive sigmoid loss).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see module docstring).

    Shapes:
        a ``(m, d)``, b ``(n, d)``, targets ``(m,)`` int64 in ``[-1, n)``, key_valid ``(n,)`` bool,
        groups ``(m,)`` and key_groups ``(n,)`` int64.

    Returns:
        Scalar loss, differentiable w.r.t. ``a``, ``b``, ``logit_scale`` and ``bias``; 0 (with zero
        gradients) when no row is valid.
    """
    backend = _resolve_backend(backend, a)
    logit_scale, bias = _as_tensor(logit_scale, a), _as_tensor(bias, a)
    kwargs = {"key_valid": key_valid, "groups": groups, "key_groups": key_groups, "groups_as": groups_as}
    if backend == "torch":
        return sigmoid_loss_torch(a, b, logit_scale, bias, targets, **kwargs)
    return _load_triton()(a, b, logit_scale, bias, targets, **kwargs)
