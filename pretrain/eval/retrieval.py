"""Cross-modal retrieval: recall@k and median rank for every direction between modalities."""

from __future__ import annotations

import itertools

import numpy as np
import torch

MODALITY_SHORT = {"sequence": "seq", "structure": "struct", "text": "text"}


def positive_ranks(queries: np.ndarray, candidates: np.ndarray, block: int = 1024) -> np.ndarray:
    """0-based rank of candidate i among all candidates for query i (ties count against it).

    Shapes:
        queries (N, E), candidates (N, E) paired by row. Memory is O(block x N).
    """
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    c = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.float32))
    ranks = torch.empty(q.shape[0], dtype=torch.long)
    for start in range(0, q.shape[0], block):
        sims = q[start : start + block] @ c.T  # (b, N)
        rows = torch.arange(sims.shape[0])
        pos = sims[rows, rows + start]
        ranks[start : start + block] = (sims > pos[:, None]).sum(1)  # strictly better candidates
    return ranks.numpy()


def retrieval_metrics(emb: dict, ks: list[int]) -> dict:
    """R@k, median rank and chance level for the six directions.

    Only proteins that have both modalities of a pair take part in that pair's retrieval.
    Returns ``{"directions": {"seq->text": {...}, ...}, "summary": {...}}``.
    """
    directions: dict[str, dict] = {}
    for a, b in itertools.permutations(("sequence", "structure", "text"), 2):
        both = emb[f"present_{a}"] & emb[f"present_{b}"]
        n = int(both.sum())
        name = f"{MODALITY_SHORT[a]}->{MODALITY_SHORT[b]}"
        if n == 0:
            directions[name] = {"n": 0}
            continue
        ranks = positive_ranks(emb[a][both], emb[b][both])
        d = {"n": n, "median_rank": float(np.median(ranks) + 1)}
        for k in ks:
            d[f"R@{k}"] = float((ranks < k).mean())
            d[f"chance_R@{k}"] = min(1.0, k / n)
        directions[name] = d
    summary = {name: {k: v for k, v in d.items() if k.startswith("R@")} for name, d in directions.items() if d.get("n")}
    return {"directions": directions, "summary": summary}
