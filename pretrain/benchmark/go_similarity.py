"""GO semantic similarity (ProtCLIP's task type): does embedding cosine follow functional similarity?

For protein pairs, the benchmark correlates (Spearman) the cosine of the two proteins' embeddings
with their Gene Ontology semantic similarity, separately for each aspect (MF, BP, CC):

* **information content** IC(t) = -log p(t), p(t) = (proteins annotated with t or a descendant) /
  (proteins annotated in t's aspect), counted over an annotation corpus (the GOA files) after
  propagating each protein's terms up ``is_a`` and ``part_of`` (:class:`data_shards.readers.obo.Ontology`);
  a protein counts once per term. An aspect's root has IC 0; a term no corpus protein reaches has
  no IC and is left out of the similarity;
* **dated annotations** (GOA files and tables older than the OBO) are read as GO says to use them
  today, as the shard builder reads them (:meth:`data_shards.readers.obo.Ontology.current`): an alt
  id as its primary, an obsolete id with a single ``replaced_by`` as its replacement; an id with no
  current term (unknown, or obsolete with no or several replacements) is dropped. The task reports
  how many annotations each rule met (:func:`current_id_counts`);
* **Resnik** (1995): sim(a, b) = IC of the most informative common ancestor (a term is its own
  ancestor); **Lin** (1998): 2 IC(MICA) / (IC(a) + IC(b)), 1 for a == b;
* **best-match average** (BMA) over two proteins' annotated terms of one aspect:
  (mean over a in A of max over b in B of sim(a, b) + mean over b in B of max over a in A) / 2.

Spearman uses average ranks for ties; its 95 % interval is a bootstrap over pairs
(:func:`pretrain.benchmark.bootstrap.bootstrap`).

    ic = information_content(onto, gaf_term_sets(["GO.goa_human.gz"]))
    pairs = sample_pairs(ids_with_go, 2000, seed=0)
    result = go_similarity_benchmark(lookup, pairs, protein_terms, onto, ic, measure="lin")
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from data_shards.readers.gaf import iter_gaf
from data_shards.readers.obo import READINGS, Ontology, load_obo
from pretrain.benchmark.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, Interval, bootstrap
from pretrain.benchmark.context import BenchmarkContext, metric_row
from pretrain.benchmark.data import BenchmarkDataError, Proteins
from pretrain.benchmark.embedding import FEATURES
from pretrain.benchmark.stats import average_ranks, spearman  # noqa: F401  (average_ranks: re-exported)
from pretrain.benchmark.suite import Suite, check_file
from pretrain.errors import ConfigError

ASPECTS = {"MF": "F", "BP": "P", "CC": "C"}  # task name -> ontology aspect letter
MEASURES = ("lin", "resnik")
_GO_ID = re.compile(r"GO:\d{7}")


def gaf_term_sets(paths: Iterable[str | Path], evidence: Iterable[str] | None = None) -> dict[str, set[str]]:
    """Accession -> its annotated GO ids, read from GAF files (NOT-qualified lines dropped).

    Args:
        paths: GAF 2.x files (plain or gzipped), e.g. the UniProt-GOA files.
        evidence: keep only these evidence codes (default: all).
    """
    wanted = frozenset(evidence) if evidence is not None else None
    out: dict[str, set[str]] = {}
    for path in paths:
        for ann in iter_gaf(path):
            if wanted is None or ann.evidence in wanted:
                out.setdefault(ann.accession, set()).add(ann.go_id)
    return out


def information_content(ontology: Ontology, corpus: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """IC of every GO term reached by the corpus (see the module docstring).

    Args:
        ontology: the GO (is_a + part_of parents).
        corpus: protein -> annotated GO ids, read through :meth:`Ontology.current` (alt ids and
            singly replaced obsolete ids count as the current term; ids with none are ignored).

    Returns:
        term -> -log p(term) >= 0, for terms with at least one (propagated) protein.
    """
    counts: dict[str, int] = {}
    per_aspect: dict[str, int] = {}
    for terms in corpus.values():
        closed = ontology.propagate(c for t in terms if (c := ontology.current(t)) is not None)
        for aspect in {ontology.aspect(t) for t in closed} - {None}:
            per_aspect[aspect] = per_aspect.get(aspect, 0) + 1
        for t in closed:
            counts[t] = counts.get(t, 0) + 1
    ic = {}
    for t, c in counts.items():
        total = per_aspect.get(ontology.aspect(t))
        if total:
            ic[t] = max(0.0, -math.log(c / total))
    return ic


class TermSimilarity:
    """Lin or Resnik similarity of two GO terms under one IC table, cached per term pair.

    Args:
        ontology: the GO.
        ic: :func:`information_content` output.
        measure: ``"lin"`` or ``"resnik"``.
    """

    def __init__(self, ontology: Ontology, ic: Mapping[str, float], measure: str = "lin"):
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        self.ontology, self.ic, self.measure = ontology, ic, measure
        self._cache: dict[tuple[str, str], float] = {}

    def _closure(self, term: str) -> frozenset[str]:
        return self.ontology.ancestors(term) | {term}

    def mica_ic(self, a: str, b: str) -> float:
        """IC of the most informative common ancestor of ``a`` and ``b`` (Resnik); 0 when none has an IC."""
        common = self._closure(a) & self._closure(b)
        return max((self.ic[t] for t in common if t in self.ic), default=0.0)

    def __call__(self, a: str, b: str) -> float:
        """sim(a, b) for two canonical ids that both have an IC."""
        key = (a, b) if a <= b else (b, a)
        value = self._cache.get(key)
        if value is None:
            resnik = self.mica_ic(a, b)
            if self.measure == "resnik":
                value = resnik
            else:
                denom = self.ic[a] + self.ic[b]
                value = 1.0 if a == b else (2.0 * resnik / denom if denom > 0 else 0.0)
            self._cache[key] = value
        return value


def best_match_average(terms_a: Sequence[str], terms_b: Sequence[str], sim: TermSimilarity) -> float | None:
    """BMA of two term lists (see the module docstring); None when either is empty."""
    if not terms_a or not terms_b:
        return None
    m = np.array([[sim(a, b) for b in terms_b] for a in terms_a])  # (|A|, |B|)
    return float(0.5 * (m.max(1).mean() + m.max(0).mean()))


def aspect_terms(ontology: Ontology, terms: Iterable[str], aspect: str, ic: Mapping[str, float]) -> list[str]:
    """Current ids (:meth:`Ontology.current`) of ``terms`` in ``aspect`` ("F", "P", "C") that have an IC, sorted."""
    out = set()
    for t in terms:
        c = ontology.current(t)
        if c is not None and ontology.aspect(c) == aspect and c in ic:
            out.add(c)
    return sorted(out)


def current_id_counts(ontology: Ontology, corpus: Mapping[str, Iterable[str]]) -> dict[str, int]:
    """How the GO ids of ``corpus`` (protein -> ids) read against ``ontology``: counts of distinct
    (protein, id) annotations, ``annotations`` in all and one count per
    :meth:`Ontology.reading <data_shards.readers.obo.Ontology.reading>` (current, alt_id, replaced;
    obsolete and unknown are dropped)."""
    out = dict.fromkeys(("annotations", *READINGS), 0)
    for terms in corpus.values():
        for t in set(terms):
            out["annotations"] += 1
            out[ontology.reading(t)] += 1
    return out


def sample_pairs(ids: Sequence[str], n_pairs: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n_pairs`` distinct unordered pairs of distinct ids, drawn uniformly with a seeded generator.

    Raises:
        ValueError: fewer than 2 distinct ids, or more pairs asked than exist.
    """
    uniq = sorted(set(ids))
    most = len(uniq) * (len(uniq) - 1) // 2
    if len(uniq) < 2 or n_pairs > most or n_pairs < 1:
        raise ValueError(f"cannot draw {n_pairs} pairs from {len(uniq)} distinct ids ({most} pairs exist)")
    rng = np.random.default_rng(seed)
    seen: set[tuple[str, str]] = set()
    out = []
    while len(out) < n_pairs:
        i, j = rng.integers(0, len(uniq), size=2)
        if i == j:
            continue
        pair = (uniq[min(i, j)], uniq[max(i, j)])
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def _cosines(lookup: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """(P,) cosine of each pair's embeddings; a missing id is a ValueError naming it."""
    missing = sorted({i for p in pairs for i in p if i not in lookup})
    if missing:
        raise ValueError(f"no embedding for {len(missing)} protein(s), e.g. {missing[:5]}")
    out = np.empty(len(pairs), np.float64)
    for k, (a, b) in enumerate(pairs):
        va, vb = np.asarray(lookup[a], np.float64), np.asarray(lookup[b], np.float64)
        norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
        out[k] = float(va @ vb) / norm if norm > 0 else 0.0
    return out


def go_similarity_benchmark(
    lookup: Mapping[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
    protein_terms: Mapping[str, Iterable[str]],
    ontology: Ontology,
    ic: Mapping[str, float],
    *,
    measure: str = "lin",
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    similarities: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict:
    """Spearman between embedding cosine and BMA GO similarity, per aspect, with bootstrap intervals.

    Args:
        lookup: protein id -> embedding vector (E,) (any norm; cosine is taken).
        pairs: protein id pairs to score.
        protein_terms: protein id -> annotated GO ids (not necessarily propagated).
        ontology, ic: the GO and the IC table (:func:`information_content`).
        measure: ``"lin"`` or ``"resnik"``.
        resamples, level, seed: bootstrap over the pairs scored in each aspect.
        similarities: :func:`pair_similarities` of these pairs under ``measure``, when already computed.

    Returns:
        ``{"measure", "n_pairs", "aspects": {"MF": {"spearman": Interval dict, "n_pairs",
        "mean_similarity"}, ...}}``; an aspect with fewer than 3 scorable pairs (both proteins with
        a term of the aspect that has an IC) reports ``spearman`` None.
    """
    if similarities is None:
        similarities = pair_similarities(pairs, protein_terms, ontology, ic, measure)
    cos = _cosines(lookup, pairs)
    out: dict = {"measure": measure, "n_pairs": len(pairs), "aspects": {}}
    for name, (rows, y) in similarities.items():
        x = cos[rows]
        entry: dict = {"n_pairs": len(rows), "mean_similarity": float(y.mean()) if len(y) else None}
        if len(rows) >= 3:
            entry["spearman"] = bootstrap(
                lambda idx, x=x, y=y: spearman(x[idx], y[idx]), len(rows), resamples=resamples, level=level, seed=seed
            ).to_dict()
        else:
            entry["spearman"] = None
        out["aspects"][name] = entry
    return out


def pair_similarities(
    pairs: Sequence[tuple[str, str]],
    protein_terms: Mapping[str, Iterable[str]],
    ontology: Ontology,
    ic: Mapping[str, float],
    measure: str = "lin",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per aspect name ("MF", "BP", "CC"): (indices into ``pairs`` that are scorable, their BMA similarity).

    Shapes:
        each entry: (S,) int64 pair indices, (S,) float64 similarities.
    """
    sim = TermSimilarity(ontology, ic, measure)
    out = {}
    for name, aspect in ASPECTS.items():
        terms = {
            pid: aspect_terms(ontology, protein_terms.get(pid, ()), aspect, ic) for pid in {i for p in pairs for i in p}
        }
        rows, sims = [], []
        for k, (a, b) in enumerate(pairs):
            s = best_match_average(terms[a], terms[b], sim)
            if s is not None:
                rows.append(k)
                sims.append(s)
        out[name] = (np.asarray(rows, np.int64), np.asarray(sims, np.float64))
    return out


# --- the suite task (``type: go_similarity`` in pretrain.benchmark.registry) ----------------------------


@dataclass
class GoSimilarityTaskConfig:
    """Suite keys of a ``go_similarity`` task.

    Each protein's GO terms are the GO ids in the proteins table's ``term_columns``; the IC is counted
    over the GAF files' proteins (``gaf: []``: over the proteins table's own annotated proteins).
    Up to ``n_pairs`` pairs of annotated proteins are drawn (seeded) and embedded.
    """

    obo: str = ""  # the GO (go-basic.obo, plain or gzipped)
    gaf: list[str] = field(default_factory=list)  # annotation corpus for the information content
    evidence: list[str] | None = None  # keep only these GAF evidence codes (default: all)
    term_columns: list[str] = field(default_factory=lambda: ["go_mf", "go_bp", "go_cc"])
    measures: list[str] = field(default_factory=lambda: ["lin"])  # lin and / or resnik
    n_pairs: int = 2000  # pairs drawn (fewer when fewer exist)
    features: list[str] = field(default_factory=lambda: ["sequence", "structure"])
    seed: int = 0  # seeds the pair draw

    def validate(self, where: str) -> None:
        if not self.obo:
            raise ConfigError(f"{where}.obo: the GO OBO file is required")
        bad = sorted(set(self.measures) - set(MEASURES))
        if not self.measures or bad:
            raise ConfigError(f"{where}.measures: {self.measures}; expected some of {list(MEASURES)}")
        bad = sorted(set(self.features) - set(FEATURES))
        if not self.features or bad:
            raise ConfigError(f"{where}.features: {self.features}; expected some of {list(FEATURES)}")
        if not self.term_columns:
            raise ConfigError(f"{where}.term_columns: name at least one column of GO ids")
        if self.n_pairs < 3:
            raise ConfigError(f"{where}.n_pairs must be >= 3, got {self.n_pairs}")


def table_terms(proteins: Proteins, columns: Sequence[str], where: str) -> dict[str, set[str]]:
    """Protein id -> GO ids found in its ``columns`` cells (proteins without any are left out)."""
    missing = [c for c in columns if c not in proteins.columns]
    if missing:
        raise ConfigError(f"{where}: proteins table {proteins.source} has no column(s) {missing}")
    out = {}
    for i, pid in enumerate(proteins.ids):
        terms = {t for c in columns for t in _GO_ID.findall(proteins.columns[c][i])}
        if terms:
            out[pid] = terms
    return out


@lru_cache(maxsize=4)
def _ontology_and_ic(obo: Path, gaf: tuple[Path, ...], evidence: tuple[str, ...] | None, table: tuple):
    """(ontology, IC, how the IC corpus's ids read: :func:`current_id_counts`), read once per process
    for a task's files (trained and base rows share them)."""
    ontology = load_obo(obo)
    corpus = gaf_term_sets(gaf, evidence) if gaf else dict(table)
    return ontology, information_content(ontology, corpus), current_id_counts(ontology, corpus)


def _task_pairs(suite: Suite, cfg: GoSimilarityTaskConfig, proteins: Proteins, name: str):
    terms = table_terms(proteins, cfg.term_columns, f"{suite.path}: {name}.term_columns")
    ids = sorted(terms)
    most = len(ids) * (len(ids) - 1) // 2
    if most < 3:
        raise BenchmarkDataError(f"{suite.path}: {name}: {len(ids)} protein(s) of {proteins.source} have GO terms")
    return terms, sample_pairs(ids, min(cfg.n_pairs, most), seed=cfg.seed)


def needs(suite: Suite, cfg: GoSimilarityTaskConfig, proteins: Proteins, name: str = "go_similarity") -> set[str]:
    """The members of the drawn pairs; checks the OBO and GAF files exist."""
    check_file(suite, cfg.obo, f"{name}.obo")
    for i, g in enumerate(cfg.gaf):
        check_file(suite, g, f"{name}.gaf[{i}]")
    _, pairs = _task_pairs(suite, cfg, proteins, name)
    return {i for p in pairs for i in p}


def run(ctx: BenchmarkContext, name: str, cfg: GoSimilarityTaskConfig) -> dict:
    """Spearman of cosine with BMA Lin / Resnik similarity, per aspect, measure and feature."""
    suite, emb = ctx.suite, ctx.embeddings
    obo = check_file(suite, cfg.obo, f"{name}.obo")
    gaf = tuple(check_file(suite, g, f"{name}.gaf[{i}]") for i, g in enumerate(cfg.gaf))
    terms, pairs = _task_pairs(suite, cfg, emb.proteins, name)
    frozen = tuple(sorted((k, frozenset(v)) for k, v in terms.items())) if not gaf else ()
    try:
        ontology, ic, corpus_ids = _ontology_and_ic(obo, gaf, tuple(cfg.evidence) if cfg.evidence else None, frozen)
    except ValueError as e:
        raise BenchmarkDataError(f"{suite.path}: {name}: {e}") from None
    index = emb.proteins.index()
    rows: list[dict] = []
    info: dict = {"annotated_proteins": len(terms), "n_pairs": len(pairs), "ic_terms": len(ic)}
    info["ic_corpus"] = [str(g) for g in gaf] or f"proteins table {emb.proteins.source}"
    # dated ids read as today's terms (module docstring): in the IC corpus and in the proteins' own terms
    info["go_ids"] = {"ic_corpus": corpus_ids, "proteins": current_id_counts(ontology, terms)}
    for measure in cfg.measures:
        sims = _similarities(ctx, name, measure, pairs, terms, ontology, ic)
        for feat in cfg.features:
            x, present = emb.feature(feat)
            keep = np.array([present[index[a]] and present[index[b]] for a, b in pairs], bool)  # (P,)
            lookup = {pid: x[index[pid]] for p in pairs for pid in p if present[index[pid]]}
            kept = [p for p, k in zip(pairs, keep) if k]
            remap = np.cumsum(keep) - 1  # pair index -> index among the kept pairs
            sub = {a: (remap[r[keep[r]]], s[keep[r]]) for a, (r, s) in sims.items()}
            res = go_similarity_benchmark(
                lookup, kept, terms, ontology, ic, measure=measure, similarities=sub, **ctx.bootstrap_kwargs
            )
            for aspect, entry in res["aspects"].items():
                info.setdefault(aspect, {})[f"{measure}/{feat}"] = {
                    "n_pairs": entry["n_pairs"],
                    "mean_similarity": entry["mean_similarity"],
                }
                if entry["spearman"] is not None:
                    rows.append(
                        metric_row(
                            f"cosine/{feat}", "all", f"spearman_{measure}", Interval(**entry["spearman"]),
                            entry["n_pairs"], aspect=aspect,
                        )
                    )  # fmt: skip
    return {"rows": rows, "info": info}


_SIMILARITIES: dict[tuple, dict] = {}


def _similarities(ctx, name, measure, pairs, terms, ontology, ic) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """:func:`pair_similarities`, once per suite task and measure (the trained and base rows share them)."""
    key = (str(ctx.suite.path), name, measure, tuple(pairs), id(ic))
    if key not in _SIMILARITIES:
        if len(_SIMILARITIES) >= 8:
            _SIMILARITIES.clear()  # a few tasks' worth at most
        _SIMILARITIES[key] = pair_similarities(pairs, terms, ontology, ic, measure)
    return _SIMILARITIES[key]
