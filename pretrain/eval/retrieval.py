"""Cross-modal retrieval: recall@k and median rank for every direction between modalities.

Two ways to count a hit:

* exact pair: only the query's own protein (row i) is correct;
* multi-positive (``_multi``): every protein whose canonical text is identical to the query's
  counts, since such proteins are indistinguishable through the text (``groups`` labels them).

Ranks are pessimistic: a candidate scoring equal to the positive counts as ranked above it, so a
collapsed model (all embeddings equal) scores chance-or-worse, never perfect.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

MODALITY_SHORT = {"sequence": "seq", "structure": "struct", "text": "text"}
CURVE_MAX_K = 50


def _as_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def positive_ranks(queries: np.ndarray, candidates: np.ndarray, block: int = 1024) -> np.ndarray:
    """0-based rank of candidate i among all candidates for query i (ties count against it).

    Shapes:
        queries (N, E), candidates (N, E) paired by row -> (N,) int64. Memory is O(block x N).
    """
    ranks, _ = _ranks(queries, candidates, None, block)
    return ranks


def multi_positive_ranks(
    queries: np.ndarray, candidates: np.ndarray, groups: np.ndarray, block: int = 1024
) -> np.ndarray:
    """0-based rank of the best-scoring positive, where candidate j is a positive of query i when
    ``groups[j] == groups[i]``; only non-positives scoring >= that positive count above it.

    Shapes:
        queries (N, E), candidates (N, E) paired by row, groups (N,) int -> (N,) int64.
    """
    _, ranks = _ranks(queries, candidates, groups, block)
    return ranks


def _ranks(queries, candidates, groups, block):
    q, c = _as_tensor(queries), _as_tensor(candidates)
    n = q.shape[0]
    exact = torch.empty(n, dtype=torch.long)
    multi = torch.empty(n, dtype=torch.long) if groups is not None else None
    g = torch.from_numpy(np.asarray(groups, dtype=np.int64)) if groups is not None else None
    for start in range(0, n, block):
        sims = q[start : start + block] @ c.T  # (b, N)
        rows = torch.arange(sims.shape[0])
        pos = sims[rows, rows + start]
        exact[start : start + block] = (sims >= pos[:, None]).sum(1) - 1  # minus the positive itself
        if g is not None:
            is_pos = g[start : start + block, None] == g[None, :]  # (b, N)
            best = sims.masked_fill(~is_pos, -math.inf).max(1).values
            multi[start : start + block] = ((sims >= best[:, None]) & ~is_pos).sum(1)
    return exact.numpy(), (multi.numpy() if multi is not None else None)


def text_groups(texts: list[str]) -> np.ndarray:
    """Group ids of identical non-empty texts; every empty text is a group of its own.

    Shapes:
        -> (N,) int64
    """
    index: dict[str, int] = {}
    out = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        key = t.strip()
        out[i] = index.setdefault(key, len(index)) if key else -(i + 1)
    return out


def chance_multi(group_sizes: np.ndarray, n: int, k: int) -> float:
    """Expected R@k of a random ranking when query i has ``group_sizes[i]`` positives among n.

    P(hit) = 1 - C(n - g, k) / C(n, k), averaged over queries.
    """
    if k >= n:
        return 1.0
    miss = np.ones(len(group_sizes))
    g = np.asarray(group_sizes, dtype=np.float64)
    for j in range(k):
        miss *= np.clip((n - g - j) / (n - j), 0.0, None)
    return float(1.0 - miss.mean())


def _recall_curve(ranks: np.ndarray, max_k: int) -> list[float]:
    counts = np.bincount(np.minimum(ranks, max_k), minlength=max_k + 1)[:max_k]
    return (np.cumsum(counts) / len(ranks)).tolist()


def _directions(emb: dict):
    """(name, query modality, candidate modality, (N,) bool: proteins with both) per available direction."""
    for a, b in itertools.permutations(("sequence", "structure", "text"), 2):
        if f"present_{a}" in emb and f"present_{b}" in emb:
            yield f"{MODALITY_SHORT[a]}->{MODALITY_SHORT[b]}", a, b, emb[f"present_{a}"] & emb[f"present_{b}"]


def direction_ranks(emb: dict, block: int = 1024) -> dict[str, np.ndarray]:
    """Per-protein exact-pair rank of the true partner in every direction (per-protein outcomes).

    The same ranks :func:`retrieval_metrics` counts (0-based, ties against the positive, among
    the proteins that have both modalities): R@k of a direction is ``mean(r[r >= 0] < k)``.

    Shapes:
        emb as for :func:`retrieval_metrics` (N rows) -> {"seq->text": (N,) int64, ...}, -1 where
        a protein lacks one of the direction's modalities.
    """
    out = {}
    for name, a, b, both in _directions(emb):
        ranks = np.full(len(both), -1, dtype=np.int64)
        if both.any():
            ranks[both] = positive_ranks(emb[a][both], emb[b][both], block)
        out[name] = ranks
    return out


def retrieval_metrics(
    emb: dict, ks: list[int], groups: np.ndarray | None = None, curve_max_k: int = CURVE_MAX_K
) -> dict:
    """R@k, median rank and chance level for the six directions.

    Only proteins that have both modalities of a pair take part in that pair's retrieval.

    Args:
        emb: ``sequence`` / ``structure`` / ``text`` (N, E) and ``present_<modality>`` (N,) bool.
        ks: recall cut-offs.
        groups: (N,) multi-positive group ids (e.g. :func:`text_groups` of the canonical texts);
            when given, every direction also reports ``R@k_multi``, ``chance_R@k_multi`` and
            ``median_rank_multi``.
        curve_max_k: R@k is also stored for every k in 1..curve_max_k (``curve``) for plots.

    Returns:
        ``{"directions": {"seq->text": {...}, ...}, "summary": {...}}``.
    """
    directions: dict[str, dict] = {}
    for name, a, b, both in _directions(emb):
        n = int(both.sum())
        if n == 0:
            directions[name] = {"n": 0}
            continue
        g = None if groups is None else np.asarray(groups)[both]
        exact, multi = _ranks(emb[a][both], emb[b][both], g, 1024)
        d: dict = {"n": n, "median_rank": float(np.median(exact) + 1)}
        for k in ks:
            d[f"R@{k}"] = float((exact < k).mean())
            d[f"chance_R@{k}"] = min(1.0, k / n)
        max_k = min(curve_max_k, n)
        curve = {
            "k": list(range(1, max_k + 1)),
            "exact": _recall_curve(exact, max_k),
            "chance": [min(1.0, k / n) for k in range(1, max_k + 1)],
        }
        if multi is not None:
            _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
            sizes = counts[inverse]
            d["median_rank_multi"] = float(np.median(multi) + 1)
            d["mean_positives"] = float(sizes.mean())
            for k in ks:
                d[f"R@{k}_multi"] = float((multi < k).mean())
                d[f"chance_R@{k}_multi"] = chance_multi(sizes, n, k)
            curve["multi"] = _recall_curve(multi, max_k)
            curve["chance_multi"] = [chance_multi(sizes, n, k) for k in range(1, max_k + 1)]
        d["curve"] = curve
        directions[name] = d
    summary = {name: {k: v for k, v in d.items() if k.startswith("R@")} for name, d in directions.items() if d.get("n")}
    return {"directions": directions, "summary": summary}
