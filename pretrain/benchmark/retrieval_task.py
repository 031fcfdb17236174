"""Cross-modal retrieval with intervals: R@k and median rank as :mod:`pretrain.eval.retrieval` computes them.

For each direction a->b (sequence, structure, text; pairs where both modalities are present), the
rank of a query's own protein among all candidates (ties count against it, so a collapsed model
scores at chance or worse) gives R@k = share of queries with rank < k and the median rank (1-based).
With ``multi_positive``, proteins with identical texts are all positives (``_multi`` metrics).
Intervals: bootstrap over queries with the candidate set fixed. Encoders before alignment share no
space: the base row reports the task as not applicable.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from pretrain.benchmark.context import BenchmarkContext, metric_row
from pretrain.benchmark.data import read_id_list
from pretrain.benchmark.scoring import mean_interval, median_interval
from pretrain.benchmark.suite import Suite, check_file
from pretrain.errors import ConfigError
from pretrain.eval.retrieval import MODALITY_SHORT, _ranks, text_groups

MODALITIES = ("sequence", "structure", "text")


@dataclass
class RetrievalTaskConfig:
    ids: str | None = None  # id-list file of the proteins to retrieve among (None: see scope)
    scope: str = "table"  # without ids: "table" (every protein of the table) or "embedded" (those other tasks embed)
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    directions: list[str] | None = None  # e.g. ["seq->text"]; None: all six
    multi_positive: bool = True  # identical texts are all positives (text directions)

    def validate(self, where: str) -> None:
        if self.scope not in ("table", "embedded"):
            raise ConfigError(f"{where}.scope: {self.scope!r}; expected table or embedded")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"{where}.ks must be positive integers, got {self.ks}")
        names = {f"{MODALITY_SHORT[a]}->{MODALITY_SHORT[b]}" for a, b in itertools.permutations(MODALITIES, 2)}
        bad = [d for d in self.directions or [] if d not in names]
        if bad:
            raise ConfigError(f"{where}.directions: unknown {bad}; expected some of {sorted(names)}")


def needs(suite: Suite, cfg: RetrievalTaskConfig, proteins, name: str = "retrieval") -> set[str]:
    """The proteins to retrieve among (none of its own with ``scope: embedded``)."""
    if cfg.ids is None:
        return set(proteins.ids) if cfg.scope == "table" else set()
    table = set(proteins.ids)
    return {p for p in read_id_list(check_file(suite, cfg.ids, f"{name}.ids")) if p in table}


def run(ctx: BenchmarkContext, name: str, cfg: RetrievalTaskConfig) -> dict:
    """R@k (exact and multi-positive) and median rank per direction, each with an interval."""
    emb = ctx.embeddings
    if not emb.shared_space:
        return {"rows": [], "info": {"not_applicable": "the encoders before alignment share no embedding space"}}
    proteins = emb.proteins
    if cfg.ids is None and cfg.scope == "embedded":
        chosen = emb.present["sequence"].copy()
    else:
        chosen = np.zeros(len(proteins.ids), bool)
        chosen[ctx.rows_of(sorted(needs(ctx.suite, cfg, proteins, name)))] = True
    texts = proteins.columns.get(ctx.suite.text_column or "", [""] * len(proteins.ids))
    rows, info = [], {}
    for a, b in itertools.permutations(MODALITIES, 2):
        direction = f"{MODALITY_SHORT[a]}->{MODALITY_SHORT[b]}"
        if cfg.directions is not None and direction not in cfg.directions:
            continue
        if a not in emb.present or b not in emb.present:
            continue
        both = chosen & emb.present[a] & emb.present[b]
        n = int(both.sum())
        info[direction] = {"n": n}
        if n == 0:
            continue
        use_groups = cfg.multi_positive and "text" in (a, b)
        groups = text_groups([texts[i] for i in np.flatnonzero(both)]) if use_groups else None
        exact, multi = _ranks(emb.vectors[a][both], emb.vectors[b][both], groups, 1024)
        for k in cfg.ks:
            rows.append(
                metric_row(
                    direction,
                    "all",
                    f"R@{k}",
                    mean_interval(exact < k, **ctx.bootstrap_kwargs),
                    n,
                    chance=min(1.0, k / n),
                )
            )
            if multi is not None:
                rows.append(
                    metric_row(direction, "all", f"R@{k}_multi", mean_interval(multi < k, **ctx.bootstrap_kwargs), n)
                )
        rows.append(metric_row(direction, "all", "median_rank", median_interval(exact + 1, **ctx.bootstrap_kwargs), n))
    return {"rows": rows, "info": info}
