"""A DeepFRI-format GO annotation file (``nrPDB-GO_*_annot.tsv`` layout) built from a PDB-chain table.

DeepFRI's own GO file is not bundled with ``../shared/data``, but its chain table
(``annotations/pdb_chains.tsv``) carries each chain's GO terms (``go_mf``, ``go_bp``, ``go_cc``,
``;``-separated, not propagated) and the GO OBO lies beside it. This module turns the two into the file
that :func:`pretrain.benchmark.data.read_deepfri_annotations` reads, so the suite's ``function`` task
scores GO-MF, GO-BP and GO-CC on the real chains::

    python -m pretrain.benchmark.go_annotations --chains annotations/pdb_chains.tsv \\
        --obo annotations/go-basic_2021-12-15.obo.gz --out nrPDB-GO_pdb_chains_annot.tsv [--min-chains 5]

What it does, following DeepFRI's ``preprocessing/create_nrPDB_GO_annot.py``:

* chain ids are the proteins table's (:func:`pretrain.benchmark.data.read_proteins`): ``<PDB>-<chain>``
  built from ``pdb_id`` (upper-cased) and ``chain``, or the table's ``id`` column; rows without a PDB
  id or chain are skipped and a repeated id keeps its first row, exactly as the suite reads the table;
* each annotated id is mapped to its primary id (alt ids through :mod:`data_shards.readers.obo`) and
  propagated up ``is_a`` and ``part_of``, keeping the ancestors in the term's own namespace. The OBO
  decides the namespace (a term listed under the wrong column moves and is counted). An obsolete id
  with a single ``replaced_by`` is read as its replacement (:meth:`Ontology.current`, counted); other
  obsolete ids and ids the OBO does not know are dropped and counted;
* the vocabulary of a namespace is every propagated term carried by at least ``min_chains`` chains
  (and at most ``max_chains`` when set), less the three namespace roots, sorted by id; names are the
  OBO's. DeepFRI kept terms with 50 to 5000 chains of its ~36k-chain nrPDB set; the 1.6k bundled
  chains call for a lower floor (default 5). Terms are counted over all chains of the table, as
  DeepFRI selected its vocabulary over the whole set before splitting;
* a chain is listed when it carries at least one vocabulary term in some namespace (DeepFRI's rule);
  its columns for namespaces in which it has none are empty, and the function task leaves it out of
  that aspect (it only scores chains with labels). Chains with no vocabulary term are not listed.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_shards.readers.obo import Ontology, load_obo
from pretrain.benchmark.data import GO_NAMESPACES, BenchmarkDataError, Proteins, read_proteins
from pretrain.eval.labels import GO_ROOTS

NAMESPACE_COLUMNS = {"molecular_function": "go_mf", "biological_process": "go_bp", "cellular_component": "go_cc"}
_GO_ID = re.compile(r"GO:\d{7}")


@dataclass
class GoAnnotationSummary:
    """Counts of one build (printed by the CLI)."""

    chains: int = 0  # distinct chain ids in the table
    skipped_rows: int = 0  # table rows without a PDB id or chain
    chains_with_terms: int = 0  # chains with a known, current GO term in some namespace
    chains_listed: int = 0  # chains with a vocabulary term in some namespace (the file's rows)
    annotations: int = 0  # GO ids read from the table (chain x id)
    alt_ids: int = 0  # ... given as an alt id and mapped to the primary id
    replaced: int = 0  # ... obsolete with a single replaced_by: read as the replacement
    obsolete: int = 0  # ... obsolete in the OBO without one: dropped
    unknown: int = 0  # ... not in the OBO: dropped
    moved: int = 0  # ... listed under another namespace's column than the OBO's
    vocabulary: dict[str, int] = field(default_factory=dict)  # task (GO-MF, ...) -> terms
    labelled: dict[str, int] = field(default_factory=dict)  # task -> chains with a vocabulary term


@dataclass
class GoAnnotations:
    """A DeepFRI GO annotation file in memory."""

    vocabulary: dict[str, list[str]]  # namespace -> term ids, sorted
    names: dict[str, str]  # term id -> OBO name
    labels: dict[str, dict[str, set[str]]]  # listed chain id -> namespace -> its vocabulary terms
    summary: GoAnnotationSummary


ChainTerms = dict[str, dict[str, set[str]]]  # chain id -> namespace -> GO ids


def propagated_terms(proteins: Proteins, ontology: Ontology) -> tuple[ChainTerms, GoAnnotationSummary]:
    """Each chain's GO terms, mapped to primary ids and propagated up is_a / part_of per namespace.

    Args:
        proteins: the chain table with ``go_mf``, ``go_bp`` and ``go_cc`` columns.
        ontology: the loaded GO.

    Returns:
        (chain id -> namespace -> propagated terms, roots included; the counts so far).

    Raises:
        BenchmarkDataError: a GO column is missing or holds something that is not a GO id, or none of
            the table's ids is in the ontology (a wrong OBO); messages name the file.
    """
    src = proteins.source
    missing = [c for c in NAMESPACE_COLUMNS.values() if c not in proteins.columns]
    if missing:
        raise BenchmarkDataError(f"{src}: no GO column(s) {missing} (columns: {sorted(proteins.columns)})")
    summary = GoAnnotationSummary(chains=len(proteins.ids), skipped_rows=proteins.skipped)
    out: ChainTerms = {}
    for i, pid in enumerate(proteins.ids):
        sets: dict[str, set[str]] = {ns: set() for ns in NAMESPACE_COLUMNS}
        for column_ns, column in NAMESPACE_COLUMNS.items():
            for raw in proteins.columns[column][i].split(";"):
                go_id = raw.strip()
                if not go_id:
                    continue
                if not _GO_ID.fullmatch(go_id):
                    raise BenchmarkDataError(f"{src}: chain {pid}: {column} entry {go_id!r} is not a GO id")
                summary.annotations += 1
                how = ontology.reading(go_id)
                if how == "unknown":
                    summary.unknown += 1
                    continue
                if how == "obsolete":
                    summary.obsolete += 1
                    continue
                summary.replaced += how == "replaced"
                summary.alt_ids += how == "alt_id"
                primary = ontology.current(go_id)
                ns = ontology.terms[primary].namespace
                if ns not in sets:  # a term without a GO namespace: nothing to file it under
                    summary.unknown += 1
                    continue
                summary.moved += ns != column_ns
                sets[ns].add(primary)
                sets[ns].update(a for a in ontology.ancestors(primary) if ontology.terms[a].namespace == ns)
        out[pid] = sets
        summary.chains_with_terms += any(sets.values())
    known = summary.annotations - summary.unknown
    if summary.annotations and not known:
        raise BenchmarkDataError(
            f"{ontology.source}: none of the {summary.annotations} GO ids of {src} is in this ontology (wrong OBO?)"
        )
    return out, summary


def build_go_annotations(
    proteins: Proteins, ontology: Ontology, min_chains: int = 5, max_chains: int | None = None
) -> GoAnnotations:
    """The vocabulary per namespace and the listed chains' labels (see the module docstring).

    Args:
        proteins: the chain table (:func:`pretrain.benchmark.data.read_proteins`) with GO columns.
        ontology: the GO (:func:`data_shards.readers.obo.load_obo`).
        min_chains: a term enters the vocabulary when at least this many chains carry it (propagated).
        max_chains: ... and at most this many (None: no upper bound; DeepFRI used 5000).
    """
    if min_chains < 1:
        raise ValueError(f"min_chains must be >= 1, got {min_chains}")
    if max_chains is not None and max_chains < min_chains:
        raise ValueError(f"max_chains ({max_chains}) must be >= min_chains ({min_chains})")
    terms, summary = propagated_terms(proteins, ontology)
    vocabulary: dict[str, list[str]] = {}
    for ns in NAMESPACE_COLUMNS:
        counts = Counter(t for sets in terms.values() for t in sets[ns])
        vocabulary[ns] = sorted(
            t
            for t, n in counts.items()
            if t not in GO_ROOTS and n >= min_chains and (max_chains is None or n <= max_chains)
        )
    labels: dict[str, dict[str, set[str]]] = {}
    for pid, sets in terms.items():  # table order
        kept = {ns: sets[ns] & set(vocabulary[ns]) for ns in NAMESPACE_COLUMNS}
        if any(kept.values()):
            labels[pid] = kept
    summary.chains_listed = len(labels)
    for ns, task in GO_NAMESPACES.items():
        summary.vocabulary[task] = len(vocabulary[ns])
        summary.labelled[task] = sum(1 for kept in labels.values() if kept[ns])
    names = {t: _clean_name(ontology.name(t)) or t for ts in vocabulary.values() for t in ts}
    return GoAnnotations(vocabulary, names, labels, summary)


def _clean_name(name: str) -> str:
    """A name safe for one tab-separated field (the reader drops empty fields, so never empty)."""
    return " ".join(name.split())


def write_go_annotations(annotations: GoAnnotations, path: str | Path) -> Path:
    """Write DeepFRI's layout (:mod:`pretrain.benchmark.data` docstring); parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for ns in NAMESPACE_COLUMNS:
        vocab = annotations.vocabulary[ns]
        lines += [f"### GO-terms ({ns})", "\t".join(vocab), f"### GO-names ({ns})"]
        lines.append("\t".join(annotations.names[t] for t in vocab))
    lines.append("### PDB-chain\t" + "\t".join(f"GO-terms ({ns})" for ns in NAMESPACE_COLUMNS))
    for pid, kept in annotations.labels.items():
        lines.append("\t".join([pid, *(",".join(sorted(kept[ns])) for ns in NAMESPACE_COLUMNS)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def go_annotation_file(
    chains: str | Path, obo: str | Path, out: str | Path, min_chains: int = 5, max_chains: int | None = None
) -> GoAnnotationSummary:
    """Read the chain table and the OBO, build the annotations and write them to ``out``.

    Raises:
        BenchmarkDataError: a bad chain table; FileNotFoundError / ValueError: a missing or bad OBO
            (both name the file).
    """
    proteins = read_proteins(chains)
    ontology = load_obo(obo)
    annotations = build_go_annotations(proteins, ontology, min_chains, max_chains)
    write_go_annotations(annotations, out)
    return annotations.summary


def format_summary(summary: GoAnnotationSummary, out: str | Path, min_chains: int, max_chains: int | None) -> str:
    """The CLI's report of one build."""
    bound = f">= {min_chains}" + ("" if max_chains is None else f" and <= {max_chains}")
    lines = [
        f"wrote {out}: {summary.chains_listed} chains listed (of {summary.chains} in the table, "
        f"{summary.chains_with_terms} with a current GO term; {summary.skipped_rows} rows without PDB id / chain)",
        *(
            f"  {task}: {summary.vocabulary[task]} terms carried by {bound} chains (roots excluded), "
            f"{summary.labelled[task]} chains labelled"
            for task in GO_NAMESPACES.values()
        ),
        f"  GO ids read: {summary.annotations}; alt ids mapped: {summary.alt_ids}; obsolete replaced: "
        f"{summary.replaced}; obsolete dropped: {summary.obsolete}; unknown dropped: {summary.unknown}; "
        f"moved to the OBO's namespace: {summary.moved}",
    ]
    empty = [t for t, n in summary.vocabulary.items() if n == 0]
    if empty:
        lines.append(f"  warning: empty vocabulary for {empty} (lower --min-chains?)")
    return "\n".join(lines)


def main(argv=None) -> int:
    prog = "python -m pretrain.benchmark.go_annotations"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--chains", required=True, help="chain table (pdb_id, chain or id; sequence; go_mf, go_bp, go_cc)")
    p.add_argument("--obo", required=True, help="GO ontology (go-basic.obo, plain or gzipped)")
    p.add_argument("--out", required=True, help="DeepFRI-format GO annotation file to write")
    p.add_argument("--min-chains", type=int, default=5, help="vocabulary: terms carried by at least N chains (5)")
    p.add_argument("--max-chains", type=int, default=None, help="... and at most N chains (default: no bound)")
    args = p.parse_args(argv)
    if args.min_chains < 1:
        p.error(f"--min-chains must be >= 1, got {args.min_chains}")
    if args.max_chains is not None and args.max_chains < args.min_chains:
        p.error(f"--max-chains ({args.max_chains}) must be >= --min-chains ({args.min_chains})")
    try:
        summary = go_annotation_file(args.chains, args.obo, args.out, args.min_chains, args.max_chains)
    except (BenchmarkDataError, FileNotFoundError, ValueError) as exc:
        print(f"go_annotations: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary, args.out, args.min_chains, args.max_chains))
    return 0


if __name__ == "__main__":
    sys.exit(main())
