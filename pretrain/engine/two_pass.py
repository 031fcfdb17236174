"""GradCache-style two-pass training step: the batch size is limited by the embeddings, not activations.

A contrastive loss couples every row of the batch, so a plain step keeps the activations of the
whole per-rank batch alive until the loss is known. The two-pass step (Gao et al., "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup", 2021) splits that dependency:

1. **Embed.** Each chunk of ``train.grad_cache_chunk`` rows runs the encoders and heads under
   ``no_grad`` (only the (B, E) embeddings of every modality and view are kept). The CPU and CUDA
   RNG states are saved before each chunk.
2. **Loss.** The full loss (all pairs, intra-modal terms, negatives from every rank through the
   existing gathered InfoNCE) runs on detached fp32 copies of the embeddings that require grad, plus
   the logit scale; ``autograd.grad`` gives dL/d(embedding) and dL/d(logit scale).
3. **Replay.** Each chunk runs again with grad after restoring its RNG states (so dropout masks are
   the ones of step 1) and back-propagates the surrogate ``sum(embedding · dL/d(embedding))``,
   whose parameter gradient is exactly the chunk's share of dL/dθ.

Why this is the one-pass gradient: dL/dθ = Σ_chunks (∂emb_chunk/∂θ)ᵀ · dL/d(emb_chunk), and the
surrogate's gradient is that product for one chunk; summing the chunks' backward passes is
gradient accumulation. The logit scale's term is added once (with the first chunk).

Under DeepSpeed every chunk's surrogate goes through ``engine.backward`` (loss scaling, ZeRO
gradient hooks and partitioning) with the gradient-accumulation boundary set only on the last
chunk, the documented way to accumulate several backward passes into one ``engine.step()``. The
data-parallel scaling is unchanged from the one-pass step: the gathered loss already gives each
rank W × its share, which DeepSpeed's averaging divides back (see ``kernels.distributed``).

Augmentation (crops, masked / noisy second views) is drawn by the data pipeline and arrives in
the batch, so both passes see the same views without replaying anything; only the model's own
randomness (dropout, GVP vector dropout) needs the RNG replay. With one chunk the RNG stream is
that of the one-pass step, so the step is the one-pass step exactly; with several chunks the
dropout masks are drawn chunk by chunk (equal to a one-pass step that embeds chunk by chunk).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pretrain.data.collate import batch_to_device
from pretrain.engine.precision import embeddings_to_fp32, forward_autocast, resolve_precision
from pretrain.losses.objective import Objective
from pretrain.models.trimodal import SHARED_OUTPUTS

# Batch keys that the Align-Pro forward reads per row (``TriModalModel.forward``).
_ROW_KEYS = ("seq_tokens", "text_ids", "text_attn")


def slice_graph(graph: dict[str, Tensor], start: int, stop: int) -> dict[str, Tensor]:
    """Graphs ``start:stop`` of a batch from ``collate_graphs``, re-indexed as a batch of their own.

    Args:
        graph: ``node_s`` (N, 6), ``node_v`` (N, 3, 3), ``edge_s`` (E, Se), ``edge_v`` (E, 1, 3),
            ``residue_index`` (N,), ``edge_index`` (2, E), ``batch`` (N,), ``num_graphs`` (),
            ``present`` (B,).
        start: first graph kept.
        stop: one past the last graph kept.

    Returns:
        The same keys for the ``stop - start`` graphs; node ids and graph ids start at 0.
    """
    node_keep = (graph["batch"] >= start) & (graph["batch"] < stop)  # (N,)
    first_node = int((graph["batch"] < start).sum())  # nodes are stored graph by graph
    edge_keep = node_keep[graph["edge_index"][1]]  # (E,) an edge belongs to its target's graph
    out = {key: graph[key][node_keep] for key in ("node_s", "node_v", "residue_index")}
    out.update({key: graph[key][edge_keep] for key in ("edge_s", "edge_v")})
    out["edge_index"] = graph["edge_index"][:, edge_keep] - first_node  # (2, E')
    out["batch"] = graph["batch"][node_keep] - start  # (N',)
    out["num_graphs"] = torch.tensor(stop - start, dtype=torch.long, device=graph["batch"].device)
    out["present"] = graph["present"][start:stop]
    return out


def slice_model_batch(batch: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of what the Align-Pro model forward reads (main inputs and second views).

    Padding widths are kept, so a chunk's embeddings equal those rows of the whole batch.
    """

    def rows(src: dict) -> dict:
        out = {k: src[k][start:stop] for k in _ROW_KEYS if k in src}
        if "graph" in src:
            out["graph"] = slice_graph(src["graph"], start, stop)
        return out

    chunk = rows(batch)
    chunk["views"] = rows(batch.get("views") or {})
    return chunk


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _num_rows(batch: dict) -> int:
    return int(batch["seq_tokens"].shape[0])


def two_pass_step(
    engine: Callable,
    batch: dict,
    objective: Objective,
    chunk_size: int,
    *,
    autocast_dtype: torch.dtype | None = None,
    backward: Callable[[Tensor], object] | None = None,
    set_boundary: Callable[[bool], object] | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Gradients of one rank's Align-Pro loss computed in two passes; the optimizer step is the caller's.

    Args:
        engine: the model forward (a DeepSpeed engine or a ``TriModalModel``), ``batch -> emb``.
        batch: a collated batch on the model's device (``pretrain.data.collate``).
        objective: the run's objective (``pretrain.losses.objective``), one whose loss reads only the
            pooled embeddings and the logit scale (``objective.two_pass``), called as
            ``objective(emb, batch) -> terms`` with ``terms["loss"]``.
        chunk_size: rows embedded at once; ``>= B`` gives one chunk.
        autocast_dtype: forward autocast dtype (``pretrain.engine.precision.resolve_precision``); None: fp32.
        backward: how a surrogate scalar is back-propagated: ``engine.backward`` under DeepSpeed
            (default: ``Tensor.backward``).
        set_boundary: ``engine.set_gradient_accumulation_boundary`` under DeepSpeed, so that only
            the last chunk's backward closes the accumulation (default: none).

    Shapes:
        every embedding (B, E); logit scale [1]; B rows in chunks of ``chunk_size``.

    Returns:
        ``(terms, logit_scale)``: the loss terms of step 2 (detached) and the logit scale used.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if "protclip" in batch or not objective.two_pass:
        raise ValueError(
            f"the two-pass step needs an objective of pooled embeddings; {type(objective).__name__} reads "
            "per-token states (or the batch has protclip targets)"
        )
    backward = backward or (lambda loss: loss.backward())
    device = batch["seq_tokens"].device
    rows = _num_rows(batch)
    bounds = [(s, min(s + chunk_size, rows)) for s in range(0, rows, chunk_size)]

    # Pass 1: embeddings only.
    states, parts = [], []
    with torch.no_grad():
        for start, stop in bounds:
            states.append(_rng_state(device))
            with forward_autocast(autocast_dtype, device):
                out = engine(slice_model_batch(batch, start, stop))
            parts.append(embeddings_to_fp32(out))
    rng_after = _rng_state(device)
    keys = [k for k in parts[0] if k not in SHARED_OUTPUTS]
    emb = {k: torch.cat([p[k] for p in parts], dim=0).requires_grad_() for k in keys}  # each (B, E)
    # The logit scale [1] (and SigLIP's term biases): the same parameters for every chunk.
    shared = {k: parts[0][k].detach().clone().requires_grad_() for k in SHARED_OUTPUTS if k in parts[0]}
    scale = shared["logit_scale"]
    del parts

    # The loss and its gradient with respect to the cached embeddings and shared outputs.
    terms = objective({**emb, **shared}, batch)  # the batch also gives presence and groups
    leaves = [emb[k] for k in keys] + list(shared.values())
    grads = torch.autograd.grad(terms["loss"], leaves, allow_unused=True)
    grad_of = {
        k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip([*emb.items(), *shared.items()], grads)
    }
    terms = {k: v.detach() for k, v in terms.items()}
    del emb, leaves, grads

    # Pass 2: replay each chunk with grad and back-propagate the cached embedding gradients.
    for i, ((start, stop), state) in enumerate(zip(bounds, states)):
        _set_rng_state(state, device)
        if set_boundary is not None:
            set_boundary(i == len(bounds) - 1)
        with forward_autocast(autocast_dtype, device):
            out = engine(slice_model_batch(batch, start, stop))
        out = embeddings_to_fp32(out)
        surrogate = sum((out[k] * grad_of[k][start:stop]).sum() for k in keys)
        if i == 0:  # the shared outputs' gradient is added once
            surrogate = surrogate + sum((out[k] * grad_of[k]).sum() for k in shared)
        backward(surrogate)
        del out, surrogate
    _set_rng_state(rng_after, device)
    return terms, scale.detach()


def embed_no_grad(
    engine: Callable, batch: dict, chunk_size: int = 0, autocast_dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """The model's forward output on ``batch`` without gradients, as the one-pass step sees it.

    Args:
        engine: the model forward (a DeepSpeed engine or a ``TriModalModel``), ``batch -> out``.
        batch: a collated batch on the model's device.
        chunk_size: rows embedded at once, as in :func:`two_pass_step` (the memory of a step that
            needs chunks); 0 embeds the whole batch in one forward (every objective's output).
        autocast_dtype: forward autocast dtype; None: fp32.

    Shapes:
        every embedding (B, E) in fp32; ``logit_scale`` [1].
    """
    device = batch["seq_tokens"].device
    rows = _num_rows(batch)
    with torch.no_grad():
        if chunk_size < 1 or chunk_size >= rows:
            with forward_autocast(autocast_dtype, device):
                return embeddings_to_fp32(engine(batch))
        parts = []
        for start in range(0, rows, chunk_size):
            with forward_autocast(autocast_dtype, device):
                parts.append(embeddings_to_fp32(engine(slice_model_batch(batch, start, min(start + chunk_size, rows)))))
    out = {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0] if k not in SHARED_OUTPUTS}
    out.update({k: parts[0][k] for k in SHARED_OUTPUTS if k in parts[0]})
    return out


def weights_give_finite_loss(engine: Callable, objective: Objective, batch: dict, device: torch.device, train) -> bool:
    """Whether the model's current weights give a finite loss on ``batch``, on this process.

    A step's own loss is computed before its update, so it cannot tell whether the update broke
    the weights (a learning rate that overflows them leaves finite but useless weights and every
    later loss NaN). One forward pass without gradients can; the CPU and CUDA random generators are
    restored afterwards, so the data and dropout streams stay those of a run that never checks.

    Args:
        engine: the model forward (DeepSpeed engine or ``TriModalModel``); collective under ZeRO-3.
        objective: the run's objective (``pretrain.losses.objective``).
        batch: the collated batch (moved to ``device`` here).
        train: the ``train`` section (``precision``, ``grad_cache_chunk``: the step's memory layout).
    """
    state = _rng_state(device)
    try:
        with torch.no_grad():
            batch = batch_to_device(batch, device)
            dtype = resolve_precision(train.precision, device)
            loss = objective(embed_no_grad(engine, batch, train.grad_cache_chunk, dtype), batch)["loss"]
            return bool(torch.isfinite(loss).all())
    finally:
        _set_rng_state(state, device)
