"""Protein-protein interaction from complexes (ProtCLIP's task type), scored zero-shot by cosine.

**Pairs.** The docking benchmark (``db5.5``: ``<PDB>_<r|l>_<b|u>.pdb.gz``) and DIPS
(``dips_test``: ``<xx>_<pdb>.pdb<k>_<n>.dill_<r|l>_b_COMPLEX.pdb.gz``) split each complex into a
receptor file and a ligand file. An *entry* is one complex (db5.5: the PDB code; DIPS: the
``<pdb>.pdb<k>_<n>`` assembly). :func:`interaction_pairs` makes

* **positives**: every (receptor chain, ligand chain) pair of one entry's *bound* files, the
  partners whose interface the benchmark defines (``pairing="all"`` adds pairs within one side,
  e.g. an antibody's heavy and light chains);
* **negatives**: as many pairs of chains drawn (seeded) from *different* PDB entries, never a
  pair whose UniProt accessions also form a positive pair (the same two proteins in another
  structure do interact) and never a pair twice.

Unbound files (``_u``) are left out: they hold the same proteins again. Homodimers are positives
whose two chains have the same sequence (their cosine is ~1 whatever the model learned); the
result counts them, and ``drop_identical=True`` removes them.

**Score and metric.** The score of a pair is the cosine of its two chains' embeddings (zero-shot:
no probe is trained, so no pair is spent on training); the metric is AUROC, computed from ranks
(Mann-Whitney U / (n_pos n_neg), ties counted half) with a 95 % bootstrap interval over pairs.

    chains = complex_chains("../shared/data/annotations/pdb_chains.tsv")
    pairs = interaction_pairs(chains, seed=0)
    vectors = model.embed_structures([(c.path, c.chain) for c in chains])
    result = ppi_benchmark(dict(zip([c.id for c in chains], vectors)), pairs)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_shards.readers.tables import iter_chain_table
from pretrain.benchmark.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES, Interval, bootstrap
from pretrain.benchmark.context import BenchmarkContext, metric_row, slug
from pretrain.benchmark.data import BenchmarkDataError, Proteins
from pretrain.benchmark.embedding import FEATURES
from pretrain.benchmark.stats import average_ranks
from pretrain.benchmark.suite import Suite, check_file
from pretrain.errors import ConfigError

SOURCES = ("db5.5", "dips_test")
_DB5 = re.compile(r"^(?P<pdb>[0-9A-Za-z]{4})_(?P<side>[rl])_(?P<state>[bu])\.pdb(\.gz)?$")
_DIPS = re.compile(
    r"^[0-9a-z]{2}_(?P<entry>(?P<pdb>[0-9a-z]{4})\.pdb\d+_\d+)\.dill_(?P<side>[rl])_(?P<state>[bu])_COMPLEX\.pdb(\.gz)?$"
)


@dataclass(frozen=True)
class ComplexChain:
    """One chain of a complex's receptor or ligand file."""

    id: str  # "<structure_file>:<chain>", as the chain table names the file
    path: Path | None  # the structure file, resolved
    chain: str  # author chain id
    entry: str  # the complex: "db5.5/1ACB", "dips_test/1a95.pdb1_3"
    side: str  # "r" (receptor) or "l" (ligand)
    pdb_id: str  # upper-case PDB code: chains of one PDB code are never a negative pair
    uniprot: str  # accession ("" when the chain has none)
    sequence: str


@dataclass(frozen=True)
class Pair:
    """A pair of chain ids and whether they interact (1) or not (0)."""

    a: str
    b: str
    label: int


def _parse_name(source: str, name: str) -> tuple[str, str, str, str] | None:
    """(entry, pdb code, side, state) of a db5.5 / DIPS file name; None when it does not parse."""
    m = (_DB5 if source == "db5.5" else _DIPS).match(name)
    if m is None:
        return None
    entry = m.group("pdb").upper() if source == "db5.5" else m.group("entry")
    return f"{source}/{entry}", m.group("pdb").upper(), m.group("side"), m.group("state")


def complex_chains(table: str | Path, sources: Iterable[str] = SOURCES, bound_only: bool = True) -> list[ComplexChain]:
    """The chains of the complexes' files listed in a chain table (``pdb_chains.tsv``).

    Args:
        table: the chain table; structure paths are relative to its folder and may point into its
            parent folder (the layout of ``../shared/data``).
        sources: structure folders (the path component before the file name) to read.
        bound_only: keep the bound (``_b``) files only.

    Returns:
        Chains in table order; rows without a chain id or sequence are left out (they cannot be
        embedded as one chain).

    Raises:
        ValueError: a file of a named source whose name is not in the source's pattern (names
            the table line).
    """
    table = Path(table)
    wanted = set(sources)
    unknown = wanted - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown complex source(s) {sorted(unknown)}; known: {list(SOURCES)}")
    out = []
    for row in iter_chain_table(table, allowed_roots=[table.resolve().parent.parent]):
        parts = Path(row.structure_file).parts
        if len(parts) < 2 or parts[-2] not in wanted:
            continue
        parsed = _parse_name(parts[-2], parts[-1])
        if parsed is None:
            raise ValueError(f"{table}:{row.line}: {row.structure_file!r} is not a {parts[-2]} complex file name")
        entry, pdb_id, side, state = parsed
        if (bound_only and state != "b") or not row.chain or not row.sequence:
            continue
        out.append(
            ComplexChain(
                f"{row.structure_file}:{row.chain}", row.path, row.chain, entry, side, pdb_id, row.uniprot, row.sequence
            )
        )
    return out


def interaction_pairs(
    chains: Sequence[ComplexChain],
    *,
    pairing: str = "cross",
    drop_identical: bool = False,
    seed: int = 0,
    max_tries: int = 1000,
) -> list[Pair]:
    """Positive pairs within entries and as many seeded negative pairs across entries (module docstring).

    Args:
        chains: :func:`complex_chains` output.
        pairing: ``"cross"`` (receptor x ligand chains) or ``"all"`` (every two chains of an entry).
        drop_identical: leave out pairs of two identical sequences (homodimers), positive or negative.
        seed: seeds the negative draws.
        max_tries: draws per negative wanted before giving up.

    Returns:
        Positives (entry order) then negatives; each pair's ids sorted.

    Raises:
        ValueError: an unknown ``pairing``, no positive pair, or too few possible negatives.
    """
    if pairing not in ("cross", "all"):
        raise ValueError(f"pairing must be 'cross' or 'all', got {pairing!r}")
    by_entry: dict[str, list[ComplexChain]] = {}
    for c in chains:
        by_entry.setdefault(c.entry, []).append(c)
    positives: list[Pair] = []
    seen: set[tuple[str, str]] = set()
    partner_accessions: set[frozenset[str]] = set()
    for members in by_entry.values():
        for i, x in enumerate(members):
            for y in members[i + 1 :]:
                if (pairing == "cross" and x.side == y.side) or x.id == y.id:
                    continue
                if drop_identical and x.sequence == y.sequence:
                    continue
                key = (min(x.id, y.id), max(x.id, y.id))
                if key not in seen:
                    seen.add(key)
                    positives.append(Pair(*key, 1))
                    if x.uniprot and y.uniprot:
                        partner_accessions.add(frozenset((x.uniprot, y.uniprot)))
    if not positives:
        raise ValueError(f"no positive pair among {len(chains)} chains of {len(by_entry)} entries")
    rng = np.random.default_rng(seed)
    negatives: list[Pair] = []
    tries = 0
    while len(negatives) < len(positives):
        tries += 1
        if tries > max_tries * len(positives):
            raise ValueError(
                f"found only {len(negatives)} of {len(positives)} negative pairs across entries in {tries - 1} draws"
            )
        i, j = rng.integers(0, len(chains), size=2)
        x, y = chains[i], chains[j]
        if x.pdb_id == y.pdb_id or (drop_identical and x.sequence == y.sequence):
            continue
        if x.uniprot and y.uniprot and frozenset((x.uniprot, y.uniprot)) in partner_accessions:
            continue
        key = (min(x.id, y.id), max(x.id, y.id))
        if key not in seen:
            seen.add(key)
            negatives.append(Pair(*key, 0))
    return positives + negatives


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve from ranks: (rank sum of positives - n1 (n1 + 1) / 2) / (n1 n0).

    Tied scores count half (average ranks). None when either class is absent.

    Shapes:
        scores (N,) float, labels (N,) {0, 1}.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n1 = int(labels.sum())
    n0 = len(labels) - n1
    if n1 == 0 or n0 == 0:
        return None
    ranks = average_ranks(scores)
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def pair_cosines(lookup: Mapping[str, np.ndarray], pairs: Sequence[Pair]) -> np.ndarray:
    """(P,) cosine of each pair's two embeddings; an id without an embedding is a ValueError naming it."""
    missing = sorted({i for p in pairs for i in (p.a, p.b) if i not in lookup})
    if missing:
        raise ValueError(f"no embedding for {len(missing)} chain(s), e.g. {missing[:5]}")
    out = np.empty(len(pairs), np.float64)
    for k, p in enumerate(pairs):
        va, vb = np.asarray(lookup[p.a], np.float64), np.asarray(lookup[p.b], np.float64)
        norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
        out[k] = float(va @ vb) / norm if norm > 0 else 0.0
    return out


def ppi_benchmark(
    lookup: Mapping[str, np.ndarray],
    pairs: Sequence[Pair],
    *,
    sequences: Mapping[str, str] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> dict:
    """AUROC of embedding cosine for telling interacting pairs from shuffled ones.

    Args:
        lookup: chain id -> embedding (E,) (any norm).
        pairs: :func:`interaction_pairs` output (both classes needed).
        sequences: chain id -> sequence, to count identical-sequence pairs per class (optional).
        resamples, level, seed: the bootstrap over pairs.

    Returns:
        ``{"score": "cosine", "auroc": Interval dict, "n_pairs", "n_positive", "n_negative",
        "mean_cosine_positive", "mean_cosine_negative"}`` (+ ``identical_sequence_positive`` /
        ``_negative`` with ``sequences``).
    """
    labels = np.array([p.label for p in pairs], dtype=np.int64)
    if labels.sum() == 0 or labels.sum() == len(labels):
        raise ValueError(f"AUROC needs positive and negative pairs, got {int(labels.sum())} of {len(labels)} positive")
    cos = pair_cosines(lookup, pairs)
    interval = bootstrap(
        lambda idx: auroc(cos[idx], labels[idx]), len(pairs), resamples=resamples, level=level, seed=seed
    )
    out = {
        "score": "cosine",
        "auroc": interval.to_dict(),
        "n_pairs": len(pairs),
        "n_positive": int(labels.sum()),
        "n_negative": int((labels == 0).sum()),
        "mean_cosine_positive": float(cos[labels == 1].mean()),
        "mean_cosine_negative": float(cos[labels == 0].mean()),
    }
    if sequences is not None:
        same = np.array([sequences.get(p.a) is not None and sequences.get(p.a) == sequences.get(p.b) for p in pairs])
        out["identical_sequence_positive"] = int((same & (labels == 1)).sum())
        out["identical_sequence_negative"] = int((same & (labels == 0)).sum())
    return out


# --- the suite task (``type: ppi`` in pretrain.benchmark.registry) -------------------------------------

SUBSETS = (("all", False), ("no homodimers", True))  # (subset name, drop identical-sequence pairs)


@dataclass
class PpiTaskConfig:
    """Suite keys of a ``ppi`` task.

    A chain is embedded as a row of the suite's proteins table when that row names the same structure
    file and chain; a chain no row names (e.g. two complexes' files sharing a PDB code and chain id)
    is added to the table under its own id ``<structure_file>:<chain>``.
    """

    chains: str | None = None  # chain table (pdb_chains.tsv layout) naming the complexes' files; None: proteins
    sources: list[str] = field(default_factory=lambda: list(SOURCES))  # structure folders of the complexes
    pairing: str = "cross"  # "cross" (receptor x ligand chains) or "all" (every two chains of an entry)
    features: list[str] = field(default_factory=lambda: ["structure", "sequence"])  # embeddings to score by
    seed: int = 0  # seeds the negative pairs

    def validate(self, where: str) -> None:
        bad = sorted(set(self.sources) - set(SOURCES))
        if not self.sources or bad:
            raise ConfigError(f"{where}.sources: {self.sources}; expected a non-empty subset of {list(SOURCES)}")
        if self.pairing not in ("cross", "all"):
            raise ConfigError(f"{where}.pairing: {self.pairing!r}; expected cross or all")
        bad = sorted(set(self.features) - set(FEATURES))
        if not self.features or bad:
            raise ConfigError(f"{where}.features: {self.features}; expected some of {list(FEATURES)}")


def _task_chains(suite: Suite, cfg: PpiTaskConfig, name: str) -> tuple[Path, list[ComplexChain]]:
    path = check_file(suite, cfg.chains, f"{name}.chains") if cfg.chains else suite.proteins
    try:
        chains = complex_chains(path, cfg.sources)
    except ValueError as e:
        raise BenchmarkDataError(f"{suite.path}: {name}: {e}") from None
    if not chains:
        raise BenchmarkDataError(f"{suite.path}: {name}: {path} names no chain of a {list(cfg.sources)} complex file")
    return path, chains


def table_ids(chains: Sequence[ComplexChain], proteins: Proteins) -> dict[str, str]:
    """Chain id -> the proteins-table id of the row naming the same (structure file, chain); else the chain id."""
    by_file: dict[tuple[Path, str], str] = {}
    for pid, structure in zip(proteins.ids, proteins.structures):
        if structure is not None and structure[1] is not None:
            by_file.setdefault((Path(structure[0]).resolve(), structure[1]), pid)
    return {c.id: (by_file.get((c.path.resolve(), c.chain), c.id) if c.path is not None else c.id) for c in chains}


def extra(suite: Suite, cfg: PpiTaskConfig, proteins: Proteins, name: str = "ppi") -> list[tuple]:
    """Rows to add to the proteins table: (id, sequence, (file, chain) or None) of chains no row names."""
    _, chains = _task_chains(suite, cfg, name)
    ids = table_ids(chains, proteins)
    have = set(proteins.ids)
    out, seen = [], set()
    for c in chains:
        if ids[c.id] == c.id and c.id not in have and c.id not in seen:
            seen.add(c.id)
            out.append((c.id, c.sequence, (c.path, c.chain) if c.path is not None else None))
    return out


def needs(suite: Suite, cfg: PpiTaskConfig, proteins: Proteins, name: str = "ppi") -> set[str]:
    """The proteins-table ids of every complex chain (after :func:`extra` rows were added)."""
    _, chains = _task_chains(suite, cfg, name)
    table = set(proteins.ids)
    return {i for i in table_ids(chains, proteins).values() if i in table}


def _write_pairs(path: Path, pairs: Sequence[Pair], cos: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = list(cos)
    lines = ["\t".join(["chain_a", "chain_b", "label", *(f"cosine_{f}" for f in feats)])]
    for k, p in enumerate(pairs):
        lines.append("\t".join([p.a, p.b, str(p.label), *(f"{cos[f][k]:.6f}" for f in feats)]))
    path.write_text("\n".join(lines) + "\n")


def run(ctx: BenchmarkContext, name: str, cfg: PpiTaskConfig) -> dict:
    """AUROC of cosine per feature, on all pairs and with homodimers (identical-sequence pairs) dropped.

    Pairs with a chain that lacks the feature (a structure that could not be read) are left out of
    that feature's figure (counted in ``info``).
    """
    table, chains = _task_chains(ctx.suite, cfg, name)
    emb = ctx.embeddings
    ids = table_ids(chains, emb.proteins)
    index = emb.proteins.index()
    sequences = {c.id: c.sequence for c in chains}
    rows: list[dict] = []
    info: dict = {"chains_table": str(table), "n_chains": len(chains), "n_entries": len({c.entry for c in chains})}
    for subset, drop in SUBSETS:
        try:
            pairs = interaction_pairs(chains, pairing=cfg.pairing, drop_identical=drop, seed=cfg.seed)
        except ValueError as e:
            info[subset] = {"skipped": str(e)}
            continue
        sub: dict = {"n_pairs": len(pairs), "n_positive": sum(p.label for p in pairs)}
        if not drop:
            same = [sequences[p.a] == sequences[p.b] for p in pairs if p.label == 1]
            sub["identical_sequence_positive"] = int(sum(same))
        cos = {}
        for feat in cfg.features:
            x, present = emb.feature(feat)
            lookup = {c.id: x[index[ids[c.id]]] for c in chains if present[index[ids[c.id]]]}
            usable = [p for p in pairs if p.a in lookup and p.b in lookup]
            n_pos = sum(p.label for p in usable)
            entry = {"pairs_without_embedding": len(pairs) - len(usable)}
            if 0 < n_pos < len(usable):
                res = ppi_benchmark(lookup, usable, **ctx.bootstrap_kwargs)
                rows.append(
                    metric_row(
                        f"cosine/{feat}", subset, "auroc", Interval(**res["auroc"]), res["n_pairs"],
                        n_positive=res["n_positive"], n_negative=res["n_negative"],
                    )
                )  # fmt: skip
                entry.update(
                    mean_cosine_positive=res["mean_cosine_positive"], mean_cosine_negative=res["mean_cosine_negative"]
                )
            if len(usable) == len(pairs):
                cos[feat] = pair_cosines(lookup, pairs)
            sub[feat] = entry
        _write_pairs(ctx.out_dir / slug(name) / f"pairs_{slug(subset)}.tsv", pairs, cos)
        info[subset] = sub
    return {"rows": rows, "info": info}
