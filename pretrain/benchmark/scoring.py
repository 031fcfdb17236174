"""Benchmark metrics with bootstrap intervals over test proteins, fast enough for 1000 resamples.

A resample redraws test proteins with replacement; it is a weight vector w (N,) of draw counts.
Fmax and micro AUPR are sums over proteins (per threshold) and over (protein, label) pairs, so
the per-protein terms are computed once and every resample is a weighted sum: the same figures
as :func:`pretrain.eval.metrics.fmax` / :func:`pretrain.eval.metrics.micro_aupr` on the redrawn
set (the tests check both on the full set and on a redraw).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pretrain.benchmark.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, Interval, bootstrap, bootstrap_counts
from pretrain.eval.metrics import _EPS, THRESHOLDS

DENSE_FACTOR = 32  # AuprTerms.aupr_many counts per protein when distinct scores x proteins <= this x entries
DENSE_BLOCK = 2_000_000  # (distinct score, protein) cells counted at a time by AuprTerms.aupr_many


def _weights(idx: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(idx, minlength=n).astype(np.float64)


class FmaxTerms:
    """Per-protein terms of CAFA protein-centric Fmax (proteins must each have a true label).

    Shapes:
        scores (N, L) in [0, 1], truth (N, L) bool; internally P, R, C (N, T).
    """

    def __init__(self, scores: np.ndarray, truth: np.ndarray, thresholds: np.ndarray = THRESHOLDS):
        scores = np.asarray(scores, dtype=np.float64)
        truth = np.asarray(truth, dtype=bool)
        if scores.shape != truth.shape:
            raise ValueError(f"scores {scores.shape} and truth {truth.shape} differ in shape")
        if not truth.any(1).all():
            raise ValueError("every test protein needs at least one true label")
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        n, t = len(scores), len(self.thresholds)
        self.prec = np.zeros((n, t))  # tp / predicted (0 without a prediction)
        self.rec = np.zeros((n, t))  # tp / true
        self.covered = np.zeros((n, t))  # 1 when the protein has a prediction at t
        n_true = truth.sum(1).astype(np.float64)
        block = max(1, 20_000_000 // max(1, t * scores.shape[1]))
        for s in range(0, n, block):
            pred = scores[s : s + block, None, :] >= (self.thresholds[None, :, None] - _EPS)  # (b, T, L)
            m = pred.sum(2)
            tp = (pred & truth[s : s + block, None, :]).sum(2)
            self.prec[s : s + block] = np.where(m > 0, tp / np.maximum(m, 1), 0.0)
            self.rec[s : s + block] = tp / n_true[s : s + block, None]
            self.covered[s : s + block] = m > 0

    def __len__(self) -> int:
        return len(self.prec)

    def fmax(self, w: np.ndarray | None = None) -> float | None:
        """Fmax with protein weights ``w`` (N,) (None: each protein once); 0.0 without any prediction."""
        w = np.ones(len(self)) if w is None else w
        n = w.sum()
        if n == 0:
            return None
        cov = w @ self.covered
        defined = cov > 0
        if not defined.any():
            return 0.0
        p = (w @ self.prec)[defined] / cov[defined]
        r = (w @ self.rec)[defined] / n
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
        return float(f.max())


class AuprTerms:
    """Micro-averaged AUPR (step-wise average precision, ties one operating point) with protein weights."""

    def __init__(self, scores: np.ndarray, truth: np.ndarray):
        scores = np.asarray(scores, dtype=np.float64)
        truth = np.asarray(truth, dtype=bool)
        n, n_labels = truth.shape
        s = scores.ravel()
        self.order = np.argsort(-s, kind="stable")
        self.y = truth.ravel()[self.order]
        self.protein = (np.arange(n * n_labels) // max(1, n_labels))[self.order]
        ss = s[self.order]
        self.last = np.r_[np.nonzero(np.diff(ss))[0], len(ss) - 1] if len(ss) else np.zeros(0, np.int64)
        self.n = n

    def aupr_many(self, weights: np.ndarray) -> np.ndarray:
        """AUPR of each row of ``weights`` (R, N) (NaN where a row has no weighted positive).

        With few distinct scores (k-NN votes, best-hit identities) the positives and all predictions
        at or above each distinct score are counted per protein once (:meth:`_count_blocks`), and every
        redraw's curve is two matrix products of those counts with its weights: about 10-30x faster
        than :meth:`aupr` per redraw on GO-BP-sized label spaces. With many distinct scores the redraws
        go through :meth:`aupr`. Both count exactly (integer sums in float64), so the two agree to the
        rounding of the final sum.
        """
        weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        k, n = len(self.last), self.n
        if k == 0 or k * n > DENSE_FACTOR * max(1, len(self.y)):
            return np.array([np.nan if (v := self.aupr(w)) is None else v for w in weights])
        total = weights @ np.bincount(self.protein[self.y], minlength=n).astype(np.float64)  # (R,)
        out = np.zeros(len(weights))
        prev_recall = np.zeros(len(weights))
        with np.errstate(invalid="ignore", divide="ignore"):
            for every, pos in self._count_blocks():
                predicted, tp = every @ weights.T, pos @ weights.T  # (groups, R)
                precision = np.where(predicted > 0, tp / predicted, 0.0)
                recall = tp / total
                out += (np.diff(np.vstack([prev_recall, recall]), axis=0) * precision).sum(0)
                prev_recall = recall[-1]
        out[~(total > 0)] = np.nan
        return out

    def _count_blocks(self):
        """Per distinct score (in decreasing order) and protein: entries at or above it, and positives
        among them, as float64 blocks of at most DENSE_BLOCK cells; kept after the first call when
        they fit DENSE_BLOCK (a bootstrap calls :meth:`aupr_many` once per batch of redraws)."""
        if getattr(self, "_blocks", None) is not None:
            yield from self._blocks
            return
        k, n = len(self.last), self.n
        group = np.repeat(np.arange(k), np.diff(np.r_[-1, self.last]))  # distinct-score group of each entry
        step = max(1, DENSE_BLOCK // max(1, n))
        blocks, carry_all, carry_pos = [], np.zeros(n), np.zeros(n)
        for g0 in range(0, k, step):
            g1 = min(k, g0 + step)
            lo, hi = (self.last[g0 - 1] + 1 if g0 else 0), self.last[g1 - 1] + 1
            cell = (group[lo:hi] - g0) * n + self.protein[lo:hi]  # (group, protein) of each entry
            size = (g1 - g0) * n
            every = np.bincount(cell, minlength=size).reshape(g1 - g0, n).astype(np.float64).cumsum(0) + carry_all
            pos = np.bincount(cell[self.y[lo:hi]], minlength=size).reshape(g1 - g0, n).astype(np.float64)
            pos = pos.cumsum(0) + carry_pos
            carry_all, carry_pos = every[-1], pos[-1]
            blocks.append((every, pos))
            yield every, pos
        if k * n <= DENSE_BLOCK:
            self._blocks = blocks

    def aupr(self, w: np.ndarray | None = None) -> float | None:
        """AUPR with protein weights ``w`` (N,); None when there is no weighted positive."""
        wp = np.ones(len(self.y)) if w is None else w[self.protein]
        tp = np.cumsum(wp * self.y)[self.last]
        fp = np.cumsum(wp * ~self.y)[self.last]
        total = tp[-1] if len(tp) else 0.0
        if total <= 0:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = tp / total
        return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _interval(fn: Callable[[np.ndarray | None], float | None], n: int, resamples: int, level: float, seed: int):
    def stat(idx: np.ndarray) -> float | None:
        if len(idx) == n and np.array_equal(idx, np.arange(n)):
            return fn(None)
        return fn(_weights(idx, n))

    return bootstrap(stat, n, resamples=resamples, level=level, seed=seed)


def multilabel_metrics(
    scores: np.ndarray,
    truth: np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> dict[str, Interval]:
    """Fmax and micro AUPR of (N, L) scores against (N, L) truth, each with its bootstrap interval."""
    n = len(truth)
    if n == 0:
        return {"fmax": Interval(None, None, None, level), "aupr": Interval(None, None, None, level)}
    f, a = FmaxTerms(scores, truth), AuprTerms(scores, truth)
    return {
        "fmax": _interval(f.fmax, n, resamples, level, seed),
        "aupr": bootstrap_counts(a.aupr_many, n, resamples=resamples, level=level, seed=seed),  # the same draws
    }


def mean_interval(
    values: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed: int = 0
) -> Interval:
    """Mean of per-item values (accuracy: 0/1 hits, recall@k: hit indicators) with its interval."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return Interval(None, None, None, level)
    return bootstrap(lambda idx: float(values[idx].mean()), len(values), resamples=resamples, level=level, seed=seed)


def median_interval(
    values: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed: int = 0
) -> Interval:
    """Median of per-item values (e.g. ranks) with its interval."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return Interval(None, None, None, level)
    return bootstrap(
        lambda idx: float(np.median(values[idx])), len(values), resamples=resamples, level=level, seed=seed
    )
