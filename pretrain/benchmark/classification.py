"""Fold / superfamily / family classification accuracy on frozen embeddings.

A labels table (TSV: ``id``, one column per level, e.g. ``fold``, ``superfamily``, ``family``, and a
``split`` column with ``train`` / ``valid`` / ``test``) gives each protein its class at each level.
For each level and feature, test proteins are classified by

* ``centroid/<feature>`` (default): the training class whose mean embedding (re-normalised) is
  most cosine-similar; or ``knn/<feature>`` (``predictor: knn``): majority of the k nearest training
  proteins (ties: the class of the nearest one);
* ``baseline/mmseqs``: the class of the best MMseqs2 hit among training proteins (no hit: wrong).

Accuracy counts every test protein with a class at that level; a test class absent from training
cannot be predicted and counts as wrong (reported as ``unseen_test_classes``). Intervals: bootstrap
over test proteins.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pretrain.benchmark import mmseqs
from pretrain.benchmark.context import BenchmarkContext, metric_row
from pretrain.benchmark.data import BenchmarkDataError, read_class_table
from pretrain.benchmark.scoring import mean_interval
from pretrain.benchmark.suite import Suite, check_file
from pretrain.errors import ConfigError


@dataclass
class ClassificationTaskConfig:
    labels: str = ""  # labels table (id, levels..., split)
    levels: list[str] = field(default_factory=lambda: ["fold", "superfamily", "family"])
    split_column: str = "split"  # values train / valid / test
    predictor: str = "centroid"  # "centroid" or "knn"
    k: int = 1  # knn: neighbours
    features: list[str] = field(default_factory=lambda: ["sequence", "structure"])
    baselines: list[str] = field(default_factory=lambda: ["mmseqs"])

    def validate(self, where: str) -> None:
        if not self.labels:
            raise ConfigError(f"{where}.labels: the labels table is required")
        if self.predictor not in ("centroid", "knn"):
            raise ConfigError(f"{where}.predictor: {self.predictor!r}; expected centroid or knn")
        if not self.levels:
            raise ConfigError(f"{where}.levels: name at least one level column")
        if self.k < 1:
            raise ConfigError(f"{where}.k must be >= 1")
        if any(b != "mmseqs" for b in self.baselines):
            raise ConfigError(f"{where}.baselines: only 'mmseqs' is known, got {self.baselines}")


def _table(suite: Suite, cfg: ClassificationTaskConfig, name: str):
    path = check_file(suite, cfg.labels, f"{name}.labels")
    classes = read_class_table(path, [*cfg.levels, cfg.split_column])
    bad = sorted({c.get(cfg.split_column, "") for c in classes.values()} - {"train", "valid", "test"})
    if bad:
        raise BenchmarkDataError(f"{path}: column {cfg.split_column!r} holds {bad}; expected train, valid or test")
    return classes


def needs(suite: Suite, cfg: ClassificationTaskConfig, proteins, name: str = "classification") -> set[str]:
    """Proteins of the labels table that the proteins table holds."""
    table = set(proteins.ids)
    return {p for p in _table(suite, cfg, name) if p in table}


def centroid_predict(x_test: np.ndarray, x_train: np.ndarray, y_train: list[str]) -> list[str]:
    """Nearest class centroid by cosine (centroids re-normalised); ties: the first class in sorted order.

    Shapes:
        x_test (Q, E), x_train (D, E) unit rows.
    """
    classes = sorted(set(y_train))
    y = np.array([classes.index(c) for c in y_train])
    cent = np.stack([x_train[y == j].mean(0) for j in range(len(classes))])  # (C, E)
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    best = np.argmax(x_test @ cent.T, axis=1)
    return [classes[j] for j in best]


def knn_predict(x_test: np.ndarray, x_train: np.ndarray, y_train: list[str], k: int) -> list[str]:
    """Majority class of the k most cosine-similar training proteins (ties: the nearest's class among them)."""
    sims = x_test @ x_train.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, : min(k, len(x_train))]
    out = []
    for row in top:
        votes = Counter(y_train[j] for j in row)
        best = max(votes.values())
        out.append(next(y_train[j] for j in row if votes[y_train[j]] == best))
    return out


def run(ctx: BenchmarkContext, name: str, cfg: ClassificationTaskConfig) -> dict:
    """Accuracy per level, feature and baseline; ``{"rows": [...], "info": {level: {...}}}``."""
    classes = _table(ctx.suite, cfg, name)
    proteins = ctx.embeddings.proteins
    index = proteins.index()
    rows, info = [], {}
    hits = None
    for level in cfg.levels:
        train = [p for p, c in classes.items() if c.get(cfg.split_column) == "train" and level in c and p in index]
        test = [p for p, c in classes.items() if c.get(cfg.split_column) == "test" and level in c and p in index]
        if not train or not test:
            info[level] = {"skipped": f"no {'training' if not train else 'test'} protein with a {level} class"}
            continue
        y_tr = [classes[p][level] for p in train]
        truth = [classes[p][level] for p in test]
        seen = set(y_tr)
        info[level] = {
            "n_train": len(train),
            "n_test": len(test),
            "label_space": len(seen),
            "unseen_test_classes": sum(t not in seen for t in truth),
            "predictor": "nearest centroid (cosine)" if cfg.predictor == "centroid" else f"k-NN (k={cfg.k})",
        }
        r_tr, r_te = ctx.rows_of(train), ctx.rows_of(test)
        for feat in cfg.features:
            x, present = ctx.embeddings.feature(feat)
            have = present[r_tr]
            if not have.any():
                continue
            pred: list[str | None] = [None] * len(test)
            avail = present[r_te]
            if avail.any():
                xs, ys = x[r_tr][have], [y for y, h in zip(y_tr, have) if h]
                got = (
                    centroid_predict(x[r_te][avail], xs, ys)
                    if cfg.predictor == "centroid"
                    else knn_predict(x[r_te][avail], xs, ys, cfg.k)
                )
                for slot, g in zip(np.flatnonzero(avail), got):
                    pred[slot] = g
            hit = np.array([p == t for p, t in zip(pred, truth)], dtype=np.float64)
            rows.append(
                metric_row(
                    f"{cfg.predictor}/{feat}", level, "accuracy", mean_interval(hit, **ctx.bootstrap_kwargs), len(test)
                )
            )
        if "mmseqs" in cfg.baselines:
            if hits is None:
                all_test = sorted({p for p, c in classes.items() if c.get(cfg.split_column) == "test" and p in index})
                all_train = sorted({p for p, c in classes.items() if c.get(cfg.split_column) == "train" and p in index})
                seq = proteins.sequences
                hits = mmseqs.search({p: seq[index[p]] for p in all_test}, {p: seq[index[p]] for p in all_train})
            pred = []
            for p in test:
                found = [h for h in hits.get(p, ()) if level in classes[h.target]]
                pred.append(classes[found[0].target][level] if found else None)
            hit = np.array([p == t for p, t in zip(pred, truth)], dtype=np.float64)
            rows.append(
                metric_row("baseline/mmseqs", level, "accuracy", mean_interval(hit, **ctx.bootstrap_kwargs), len(test))
            )
        majority = Counter(y_tr).most_common(1)[0][0]
        info[level]["majority_accuracy"] = float(np.mean([t == majority for t in truth]))
    return {"rows": rows, "info": info}
