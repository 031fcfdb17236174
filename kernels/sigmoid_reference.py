"""Pure-torch SigLIP pairwise sigmoid loss: a chunked, bounded-memory op and a float64 eager reference.

``sigmoid_loss_torch`` is the CPU fallback of ``kernels.sigmoid_loss`` (the fused op is
``kernels.sigmoid_triton``) and the block op of the ring (``kernels.sigmoid_ring``);
``sigmoid_loss_reference`` materialises ``m × n`` and is a test oracle only.
Liger-Kernel layering: ``_sigmoid_forward`` / ``_sigmoid_backward`` do the work,
``SigmoidLossTorchFunction`` only calls them, ``sigmoid_loss_torch`` validates arguments.

Loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"), with ``s = logit_scale``
(already ``exp()``'d), ``t = bias``, ``x_ij = s · a_i·b_j + t``, ``z_ij = +1`` when ``j = targets[i]``
(row i's positive) and ``-1`` otherwise, ``V`` the valid key columns and ``R`` the valid rows::

    L = -(1 / |R|) · Σ_{i in R} Σ_{j in V} log σ(z_ij · x_ij)

Normalisation: the sum over every (valid row, valid key) pair divided by the number of valid rows,
i.e. the per-row sum over keys, averaged over rows: SigLIP's ``1/|B|`` with ``|B|`` the batch of
valid queries. The gathered loss (``kernels.sigmoid_distributed``) rescales each rank's share by
``W · N_r / N`` so that ``mean_r L_r`` is this loss over the global batch. A row is valid when
``targets[i] >= 0`` and (with ``key_valid``) its positive column is valid; a masked key is neither a
positive nor a negative; an invalid row's own key still acts as a negative for other rows unless
``key_valid`` masks it (the same semantics as ``kernels.infonce_reference``). No valid row: loss 0 and
zero gradients. With paired rows (``targets = arange``, ``m = n``, one mask for rows and keys) the loss is
symmetric in ``a`` and ``b`` by construction.

False negatives (``groups`` per row, ``key_groups`` per key column; ``kernels.grouped.NO_GROUP``: in no
group): a pair ``(i, j)`` with ``groups[i] == key_groups[j] != NO_GROUP`` and ``j != targets[i]`` is,
by default, **excluded**: neither a positive nor a negative, it adds nothing to the loss or to any gradient (as a
masked key does, but for that row only). Row i keeps its own positive and every other group's keys as
negatives; ``|R|`` is unchanged. This is what ``kernels.grouped`` guarantees for InfoNCE (no two rows
of one group face each other as negatives), and it needs no deduplication here: SigLIP's pairs are
independent binary terms, with no softmax denominator in which a class of k duplicates would weigh k
times, so each member keeps its own paired key as positive instead of a representative's.

The other reading is an option, ``groups_as="positive"``: every such pair is a **positive**
(``z_ij = +1``, multi-positive sigmoid), possible because the pairs are independent terms with no
softmax denominator. It asserts that two proteins with one description should embed alike in every
term; the default, ``groups_as="exclude"``, only stops pushing them apart. Either way ``|R|`` and the
normalisation are unchanged, and ``NO_GROUP`` never matches anything.

Memory: key columns are processed ``chunk_size`` at a time, so at most one ``m × chunk`` block of
logits exists; backward saves only the inputs and recomputes the chunk logits. Nothing ``m × n``.

Gradients, with ``w_i = grad_output / |R|`` (0 for invalid rows) and
``D_ij = w_i · z_ij · (σ(z_ij x_ij) − 1)`` on valid columns (0 on masked ones)::

    da = s D b      db = s Dᵀ a      ds = Σ_ij D_ij (a_i·b_j) = Σ_i a_i·(D b)_i      dt = Σ_ij D_ij
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.grouped import NO_GROUP
from kernels.infonce_reference import refuse_double_backward

__all__ = ["GROUPS_AS", "SigmoidLossTorchFunction", "check_groups_as", "sigmoid_loss_reference", "sigmoid_loss_torch"]

GROUPS_AS = ("exclude", "positive")  # what a same-group pair (not the row's own positive) is


def check_groups_as(groups_as: str) -> bool:
    """Validates ``groups_as`` (:data:`GROUPS_AS`); returns True for ``"positive"``."""
    if groups_as not in GROUPS_AS:
        raise ValueError(f"groups_as must be 'exclude' or 'positive'; got {groups_as!r}")
    return groups_as == "positive"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 / bf16 / fp32 inputs compute in fp32; fp64 stays fp64 (used by gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _row_weights(
    targets: torch.Tensor, key_valid: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(valid, weight, n_valid)``: rows with a usable positive, ``valid / max(|R|, 1)`` in
    ``dtype`` and ``|R|`` (0-dim long tensor; no host sync)."""
    valid = targets >= 0
    if key_valid is not None and key_valid.numel():
        valid = valid & key_valid[targets.clamp(min=0)]
    elif key_valid is not None:  # no keys at all: no row has a positive
        valid = torch.zeros_like(valid)
    n_valid = valid.sum()
    weight = valid.to(dtype) / n_valid.clamp(min=1).to(dtype)
    return valid, weight, n_valid


def _chunk_signed_logits(a, bc, s, t, targets, start):
    """``(u, dots, rows, cols)`` for key columns ``[start, start + c)``: ``dots = a · bcᵀ`` and
    ``u = z · x`` (both ``(m, c)``), and the (row, chunk column) indices of the positives in this chunk.

    ``u`` is ``+x`` at each row's positive (when it lies in this chunk) and ``-x`` elsewhere.
    """
    dots = a @ bc.T  # (m, c): with u, the only m x chunk buffers
    u = dots.mul(s).add_(t).neg_()
    local = targets - start
    rows = torch.nonzero((local >= 0) & (local < bc.shape[0])).squeeze(1)  # rows with a positive here
    cols = local[rows]
    u[rows, cols] = u[rows, cols].neg()
    return u, dots, rows, cols


def _chunk_same_group(groups, key_groups, start, end, rows, cols):
    """``(m, c)`` bool over key columns ``[start, end)``: same-group pairs other than each row's
    positive (None: ungrouped); excluded, or positives with ``groups_as="positive"``."""
    if groups is None:
        return None
    same = (groups[:, None] == key_groups[None, start:end]) & (groups != NO_GROUP)[:, None]
    same[rows, cols] = False  # a row's own positive stays a positive
    return same


def _sigmoid_forward(
    a, b, s, t, targets, key_valid, weight, chunk_size, groups=None, key_groups=None, groups_positive=False
) -> torch.Tensor:
    """Chunked forward; returns the scalar loss in the compute dtype. ``groups_positive``: same-group
    pairs are positives (``z = +1``) instead of excluded."""
    ct = _compute_dtype(a.dtype)
    af = a.to(ct)
    s, t = s.to(ct).reshape(()), t.to(ct).reshape(())
    row_sum = torch.zeros(a.shape[0], dtype=ct, device=a.device)  # (m,) Σ_j -log σ(z x) so far
    for start in range(0, b.shape[0], chunk_size):
        bc = b[start : start + chunk_size].to(ct)
        u, _, rows, cols = _chunk_signed_logits(af, bc, s, t, targets, start)
        same = _chunk_same_group(groups, key_groups, start, start + chunk_size, rows, cols)
        if same is not None and groups_positive:
            u[same] = u[same].neg()  # z = +1 on same-group pairs too
        nll = F.logsigmoid(u).neg_()  # (m, c)
        if key_valid is not None:
            nll.masked_fill_(~key_valid[start : start + chunk_size], 0.0)
        if same is not None and not groups_positive:
            nll.masked_fill_(same, 0.0)  # excluded
        row_sum += nll.sum(1)
    return (row_sum * weight).sum()


def _sigmoid_backward(
    grad_output,
    a,
    b,
    s,
    t,
    targets,
    key_valid,
    weight,
    chunk_size,
    needs,
    groups=None,
    key_groups=None,
    groups_positive=False,
):
    """Chunked backward: recomputes each chunk's logits. Returns ``(da, db, ds, dt)`` in the dtypes and
    shapes of the inputs (``None`` where ``needs`` is False). ``groups_positive`` as for the forward."""
    need_a, need_b, need_s, need_t = needs
    ct = _compute_dtype(a.dtype)
    af = a.to(ct)
    sc, tc = s.to(ct).reshape(()), t.to(ct).reshape(())
    w = weight * grad_output.to(ct).reshape(())  # (m,)
    da = torch.zeros(a.shape, dtype=ct, device=a.device) if need_a else None
    db = torch.empty(b.shape, dtype=ct, device=b.device) if need_b else None
    ds = torch.zeros((), dtype=ct, device=a.device)
    dt = torch.zeros((), dtype=ct, device=a.device)
    for start in range(0, b.shape[0], chunk_size):
        end = min(start + chunk_size, b.shape[0])
        bc = b[start:end].to(ct)
        u, dots, rows, cols = _chunk_signed_logits(af, bc, sc, tc, targets, start)
        same = _chunk_same_group(groups, key_groups, start, end, rows, cols)
        if same is not None and groups_positive:
            u[same] = u[same].neg()  # z = +1 on same-group pairs too
        # d(-log σ(z x))/dx = z (σ(u) - 1): σ(-u) on negatives (z = -1), -σ(-u) on positives
        d = u.neg_().sigmoid_()  # (m, c), in place of u; no 1 - σ cancellation
        d[rows, cols] = d[rows, cols].neg()
        if same is not None and groups_positive:
            d[same] = d[same].neg()
        d.mul_(w[:, None])
        if key_valid is not None:
            d.masked_fill_(~key_valid[start:end], 0.0)
        if same is not None and not groups_positive:
            d.masked_fill_(same, 0.0)  # excluded
        if need_s:
            ds += (d * dots).sum()
        dt += d.sum()
        d.mul_(sc)  # s D: both embedding gradients carry s (a tensor alpha= would sync)
        if need_a:
            da.addmm_(d, bc)
        if need_b:
            db[start:end] = d.T @ af
    return (
        da.to(a.dtype) if need_a else None,
        db.to(b.dtype) if need_b else None,
        ds.reshape(s.shape).to(s.dtype) if need_s else None,
        dt.reshape(t.shape).to(t.dtype) if need_t else None,
    )


class SigmoidLossTorchFunction(torch.autograd.Function):
    """Autograd wrapper around the chunked forward / backward; holds no logic of its own."""

    @staticmethod
    def forward(
        ctx,
        a,
        b,
        logit_scale,
        bias,
        targets,
        key_valid,
        chunk_size,
        groups=None,
        key_groups=None,
        groups_positive=False,
    ):
        # autocast would silently run the fp32 matmuls in half precision: opt out explicitly.
        with torch.autocast(a.device.type, enabled=False):
            _, weight, _ = _row_weights(targets, key_valid, _compute_dtype(a.dtype))
            loss = _sigmoid_forward(
                a, b, logit_scale, bias, targets, key_valid, weight, chunk_size, groups, key_groups, groups_positive
            )
        ctx.save_for_backward(a, b, logit_scale, bias, targets, key_valid, weight, groups, key_groups)
        ctx.chunk_size = chunk_size
        ctx.groups_positive = groups_positive
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        refuse_double_backward("sigmoid_loss (torch)")
        a, b, logit_scale, bias, targets, key_valid, weight, groups, key_groups = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        with torch.autocast(a.device.type, enabled=False):
            grads = _sigmoid_backward(
                grad_output, a, b, logit_scale, bias, targets, key_valid, weight, ctx.chunk_size, needs,
                groups, key_groups, ctx.groups_positive,
            )  # fmt: skip
        return (*grads, None, None, None, None, None, None)


def check_groups(groups, key_groups, m: int, n: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validates the false-negative group ids; returns ``(groups, key_groups)`` as int64 (both None when
    ungrouped). ``key_groups`` defaults to ``groups`` when ``m == n`` (paired rows)."""
    if groups is None:
        if key_groups is not None:
            raise ValueError("key_groups needs groups (the row group ids)")
        return None, None
    if key_groups is None:
        if m != n:
            raise ValueError(f"groups alone needs m == n (paired rows); got m={m}, n={n}: pass key_groups")
        key_groups = groups
    for name, g, size in (("groups", groups, m), ("key_groups", key_groups, n)):
        if g.shape != (size,) or g.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an integer tensor of shape ({size},); got {g.dtype} {tuple(g.shape)}")
    return groups.to(device=device, dtype=torch.int64), key_groups.to(device=device, dtype=torch.int64)


def _check_args(a, b, logit_scale, bias, targets, key_valid) -> torch.Tensor:
    """Validates shapes and dtypes (no host sync on values); returns the targets to use (int64)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be (m, d) and (n, d); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"a and b must share a dtype; got {a.dtype} and {b.dtype}")
    for name, x in (("logit_scale", logit_scale), ("bias", bias)):
        if not isinstance(x, torch.Tensor) or x.numel() != 1 or x.dim() > 1:
            raise ValueError(f"{name} must be a tensor of shape [] or [1]")
    m, n = a.shape[0], b.shape[0]
    if key_valid is not None and (key_valid.shape != (n,) or key_valid.dtype != torch.bool):
        raise ValueError(f"key_valid must be a bool tensor of shape ({n},)")
    if targets is None:
        if m > n:
            raise ValueError(f"default targets arange(m) need m <= n; got m={m}, n={n}")
        return torch.arange(m, device=a.device)
    if targets.shape != (m,) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"targets must be an integer tensor of shape ({m},); got {targets.dtype} {tuple(targets.shape)}"
        )
    return targets.long()


def sigmoid_loss_torch(
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
    chunk_size: int = 4096,
) -> torch.Tensor:
    """SigLIP sigmoid loss of rows of ``a`` against all rows of ``b``, chunked over key columns.

    Args:
        a: queries.
        b: keys; row ``targets[i]`` is the positive of query ``i``, every other valid row a negative.
        logit_scale: the multiplier ``s`` (already ``exp()``'d), shape ``[]`` or ``[1]``.
        bias: the learned bias ``t``, shape ``[]`` or ``[1]`` (SigLIP initialises it at -10).
        targets: column of each row's positive; ``-1`` ignores the row. Default ``arange(m)``
            (needs ``m <= n``). Values must lie in ``[-1, n)`` (not checked: that would sync).
        key_valid: optional mask of usable key columns (neither positives nor negatives when False);
            a row whose positive is masked is ignored.
        groups: optional false-negative group id of each row (``NO_GROUP``: none); a key of the row's
            group other than its positive is excluded for that row (module docstring).
        key_groups: group id of each key column; default ``groups`` (needs ``m == n``).
        groups_as: what those same-group pairs are: ``"exclude"`` (default: no loss, no gradient) or
            ``"positive"`` (``z = +1``: multi-positive sigmoid).
        chunk_size: key columns per block; peak extra memory is about ``3 · m × chunk_size`` values
            (and an ``m × chunk_size`` bool mask with ``groups``).

    Shapes:
        a ``(m, d)``, b ``(n, d)``, targets ``(m,)`` int64, key_valid ``(n,)`` bool, groups ``(m,)``
        and key_groups ``(n,)`` int64.

    Returns:
        Scalar loss (module docstring: sum over valid pairs / number of valid rows), fp32 (fp64 for
        fp64 inputs); 0 when no row is valid. Gradients come back in the inputs' dtypes.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    positive = check_groups_as(groups_as)
    targets = _check_args(a, b, logit_scale, bias, targets, key_valid)
    groups, key_groups = check_groups(groups, key_groups, a.shape[0], b.shape[0], a.device)
    return SigmoidLossTorchFunction.apply(
        a, b, logit_scale, bias, targets, key_valid, chunk_size, groups, key_groups, positive
    )


def sigmoid_loss_reference(
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
) -> torch.Tensor:
    """Materialised float64 SigLIP loss (test oracle only: allocates ``m × n``).

    Same arguments and semantics as :func:`sigmoid_loss_torch`; everything is cast to float64 first
    and autograd differentiates it, so gradients w.r.t. the caller's tensors come back in their dtypes.

    Shapes:
        a ``(m, d)``, b ``(n, d)``, targets ``(m,)``, key_valid ``(n,)``, groups ``(m,)``, key_groups ``(n,)``.

    Returns:
        Scalar float64 loss; 0 when no row is valid.
    """
    positive = check_groups_as(groups_as)
    targets = _check_args(a, b, logit_scale, bias, targets, key_valid)
    groups, key_groups = check_groups(groups, key_groups, a.shape[0], b.shape[0], a.device)
    m, n = a.shape[0], b.shape[0]
    x = logit_scale.double().reshape(()) * (a.double() @ b.double().T) + bias.double().reshape(())  # (m, n)
    z = -torch.ones(m, n, dtype=torch.float64, device=a.device)
    valid = targets >= 0
    rows = torch.nonzero(valid).squeeze(1)
    z[rows, targets[rows]] = 1.0
    pair_valid = valid[:, None].expand(m, n).clone()
    if key_valid is not None:
        pair_valid &= key_valid[None, :]
        valid = valid & (key_valid[targets.clamp(min=0)] if n else torch.zeros_like(valid))
        pair_valid &= valid[:, None]
    if groups is not None:  # same-group pairs other than the row's own positive: excluded or positives
        same = (groups[:, None] == key_groups[None, :]) & (groups[:, None] != NO_GROUP)  # (m, n)
        if positive:
            z = torch.where(same, 1.0, z)
        else:
            pair_valid &= ~(same & (z < 0))
    nll = torch.where(pair_valid, -F.logsigmoid(z * x), 0.0)
    return nll.sum() / valid.sum().clamp(min=1)
