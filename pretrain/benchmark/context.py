"""What a benchmark task receives (:class:`BenchmarkContext`) and the rows it returns (:func:`metric_row`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.benchmark.bootstrap import Interval
from pretrain.benchmark.embedding import Embeddings
from pretrain.benchmark.suite import Suite


@dataclass
class BenchmarkContext:
    """One model's embeddings of the suite's proteins, and where the task writes its files.

    Attributes:
        suite: the suite (data paths resolve with ``suite.resolve``).
        embeddings: row i is ``embeddings.proteins.ids[i]``.
        out_dir: this model's output folder (``DIR/<row>``); a task writes under ``out_dir/<task slug>``.
        row: "trained" (the export) or "base" (its encoders before alignment).
        sequence_model: the row's model holding its ESM-2 (for tasks that run its LM head, e.g.
            mutation effect); None when the tasks have no model (hand-made embeddings).
    """

    suite: Suite
    embeddings: Embeddings
    out_dir: Path
    row: str
    sequence_model: object | None = None

    @property
    def bootstrap_kwargs(self) -> dict:
        b = self.suite.bootstrap
        return {"resamples": b.resamples, "level": b.level, "seed": b.seed}

    def rows_of(self, ids) -> np.ndarray:
        """Row indices of ``ids`` in the embeddings (ids not in the proteins table raise KeyError)."""
        index = self.embeddings.proteins.index()
        return np.asarray([index[i] for i in ids], dtype=np.int64)


def slug(name: str) -> str:
    """A file-name-safe form of a task or method name."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip())
    return out.strip("_") or "task"


def metric_row(method: str, subset: str, metric: str, interval: Interval, n: int, **extra) -> dict:
    """One result: ``method`` on ``subset`` of the test items, ``metric`` with its interval, ``n`` items."""
    return {"method": method, "subset": subset, "metric": metric, **interval.to_dict(), "n": int(n), **extra}
