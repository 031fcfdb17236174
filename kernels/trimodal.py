"""The fused tri-modal contrastive step: every requested InfoNCE term of one rank, each embedding gathered once.

``pretrain.losses.align_pro`` computes up to six symmetric InfoNCE terms per step (three cross-modal pairs,
three intra-modal view pairs), and each call of ``kernels.gathered_symmetric_infonce`` /
``kernels.grouped_symmetric_infonce`` gathers (or ring-passes) its two embeddings again: a modality used
by three terms is gathered three times, its gradient all-reduced three times. :func:`trimodal_infonce`
returns the same per-term values (this rank's share ``L_r`` of each) and gradients, with:

- every embedding key gathered **once**, all K keys in one collective: their local rows are stacked
  (b, K, d) and ``gather_with_grad`` runs once (its backward is one all-reduce, autograd having summed
  every term's gradient first);
- the presence masks of every modality and the false-negative group ids gathered in **one** no-grad
  all-gather (one int64 (b, 1 + #masks) tensor), and the equal-rows check run once;
- per-term logit scales (a (n_terms,) tensor or one [1] tensor per term: nothing assumes one shared s).

Term semantics (exactly the per-term functions'): term t's valid rows are the AND of its ``present``
masks; plain terms (``grouped=False``) are ``gathered_symmetric_infonce(a, b, s_t, valid_local=...)``;
grouped terms are ``grouped_symmetric_infonce(a, b, s_t, groups, valid_local=...)`` (one representative
key per group, ``kernels.grouped``). Each returned loss is ``L_r``; ``mean_r L_r`` is the global loss and
gradients follow the ``W ×`` rule of ``kernels.distributed``.

What is shared, per backend and strategy
----------------------------------------
- torch, ``"allgather"`` (``kernels.trimodal_blocks``): one custom autograd function for all terms. The
  directions are grouped by query key (e.g. ``sequence`` rows against gathered ``structure`` and
  ``text`` and ``sequence_view2``); each chunk of a query set (``chunk · Σn`` logits at most, never
  b × N beyond that chunk) is cast once and contrasted with all its key sets, each with its term's
  scale, mask and LSE; one backward walks the same chunks for every term. Compute is the per-term
  calls' (same FLOPs); what is saved is communication, autograd nodes and bookkeeping.
- triton, ``"allgather"`` (``kernels.trimodal_triton``): ONE forward launch for every direction of
  every term (the grid's third axis walks the directions, each with its term's scale, targets and mask),
  then five torch ops for the losses; the backward runs ``kernels.infonce_blocks.block_backward`` per
  direction. Not shared: similarity tiles (a query set against different key sets are different
  products) and backward launches (the gradient-chunk kernel takes one scale per launch); the module
  docstring of ``kernels.trimodal_triton`` says why.
- ``"ring"`` (both backends): supported. The local rows of every key are stacked (K, b, d) and passed
  rank to rank once per step for all terms (W − 1 hops; memory O(K·b·d), no gathered keys;
  ``kernels.trimodal_blocks.RingTrimodalFunction``), instead of one ring per term; the backward sends
  them round once more with one (K, b, d) fp32 accumulator. Block work: the torch group ops above, or
  ``kernels.ring``'s Triton block kernels, one direction at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.functional import resolve_backend
from kernels.gather import STRATEGIES, check_equal_rows, gather_no_grad, gather_with_grad, world_and_rank
from kernels.grouped import representatives
from kernels.trimodal_blocks import GatheredTrimodalFunction, Plan, RingTrimodalFunction, compute_dtype, group_ops

__all__ = ["ALIGN_PRO_TERMS", "Term", "rank_trimodal_infonce", "trimodal_infonce"]


@dataclass(frozen=True)
class Term:
    """One symmetric InfoNCE term of :func:`trimodal_infonce`.

    Attributes:
        name: the key of its loss in the result (e.g. ``"loss_seq_text"``).
        a_key, b_key: the embedding keys it pairs (row i of ``emb[a_key]`` with row i of ``emb[b_key]``).
        grouped: False negatives deduplicated (``kernels.grouped``): needs ``groups``.
        present: the presence-mask keys whose AND gives the term's valid rows; ``None`` means
            ``(a_key, b_key)`` (a pair term); an intra term names its modality, e.g. ``("sequence",)``
            for ``sequence`` vs ``sequence_view2``. Ignored when the call passes no masks.
    """

    name: str
    a_key: str
    b_key: str
    grouped: bool = False
    present: tuple[str, ...] | None = None

    def presence_keys(self) -> tuple[str, ...]:
        return tuple(self.present) if self.present is not None else (self.a_key, self.b_key)


# align_pro's six terms (three cross-modal pairs, three intra-modal view pairs), false negatives
# deduplicated on the three that contrast texts: the term list of the kernel tests and the benchmark.
ALIGN_PRO_TERMS = (
    Term("loss_seq_struct", "sequence", "structure"),
    Term("loss_seq_text", "sequence", "text", grouped=True),
    Term("loss_struct_text", "structure", "text", grouped=True),
    Term("loss_intra_seq", "sequence", "sequence_view2", present=("sequence",)),
    Term("loss_intra_struct", "structure", "structure_view2", present=("structure",)),
    Term("loss_intra_text", "text", "text_view2", grouped=True, present=("text",)),
)


@functools.cache
def triton_available() -> bool:
    """Whether the tri-modal Triton op import here (Triton installed); cached."""
    try:
        import kernels.trimodal_triton  # noqa: F401
    except ImportError:
        return False
    return True


def _scale_vector(logit_scales, n_terms: int, ref: Tensor) -> Tensor:
    """(n_terms,) scales, differentiable into whatever the caller passed."""
    if isinstance(logit_scales, Tensor):
        if logit_scales.dim() > 1 or logit_scales.numel() != n_terms:
            raise ValueError(
                f"logit_scales must have shape ({n_terms},) (one per term); got {tuple(logit_scales.shape)}"
            )
        return logit_scales.reshape(n_terms)
    scales = list(logit_scales)
    if len(scales) != n_terms:
        raise ValueError(f"logit_scales: need one scale per term ({n_terms}); got {len(scales)}")
    for i, s in enumerate(scales):
        if not isinstance(s, Tensor) or s.numel() != 1 or s.dim() > 1:
            raise ValueError(f"logit_scales[{i}] must be a tensor of shape [] or [1]")
    return torch.stack([s.reshape(()).to(ref.device) for s in scales])


def _check(emb, terms, present, groups, strategy) -> tuple[list[str], int]:
    """Argument checks (ValueError / KeyError naming the problem); returns (distinct keys, rows)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    if not terms:
        raise ValueError("trimodal_infonce needs at least one term")
    names = [t.name for t in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"term names must be distinct; got {names}")
    keys = list(dict.fromkeys(k for t in terms for k in (t.a_key, t.b_key)))
    missing = [k for k in keys if k not in emb]
    if missing:
        raise KeyError(f"trimodal_infonce: embeddings {missing} are used by a term but not given (have {sorted(emb)})")
    first = emb[keys[0]]
    if first.dim() != 2:
        raise ValueError(f"embeddings must be (b, d); {keys[0]!r} is {tuple(first.shape)}")
    for k in keys:
        x = emb[k]
        if x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
            raise ValueError(
                f"every embedding must match {keys[0]!r} ({tuple(first.shape)}, {first.dtype}, {first.device}); "
                f"{k!r} is ({tuple(x.shape)}, {x.dtype}, {x.device})"
            )
    rows = first.shape[0]
    if present is not None:
        for t in terms:
            for p in t.presence_keys():
                if p not in present:
                    raise KeyError(f"term {t.name!r} needs presence mask {p!r}; masks given: {sorted(present)}")
                if present[p].shape != (rows,) or present[p].dtype != torch.bool:
                    raise ValueError(f"present[{p!r}] must be a bool tensor of shape ({rows},)")
    if any(t.grouped for t in terms):
        if groups is None:
            raise ValueError(f"grouped terms {[t.name for t in terms if t.grouped]} need groups (false-negative ids)")
        if groups.shape != (rows,):
            raise ValueError(f"groups must have shape ({rows},); got {tuple(groups.shape)}")
    return keys, rows


def _gather_masks(terms, present, groups, group, device) -> tuple[dict[str, Tensor], Tensor | None]:
    """Every rank's presence masks (by key, (W·b,) bool) and group ids ((W·b,) int64 or None), from ONE
    no-grad all-gather of an int64 (b, #ids + #masks) tensor."""
    mask_keys = [] if present is None else list(dict.fromkeys(p for t in terms for p in t.presence_keys()))
    cols = [groups.to(device=device, dtype=torch.int64)] if groups is not None else []
    cols += [present[p].to(device=device, dtype=torch.int64) for p in mask_keys]
    if not cols:
        return {}, None
    gathered = gather_no_grad(torch.stack(cols, dim=1), group)  # (W·b, c): one collective for all
    first = int(groups is not None)
    return {p: gathered[:, first + i].bool() for i, p in enumerate(mask_keys)}, gathered[:, 0] if first else None


def _plan(keys, terms, masks_all, groups_all, rows, world, rank, ct, device) -> Plan:
    """The engine's plan (targets, key masks, coefficients of every term) from every rank's masks and ids."""
    n_all = world * rows
    index_all = torch.arange(n_all, device=device)
    local = slice(rank * rows, (rank + 1) * rows)
    targets, key_valid, valid_all = [], [], []
    for t in terms:
        v_all = torch.ones(n_all, dtype=torch.bool, device=device)
        for p in t.presence_keys() if masks_all else ():
            v_all = v_all & masks_all[p].to(device)
        if t.grouped:
            rep = representatives(groups_all.to(device), v_all)  # (W·b,), -1 on invalid rows
            key_valid.append(v_all & (rep == index_all))
            targets.append(rep[local])
        else:
            key_valid.append(v_all)
            targets.append(torch.where(v_all[local], index_all[local], -1))
        valid_all.append(v_all)
    coef = 0.5 * world / torch.stack(valid_all).sum(dim=1).clamp(min=1).to(ct)  # (n_terms,)
    directions = tuple(
        (i, keys.index(k_q), keys.index(k_k))
        for i, t in enumerate(terms)
        for k_q, k_k in ((t.a_key, t.b_key), (t.b_key, t.a_key))
    )
    return Plan(directions, torch.stack(targets), torch.stack(key_valid), coef, world, rank, rows)


def _gathered_losses(plan, backend, scales, xs, stacked, gathered) -> Tensor:
    """(n_terms,) losses from the local rows ``xs`` / ``stacked`` (b, K, d) and ``gathered`` (W·b, K, d)."""
    if backend == "triton":
        from kernels.trimodal_triton import trimodal_infonce_triton

        return trimodal_infonce_triton(plan, scales, stacked, gathered)
    return GatheredTrimodalFunction.apply(plan, group_ops(backend), scales, gathered, *xs)


def rank_trimodal_infonce(
    emb_all: Mapping[str, Tensor],
    terms: Sequence[Term],
    logit_scales: Tensor | Sequence[Tensor],
    *,
    world: int,
    rank: int = 0,
    present_all: Mapping[str, Tensor] | None = None,
    groups_all: Tensor | None = None,
    backend: str = "auto",
) -> dict[str, Tensor]:
    """Rank ``rank``'s share of every term given every rank's rows (no communication): the all-gather
    strategy's compute, as :func:`kernels.rank_symmetric_infonce` is for one term. For benchmarks that
    simulate a world on one device and for tests; training calls :func:`trimodal_infonce`.

    Args:
        emb_all: every rank's rows by key, (W·b, d), rank-major; the local rows are the ``rank`` slice.
        terms, logit_scales, backend: as :func:`trimodal_infonce`.
        world, rank: the simulated world size and rank.
        present_all: every rank's presence masks by key, (W·b,) bool; groups_all: (W·b,) int64.

    Returns:
        ``{term.name: L_rank}``; the gradient reaching ``emb_all`` is that of this share alone.
    """
    keys, n_all = _check(emb_all, terms, present_all, groups_all, "allgather")
    if world < 1 or n_all % world or not 0 <= rank < world:
        raise ValueError(f"rank_trimodal_infonce: {n_all} rows do not split into world={world} ranks (rank={rank})")
    rows = n_all // world
    xs_all = [emb_all[k] for k in keys]
    device, ct = xs_all[0].device, compute_dtype(xs_all[0].dtype)
    scales = _scale_vector(logit_scales, len(terms), xs_all[0])
    backend = resolve_backend(backend, xs_all[0], triton_available)
    plan = _plan(keys, terms, present_all or {}, groups_all, rows, world, rank, ct, device)
    gathered = torch.stack(xs_all, dim=1)  # (W·b, K, d)
    local = slice(rank * rows, (rank + 1) * rows)
    losses = _gathered_losses(plan, backend, scales, [x[local] for x in xs_all], gathered[local], gathered)
    return {t.name: losses[i] for i, t in enumerate(terms)}


def trimodal_infonce(
    emb: Mapping[str, Tensor],
    terms: Sequence[Term],
    logit_scales: Tensor | Sequence[Tensor],
    *,
    present: Mapping[str, Tensor] | None = None,
    groups: Tensor | None = None,
    backend: str = "auto",
    strategy: str = "allgather",
    group=None,
    check_rows: bool = True,
) -> dict[str, Tensor]:
    """This rank's share of every requested symmetric InfoNCE term, each embedding gathered once (module doc).

    Each value equals what ``kernels.gathered_symmetric_infonce`` (plain term) or
    ``kernels.grouped_symmetric_infonce`` (``term.grouped``) returns for that term alone, with
    ``valid_local`` the AND of the term's presence masks and its own scale, with the same gradients.

    Args:
        emb: local embeddings by key (``"sequence"``, ``"structure"``, ``"text"``, ``"sequence_view2"``,
            …); only the keys some term uses are read. All (b, d), one dtype and device.
        terms: the terms to compute (zero-weight ones left out by the caller); distinct names.
        logit_scales: the multipliers s (already ``exp()``'d), a (n_terms,) tensor or one [] / [1]
            tensor per term, in the order of ``terms``; each gets its gradient.
        present: presence masks by key, (b,) bool; ``None``: every row valid.
        groups: (b,) int64 false-negative group ids (``kernels.grouped.NO_GROUP``: none), needed when a
            term is grouped.
        backend: ``"auto"`` (Triton on CUDA when it imports, else torch), ``"torch"`` or ``"triton"``.
        strategy: ``"allgather"`` or ``"ring"`` (module doc: what each shares).
        group: process group (default: the world); without torch.distributed, one rank.
        check_rows: run ``kernels.check_equal_rows`` once first; ``False`` when the caller has.

    Shapes:
        emb[k] (b, d); present[k] (b,) bool; groups (b,) int64; b equal on every rank.

    Returns:
        ``{term.name: 0-dim loss}`` (fp32, fp64 for fp64 inputs): ``L_r`` of each term; log
        ``mean_r L_r``.
    """
    keys, rows = _check(emb, terms, present, groups, strategy)
    xs = [emb[k] for k in keys]
    device, ct = xs[0].device, compute_dtype(xs[0].dtype)
    scales = _scale_vector(logit_scales, len(terms), xs[0])
    world, rank = world_and_rank(group)
    if check_rows:
        check_equal_rows(rows, device, group)
    backend = resolve_backend(backend, xs[0], triton_available)
    groups = groups if any(t.grouped for t in terms) else None  # ids only matter to grouped terms
    masks_all, groups_all = _gather_masks(terms, present, groups, group, device)
    plan = _plan(keys, terms, masks_all, groups_all, rows, world, rank, ct, device)
    if strategy == "ring":
        losses = RingTrimodalFunction.apply(plan, group_ops(backend), group, scales, *xs)
        return {t.name: losses[i] for i, t in enumerate(terms)}
    stacked = torch.stack(xs, dim=1)  # (b, K, d): every key's rows, gathered in ONE collective
    gathered = gather_with_grad(stacked, group)  # (W·b, K, d); backward: one all-reduce for every key
    losses = _gathered_losses(plan, backend, scales, xs, stacked, gathered)
    return {t.name: losses[i] for i, t in enumerate(terms)}
