"""The fused tri-modal loss's engine: every term's two directions reduced block by block, keys shared.

Used by :func:`kernels.trimodal.trimodal_infonce` (which builds the plan: keys, directions, targets, key
masks, row weights). A *direction* is one query embedding key against one key embedding key with one
term's scale, targets and key mask; a term contributes two (a → b and b → a). The directions are grouped
by their query key, so each query set is read once per key block for all the directions that use it.

Loss of term t, with N_t its valid global rows, W the world size and per-row ``lse`` / positive logit::

    L_t = 0.5 · W / max(N_t, 1) · Σ_{direction of t} Σ_{i: target_i ≥ 0} (lse_i − s_t · q_i·k_{target_i})

which is, term by term, ``kernels.gathered_symmetric_infonce`` (targets r·b + i on present rows) and
``kernels.grouped_symmetric_infonce`` (targets the group representatives) with the same rescale.

Blocks: with ``"allgather"`` there is one block, every key's gathered rows (one ``gather_with_grad`` of
the stacked (b, K, d) local rows: a single collective for all keys), and :class:`GatheredTrimodalFunction`
returns their gradient as one (W·b, K, d) tensor to the gather (whose backward is one all-reduce).
With ``"ring"`` the block is this rank's rows of *every* key,
stacked (K, b, d) and passed rank to rank once per step for all terms (``kernels.ring``'s ``Ring``);
the backward sends it round again with one fp32 accumulator of the same shape (:class:`RingTrimodalFunction`).
Message order per link as in ``kernels.ring``: features(0), grads(0), features(1), …

Block ops (the per-block work of one query group):

- torch (:class:`_TorchGroupOps`): each chunk of query rows (``chunk · Σn ≤ _CHUNK_ELEMS``: never a
  b × N buffer beyond one chunk) is cast once and contrasted with every key block of its group, one
  (chunk, n_j) logits buffer at a time, scaled, masked and exponentiated in place (the chunked reference's
  arithmetic). Concatenating the group's keys into one GEMM per chunk was tried: on the 2-core CPU it
  measured no faster, and it copies every key block, so it was dropped. Same FLOPs as the per-term calls.
- triton (ring strategy only): ``kernels.ring``'s block kernels, one LSE / backward launch set per
  direction (the kernels take one scale per launch, and the terms' scales differ).

Positive logits are gathered rows (``q_i · k_{t_i}``, taken from the block that holds ``t_i``), so the
block ops never see targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import ring as ring_module
from kernels.infonce_reference import refuse_double_backward

__all__ = ["GatheredTrimodalFunction", "Plan", "RingTrimodalFunction", "group_ops"]

_CHUNK_ELEMS = 1 << 24  # query rows per torch chunk = this / Σn: the (chunk, Σn) buffer is ≤ 64 MiB in fp32


@dataclass(frozen=True)
class Plan:
    """What the engine computes (built by ``kernels.trimodal``; tensors carry no autograd history).

    Attributes:
        directions: per direction ``(term index, query key index, key key index)``.
        targets: (n_terms, b) int64 global row of each local row's positive, −1 for no query.
        key_valid: (n_terms, W·b) bool, the key columns of each term.
        coef: (n_terms,) the compute-dtype factor 0.5·W / max(N_t, 1).
        world, rank: of the process group; rows: b.
    """

    directions: tuple[tuple[int, int, int], ...]
    targets: Tensor
    key_valid: Tensor
    coef: Tensor
    world: int
    rank: int
    rows: int

    def query_groups(self) -> dict[int, list[int]]:
        """Query key index → the indices of its directions (in order)."""
        groups: dict[int, list[int]] = {}
        for j, (_, q, _) in enumerate(self.directions):
            groups.setdefault(q, []).append(j)
        return groups


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 / bf16 / fp32 compute in fp32, fp64 in fp64 (the exact tests)."""
    return torch.promote_types(dtype, torch.float32)


class _TorchGroupOps:
    """Chunked torch ops of one query group: each chunk of query rows is cast once and contrasted with every
    key block of the group in turn, one (chunk, n_j) logits buffer at a time (chunk · Σn ≤ ``_CHUNK_ELEMS``)."""

    @staticmethod
    def _chunk(keys) -> int:
        return max(1, _CHUNK_ELEMS // max(sum(k.shape[0] for k in keys), 1))

    @staticmethod
    def lse(q, keys, scales, masks):
        """Per direction (m,) LSE of s_j·q·K_jᵀ over the unmasked columns (−inf where none)."""
        ct = compute_dtype(q.dtype)
        kf = [k.to(ct) for k in keys]
        chunk = _TorchGroupOps._chunk(keys)
        out = [torch.empty(q.shape[0], dtype=ct, device=q.device) for _ in keys]
        for start in range(0, q.shape[0], chunk):
            qc = q[start : start + chunk].to(ct)
            for j, k in enumerate(kf):
                z = (qc @ k.T).mul_(scales[j])  # (c, n_j), in place from here on
                if masks[j] is not None:
                    z.masked_fill_(~masks[j], float("-inf"))
                out[j][start : start + chunk] = torch.logsumexp(z, dim=1)
        return out

    @staticmethod
    def backward(q, keys, scales, lses, weights, masks):
        """(dq, [dK_j], [ds_j]) of Σ_j Σ_i w_ji·lse_ji (the LSE part; positives are the caller's):
        per chunk and direction G_j = w·softmax in place, dq += s_j·G_j·K_j, dK_j += s_j·G_jᵀ·q,
        ds_j += Σ q·(G_j·K_j)."""
        ct = compute_dtype(q.dtype)
        kf = [k.to(ct) for k in keys]
        chunk = _TorchGroupOps._chunk(keys)
        dq = torch.empty(q.shape, dtype=ct, device=q.device)
        dk = [None] * len(kf)
        ds = [torch.zeros((), dtype=ct, device=q.device) for _ in keys]
        lses = [torch.where(w != 0, lse, float("inf")) for lse, w in zip(lses, weights)]  # weightless: p = 0
        for start in range(0, q.shape[0], chunk):
            qc = q[start : start + chunk].to(ct)
            dq_c = None
            for j, k in enumerate(kf):
                z = (qc @ k.T).mul_(scales[j]).sub_(lses[j][start : start + chunk, None]).exp_()  # (c, n_j)
                if masks[j] is not None:
                    z.masked_fill_(~masks[j], 0.0)
                z.mul_(weights[j][start : start + chunk, None])  # G_j = dL/dz
                gk = z @ k  # (c, d)
                ds[j] += (qc * gk).sum()
                gk.mul_(scales[j])
                dq_c = gk if dq_c is None else dq_c.add_(gk)
                dk_c = (z.T @ qc).mul_(scales[j])  # (n_j, d)
                dk[j] = dk_c if dk[j] is None else dk[j].add_(dk_c)
            dq[start : start + chunk] = dq_c
        return dq, [torch.zeros_like(k) if g is None else g for k, g in zip(kf, dk)], ds


class _TritonGroupOps:
    """One direction at a time on ``kernels.ring``'s Triton block kernels (one scale per launch)."""

    def __init__(self):
        self.ops = ring_module.block_ops("triton", torch.device("cuda"))

    def lse(self, q, keys, scales, masks):
        return [self.ops.lse(q, k, s, m) for k, s, m in zip(keys, scales, masks)]

    def backward(self, q, keys, scales, lses, weights, masks):
        dq, dks, dss = None, [], []
        for k, s, lse, w, m in zip(keys, scales, lses, weights, masks):
            dq_j, dk_j, ds_j = self.ops.backward(q, k, s, lse, w.float().contiguous(), m)
            dq = dq_j if dq is None else dq + dq_j
            dks.append(dk_j)
            dss.append(ds_j)
        return dq, dks, dss


def group_ops(backend: str):
    """The block ops of a resolved backend, ``"torch"`` or ``"triton"``."""
    return _TritonGroupOps() if backend == "triton" else _TorchGroupOps()


# ----------------------------------------------------------------------------- block reductions


def _positives_in_block(targets, offset, n_block):
    """(hit (b,) bool, index (b,) int64): rows whose positive is key row offset … offset + n_block of
    the block, and its row there (0 where not hit: weighted out by the caller; no host sync)."""
    local = targets - offset
    hit = (local >= 0) & (local < n_block)
    return hit, torch.where(hit, local, torch.zeros_like(local))


def _block_forward(plan, xs, block, offset, n_block, scales, ops, lse, pos):
    """Fold one key block (``block[k]``: key k's rows offset … offset + n_block) into every direction's
    running LSE and positive logit (lists of (b,) tensors, updated in place / replaced)."""
    ct = lse[0].dtype
    for qk, dirs in plan.query_groups().items():
        keys = [block[plan.directions[j][2]] for j in dirs]
        terms = [plan.directions[j][0] for j in dirs]
        masks = [plan.key_valid[t, offset : offset + n_block] for t in terms]
        parts = ops.lse(xs[qk], keys, [scales[t] for t in terms], masks)
        for j, t, k, part in zip(dirs, terms, keys, parts):
            lse[j] = torch.logaddexp(lse[j], part.to(ct))
            hit, index = _positives_in_block(plan.targets[t], offset, n_block)
            dot = (xs[qk].to(ct) * k[index].to(ct)).sum(dim=1)
            pos[j] = pos[j] + torch.where(hit, dot, 0.0)


def _block_backward(plan, xs, block, offset, n_block, scales, ops, lse, weights, dxs, ds):
    """Gradients from one key block: adds into ``dxs`` (per local key) and ``ds`` (per term); returns the
    block's own gradient (len(block) tensors, compute dtype)."""
    ct = dxs[0].dtype
    dblock = [None] * len(block)
    for qk, dirs in plan.query_groups().items():
        keys = [block[plan.directions[j][2]] for j in dirs]
        terms = [plan.directions[j][0] for j in dirs]
        masks = [plan.key_valid[t, offset : offset + n_block] for t in terms]
        w = [weights[j] for j in dirs]
        dq, dks, dss = ops.backward(xs[qk], keys, [scales[t] for t in terms], [lse[j] for j in dirs], w, masks)
        dxs[qk] += dq.to(ct)
        xq = xs[qk].to(ct)
        for j, t, k, dk, ds_j, w_j in zip(dirs, terms, keys, dks, dss, w):
            kk = plan.directions[j][2]
            dblock[kk] = dk.to(ct) if dblock[kk] is None else dblock[kk] + dk
            ds[t] = ds[t] + ds_j.to(ct)
            # positives: the loss holds −w_i·s·q_i·k_{t_i}
            hit, index = _positives_in_block(plan.targets[t], offset, n_block)
            w_hit = torch.where(hit, w_j, 0.0)[:, None]  # (b, 1)
            k_pos = k[index].to(ct)  # (b, d)
            dxs[qk] -= w_hit * scales[t] * k_pos
            dblock[kk].index_add_(0, index, -w_hit * scales[t] * xq)
            ds[t] = ds[t] - (w_hit * xq * k_pos).sum()
    return [torch.zeros(k.shape, dtype=ct, device=k.device) if d is None else d for k, d in zip(block, dblock)]


def _state(plan, ct, device):
    n = len(plan.directions)
    lse = [torch.full((plan.rows,), float("-inf"), dtype=ct, device=device) for _ in range(n)]
    return lse, [torch.zeros(plan.rows, dtype=ct, device=device) for _ in range(n)]


def _finish(plan, scales, lse, pos, n_terms):
    """(per-term losses (n_terms,), per-direction (b,) row weights before the upstream gradient)."""
    ct = lse[0].dtype
    losses = torch.zeros(n_terms, dtype=ct, device=lse[0].device)
    weights = []
    for j, (t, _, _) in enumerate(plan.directions):
        live = plan.targets[t] >= 0
        per_row = torch.where(live, lse[j] - scales[t] * pos[j], 0.0)
        losses[t] = losses[t] + plan.coef[t] * per_row.sum()
        weights.append(live.to(ct) * plan.coef[t])
    return losses, weights


def _term_grad_weights(plan, weights, grad_losses):
    return [weights[j] * grad_losses[t] for j, (t, _, _) in enumerate(plan.directions)]


class GatheredTrimodalFunction(torch.autograd.Function):
    """All-gather strategy: the local rows of every key and their once-gathered stack, one block.

    ``forward(ctx, plan, ops, scales (n_terms,), gathered (W·b, K, d), *xs (b, d) each)`` → (n_terms,)
    losses; gradients for ``scales``, ``gathered`` (one (W·b, K, d) tensor: back through ``gather_with_grad``
    in one all-reduce) and the local rows.
    """

    @staticmethod
    def forward(ctx, plan, ops, scales, gathered, *xs):
        ct = compute_dtype(xs[0].dtype)
        s = scales.detach().to(ct)
        block = gathered.unbind(1)  # K (W·b, d) views
        with torch.autocast(xs[0].device.type, enabled=False):
            lse, pos = _state(plan, ct, xs[0].device)
            _block_forward(plan, xs, block, 0, gathered.shape[0], s, ops, lse, pos)
            losses, weights = _finish(plan, s, lse, pos, scales.shape[0])
        ctx.save_for_backward(scales, gathered, *xs, *lse, *weights)
        ctx.plan, ctx.ops, ctx.n_keys = plan, ops, len(xs)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        refuse_double_backward("trimodal infonce")
        plan, n_keys, n_dirs = ctx.plan, ctx.n_keys, len(ctx.plan.directions)
        scales, gathered, *rest = ctx.saved_tensors
        xs, lse, weights = rest[:n_keys], rest[n_keys : n_keys + n_dirs], rest[n_keys + n_dirs :]
        ct = compute_dtype(xs[0].dtype)
        s = scales.detach().to(ct)
        w = _term_grad_weights(plan, weights, grad_losses.to(ct))
        dxs = [torch.zeros(x.shape, dtype=ct, device=x.device) for x in xs]
        ds = [torch.zeros((), dtype=ct, device=s.device) for _ in range(s.shape[0])]
        with torch.autocast(xs[0].device.type, enabled=False):
            block = gathered.unbind(1)
            dg = _block_backward(plan, xs, block, 0, gathered.shape[0], s, ctx.ops, lse, w, dxs, ds)
        d_gathered = torch.stack(dg, dim=1).to(gathered.dtype)  # (W·b, K, d)
        grads = [d.to(x.dtype) for d, x in zip(dxs, xs)]
        return None, None, torch.stack(ds).to(scales.dtype), d_gathered, *grads


class RingTrimodalFunction(torch.autograd.Function):
    """Ring strategy: the stacked (K, b, d) local rows of every key travel rank to rank, once per step for
    all terms; the backward sends them round again with a (K, b, d) fp32 gradient accumulator.

    ``forward(ctx, plan, ops, group, scales (n_terms,), *xs)`` → (n_terms,) losses.
    """

    @staticmethod
    def forward(ctx, plan, ops, group, scales, *xs):
        ring = ring_module.Ring(group)
        ct = compute_dtype(xs[0].dtype)
        s = scales.detach().to(ct)
        b = plan.rows
        block = torch.stack([x.contiguous() for x in xs])  # (K, b, d): what travels
        with torch.autocast(xs[0].device.type, enabled=False):
            lse, pos = _state(plan, ct, xs[0].device)
            for step in range(ring.world):
                incoming, works = ring.shift_features(block) if step < ring.world - 1 else ((None, None), None)
                _block_forward(plan, xs, block, ring.source(step) * b, b, s, ops, lse, pos)
                ring_module.wait_all(works)
                block = incoming[0]
            losses, weights = _finish(plan, s, lse, pos, scales.shape[0])
        ctx.save_for_backward(scales, *xs, *lse, *weights)
        ctx.plan, ctx.ops, ctx.ring, ctx.n_keys = plan, ops, ring, len(xs)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        refuse_double_backward("trimodal infonce (ring)")
        plan, ring, ops, n_keys, n_dirs = ctx.plan, ctx.ring, ctx.ops, ctx.n_keys, len(ctx.plan.directions)
        saved = ctx.saved_tensors
        scales, xs = saved[0], saved[1 : 1 + n_keys]
        lse, weights = saved[1 + n_keys : 1 + n_keys + n_dirs], saved[1 + n_keys + n_dirs :]
        ct = compute_dtype(xs[0].dtype)
        s = scales.detach().to(ct)
        b = plan.rows
        w = _term_grad_weights(plan, weights, grad_losses.to(ct))
        dxs = [torch.zeros(x.shape, dtype=ct, device=x.device) for x in xs]
        ds = [torch.zeros((), dtype=ct, device=s.device) for _ in range(s.shape[0])]
        block = torch.stack([x.contiguous() for x in xs])
        pending_send, sent, own = None, None, None
        with torch.autocast(xs[0].device.type, enabled=False):
            for step in range(ring.world):
                acc_in, acc_work = (
                    ring.recv_grads(torch.empty(block.shape, dtype=ct, device=block.device))
                    if step > 0
                    else (None, None)
                )
                incoming, works = ring.shift_features(block) if step < ring.world - 1 else ((None, None), None)
                acc = torch.stack(_block_backward(plan, xs, block, ring.source(step) * b, b, s, ops, lse, w, dxs, ds))
                if acc_work is not None:
                    acc_work.wait()
                    acc += acc_in
                if ring.world > 1:
                    ring_module.wait_all([pending_send] if pending_send is not None else None)
                    pending_send, sent = ring.send_grads(acc), acc
                else:
                    own = acc
                ring_module.wait_all(works)
                block = incoming[0]
            if ring.world > 1:
                own, work = ring.recv_grads(acc)
                work.wait()
                pending_send.wait()
                del sent
        grads = [(dx + own[k]).to(x.dtype) for k, (dx, x) in enumerate(zip(dxs, xs))]
        return None, None, None, torch.stack(ds).to(scales.dtype), *grads
