"""Small benchmark contexts from hand-made embeddings (no model), for the task tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pretrain.benchmark.context import BenchmarkContext
from pretrain.benchmark.data import Proteins
from pretrain.benchmark.embedding import Embeddings
from pretrain.benchmark.suite import BootstrapConfig, Suite


def make_context(
    tmp: Path,
    ids: list[str],
    sequences: list[str],
    vectors: dict[str, np.ndarray],
    texts: list[str] | None = None,
    resamples: int = 200,
    shared_space: bool = True,
) -> BenchmarkContext:
    """A context over proteins ``ids`` whose features are ``vectors`` (rows normalised here)."""
    proteins = Proteins(list(ids), list(sequences), [None] * len(ids), {"text": texts or [""] * len(ids)})
    n = len(ids)
    vecs, present = {}, {}
    for name in ("sequence", "structure", "text"):
        x = vectors.get(name)
        if x is None:
            vecs[name], present[name] = np.zeros((n, 2), np.float32), np.zeros(n, bool)
        else:
            x = np.asarray(x, np.float64)
            vecs[name] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
            present[name] = np.ones(n, bool)
    suite = Suite("test", tmp / "suite.yaml", tmp, tmp / "proteins.tsv", text_column="text")
    suite.bootstrap = BootstrapConfig(resamples=resamples, seed=0)
    return BenchmarkContext(suite, Embeddings(proteins, vecs, present, shared_space), tmp / "out", "trained")
