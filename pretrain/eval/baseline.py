"""Nearest-neighbour transfer on sequence similarity: the baseline beside every learned figure.

A protein's 3-mer profile (20 amino acids + X for anything else: 21^3 = 9261 dimensions) is
compared with every training protein's, by Jaccard similarity of the 3-mer sets (default) or
cosine similarity of the 3-mer counts; the most similar training protein's labels are copied with
the similarity as their score (the "BLAST / Diamond transfer" baseline of CAFA, alignment-free).
Exact and blocked (train rows in blocks), so memory stays at O(block x 9261).
"""

from __future__ import annotations

import numpy as np
import torch

_AMINO = "ACDEFGHIKLMNPQRSTVWY"
_CODE = np.full(256, 20, dtype=np.int64)
_CODE[np.frombuffer(_AMINO.encode(), dtype=np.uint8)] = np.arange(20)
_BASE = 21


def kmer_ids(sequence: str, k: int = 3) -> np.ndarray:
    """Integer ids of the overlapping k-mers of ``sequence`` (with repeats), base-21 encoded."""
    codes = _CODE[np.frombuffer(sequence.upper().encode("ascii", "replace"), dtype=np.uint8)]
    if len(codes) < k:
        return np.zeros(0, dtype=np.int64)
    ids = np.zeros(len(codes) - k + 1, dtype=np.int64)
    for j in range(k):
        ids = ids * _BASE + codes[j : len(codes) - k + 1 + j]
    return ids


def _profiles(seqs: list[str], k: int, metric: str) -> torch.Tensor:
    """(N, 21^k) float32: 0/1 presence (jaccard) or L2-normalised counts (cosine)."""
    out = torch.zeros(len(seqs), _BASE**k)
    for i, s in enumerate(seqs):
        ids = torch.from_numpy(kmer_ids(s or "", k))
        if metric == "jaccard":
            out[i, ids] = 1.0
        else:
            out[i].index_add_(0, ids, torch.ones(len(ids)))
    if metric == "cosine":
        out = torch.nn.functional.normalize(out, dim=1)
    return out


def nearest_neighbours(
    queries: list[str], database: list[str], k: int = 3, metric: str = "jaccard", block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The most similar database sequence of each query.

    Ties go to the lowest database index; a query without any k-mer gets index -1 and similarity 0.
    Queries and database are both processed in blocks of ``block`` rows.

    Shapes:
        -> (index (Q,) int64, similarity (Q,) float32 in [0, 1])
    """
    if metric not in ("jaccard", "cosine"):
        raise ValueError(f"baseline metric {metric!r}: expected 'jaccard' or 'cosine'")
    index = np.full(len(queries), -1, dtype=np.int64)
    similarity = np.zeros(len(queries), dtype=np.float32)
    for q_start in range(0, len(queries), block):
        q = _profiles(queries[q_start : q_start + block], k, metric)
        q_size = q.sum(1)
        best = torch.full((q.shape[0],), -1.0)
        best_idx = torch.full((q.shape[0],), -1, dtype=torch.long)
        for start in range(0, len(database), block):
            d = _profiles(database[start : start + block], k, metric)
            inter = q @ d.T  # (q, d): shared k-mers (jaccard) or cosine
            if metric == "jaccard":
                union = q_size[:, None] + d.sum(1)[None, :] - inter
                sim = torch.where(union > 0, inter / union.clamp_min(1e-9), torch.zeros_like(inter))
            else:
                sim = inter
            val, idx = sim.max(1)  # first maximum within the block
            better = val > best  # strict: an earlier block wins ties
            best = torch.where(better, val, best)
            best_idx = torch.where(better, idx + start, best_idx)
        empty = q_size == 0
        best_idx[empty] = -1
        best = best.clamp_min(0.0)
        best[empty] = 0.0
        index[q_start : q_start + block] = best_idx.numpy()
        similarity[q_start : q_start + block] = best.numpy()
    return index, similarity


def transfer_scores(index: np.ndarray, similarity: np.ndarray, database_truth: np.ndarray) -> np.ndarray:
    """Copy the neighbour's labels with the similarity as score.

    Shapes:
        index (Q,), similarity (Q,), database_truth (D, L) bool -> (Q, L) float32
    """
    out = np.zeros((len(index), database_truth.shape[1]), dtype=np.float32)
    ok = index >= 0
    out[ok] = database_truth[index[ok]].astype(np.float32) * similarity[ok, None]
    return out
