"""Function prediction from frozen embeddings: GO-MF/BP/CC and EC (Fmax), fold / family (accuracy).

For every task, each method is scored on the same held-out proteins (those with at least one
label), so the figures sit side by side:

* ``probe/<features>``: a probe (:mod:`pretrain.eval.probes`) trained on the training shard set,
  for features ``sequence``, ``structure`` and ``concat`` (both, concatenated);
* ``zeroshot/<modality>``: cosine similarity with one text prompt per label (no training);
* ``baseline/kmer``: the nearest training protein by 3-mer similarity donates its labels.

A held-out protein that lacks a method's input modality gets no prediction (zero scores): it
still counts in recall, as in CAFA's full evaluation mode. Multi-label scores are propagated up
the hierarchy (a parent scores at least as high as its children) before Fmax and AUPR.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.eval.baseline import nearest_neighbours, transfer_scores
from pretrain.eval.embed import Annotations
from pretrain.eval.labels import (
    GO_TASKS,
    LabelSpace,
    class_labels,
    ec_ancestors_in,
    ec_label_sets,
    go_ancestors_in,
    go_label_sets,
)
from pretrain.eval.metrics import accuracy, fmax, micro_aupr, propagate_scores
from pretrain.eval.probes import ProbeConfig, predict, save_probe, train_probe
from pretrain.eval.zeroshot import ec_prompt, go_prompt, zero_shot_scores

log = logging.getLogger(__name__)

PROBE_FEATURES = ("sequence", "structure", "concat")
ZERO_SHOT_MODALITIES = ("sequence", "structure")
TextEmbedder = Callable[[list[str]], np.ndarray]  # texts -> (T, E) unit-norm embeddings


@dataclass
class FunctionSettings:
    methods: frozenset = frozenset({"probe", "zeroshot", "baseline"})
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    fold_key: str = "family"  # meta key holding the fold / family class
    baseline_metric: str = "jaccard"  # 3-mer "jaccard" (sets) or "cosine" (counts)
    probes_dir: Path | None = None  # where probes are saved (None: not saved)


def features(emb: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, E') features and (N,) availability for ``sequence``, ``structure`` or ``concat``."""
    if name == "concat":
        return (
            np.concatenate([emb["sequence"], emb["structure"]], 1),
            emb["present_sequence"] & emb["present_structure"],
        )
    return emb[name], emb[f"present_{name}"]


def _score(
    scores: np.ndarray, truth: np.ndarray, space: LabelSpace, anc: dict, kept: dict | None = None, method: str = ""
) -> dict:
    s = propagate_scores(scores, space.labels, anc)
    if kept is not None:  # per-protein outcomes: the propagated scores Fmax reads
        kept["methods"][method] = s
    return {**fmax(s, truth), "aupr": micro_aupr(s, truth)}


def _multilabel_task(
    slug: str,
    train_sets: list[set[str]],
    test_sets: list[set[str]],
    names: dict[str, str],
    ancestors: Callable[[list[str]], dict],
    prompt: Callable[[str], str],
    train: dict,
    test: dict,
    settings: FunctionSettings,
    embed_text: TextEmbedder | None,
    extra: dict,
    outcomes: dict | None = None,
) -> dict:
    space = LabelSpace(set().union(*train_sets, *test_sets), names)
    y_tr, y_te = space.matrix(train_sets), space.matrix(test_sets)
    rows = np.flatnonzero(y_te.any(1))  # scored held-out proteins
    if len(rows) == 0:
        return {"skipped": "no held-out protein has a label", **extra}
    truth = y_te[rows]
    anc = ancestors(space.labels)
    if outcomes is not None:
        outcomes.update(rows=rows.astype(np.int64), truth=truth.astype(bool), methods={})
    labelled = y_tr.any(1)
    trained = np.flatnonzero(y_tr[labelled].any(0))  # probe outputs: labels seen in training
    out = {
        "n_train": int(labelled.sum()),
        "n_test": len(rows),
        "n_labels": len(space),
        "n_labels_trained": len(trained),
        "mean_labels_per_protein": float(truth.sum(1).mean()),
        **extra,
        "methods": {},
    }
    methods = out["methods"]
    if "probe" in settings.methods and len(trained):
        if settings.probes_dir is not None:
            d = Path(settings.probes_dir) / slug
            d.mkdir(parents=True, exist_ok=True)
            LabelSpace([space.labels[j] for j in trained], space.names).save(
                d / "labels.json", task=slug, kind=settings.probe.kind, multilabel=True, **extra
            )
        for feat in PROBE_FEATURES:
            x_tr, p_tr = features(train, feat)
            x_te, p_te = features(test, feat)
            fit = labelled & p_tr
            if fit.sum() < 2:
                continue
            probe = train_probe(x_tr[fit], y_tr[fit][:, trained], settings.probe)
            scores = np.zeros(truth.shape, np.float32)
            avail = p_te[rows]
            if avail.any():
                sub = np.zeros((int(avail.sum()), len(space)), np.float32)
                sub[:, trained] = predict(probe, x_te[rows][avail])
                scores[avail] = sub
            methods[f"probe/{feat}"] = {
                **_score(scores, truth, space, anc, outcomes, f"probe/{feat}"),
                "n_with_input": int(avail.sum()),
            }
            if settings.probes_dir is not None:
                save_probe(Path(settings.probes_dir) / slug, feat, probe, n_train=int(fit.sum()))
    if "zeroshot" in settings.methods and embed_text is not None:
        prompts = embed_text([prompt(t) for t in space.labels])
        for m in ZERO_SHOT_MODALITIES:
            x_te, p_te = features(test, m)
            avail = p_te[rows]
            scores = np.zeros(truth.shape, np.float32)
            if avail.any():
                scores[avail] = zero_shot_scores(x_te[rows][avail], prompts)
            methods[f"zeroshot/{m}"] = {
                **_score(scores, truth, space, anc, outcomes, f"zeroshot/{m}"),
                "n_with_input": int(avail.sum()),
            }
    if "baseline" in settings.methods:
        methods["baseline/kmer"] = _baseline_multilabel(train, test, rows, y_tr, truth, space, anc, settings, outcomes)
    return out


def _sequences(emb: dict, rows: np.ndarray) -> list[str | None]:
    seqs = emb["annotations"].sequences
    return [seqs[i] for i in rows]


def _baseline_multilabel(train, test, rows, y_tr, truth, space, anc, settings, outcomes=None) -> dict:
    seq_tr = train["annotations"].sequences
    db = np.flatnonzero(y_tr.any(1) & np.array([bool(s) for s in seq_tr], dtype=bool))
    queries = _sequences(test, rows)
    avail = np.array([bool(s) for s in queries], dtype=bool)
    scores = np.zeros(truth.shape, np.float32)
    if len(db) and avail.any():
        idx, sim = nearest_neighbours(
            [q for q in queries if q], [seq_tr[i] for i in db], metric=settings.baseline_metric
        )
        scores[avail] = transfer_scores(idx, sim, y_tr[db])
    return {
        **_score(scores, truth, space, anc, outcomes, "baseline/kmer"),
        "n_with_input": int(avail.sum()),
        "metric": settings.baseline_metric,
    }


def _correct(pred: list, truth: list) -> np.ndarray:
    """(n,) bool: the per-protein outcomes that :func:`accuracy` averages."""
    return np.array([p == t for p, t in zip(pred, truth)], dtype=bool)


def _fold_task(train: dict, test: dict, settings: FunctionSettings, outcomes: dict | None = None) -> dict:
    key = settings.fold_key
    cls_tr = class_labels(train["annotations"].meta, key)
    cls_te = class_labels(test["annotations"].meta, key)
    rows = [i for i, c in enumerate(cls_te) if c is not None]
    classes = sorted({c for c in cls_tr if c is not None})
    if not rows or not classes:
        return {"key": key, "skipped": f"no meta[{key!r}] labels in the {'held-out' if not rows else 'training'} set"}
    index = {c: j for j, c in enumerate(classes)}
    truth = [cls_te[i] for i in rows]
    majority = Counter(c for c in cls_tr if c is not None).most_common(1)[0][0]
    out = {
        "key": key,
        "n_train": sum(c is not None for c in cls_tr),
        "n_test": len(rows),
        "n_classes": len(classes),
        "unseen_test_classes": sum(c not in index for c in truth),
        "majority_accuracy": accuracy([majority] * len(truth), truth),
        "methods": {},
    }
    rows_a = np.array(rows, dtype=np.int64)
    if outcomes is not None:
        outcomes.update(rows=rows_a, methods={})
    if "probe" in settings.methods:
        if settings.probes_dir is not None:
            d = Path(settings.probes_dir) / "fold"
            d.mkdir(parents=True, exist_ok=True)
            LabelSpace(classes).save(
                d / "labels.json", task="fold", key=key, kind=settings.probe.kind, multilabel=False
            )
        labelled = np.array([c is not None for c in cls_tr])
        for feat in PROBE_FEATURES:
            x_tr, p_tr = features(train, feat)
            x_te, p_te = features(test, feat)
            fit = labelled & p_tr
            if fit.sum() < 2:
                continue
            y = np.array([index[cls_tr[i]] for i in np.flatnonzero(fit)])
            probe = train_probe(x_tr[fit], y, settings.probe, num_classes=len(classes))
            avail = p_te[rows_a]
            pred: list[str | None] = [None] * len(rows)
            if avail.any():
                best = predict(probe, x_te[rows_a][avail], multilabel=False).argmax(1)
                for slot, j in zip(np.flatnonzero(avail), best):
                    pred[slot] = classes[j]
            out["methods"][f"probe/{feat}"] = {"accuracy": accuracy(pred, truth), "n_with_input": int(avail.sum())}
            if outcomes is not None:
                outcomes["methods"][f"probe/{feat}"] = _correct(pred, truth)
            if settings.probes_dir is not None:
                save_probe(Path(settings.probes_dir) / "fold", feat, probe, n_train=int(fit.sum()))
    if "baseline" in settings.methods:
        seq_tr = train["annotations"].sequences
        db = [i for i, c in enumerate(cls_tr) if c is not None and seq_tr[i]]
        queries = _sequences(test, rows_a)
        pred = [None] * len(rows)
        live = [j for j, q in enumerate(queries) if q]
        if db and live:
            idx, _ = nearest_neighbours(
                [queries[j] for j in live], [seq_tr[i] for i in db], metric=settings.baseline_metric
            )
            for j, n in zip(live, idx):
                pred[j] = cls_tr[db[n]] if n >= 0 else None
        out["methods"]["baseline/kmer"] = {
            "accuracy": accuracy(pred, truth),
            "n_with_input": len(live),
            "metric": settings.baseline_metric,
        }
        if outcomes is not None:
            outcomes["methods"]["baseline/kmer"] = _correct(pred, truth)
    return out


def evaluate_function(
    train: dict | None,
    test: dict,
    tasks: set[str],
    settings: FunctionSettings,
    *,
    ontology=None,
    embed_text: TextEmbedder | None = None,
    ec_names: dict[str, str] | None = None,
    per_protein: dict | None = None,
) -> dict:
    """Run the label tasks in ``tasks`` (subset of {"go", "ec", "fold"}).

    Args:
        train, test: :func:`pretrain.eval.embed.embed_shards` results (with ``annotations``);
            ``train`` may be None (or hold annotations only) when no probe is trained.
        settings: methods, probe settings, fold key, where probes go.
        ontology: GO ontology for propagation (None: GO labels are used as annotated).
        embed_text: text encoder for zero-shot prompts (None: no zero-shot).
        ec_names: EC label -> name for zero-shot prompts.
        per_protein: when a dict is given, it is filled with the per-protein outcomes behind every
            figure (the returned result is unchanged): ``{task: {"rows": (n,) int64 held-out
            row indices scored, "truth": (n, L) bool, "methods": {method: (n, L) float32
            propagated scores}}}`` for GO / EC, whose Fmax these give back exactly, and
            ``{"fold": {"rows": (n,), "methods": {method: (n,) bool correct}}}``. A skipped
            task has no entry.

    Returns:
        ``{"GO-MF": {...}, "GO-BP": ..., "GO-CC": ..., "EC": ..., "fold": ...}`` for the tasks run.
    """
    out: dict = {}
    if train is None:  # zero-shot needs no training set
        train = {"annotations": Annotations()}
    a_tr, a_te = train["annotations"], test["annotations"]
    if "go" in tasks:
        for name, aspect in GO_TASKS.items():
            lab_tr = go_label_sets(a_tr.go, aspect, ontology)
            lab_te = go_label_sets(a_te.go, aspect, ontology)
            names = {**lab_tr.names, **lab_te.names}
            known = lab_tr.known_ids + lab_te.known_ids
            mismatched = lab_tr.name_mismatches + lab_te.name_mismatches
            extra = {
                "propagated": ontology is not None,
                "unknown_go_ids": lab_tr.unknown_ids + lab_te.unknown_ids,
                "obsolete_go_ids": lab_tr.obsolete_ids + lab_te.obsolete_ids,
                "go_name_mismatches": mismatched,
            }
            if mismatched > 0.1 * max(1, known):
                log.warning(
                    "%s: %d of %d annotated GO ids carry a name that differs from the ontology's: the ids "
                    "may not be real GO ids (the demo corpus makes them up); propagation is then meaningless",
                    name,
                    mismatched,
                    known,
                )
            out[name] = _multilabel_task(
                name.lower().replace("-", "_"),
                lab_tr.sets,
                lab_te.sets,
                names,
                lambda labels: go_ancestors_in(labels, ontology),
                lambda t, a=aspect, n=names: go_prompt(n.get(t) or t, a),
                train,
                test,
                settings,
                embed_text,
                extra,
                _slot(per_protein, name),
            )
    if "ec" in tasks:
        names = ec_names or {}
        out["EC"] = _multilabel_task(
            "ec",
            ec_label_sets(a_tr.ec),
            ec_label_sets(a_te.ec),
            names,
            ec_ancestors_in,
            lambda t: ec_prompt(t, names.get(t, "")),
            train,
            test,
            settings,
            embed_text,
            {"propagated": True},
            _slot(per_protein, "EC"),
        )
    if "fold" in tasks:
        out["fold"] = _fold_task(train, test, settings, _slot(per_protein, "fold"))
    if per_protein is not None:  # a skipped task leaves an empty slot
        for task in [t for t, v in per_protein.items() if not v]:
            del per_protein[task]
    return out


def _slot(per_protein: dict | None, task: str) -> dict | None:
    """The dict a task fills with its per-protein outcomes (None: not asked for)."""
    return None if per_protein is None else per_protein.setdefault(task, {})
