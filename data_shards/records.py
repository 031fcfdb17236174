"""Records of a build: structure chains and sequence entries joined with their annotations.

:class:`RecordMaker` takes a parsed structure file (or the index's UniProt/FASTA entries), finds
each chain's accession (chain table → SIFTS → AlphaFold file name), merges the annotations of the
chain table row, the accession and the chain (DeepFRI / SIFTS EC), canonicalises GO terms, builds
the text (:func:`~data_shards.annotations.make_text`) and the metadata, and validates the record.
Everything it cannot use goes to the ``skip`` callback with a reason and an example.

Record ids: ``<file stem>_<chain>`` for experimental structures (``1ACB_r_b_E``; the bare stem for
per-chain files like ``1bdm_A``), ``AF-<accession>-F1`` for AlphaFold models, the accession (or
FASTA id) for sequence-only entries, ``<PDB id>_<chain>`` for chain-table rows without a structure
file (sequence and text only); a repeated id gets ``#2``, ``#3``...

A chain id the structure reader found used by two different chains (``StructureFile.ambiguous``)
gives no record: one record would splice two molecules.

Metadata written: ``source`` (pdb / alphafold / uniprot / fasta; chain_table for a table row
without structure file or PDB id), ``accession``, ``pdb_id``,
``chain``, ``structure_file`` (as given, relative), ``evidence`` (UniProt existence level 1-5,
only when known), ``go_evidence`` (sorted GAF / UniProt evidence codes), ``organism``, ``taxon``,
``reviewed``, ``property_coverage`` (ProtCLIP ``o``), ``text_derived``, ``annotation_sources``,
``go_source``, ``uniprot_sequence`` (when a structure chain's accession has a UniProt sequence) and
``repaired`` (what the structure reader had to fix).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_shards.annotations import AnnotationIndex, canonical_terms, make_text
from data_shards.readers.structures import StructureFile
from data_shards.readers.tables import ChainRow
from data_shards.schema import ProteinRecord, SchemaError, validate_record

_STRUCT_SUFFIX_RE = re.compile(r"\.(pdb|ent|cif|mmcif)$", re.IGNORECASE)
_PDB_ID_RES = (
    re.compile(r"^d([0-9][a-z0-9]{3})[a-z0-9_.]{2}$"),  # SCOP domain d1asha_
    re.compile(r"(?:^|[_.\-])(?:pdb)?([0-9][a-z0-9]{3})(?=$|[_.\-])"),
)

# Docking Benchmark unbound partners (1EZU_r_u, 1EZU_l_u): the name carries the complex's id
_DOCKING_UNBOUND_RE = re.compile(r"_[rl]_u$", re.IGNORECASE)

SkipFn = Callable[[str, str], None]


@dataclass
class StructureUnit:
    """One structure file to read: ``rows`` are its chain-table rows, or None for every protein chain."""

    path: Path
    display: str  # path as the user gave it (relative), used in meta and examples
    rows: list[ChainRow] | None  # chain-table rows, or None for "every protein chain"


@dataclass
class BuiltRecord:
    """A record with its manifest ``props`` and the keys that cluster it for the heldout split."""

    record: ProteinRecord
    props: dict
    cluster_keys: list[str]


def stem_of(path: Path) -> str:
    """File name without ``.gz`` and a ``.pdb``/``.ent``/``.cif``/``.mmcif`` suffix."""
    name = path.name
    name = name[:-3] if name.lower().endswith(".gz") else name
    return _STRUCT_SUFFIX_RE.sub("", name)


def guess_pdb_id(stem: str) -> str:
    """A PDB id from a file stem ("1ACB_r_b" -> "1ACB", SCOP "d1asha_" -> "1ASH"), else ""."""
    lowered = stem.lower()
    for pattern in _PDB_ID_RES:
        match = pattern.search(lowered)
        if match:
            return match.group(1).upper()
    return ""


def sequence_problem(sequence: str | None) -> str | None:
    """The skip reason for an unusable sequence (empty, internal stop, not amino acids, only X), else None."""
    if not sequence:
        return "empty sequence"
    if "*" in sequence:  # readers strip a trailing stop only: joining the fragments would splice them
        return "internal stop '*' in sequence"
    if not re.fullmatch(r"[A-Z]+", sequence):
        return "non-amino-acid sequence (characters outside A-Z)"
    if len(sequence) >= 10 and set(sequence) <= set("ACGTUN"):
        return "non-amino-acid sequence (nucleotides)"
    if set(sequence) == {"X"}:
        return "non-amino-acid sequence (only unknown residues)"
    return None


class RecordMaker:
    """Joins parsed chains / sequence entries with annotations into records.

    Args:
        index: the annotations.
        ontology: GO ontology or None.
        skip: called with (reason, example) for every sample left out.
        skip_term: called with (reason, example) for every GO term left out.
    """

    def __init__(self, index: AnnotationIndex, ontology, skip: SkipFn, skip_term: SkipFn):
        self.index, self.ontology, self.skip, self.skip_term = index, ontology, skip, skip_term
        self.used_ids: set[str] = set()
        self.used_accessions: set[str] = set()
        self.table_mismatches = 0

    def _unique_id(self, record_id: str) -> str:
        unique, n = record_id, 1
        while unique in self.used_ids:
            n += 1
            unique = f"{record_id}#{n}"
        self.used_ids.add(unique)
        return unique

    def make(
        self, *, record_id, sequence, backbone, accession, row: ChainRow | None, extras, base_meta: dict
    ) -> BuiltRecord | None:
        """Join one chain or sequence entry with its annotations; None (and a skip) when unusable.

        Args:
            record_id: wanted id (made unique).
            sequence: observed (structure) or entry sequence.
            backbone: :class:`~data_shards.schema.Backbone` or None.
            accession: UniProt accession or "".
            row: the chain-table row, if any.
            extras: per-chain SIFTS / DeepFRI annotations, if any.
            base_meta: metadata already known (source, chain, structure_file, ...).
        """
        problem = sequence_problem(sequence)
        if problem is not None:
            self.skip(problem, record_id)
            return None
        info = self.index.protein(accession)
        if info is not None and accession:
            self.used_accessions.add(info.accession)
        terms = []
        if row is not None:
            terms += [(go_id, aspect, set(), "") for go_id, aspect in row.go]
        if info is not None:
            terms += [(go_id, a, ev, n) for go_id, (a, ev, n) in info.go.items()]
        if extras is not None:
            terms += [(go_id, aspect, set(), "") for go_id, aspect in extras.go]
        terms = canonical_terms(terms, self.ontology, self.skip_term, record_id)
        ec = list(row.ec) if row is not None else []
        for numbers in ((info.ec if info else []), (extras.ec if extras else [])):
            ec += [n for n in numbers if n not in ec]
        name = (info.name if info else "") or (row.name if row is not None else "")
        text, derived, coverage, evidence = make_text(
            name=name,
            function=info.function if info else "",
            location=info.location if info else "",
            similarity=info.similarity if info else "",
            terms=terms,
            ec=ec,
            ontology=self.ontology,
        )
        meta = dict(base_meta)
        if accession:
            meta["accession"] = info.accession if info is not None else accession
        existence = info.existence if info else None
        if existence is not None:
            meta["evidence"] = existence
        if evidence:
            meta["go_evidence"] = evidence
        organism = info.organism if info else ""
        taxon = (row.taxon if row is not None else "") or (info.taxon if info else "")
        if organism:
            meta["organism"] = organism
        if taxon:
            meta["taxon"] = taxon
        if info is not None and info.reviewed is not None:
            meta["reviewed"] = info.reviewed
        meta["property_coverage"] = coverage
        if derived:
            meta["text_derived"] = derived
        sources = list(info.sources) if info else []
        if row is not None:
            sources.insert(0, "chain_table")
            if row.go_source:
                meta["go_source"] = row.go_source
        sources += [s for s in (extras.sources if extras else []) if s not in sources]
        if sources:
            meta["annotation_sources"] = sources
        if backbone is not None and info is not None and sequence_problem(info.sequence) is None:
            meta["uniprot_sequence"] = info.sequence
        record = ProteinRecord(self._unique_id(record_id), sequence, backbone, text, meta)
        try:
            validate_record(record)
        except SchemaError as exc:
            self.skip("invalid record", f"{record_id}: {exc}")
            return None
        keys = [f"seq:{hashlib.sha1(sequence.encode()).hexdigest()}"]
        if meta.get("accession"):
            keys.append(f"acc:{meta['accession']}")
        if meta.get("uniprot_sequence"):
            keys.append(f"seq:{hashlib.sha1(meta['uniprot_sequence'].encode()).hexdigest()}")
        props = {"existence": existence, "coverage": coverage, "reviewed": meta.get("reviewed")}
        return BuiltRecord(record, props, keys)

    def from_structure(
        self,
        unit: StructureUnit,
        parsed: StructureFile | None,
        error: str | None,
        reason: str = "unreadable structure file",
    ) -> Iterator[BuiltRecord]:
        """Records of one parsed structure file (its table rows, or every protein chain); when
        ``parsed`` is None every wanted chain is skipped with ``reason`` and ``error``."""
        rows = unit.rows
        if parsed is None:
            for row in rows or [None]:
                where = unit.display + (f" chain {row.chain}" if row is not None else "")
                self.skip(reason, f"{where}: {error}")
            return
        stem = stem_of(unit.path)
        predicted = parsed.predicted
        base = {"source": "alphafold" if predicted else "pdb", "structure_file": unit.display}
        if parsed.repaired:
            base["repaired"] = parsed.repaired
        found = [c.chain for c in parsed.chains] + list(parsed.ambiguous)
        targets = [(row.chain, row) for row in rows] if rows is not None else [(chain, None) for chain in found]
        if rows is None and not found:  # every input file is accounted for in the manifest
            other = f" (only non-protein chains {', '.join(parsed.other_chains)})" if parsed.other_chains else ""
            self.skip("no protein chain in structure file", unit.display + other)
            return
        for chain_id, row in targets:
            chain = parsed.chain(chain_id)
            where = f"{unit.display} chain {chain_id}"
            if chain_id in parsed.ambiguous:  # never one record for two molecules
                self.skip("chain id used by two different chains", f"{where}: {parsed.ambiguous[chain_id]}")
                continue
            if chain is None:
                reason = (
                    "chain has no amino-acid residues"
                    if chain_id in parsed.other_chains
                    else "chain missing from structure file"
                )
                self.skip(reason, where)
                continue
            # A chain-table row is authoritative: an empty pdb_id there means "unknown". Never guess
            # the id of a Docking Benchmark unbound file (1EZU_r_u is not entry 1EZU, and its chain
            # letters are not 1EZU's): a SIFTS/DeepFRI join on it attaches another protein.
            if row is not None:
                pdb_id = row.pdb_id or parsed.pdb_id
            else:
                pdb_id = parsed.pdb_id or ("" if _DOCKING_UNBOUND_RE.search(stem) else guess_pdb_id(stem))
            extras = self.index.chain(pdb_id, chain_id) if pdb_id else None
            accession = (row.uniprot if row is not None else "") or (extras.accession if extras else "")
            if predicted and stem.startswith("AF-"):
                accession = accession or stem.split("-")[1]
                record_id = re.sub(r"-model_v\d+$", "", stem) + (f"_{chain_id}" if len(parsed.chains) > 1 else "")
            elif chain_id and stem.endswith(f"_{chain_id}"):
                record_id = stem  # per-chain files such as theseus' 1bdm_A.pdb.gz
            else:
                record_id = f"{stem}_{chain_id}" if chain_id else stem
            if row is not None and row.sequence and row.sequence != chain.sequence:
                self.table_mismatches += 1
            meta = {**base, "chain": chain_id}
            if pdb_id and not predicted:
                meta["pdb_id"] = pdb_id
            built = self.make(
                record_id=record_id,
                sequence=chain.sequence,
                backbone=chain.backbone,
                accession=accession,
                row=row,
                extras=extras,
                base_meta=meta,
            )
            if built is not None:
                yield built

    def from_row(self, row: ChainRow, table: str) -> BuiltRecord | None:
        """A record without structure from a chain-table row with an empty ``structure_file``:
        the table's sequence with the row's annotations (None and a skip when it has no sequence).

        Args:
            row: the row.
            table: the table's file name (for skip examples).
        """
        where = f"{table}:{row.line} {row.pdb_id or '-'} {row.chain or '-'}"
        if not row.sequence:
            self.skip("no structure file and no sequence", where)
            return None
        if row.pdb_id and row.chain:
            record_id = f"{row.pdb_id}_{row.chain}"
        else:
            record_id = row.uniprot or f"{stem_of(Path(table))}_{row.line}"
        meta = {"source": "pdb" if row.pdb_id else "chain_table"}
        if row.pdb_id:
            meta["pdb_id"] = row.pdb_id
        if row.chain:
            meta["chain"] = row.chain
        extras = self.index.chain(row.pdb_id, row.chain) if row.pdb_id else None
        accession = row.uniprot or (extras.accession if extras else "")
        return self.make(
            record_id=record_id,
            sequence=row.sequence,
            backbone=None,
            accession=accession,
            row=row,
            extras=extras,
            base_meta=meta,
        )

    def standalone(self) -> Iterator[BuiltRecord]:
        """Records of the UniProt / FASTA entries that no structure record used (input order)."""
        for key in self.index.sequence_entries:
            info = self.index.proteins[key]
            if info.accession in self.used_accessions:
                continue
            built = self.standalone_record(key)
            if built is not None:
                yield built

    def standalone_record(self, key: str) -> BuiltRecord | None:
        """The sequence-only record of the UniProt / FASTA entry ``key`` (None when it is skipped)."""
        info = self.index.proteins[key]
        source = "uniprot" if any(s.startswith("uniprot") for s in info.sources) else "fasta"
        return self.make(
            record_id=key,
            sequence=info.sequence,
            backbone=None,
            accession=key,
            row=None,
            extras=None,
            base_meta={"source": source},
        )
