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
    if n_items <= 0:
        raise ValueError(f"bootstrap needs at least one item, got n_items={n_items}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 0:
        raise ValueError(f"resamples must be >= 0, got {resamples}")
    value = statistic(np.arange(n_items))
    if value is None:
        return Interval(None, None, None, level, 0)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        v = statistic(rng.integers(0, n_items, size=n_items))
        if v is not None and np.isfinite(v):
            draws.append(float(v))
    if not draws:
        return Interval(float(value), None, None, level, 0)
    low, high = np.quantile(np.asarray(draws), [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(value), float(low), float(high), level, len(draws))
