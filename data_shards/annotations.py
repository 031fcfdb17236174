"""The annotation side of a build: everything known about an accession or a PDB chain, and its text.

:class:`AnnotationIndex` merges UniProt entries (flat, XML, REST TSV), FASTA headers, GAF files,
DeepFRI tables and SIFTS mappings into per-accession :class:`ProteinInfo` (names, free text, GO
terms with evidence codes, EC numbers, existence level, organism, sequence) and per-chain extras
(SIFTS accession, DeepFRI/SIFTS EC numbers and GO terms). It holds annotations only, never
structures, so its size follows the annotation files, not the structure corpus.

:func:`make_text` turns merged annotations into the schema's text fields, ProtST/ProtCLIP style:
free text when the sources have it; otherwise ``function`` is built from the definitions of the
protein's most specific MF/BP terms and ``location`` from the names of its most specific CC terms
(both marked as derived in ``meta["text_derived"]``, and never counted as ProtCLIP properties).
With an OBO every GO entry also carries its term ``definition`` (for definition paraphrases).
GO ids are canonicalised with the OBO when one is given (alt ids → primary ids, an obsolete id with a
single ``replaced_by`` → its replacement); unknown ids and other obsolete ids are dropped term by
term with a reason, the protein is kept. Terms are stored as
annotated (not propagated up the ontology; evaluation propagates with ``Ontology.propagate``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from data_shards.readers.fasta import FastaRecord
from data_shards.readers.gaf import GafAnnotation, iter_gaf
from data_shards.readers.obo import Ontology
from data_shards.readers.tables import DeepFriRow, iter_deepfri, load_sifts_enzyme, load_sifts_uniprot
from data_shards.readers.uniprot import UniProtEntry
from data_shards.sampling import property_coverage

MAX_DERIVED_DEFINITIONS = 4  # definitions joined into a derived "function" text
MAX_DERIVED_CHARS = 1200
_ASPECT_ORDER = {"F": 0, "P": 1, "C": 2}

SkipFn = Callable[[str, str], None]  # (reason, example) -> None


@dataclass
class ProteinInfo:
    """Merged annotations of one accession (or of a FASTA id without accession).

    Attributes:
        go: {go_id: [aspect, set of evidence codes, term name]} in first-seen order.
        sources: which inputs contributed ("uniprot", "fasta", "gaf", ...), in first-seen order.
    """

    accession: str
    name: str = ""
    function: str = ""
    location: str = ""
    similarity: str = ""
    go: dict[str, list] = field(default_factory=dict)
    ec: list[str] = field(default_factory=list)
    existence: int | None = None
    organism: str = ""
    taxon: str = ""
    reviewed: bool | None = None
    sequence: str | None = None
    sources: list[str] = field(default_factory=list)

    def add_go(self, go_id: str, aspect: str = "", evidence: str = "", name: str = "") -> None:
        """Add one GO term (merging aspect/evidence/name into an existing entry)."""
        entry = self.go.setdefault(go_id, ["", set(), ""])
        entry[0] = entry[0] or aspect
        if evidence:
            entry[1].add(evidence)
        entry[2] = entry[2] or name

    def add_ec(self, numbers) -> None:
        """Append EC numbers not seen yet."""
        for number in numbers:
            if number not in self.ec:
                self.ec.append(number)

    def add_source(self, source: str) -> None:
        """Remember that ``source`` contributed."""
        if source not in self.sources:
            self.sources.append(source)


@dataclass
class ChainExtras:
    """Per-chain annotations from SIFTS / DeepFRI: accession, EC numbers, GO terms [(id, aspect)]."""

    accession: str = ""
    ec: list[str] = field(default_factory=list)
    go: list[tuple[str, str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


class AnnotationIndex:
    """Annotations by accession and by PDB chain; fill with the ``add_*`` methods, then look up."""

    def __init__(self):
        self.proteins: dict[str, ProteinInfo] = {}
        self._alias: dict[str, str] = {}  # secondary accession -> primary
        self.chains: dict[tuple[str, str], ChainExtras] = {}
        self.sequence_entries: list[str] = []  # UniProt/FASTA accessions and ids, in input order
        self._listed: set[str] = set()
        self._sifts: list[dict[tuple[str, str], str]] = []

    # ------------------------------------------------------------------ filling

    def _protein(self, accession: str) -> ProteinInfo:
        info = self.proteins.get(accession)
        if info is None:
            info = self.proteins[accession] = ProteinInfo(accession)
        return info

    def add_uniprot(self, entry: UniProtEntry, source: str = "uniprot") -> ProteinInfo:
        """Merge a UniProt entry (its fields win over GAF/FASTA ones already present)."""
        info = self._protein(entry.accession)
        for secondary in entry.accessions[1:]:
            self._alias.setdefault(secondary, entry.accession)
        for name in ("name", "function", "location", "similarity", "organism", "taxon"):
            value = getattr(entry, name)
            if value:
                setattr(info, name, value)
        if entry.existence is not None:
            info.existence = entry.existence
        if entry.reviewed is not None:
            info.reviewed = entry.reviewed
        for ref in entry.go:
            info.add_go(ref.id, ref.aspect, ref.evidence, ref.name)
        info.add_ec(entry.ec)
        if entry.sequence:
            info.sequence = entry.sequence
        self._list(entry.accession)
        info.add_source(source)
        return info

    def add_fasta(self, record: FastaRecord) -> ProteinInfo:
        """Merge a FASTA record (fills only what is still missing)."""
        key = record.accession or record.id
        info = self._protein(key)
        info.name = info.name or record.name or ("" if record.accession else record.description)
        info.organism = info.organism or record.organism
        info.taxon = info.taxon or record.taxon
        if info.existence is None:
            info.existence = record.existence
        if info.reviewed is None:
            info.reviewed = record.reviewed
        if info.sequence is None and record.sequence:
            info.sequence = record.sequence
        self._list(key)
        info.add_source("fasta")
        return info

    def _list(self, key: str) -> None:
        if key not in self._listed:
            self._listed.add(key)
            self.sequence_entries.append(key)

    def add_gaf(self, path: str | Path, skipped: dict | None = None) -> int:
        """Merge a GAF file; returns the number of annotations read."""
        count = 0
        for ann in iter_gaf(path, skipped):
            self.add_gaf_annotation(ann)
            count += 1
        return count

    def add_gaf_annotation(self, ann: GafAnnotation) -> None:
        """Merge one GAF annotation."""
        info = self._protein(ann.accession)
        info.add_go(ann.go_id, ann.aspect, ann.evidence)
        info.name = info.name or ann.name
        info.taxon = info.taxon or ann.taxon
        info.add_source("gaf")

    def add_deepfri(self, path: str | Path) -> int:
        """Merge a DeepFRI chain → EC/GO table; returns rows read."""
        count = 0
        for row in iter_deepfri(path):
            self.add_deepfri_row(row)
            count += 1
        return count

    def add_deepfri_row(self, row: DeepFriRow) -> None:
        """Merge one DeepFRI chain row."""
        extras = self.chains.setdefault((row.pdb_id.lower(), row.chain), ChainExtras())
        extras.ec.extend(n for n in row.ec if n not in extras.ec)
        extras.go.extend(t for t in row.go if t not in extras.go)
        if "deepfri" not in extras.sources:
            extras.sources.append("deepfri")

    def add_sifts(self, path: str | Path, kind: str) -> int:
        """Merge SIFTS ``pdb_chain_uniprot`` (kind "sifts_uniprot") or ``pdb_chain_enzyme`` ("sifts_enzyme")."""
        if kind == "sifts_uniprot":
            mapping = load_sifts_uniprot(path)
            self._sifts.append(mapping)
            return len(mapping)
        enzymes = load_sifts_enzyme(path)
        for key, numbers in enzymes.items():
            extras = self.chains.setdefault(key, ChainExtras())
            extras.ec.extend(n for n in numbers if n not in extras.ec)
            if "sifts" not in extras.sources:
                extras.sources.append("sifts")
        return len(enzymes)

    # ------------------------------------------------------------------ lookups

    def protein(self, accession: str | None) -> ProteinInfo | None:
        """Annotations of ``accession`` (secondary accessions and isoform suffixes resolved)."""
        if not accession:
            return None
        accession = self._alias.get(accession, accession)
        info = self.proteins.get(accession)
        if info is None and "-" in accession:  # isoform "P12345-2" -> canonical entry
            base = accession.split("-", 1)[0]
            info = self.proteins.get(self._alias.get(base, base))
        return info

    def chain(self, pdb_id: str, chain: str) -> ChainExtras | None:
        """Per-chain extras (SIFTS accession filled in when known)."""
        key = (pdb_id.lower(), chain)
        extras = self.chains.get(key)
        accession = next((m[key] for m in self._sifts if key in m), "")
        if accession:
            extras = extras or ChainExtras()
            extras = ChainExtras(accession, extras.ec, extras.go, extras.sources + ["sifts"])
        return extras


# ----------------------------------------------------------------------------- text


def canonical_terms(
    terms: list[tuple[str, str, set, str]], ontology: Ontology | None, skip: SkipFn, owner: str
) -> list[tuple[str, str, set, str]]:
    """Canonicalise [(go_id, aspect, evidence set, name)]; drops unknown terms via ``skip``.

    Returns:
        [(primary id, aspect, evidence set, name)], merged by primary id, sorted by (aspect, id).
    """
    merged: dict[str, list] = {}
    dropped: set[str] = set()  # one skip per (record, term), however many sources repeat the term

    def drop(reason: str, go_id: str) -> None:
        if go_id not in dropped:
            dropped.add(go_id)
            skip(reason, f"{owner}:{go_id}")

    for go_id, aspect, evidence, name in terms:
        if ontology is not None:
            primary = ontology.current(go_id)
            if primary is None:
                drop(f"{ontology.reading(go_id)} GO id", go_id)  # "obsolete" or "unknown"
                continue
            aspect, name = ontology.aspect(primary) or "", ontology.name(primary)
        else:
            primary = go_id
        if aspect not in _ASPECT_ORDER:
            drop("GO id without aspect (give --go-obo)", go_id)
            continue
        entry = merged.setdefault(primary, [aspect, set(), name])
        entry[1] |= set(evidence)
        entry[2] = entry[2] or name
    return sorted(
        ((go_id, a, ev, n) for go_id, (a, ev, n) in merged.items()), key=lambda t: (_ASPECT_ORDER[t[1]], t[0])
    )


def most_specific(go_ids: list[str], ontology: Ontology | None) -> list[str]:
    """The ids that are not an ancestor of another id in the list (all of them without an ontology)."""
    if ontology is None:
        return list(go_ids)
    covered: set[str] = set()
    for go_id in go_ids:
        covered |= ontology.ancestors(go_id)
    return [go_id for go_id in go_ids if go_id not in covered]


def make_text(
    *,
    name: str,
    function: str,
    location: str,
    similarity: str,
    terms: list[tuple[str, str, set, str]],
    ec: list[str],
    ontology: Ontology | None,
) -> tuple[dict | None, list[str], int, list[str]]:
    """Build the schema's text dict from canonical terms and free text.

    Args:
        name, function, location, similarity: free text from the sources ("" when absent).
        terms: canonical GO terms from :func:`canonical_terms`.
        ec: EC numbers.
        ontology: for definitions and for picking the most specific terms (optional).

    Returns:
        (text or None when there is nothing at all, derived field names, ProtCLIP property
        coverage o in 0..4 counted on source free text only, sorted GO evidence codes)
    """
    derived: list[str] = []
    coverage = property_coverage(name=name, function=function, location=location, similarity=similarity)
    by_aspect = {a: [t for t in terms if t[1] == a] for a in _ASPECT_ORDER}
    if not function and (by_aspect["F"] or by_aspect["P"]):
        function = _derived_function(by_aspect, ontology)
        if function:
            derived.append("function")
    if not location and by_aspect["C"]:
        ids = most_specific([t[0] for t in by_aspect["C"]], ontology)
        names = [t[3] for t in by_aspect["C"] if t[0] in ids and t[3]]
        if names:
            location = "Located in " + ", ".join(names) + "."
            derived.append("location")
    evidence = sorted({code for t in terms for code in t[2]})
    if not (name or function or location or similarity or terms or ec):
        return None, derived, coverage, evidence
    text = {
        "name": name,
        "function": function,
        "location": location,
        "similarity": similarity,
        "go": [_go_entry(go_id, aspect, term_name, ontology) for go_id, aspect, _, term_name in terms],
        "ec": list(ec),
    }
    return text, derived, coverage, evidence


def _go_entry(go_id: str, aspect: str, name: str, ontology: Ontology | None) -> dict:
    """One ``text["go"]`` entry; carries the OBO definition when the ontology has one.

    The definition travels with the term so that training-time augmentation can paraphrase it
    (``data_shards.text_rules``) without needing the OBO file.
    """
    entry = {"id": go_id, "aspect": aspect, "name": name}
    definition = ontology.definition(go_id).strip() if ontology is not None else ""
    if definition:
        entry["definition"] = definition
    return entry


def _derived_function(by_aspect: dict, ontology: Ontology | None) -> str:
    parts: list[str] = []
    for aspect, verb in (("F", "Enables"), ("P", "Involved in")):
        group = by_aspect[aspect]
        ids = most_specific([t[0] for t in group], ontology)
        if ontology is not None:
            for go_id in ids:
                definition = ontology.definition(go_id)
                if definition and len(parts) < MAX_DERIVED_DEFINITIONS and definition not in parts:
                    parts.append(definition)
        else:
            names = [t[3] for t in group if t[0] in ids and t[3]]
            if names:
                parts.append(f"{verb} " + ", ".join(names) + ".")
    text = " ".join(parts)
    if len(text) > MAX_DERIVED_CHARS:
        text = text[:MAX_DERIVED_CHARS].rsplit(" ", 1)[0] + "..."
    return text
