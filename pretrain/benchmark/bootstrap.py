"""Percentile bootstrap intervals over test items (proteins, pairs, variants).

A benchmark figure is a statistic of a test set; its interval comes from redrawing the test items
with replacement and recomputing the statistic (Efron's percentile bootstrap). Resampling is over
*items*, the unit a benchmark draws: a protein keeps all its labels, a pair both its members.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap interval; ``low``/``high`` are None when no resample was defined."""

    value: float | None
    low: float | None
    high: float | None
    level: float = DEFAULT_LEVEL
    resamples: int = 0  # resamples that gave a defined statistic

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self, digits: int = 3) -> str:
        """``0.712 [0.680, 0.744]``, ``0.712 (no interval)`` or ``n/a``."""
        if self.value is None:
            return "n/a"
        if self.low is None or self.high is None:
            return f"{self.value:.{digits}f} (no interval)"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap(
    statistic: Callable[[np.ndarray], float | None],
    n_items: int,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Interval:
    """The statistic on all items and its percentile interval over ``resamples`` redraws.

    Args:
        statistic: called with an index array (n_items,) of the items to use (with repeats); returns a
            float, or None when undefined on that draw (e.g. a draw with no positive pair). Undefined
            draws are left out of the interval and counted out of ``resamples``.
        n_items: how many test items there are (> 0).
        resamples: bootstrap draws (0 gives the point value with no interval).
        level: coverage of the interval, in (0, 1).
        seed: seeds the draws (the same seed gives the same interval).

    Returns:
        :class:`Interval` with the value on every item once and the (1-level)/2 and (1+level)/2
        percentiles of the resampled statistics.
    """
    _check(n_items, resamples, level)
    value = statistic(np.arange(n_items))
    if value is None:
        return Interval(None, None, None, level, 0)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        v = statistic(rng.integers(0, n_items, size=n_items))
        if v is not None and np.isfinite(v):
            draws.append(float(v))
    return _percentiles(float(value), np.asarray(draws, dtype=np.float64), level)


def bootstrap_counts(
    statistic_many: Callable[[np.ndarray], np.ndarray],
    n_items: int,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    batch: int = 100,
) -> Interval:
    """:func:`bootstrap` for a statistic of per-item draw counts that scores many redraws in one call.

    The redraws are the ones :func:`bootstrap` makes with the same ``seed`` (the same generator calls,
    ``batch`` redraws at a time), so the interval is the same as the one-at-a-time path's.

    Args:
        statistic_many: ``W`` (r, n_items) float64 draw counts (row of ones: every item once) ->
            (r,) values, NaN where undefined on that draw.
        n_items, resamples, level, seed: as :func:`bootstrap`.
        batch: redraws per call of ``statistic_many`` (bounds its memory).
    """
    _check(n_items, resamples, level)
    value = float(statistic_many(np.ones((1, n_items)))[0])
    if not np.isfinite(value):
        return Interval(None, None, None, level, 0)
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, resamples, batch):
        r = min(batch, resamples - start)
        idx = rng.integers(0, n_items, size=(r, n_items))  # the same stream as r calls of size n_items
        flat = (idx + n_items * np.arange(r)[:, None]).ravel()
        counts = np.bincount(flat, minlength=r * n_items).reshape(r, n_items).astype(np.float64)
        values.append(np.asarray(statistic_many(counts), dtype=np.float64))
    draws = np.concatenate(values) if values else np.zeros(0)
    return _percentiles(value, draws[np.isfinite(draws)], level)


def _check(n_items: int, resamples: int, level: float) -> None:
    if n_items <= 0:
        raise ValueError(f"bootstrap needs at least one item, got n_items={n_items}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0, got {resamples}")


def _percentiles(value: float, draws: np.ndarray, level: float) -> Interval:
    """The interval of the finite resampled statistics ``draws`` (none: the value without one)."""
    if not len(draws):
        return Interval(value, None, None, level, 0)
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Interval(value, float(low), float(high), level, len(draws))
