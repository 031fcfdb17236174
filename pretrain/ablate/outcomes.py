"""The table's metrics: read from an evaluation's result, and rebuilt from per-protein outcomes.

Every column is a function of sums over the held-out proteins, ``value = combine(parts @ w)``:
``parts`` (K, N) holds each protein's contribution (zero for a protein the metric does not
score) and ``w`` (N,) how often each protein is drawn (all ones: the figure in ``ablate_eval.json``
exactly; a bootstrap draw of the proteins: that draw's figure). R@10 of a direction is hits /
proteins with both modalities; fold accuracy correct / labelled; Fmax needs, per threshold, the
summed precision of the proteins with a prediction, their number and the summed recall (CAFA's
protein-centric definition, :func:`pretrain.eval.metrics.fmax`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pretrain.eval.metrics import THRESHOLDS

PAIRS = (("seq<->struct", "seq->struct", "struct->seq"), ("seq<->text", "seq->text", "text->seq"))
PAIRS += (("struct<->text", "struct->text", "text->struct"),)
FUNCTION_TASKS = ("GO-MF", "GO-BP", "GO-CC", "EC")
# metric key -> column header, in table order
COLUMNS = {
    "seq<->struct": "seq↔struct R@10",
    "seq<->text": "seq↔text R@10",
    "struct<->text": "struct↔text R@10",
    "mean": "mean R@10",
    **{f"{t} Fmax": f"{t} Fmax" for t in FUNCTION_TASKS},
    "fold accuracy": "fold acc",
}
K = 10  # the R@k of the table
_EPS = 1e-6  # a score counts as predicted at t when >= t - _EPS, as in pretrain.eval.metrics.fmax


def r10_of(result: dict, where: str) -> tuple[dict[str, float], float]:
    """Exact-pair R@10 per modality pair and over the six directions, and the chance level, from an eval result."""
    try:
        directions = result["retrieval"]["directions"]
        missing = [d for _, *ds in PAIRS for d in ds if "R@10" not in directions.get(d, {})]
    except (KeyError, TypeError, AttributeError) as e:  # not pretrain.eval's result
        raise ValueError(f"{where}: not a retrieval evaluation ({type(e).__name__}: {e})") from None
    if missing:
        raise RuntimeError(f"{where}: no R@10 for {missing} (eval.ks must include 10)")
    try:
        r10 = {pair: 0.5 * (directions[a]["R@10"] + directions[b]["R@10"]) for pair, a, b in PAIRS}
        r10["mean"] = sum(directions[d]["R@10"] for _, *ds in PAIRS for d in ds) / 6
        return r10, max(directions[d]["chance_R@10"] for _, *ds in PAIRS for d in ds)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a retrieval evaluation ({type(e).__name__}: {e})") from None


def run_metrics(result: dict, method: str, where: str) -> tuple[dict[str, float | None], float | None]:
    """Every table metric of one evaluation (None where a task was not run or was skipped), and the R@10 chance."""
    metrics: dict[str, float | None] = dict.fromkeys(COLUMNS)
    chance = None
    if "retrieval" in result:
        r10, chance = r10_of(result, where)
        metrics.update(r10)
    for task in FUNCTION_TASKS:
        entry = (result.get("function") or {}).get(task) or {}
        metrics[f"{task} Fmax"] = ((entry.get("methods") or {}).get(method) or {}).get("fmax")
    fold = result.get("fold") or {}
    metrics["fold accuracy"] = ((fold.get("methods") or {}).get(method) or {}).get("accuracy")
    return metrics, chance


@dataclass
class Parts:
    """One run's column as per-protein contributions: ``combine(matrix @ w)`` is its value."""

    matrix: np.ndarray  # (K, N) float64, N = held-out proteins
    combine: Callable[[np.ndarray], np.ndarray]  # (K, B) sums -> (B,) values

    def value(self) -> float:
        """The column's figure on the held-out set as evaluated (every protein once)."""
        return float(self.combine(self.matrix.sum(1, keepdims=True))[0])


def mean_of_ratios(sums: np.ndarray) -> np.ndarray:
    """(2k, B) sums, rows (numerator, denominator) per ratio -> (B,) mean of the k ratios (NaN: an empty one)."""
    num, den = sums[0::2], sums[1::2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (num / den).mean(0)


def fmax_from_sums(sums: np.ndarray) -> np.ndarray:
    """(3T + 1, B) sums of :func:`fmax_parts` rows -> (B,) Fmax (0.0 where no threshold predicts, NaN: no protein)."""
    t = (sums.shape[0] - 1) // 3
    prec_sum, rec_sum, covered, n = sums[:t], sums[t : 2 * t], sums[2 * t : 3 * t], sums[3 * t]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = prec_sum / covered
        recall = rec_sum / n
        f = 2 * precision * recall / (precision + recall)
    f = np.where((covered > 0) & (precision + recall > 0), f, 0.0)
    return np.where(n > 0, f.max(0), np.nan)


def fmax_parts(scores: np.ndarray, truth: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """Per-protein terms of CAFA Fmax: ``fmax_from_sums(parts.sum(1))`` is ``fmax(scores, truth)["fmax"]``.

    Shapes:
        scores (n, L), truth (n, L) bool -> (3T + 1, n): per threshold the protein's precision
        (0 without a prediction), its recall, whether it has a prediction; then 1 for a protein
        with a label (0 for one without: it is not scored).
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    t = np.asarray(thresholds, dtype=np.float64)
    labelled = truth.any(1)
    n_true = np.maximum(truth.sum(1), 1).astype(np.float64)  # (n,)
    pred = scores[None] >= (t[:, None, None] - _EPS)  # (T, n, L)
    m = pred.sum(2)  # (T, n)
    tp = (pred & truth[None]).sum(2)
    has = (m > 0) & labelled
    prec = np.where(has, tp / np.maximum(m, 1), 0.0)
    rec = np.where(labelled, tp / n_true, 0.0)
    return np.concatenate([prec, rec, has.astype(np.float64), labelled[None].astype(np.float64)])


def _scatter(rows: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """(K, r) values of the scored rows -> (K, n) over all held-out proteins (zeros elsewhere)."""
    out = np.zeros((values.shape[0], n))
    out[:, rows] = values
    return out


def _direction(ranks: np.ndarray) -> np.ndarray:
    """(N,) ranks (-1: absent) -> (2, N): hit at 10, present."""
    return np.stack([(ranks >= 0) & (ranks < K), ranks >= 0]).astype(np.float64)


def column_parts(outcomes: dict[str, np.ndarray], method: str, where: str) -> dict[str, Parts]:
    """Every column a run's per-protein outcomes (:func:`pretrain.eval.__main__.flatten_per_protein` keys) give.

    Raises:
        ValueError: an array is missing or of the wrong shape (``where`` names the file).
    """
    try:
        n = len(outcomes["ids"])
        out: dict[str, Parts] = {}
        if any(k.startswith("retrieval/") for k in outcomes):
            ranks = {d: np.asarray(outcomes[f"retrieval/{d}"]).reshape(n) for _, *ds in PAIRS for d in ds}
            for pair, a, b in PAIRS:
                out[pair] = Parts(np.concatenate([_direction(ranks[a]), _direction(ranks[b])]), mean_of_ratios)
            out["mean"] = Parts(np.concatenate([_direction(ranks[d]) for _, *ds in PAIRS for d in ds]), mean_of_ratios)
        for task in FUNCTION_TASKS:
            key = f"function/{task}/methods/{method}"
            if key in outcomes:
                rows = np.asarray(outcomes[f"function/{task}/rows"])
                parts = fmax_parts(outcomes[key], outcomes[f"function/{task}/truth"])
                out[f"{task} Fmax"] = Parts(_scatter(rows, parts, n), fmax_from_sums)
        if f"fold/methods/{method}" in outcomes:
            rows = np.asarray(outcomes["fold/rows"])
            correct = np.asarray(outcomes[f"fold/methods/{method}"], dtype=np.float64).reshape(1, len(rows))
            counts = np.concatenate([correct, np.ones_like(correct)])  # (2, r): correct, labelled
            out["fold accuracy"] = Parts(_scatter(rows, counts, n), mean_of_ratios)
        return out
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise ValueError(f"{where}: damaged per-protein outcomes ({type(e).__name__}: {e})") from None


def keep_for_table(per_protein: dict[str, np.ndarray], method: str) -> dict[str, np.ndarray]:
    """The flat per-protein arrays the table's columns need (``method``'s scores only), for the eval cache."""
    keep = {"ids", "fold/rows", f"fold/methods/{method}"}
    keep |= {f"retrieval/{d}" for _, *ds in PAIRS for d in ds}
    for task in FUNCTION_TASKS:
        keep |= {f"function/{task}/rows", f"function/{task}/truth", f"function/{task}/methods/{method}"}
    return {k: v for k, v in per_protein.items() if k in keep}
