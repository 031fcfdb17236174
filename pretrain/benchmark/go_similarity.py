"""GO semantic similarity (ProtCLIP's task type): does embedding cosine follow functional similarity?

For protein pairs, the benchmark correlates (Spearman) the cosine of the two proteins' embeddings
with their Gene Ontology semantic similarity, separately for each aspect (MF, BP, CC):

* **information content** IC(t) = -log p(t), p(t) = (proteins annotated with t or a descendant) /
  (proteins annotated in t's aspect), counted over an annotation corpus (the GOA files) after
  propagating each protein's terms up ``is_a`` and ``part_of`` (:class:`data_shards.readers.obo.Ontology`);
  a protein counts once per term. An aspect's root has IC 0; a term no corpus protein reaches has
  no IC and is left out of the similarity;
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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from data_shards.readers.gaf import iter_gaf
from data_shards.readers.obo import Ontology
from pretrain.benchmark.bootstrap import DEFAULT_RESAMPLES, bootstrap

ASPECTS = {"MF": "F", "BP": "P", "CC": "C"}  # task name -> ontology aspect letter
MEASURES = ("lin", "resnik")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, ties sharing the mean of their ranks (scipy's ``rankdata``).

    Shapes:
        (N,) -> (N,) float64.
    """
    values = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of the last member of each group of equal values
    return (last - 0.5 * (counts - 1))[inverse].astype(np.float64)


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho: Pearson correlation of average ranks; None with < 2 items or a constant side.

    Shapes:
        x (N,), y (N,).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-D arrays of one length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    if denom == 0.0:
        return None
    return float((rx * ry).sum() / denom)


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
        corpus: protein -> annotated GO ids (alt ids allowed; unknown / obsolete ids ignored).

    Returns:
        term -> -log p(term) >= 0, for terms with at least one (propagated) protein.
    """
    counts: dict[str, int] = {}
    per_aspect: dict[str, int] = {}
    for terms in corpus.values():
        closed = ontology.propagate(terms)
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
    """Canonical ids of ``terms`` in ``aspect`` ("F", "P", "C") that have an IC, sorted."""
    out = set()
    for t in terms:
        c = ontology.canonical(t)
        if c is not None and ontology.aspect(c) == aspect and c in ic:
            out.add(c)
    return sorted(out)


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
    seed: int = 0,
) -> dict:
    """Spearman between embedding cosine and BMA GO similarity, per aspect, with bootstrap intervals.

    Args:
        lookup: protein id -> embedding vector (E,) (any norm; cosine is taken).
        pairs: protein id pairs to score.
        protein_terms: protein id -> annotated GO ids (not necessarily propagated).
        ontology, ic: the GO and the IC table (:func:`information_content`).
        measure: ``"lin"`` or ``"resnik"``.
        resamples, seed: bootstrap over the pairs scored in each aspect.

    Returns:
        ``{"measure", "n_pairs", "aspects": {"MF": {"spearman": Interval dict, "n_pairs",
        "mean_similarity"}, ...}}``; an aspect with fewer than 3 scorable pairs (both proteins with
        a term of the aspect that has an IC) reports ``spearman`` None.
    """
    sim = TermSimilarity(ontology, ic, measure)
    cos = _cosines(lookup, pairs)
    out: dict = {"measure": measure, "n_pairs": len(pairs), "aspects": {}}
    for name, aspect in ASPECTS.items():
        terms = {}
        for pid in {i for p in pairs for i in p}:
            terms[pid] = aspect_terms(ontology, protein_terms.get(pid, ()), aspect, ic)
        rows, sims = [], []
        for k, (a, b) in enumerate(pairs):
            s = best_match_average(terms[a], terms[b], sim)
            if s is not None:
                rows.append(k)
                sims.append(s)
        x, y = cos[rows], np.asarray(sims)
        entry: dict = {"n_pairs": len(rows), "mean_similarity": float(y.mean()) if len(y) else None}
        if len(rows) >= 3:
            entry["spearman"] = bootstrap(
                lambda idx, x=x, y=y: spearman(x[idx], y[idx]), len(rows), resamples=resamples, seed=seed
            ).to_dict()
        else:
            entry["spearman"] = None
        out["aspects"][name] = entry
    return out
