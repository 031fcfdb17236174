"""Function prediction in the DeepFRI / ProtST protocol: EC and GO-MF/BP/CC, Fmax and micro AUPR.

Protocol (DeepFRI, Gligorijevic et al. 2021; ProtST, Xu et al. 2023):

* the label vocabulary is the annotation file's (``nrPDB-EC_*_annot.tsv``: 538 EC numbers;
  ``nrPDB-GO_*_annot.tsv``: its MF / BP / CC terms), flat: the file lists every label of a chain;
* train / valid / test are the benchmark's chain-id lists, or a split this task makes (``split.method``:
  ``cluster``: MMseqs2 clusters at ``identity`` over ``coverage``, whole clusters to test; ``random``);
* test proteins are also scored in bins of maximum identity to any training protein (MMseqs2
  ``fident`` of the highest-identity hit with E-value <= 1e-3; none counts as 0): ``id<30%``,
  ``id<50%``, ``id<95%``;
* protein-centric Fmax and micro AUPR (:mod:`pretrain.eval.metrics`), each with a 95 % bootstrap
  interval over test proteins; every method is scored on the same draws (paired).

Methods, all on frozen embeddings (nothing is fine-tuned):

* ``knn/<feature>``: the k nearest training proteins by cosine; a label's score is the
  cosine-weighted share of those neighbours carrying it (weights clipped at 0), in [0, 1];
* ``probe/<feature>`` (``predictor: probe``): a linear probe (:mod:`pretrain.eval.probes`) on train;
* ``baseline/mmseqs``: the best MMseqs2 hit (highest bit score) among training proteins transfers
  its labels, scored by its identity (the BLAST baseline of DeepFRI and CAFA);
* ``baseline/kmer (fallback)``: the 3-mer nearest neighbour of :mod:`pretrain.eval.baseline`,
  used when asked for (``baselines: [kmer]``), e.g. where MMseqs2 cannot run.

Predictions and ground truth are written in CAFA format under ``<out>/<task>/cafa/`` with a flat
OBO of the vocabulary, so the CAFA evaluator (``cafaeval``) scores them without this project.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.benchmark import mmseqs
from pretrain.benchmark.context import BenchmarkContext, metric_row, slug
from pretrain.benchmark.data import BenchmarkDataError, LabelFile, read_deepfri_annotations, read_id_list
from pretrain.benchmark.scoring import multilabel_metrics
from pretrain.benchmark.suite import Suite, check_file
from pretrain.errors import ConfigError
from pretrain.eval.baseline import nearest_neighbours, transfer_scores
from pretrain.eval.probes import ProbeConfig, predict, train_probe

SPLIT_METHODS = ("lists", "cluster", "random")
PREDICTORS = ("knn", "probe")
BASELINES = ("mmseqs", "kmer")


@dataclass
class SplitConfig:
    method: str = "lists"  # "lists" (train/valid/test files), "cluster" (MMseqs2 clusters) or "random"
    train: str | None = None  # id-list files (method: lists)
    valid: str | None = None
    test: str | None = None
    identity: float = 0.3  # cluster: MMseqs2 --min-seq-id (a pair at >= identity over coverage joins)
    coverage: float = 0.5  # cluster: -c, of both sequences
    test_fraction: float = 0.3  # cluster / random: share of proteins in test (whole clusters)
    seed: int = 0  # cluster / random: seeds the draw

    def validate(self, where: str) -> None:
        if self.method not in SPLIT_METHODS:
            raise ConfigError(f"{where}.method: {self.method!r}; expected one of {SPLIT_METHODS}")
        if self.method == "lists" and (self.train is None or self.test is None):
            raise ConfigError(f"{where}: method 'lists' needs the train and test id-list files")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"{where}.test_fraction must lie in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.identity <= 1.0 or not 0.0 <= self.coverage <= 1.0:
            raise ConfigError(f"{where}: identity and coverage must lie in [0, 1]")


@dataclass
class FunctionTaskConfig:
    annotations: str = ""  # DeepFRI annotation file (EC or GO)
    aspects: list[str] | None = None  # which of the file's tasks (EC, GO-MF, GO-BP, GO-CC); None: all
    split: SplitConfig = field(default_factory=SplitConfig)
    identity_cutoffs: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.95])
    predictor: str = "knn"  # "knn" or "probe"
    k: int = 5  # knn: neighbours
    features: list[str] = field(default_factory=lambda: ["sequence", "structure"])
    baselines: list[str] = field(default_factory=lambda: ["mmseqs"])

    def validate(self, where: str) -> None:
        if not self.annotations:
            raise ConfigError(f"{where}.annotations: the DeepFRI annotation file is required")
        if self.predictor not in PREDICTORS:
            raise ConfigError(f"{where}.predictor: {self.predictor!r}; expected one of {PREDICTORS}")
        if self.k < 1:
            raise ConfigError(f"{where}.k must be >= 1, got {self.k}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ConfigError(f"{where}.baselines: unknown {bad}; expected some of {BASELINES}")
        bad = [f for f in self.features if f not in ("sequence", "structure", "concat")]
        if bad:
            raise ConfigError(f"{where}.features: unknown {bad}; expected sequence, structure or concat")
        if any(not 0.0 < c <= 1.0 for c in self.identity_cutoffs):
            raise ConfigError(f"{where}.identity_cutoffs must lie in (0, 1], got {self.identity_cutoffs}")


def needs(suite: Suite, cfg: FunctionTaskConfig, proteins, name: str = "function") -> set[str]:
    """The proteins this task embeds: annotated chains of the table (with at least one label)."""
    files = read_deepfri_annotations(check_file(suite, cfg.annotations, f"{name}.annotations"))
    table = set(proteins.ids)
    return {c for lf in files.values() for c, labels in lf.labels.items() if labels and c in table}


def knn_scores(x_test: np.ndarray, x_train: np.ndarray, y_train: np.ndarray, k: int) -> np.ndarray:
    """Cosine-weighted k-NN label scores.

    Shapes:
        x_test (Q, E), x_train (D, E) unit rows, y_train (D, L) bool -> (Q, L) float64 in [0, 1].
    """
    q, n_labels = len(x_test), y_train.shape[1]
    if q == 0 or len(x_train) == 0:
        return np.zeros((q, n_labels))
    k = min(k, len(x_train))
    sims = x_test.astype(np.float64) @ x_train.astype(np.float64).T  # (Q, D)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # ties: lower training index first
    w = np.clip(np.take_along_axis(sims, top, 1), 0.0, None)  # (Q, k)
    votes = (w[:, :, None] * y_train[top]).sum(1)  # (Q, L)
    total = w.sum(1, keepdims=True)
    return np.where(total > 0, votes / np.where(total > 0, total, 1.0), 0.0)


def best_hit_scores(hits: dict, test_ids: list[str], train_index: dict[str, int], y_train: np.ndarray) -> np.ndarray:
    """Labels of each test protein's best MMseqs2 hit, scored by its identity (0 without a hit).

    Shapes:
        -> (len(test_ids), L) float64
    """
    out = np.zeros((len(test_ids), y_train.shape[1]))
    for i, pid in enumerate(test_ids):
        found = hits.get(pid)
        if found:
            best = found[0]
            out[i] = y_train[train_index[best.target]] * best.identity
    return out


def _split(suite: Suite, cfg: SplitConfig, labelled: dict[str, str], out: Path) -> dict[str, list[str]]:
    """train / valid / test ids among ``labelled`` (id -> sequence); written to ``out/split_*.txt``."""
    if cfg.method == "lists":
        parts = {}
        for part in ("train", "valid", "test"):
            value = getattr(cfg, part)
            ids = read_id_list(check_file(suite, value, f"split.{part}")) if value else []
            parts[part] = [i for i in ids if i in labelled]
            parts[f"{part}_listed"] = len(ids)
        shared = set(parts["train"]) & (set(parts["test"]) | set(parts["valid"]))
        if shared:
            raise BenchmarkDataError(
                f"{cfg.train}: {len(shared)} ids are also in the valid / test lists, e.g. {sorted(shared)[:3]}"
            )
        return parts
    rng = np.random.default_rng(cfg.seed)
    ids = sorted(labelled)
    if cfg.method == "random":
        order = [ids[i] for i in rng.permutation(len(ids))]
        n_test = max(1, round(cfg.test_fraction * len(ids)))
        test = set(order[:n_test])
    else:
        rep = mmseqs.cluster({i: labelled[i] for i in ids}, min_identity=cfg.identity, coverage=cfg.coverage)
        clusters: dict[str, list[str]] = {}
        for i in ids:
            clusters.setdefault(rep[i], []).append(i)
        reps = sorted(clusters)
        test = set()
        for j in rng.permutation(len(reps)):
            if len(test) >= cfg.test_fraction * len(ids):
                break
            test.update(clusters[reps[j]])
    parts = {"train": [i for i in ids if i not in test], "valid": [], "test": [i for i in ids if i in test]}
    out.mkdir(parents=True, exist_ok=True)
    for part in ("train", "test"):
        (out / f"split_{part}.txt").write_text("".join(f"{i}\n" for i in parts[part]))
    return parts


def _split_info(cfg: SplitConfig) -> dict:
    """The split settings that apply to its method."""
    keys = {
        "lists": ("train", "valid", "test"),
        "cluster": ("identity", "coverage", "test_fraction", "seed"),
        "random": ("test_fraction", "seed"),
    }[cfg.method]
    return {"method": cfg.method, **{k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}}


def _cutoff_name(c: float) -> str:
    return f"id<{round(c * 100):d}%"


def write_cafa(
    directory: Path,
    vocabulary: list[str],
    test_ids: list[str],
    truth: np.ndarray,
    predictions: dict[str, np.ndarray],
    subsets: dict[str, np.ndarray],
    namespace: str,
) -> None:
    """CAFA files: ``labels.obo`` (the flat vocabulary), ``ground_truth[_<subset>].tsv`` and
    ``predictions/<method>.tsv`` (``protein<TAB>term<TAB>score``, non-zero scores).

    Shapes:
        truth (Q, L) bool, predictions[m] (Q, L), subsets[name] (Q,) bool.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "labels.obo", "w") as f:
        f.write("format-version: 1.2\n\n")
        for term in vocabulary:  # flat: no is_a, as the benchmark's vocabulary is used as it is
            f.write(f"[Term]\nid: {term}\nname: {term}\nnamespace: {namespace}\n\n")
    for name, mask in {"all": np.ones(len(test_ids), bool), **subsets}.items():
        suffix = "" if name == "all" else "_" + slug(name.replace("<", "lt").replace("%", ""))
        with open(directory / f"ground_truth{suffix}.tsv", "w") as f:
            for i in np.flatnonzero(mask):
                for j in np.flatnonzero(truth[i]):
                    f.write(f"{test_ids[i]}\t{vocabulary[j]}\n")
    pred_dir = directory / "predictions"
    pred_dir.mkdir(exist_ok=True)
    for method, scores in predictions.items():
        with open(pred_dir / f"{slug(method.split(' ')[0].replace('/', '_'))}.tsv", "w") as f:
            for i, j in zip(*np.nonzero(scores > 0)):
                f.write(f"{test_ids[i]}\t{vocabulary[j]}\t{float(scores[i, j])!r}\n")


def _evaluate_aspect(ctx: BenchmarkContext, name: str, lf: LabelFile, cfg: FunctionTaskConfig, out: Path) -> dict:
    emb = ctx.embeddings
    proteins = emb.proteins
    index = proteins.index()
    labelled = {c: proteins.sequences[index[c]] for c, s in lf.labels.items() if s and c in index}
    parts = _split(ctx.suite, cfg.split, labelled, out)
    train_ids, test_ids = parts["train"], parts["test"]
    vocab = lf.vocabulary
    col = {t: j for j, t in enumerate(vocab)}

    def matrix(ids):
        y = np.zeros((len(ids), len(vocab)), bool)
        for i, pid in enumerate(ids):
            y[i, [col[t] for t in lf.labels[pid]]] = True
        return y

    y_tr, y_te = matrix(train_ids), matrix(test_ids)
    info = {
        "annotations": str(lf.source),
        "label_space": len(vocab),
        "labels_in_train": int(y_tr.any(0).sum()),
        "labels_in_test": int(y_te.any(0).sum()),
        "test_labels_unseen_in_train": int((y_te.any(0) & ~y_tr.any(0)).sum()),
        "annotated_chains": sum(1 for s in lf.labels.values() if s),
        "annotated_chains_in_proteins_table": len(labelled),
        "n_train": len(train_ids),
        "n_valid": len(parts["valid"]),
        "n_test": len(test_ids),
        "split": _split_info(cfg.split),
        "predictor": f"k-NN (k={cfg.k}, cosine-weighted vote)" if cfg.predictor == "knn" else "linear probe",
    }
    info.update({k: v for k, v in parts.items() if k.endswith("_listed")})
    if not train_ids or not test_ids:
        return {"rows": [], "info": {**info, "skipped": "no labelled training or test protein in the proteins table"}}
    seqs = {p: labelled[p] for p in (*train_ids, *test_ids)}
    predictions: dict[str, np.ndarray] = {}
    hits = None
    if "mmseqs" in cfg.baselines or cfg.identity_cutoffs:
        hits = mmseqs.search({p: seqs[p] for p in test_ids}, {p: seqs[p] for p in train_ids})
    r_tr, r_te = ctx.rows_of(train_ids), ctx.rows_of(test_ids)
    for feat in cfg.features:
        x, present = emb.feature(feat)
        have_tr = present[r_tr]
        if have_tr.sum() == 0:
            continue
        scores = np.zeros(y_te.shape)
        avail = present[r_te]  # test proteins without the feature keep zero scores (count in recall)
        if cfg.predictor == "knn":
            scores[avail] = knn_scores(x[r_te][avail], x[r_tr][have_tr], y_tr[have_tr], cfg.k)
        else:
            trained = np.flatnonzero(y_tr[have_tr].any(0))
            probe = train_probe(x[r_tr][have_tr], y_tr[have_tr][:, trained], ProbeConfig())
            sub = np.zeros((int(avail.sum()), len(vocab)))
            sub[:, trained] = predict(probe, x[r_te][avail])
            scores[avail] = sub
        predictions[f"{cfg.predictor}/{feat}"] = scores
    if "mmseqs" in cfg.baselines:
        predictions["baseline/mmseqs"] = best_hit_scores(hits, test_ids, {p: i for i, p in enumerate(train_ids)}, y_tr)
    if "kmer" in cfg.baselines:
        idx, sim = nearest_neighbours([seqs[p] for p in test_ids], [seqs[p] for p in train_ids])
        predictions["baseline/kmer (fallback)"] = transfer_scores(idx, sim, y_tr).astype(np.float64)
    max_id = mmseqs.max_identity(hits or {}, test_ids)
    ident = np.array([max_id[p] for p in test_ids])
    subsets = {_cutoff_name(c): ident < c for c in sorted(cfg.identity_cutoffs)}
    info["test_max_identity"] = {"mean": float(ident.mean()), "median": float(np.median(ident))}
    info["subset_sizes"] = {"all": len(test_ids), **{k: int(m.sum()) for k, m in subsets.items()}}
    write_cafa(out / "cafa", vocab, test_ids, y_te, predictions, subsets, name)
    rows = []
    for method, scores in predictions.items():
        for subset, mask in {"all": np.ones(len(test_ids), bool), **subsets}.items():
            if not mask.any():
                continue
            m = multilabel_metrics(scores[mask], y_te[mask], **ctx.bootstrap_kwargs)
            for metric in ("fmax", "aupr"):
                rows.append(metric_row(method, subset, metric, m[metric], int(mask.sum())))
    return {"rows": rows, "info": info}


def run(ctx: BenchmarkContext, name: str, cfg: FunctionTaskConfig) -> dict:
    """Score every aspect of the annotation file (or ``cfg.aspects``); one result per aspect.

    Returns:
        ``{"rows": [...], "info": {aspect: {...}}}``; each row's ``method`` is prefixed by the aspect
        when the file has several (GO).
    """
    path = check_file(ctx.suite, cfg.annotations, f"{name}.annotations")
    files = read_deepfri_annotations(path)
    aspects = cfg.aspects or list(files)
    unknown = [a for a in aspects if a not in files]
    if unknown:
        raise ConfigError(f"{ctx.suite.path}: task {name}: aspects {unknown} not in {path} (has {list(files)})")
    rows, info = [], {}
    for aspect in aspects:
        out = ctx.out_dir / slug(name) / slug(aspect)
        result = _evaluate_aspect(ctx, aspect, files[aspect], cfg, out)
        for r in result["rows"]:
            r["aspect"] = aspect
        rows.extend(result["rows"])
        info[aspect] = result["info"]
    return {"rows": rows, "info": info}
