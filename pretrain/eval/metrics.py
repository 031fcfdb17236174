"""Function-prediction metrics: CAFA protein-centric Fmax, micro AUPR, score propagation.

Fmax (Radivojac et al. 2013; CAFA) over thresholds t = 0.01, 0.02, ..., 1.00, computed once over
the whole test set:

* proteins without any true label are excluded from everything;
* a label is predicted at t when its score is >= t (within 1e-6, so float32 scores lying on a
  threshold count);
* precision(t) is averaged over the proteins with at least one predicted label, recall(t) over
  all (labelled) proteins; thresholds where no protein has a prediction are skipped;
* Fmax = max_t 2 p r / (p + r).
"""

from __future__ import annotations

import numpy as np

THRESHOLDS = np.round(np.arange(1, 101) / 100.0, 2)
_EPS = 1e-6


def fmax(scores: np.ndarray, truth: np.ndarray, thresholds: np.ndarray = THRESHOLDS, block: int = 4096) -> dict:
    """CAFA protein-centric Fmax (see the module docstring).

    Shapes:
        scores (N, L) in [0, 1], truth (N, L) bool.

    Returns:
        ``fmax``, ``threshold`` (argmax), ``precision`` / ``recall`` / ``coverage`` (fraction of
        proteins with a prediction) at that threshold, ``n`` (proteins scored), and ``curve``
        (``threshold``, ``precision``, ``recall`` lists over the thresholds where precision is
        defined). ``fmax`` is 0.0 when no threshold has a prediction, None when ``n`` is 0.
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    if scores.shape != truth.shape:
        raise ValueError(f"scores {scores.shape} and truth {truth.shape} differ in shape")
    keep = truth.any(1)
    scores, truth = scores[keep], truth[keep]
    n = int(keep.sum())
    if n == 0:
        return {"fmax": None, "n": 0}
    t = np.asarray(thresholds, dtype=np.float64)
    n_true = truth.sum(1).astype(np.float64)  # (N,)
    prec_sum = np.zeros(len(t))
    rec_sum = np.zeros(len(t))
    covered = np.zeros(len(t))
    block = max(1, min(block, 20_000_000 // max(1, len(t) * scores.shape[1])))  # ~20 MB of masks
    for start in range(0, n, block):
        s, y = scores[start : start + block], truth[start : start + block]
        pred = s[None, :, :] >= (t[:, None, None] - _EPS)  # (T, b, L)
        m = pred.sum(2)  # (T, b) predicted per protein
        tp = (pred & y[None]).sum(2)
        has = m > 0
        prec_sum += np.where(has, tp / np.maximum(m, 1), 0.0).sum(1)
        rec_sum += (tp / n_true[start : start + block][None]).sum(1)
        covered += has.sum(1)
    defined = covered > 0
    precision = np.where(defined, prec_sum / np.maximum(covered, 1), np.nan)
    recall = rec_sum / n
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(defined & (precision + recall > 0), 2 * precision * recall / (precision + recall), 0.0)
    out = {"n": n, "fmax": 0.0, "threshold": None, "precision": None, "recall": None, "coverage": 0.0}
    if defined.any():
        best = int(np.argmax(f))
        out.update(
            fmax=float(f[best]),
            threshold=float(t[best]),
            precision=float(precision[best]),
            recall=float(recall[best]),
            coverage=float(covered[best] / n),
        )
    out["curve"] = {
        "threshold": [float(x) for x in t[defined]],
        "precision": [float(x) for x in precision[defined]],
        "recall": [float(x) for x in recall[defined]],
    }
    return out


def micro_aupr(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Area under the micro-averaged precision-recall curve (average precision, step-wise).

    Every (protein, label) pair of the proteins with at least one label is one prediction; tied
    scores form one operating point. None when there is no positive.

    Shapes:
        scores (N, L), truth (N, L) bool.
    """
    truth = np.asarray(truth, dtype=bool)
    keep = truth.any(1)
    s = np.asarray(scores, dtype=np.float64)[keep].ravel()
    y = truth[keep].ravel()
    if not y.any():
        return None
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def propagate_scores(scores: np.ndarray, labels: list[str], ancestors: dict[str, list[str]]) -> np.ndarray:
    """Make scores consistent with the hierarchy: a label scores at least as high as any descendant.

    Args:
        scores: (N, L), column j is ``labels[j]``.
        ancestors: label -> its ancestors within ``labels``.

    Shapes:
        -> (N, L), a new array.
    """
    index = {t: j for j, t in enumerate(labels)}
    out = np.array(scores, dtype=np.float32, copy=True)
    for j, t in enumerate(labels):
        cols = [index[a] for a in ancestors.get(t, ()) if a in index]
        if cols:
            out[:, cols] = np.maximum(out[:, cols], scores[:, j : j + 1])
    return out


def accuracy(predicted: list, truth: list) -> float | None:
    """Fraction of equal pairs; None for an empty list."""
    if not truth:
        return None
    return float(np.mean([p == t for p, t in zip(predicted, truth)]))
