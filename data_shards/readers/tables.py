"""Tab-separated annotation tables: the chain table, UniProt TSV, DeepFRI chain → terms, SIFTS.

* **chain table** (``pdb_chains.tsv``): one row per protein chain with ``structure_file`` (relative
  to the table's folder), ``chain``, ``pdb_id``, ``uniprot``, ``taxon``, ``protein_name``,
  ``go_mf``/``go_bp``/``go_cc`` (``;``-separated), ``ec``, ``go_source`` and the observed
  ``sequence``. Structure paths are resolved and must stay inside an allowed root (the table's
  folder unless the caller allows more): a row pointing elsewhere gets ``path_error`` set.
* **UniProt TSV** (UniProt REST ``format=tsv``): columns named as UniProt names them (``Entry``,
  ``Protein names``, ``Sequence``, ``Function [CC]``, ``Subcellular location [CC]``,
  ``Sequence similarities``, ``Gene Ontology IDs``, ``EC number``, ``Protein existence``,
  ``Annotation``, ``Organism``, ``Organism (ID)``, ``Reviewed``); a few lower-case aliases
  (``uniprot``, ``protein_name``, ``function_text``, ``go``, ``seq``, ``organism``) are accepted too.
* **DeepFRI** (``nrPDB-EC_2020.04_annot.tsv``, ``nrPDB-GO_*_annot.tsv``): ``### `` section headers
  with the term vocabularies, then ``PDBID-CHAIN<TAB>terms,...`` rows (EC: one column; GO: MF, BP,
  CC columns).
* **SIFTS** ``pdb_chain_uniprot.tsv(.gz)`` (chain → accession, the accession covering most
  residues wins) and ``pdb_chain_enzyme.tsv(.gz)`` (chain → EC numbers).

:func:`detect_table_format` tells them (and GAF) apart by their first lines.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_shards.readers.uniprot import GoRef, UniProtEntry, clean_text, existence_level, open_text, valid_ec

CHAIN_TABLE_COLUMNS = ("structure_file", "chain")
_GO_RE = re.compile(r"GO:\d{7}")
_ASPECT_COLUMNS = {"go_mf": "F", "go_bp": "P", "go_cc": "C"}
_UNIPROT_ALIASES = {
    "accession": ("uniprot", "accession", "entry"),
    "entry_name": ("entry name", "entry_name", "entry"),
    "name": ("protein names", "protein_name", "protein name"),
    "sequence": ("sequence", "seq"),
    "function": ("function [cc]", "function_text", "function"),
    "location": ("subcellular location [cc]", "subcellular location", "location"),
    "similarity": ("sequence similarities", "similarity"),
    "go": ("gene ontology ids", "go", "gene ontology (go)"),
    "ec": ("ec number", "ec"),
    "existence": ("protein existence", "existence"),
    "annotation": ("annotation", "annotation score"),
    "organism": ("organism",),
    "taxon": ("organism (id)", "taxon", "organism_id"),
    "reviewed": ("reviewed",),
}
_TOPIC_PREFIX_RE = re.compile(r"\b(FUNCTION|SUBCELLULAR LOCATION|SIMILARITY):\s*")
csv.field_size_limit(1 << 26)


class TableFormatError(ValueError):
    """A table is malformed; the message names the file (and line)."""


def detect_table_format(path: str | Path) -> str | None:
    """ "chains", "uniprot_tsv", "deepfri", "gaf", "sifts_uniprot", "sifts_enzyme" or None."""
    path = Path(path)
    with open_text(path) as handle:
        head = [handle.readline() for _ in range(5)]
    first = next((line for line in head if line.strip() and not line.startswith("# ")), "")
    cols = [c.strip().lower() for c in first.rstrip("\n").split("\t")]
    if head[0].startswith("!gaf-version") or (len(cols) >= 15 and any(_GO_RE.fullmatch(c) for c in cols)):
        return "gaf"
    if head[0].startswith("### "):
        return "deepfri"
    if all(c in cols for c in CHAIN_TABLE_COLUMNS):
        return "chains"
    if cols[:3] == ["pdb", "chain", "sp_primary"]:
        return "sifts_uniprot"
    if cols[:2] == ["pdb", "chain"] and "ec_number" in cols:
        return "sifts_enzyme"
    if (
        cols
        and cols[0] in ("entry", "uniprot", "accession")
        and any(c in cols for c in ("sequence", "seq", "protein names", "protein_name", "function [cc]"))
    ):
        return "uniprot_tsv"
    return None


def _reader(handle) -> csv.DictReader:
    return csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)


# ----------------------------------------------------------------------------- chain table


@dataclass
class ChainRow:
    """One row of the chain table.

    Attributes:
        line: 1-based line number in the table.
        structure_file: the path as written in the table.
        path: the resolved structure path, or None when ``path_error`` is set.
        path_error: why the path was refused ("escapes ..."), else None.
        chain, pdb_id, uniprot, taxon, name, go_source, sequence: as in the table ("" if empty).
        go: [(go_id, aspect)] from go_mf / go_bp / go_cc.
        ec: EC numbers.
    """

    line: int
    structure_file: str
    path: Path | None
    path_error: str | None
    chain: str
    pdb_id: str = ""
    uniprot: str = ""
    taxon: str = ""
    name: str = ""
    go: list[tuple[str, str]] = field(default_factory=list)
    ec: list[str] = field(default_factory=list)
    go_source: str = ""
    sequence: str = ""


def resolve_inside(base: Path, relative: str, roots: list[Path]) -> tuple[Path | None, str | None]:
    """Resolve ``base / relative`` and check it lies inside one of ``roots`` (symlinks resolved).

    Returns:
        (path, None) when allowed, else (None, reason).
    """
    if not relative or "\x00" in relative:
        return None, "empty or invalid structure path"
    candidate = (base / relative).resolve()
    for root in roots:
        if candidate == root or candidate.is_relative_to(root):
            return candidate, None
    return None, f"path {relative!r} escapes the allowed roots ({', '.join(str(r) for r in roots)})"


def iter_chain_table(path: str | Path, allowed_roots: list[str | Path] | None = None) -> Iterator[ChainRow]:
    """Yield the rows of a chain table.

    Args:
        path: the table.
        allowed_roots: folders structure paths may resolve into; the table's folder is always one.

    Raises:
        TableFormatError: the header lacks ``structure_file`` or ``chain``.
    """
    path = Path(path)
    base = path.resolve().parent
    roots = [base] + [Path(r).resolve() for r in allowed_roots or []]
    with open_text(path) as handle:
        reader = _reader(handle)
        missing = [c for c in CHAIN_TABLE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise TableFormatError(f"{path}: chain table lacks column(s) {missing}")
        for lineno, row in enumerate(reader, 2):
            row = {k: (v or "").strip() for k, v in row.items() if k is not None}
            resolved, error = resolve_inside(base, row.get("structure_file", ""), roots)
            go = []
            for column, aspect in _ASPECT_COLUMNS.items():
                go.extend((go_id, aspect) for go_id in _GO_RE.findall(row.get(column, "")))
            yield ChainRow(
                line=lineno,
                structure_file=row.get("structure_file", ""),
                path=resolved,
                path_error=error,
                chain=row.get("chain", ""),
                pdb_id=row.get("pdb_id", "").upper(),
                uniprot=row.get("uniprot", ""),
                taxon=row.get("taxon", ""),
                name=row.get("protein_name", ""),
                go=go,
                ec=valid_ec(re.split(r"[;,\s]+", row.get("ec", ""))),
                go_source=row.get("go_source", ""),
                sequence=row.get("sequence", "").upper(),
            )


# ----------------------------------------------------------------------------- UniProt TSV


def _column(fieldnames: list[str], key: str) -> str | None:
    lowered = {name.strip().lower(): name for name in fieldnames}
    for alias in _UNIPROT_ALIASES[key]:
        if alias in lowered:
            return lowered[alias]
    return None


def _protein_name(text: str) -> str:
    """UniProt "Protein names": the recommended name is the text before the first top-level "(" / "["."""
    depth = 0
    for i, char in enumerate(text):
        if char in "([" and depth == 0 and i > 0 and text[i - 1] == " ":
            return text[:i].strip()
        depth += char in "(["
        depth -= char in ")]"
    return text.strip()


def _topic_text(text: str) -> str:
    return clean_text(_TOPIC_PREFIX_RE.sub("", text))


def iter_uniprot_tsv(path: str | Path) -> Iterator[UniProtEntry]:
    """Yield UniProt TSV rows as :class:`UniProtEntry` (GO aspects are "" unless given).

    Raises:
        TableFormatError: no accession column.
    """
    path = Path(path)
    with open_text(path) as handle:
        reader = _reader(handle)
        names = reader.fieldnames or []
        cols = {key: _column(names, key) for key in _UNIPROT_ALIASES}
        if cols["accession"] is None:
            raise TableFormatError(f"{path}: UniProt TSV lacks an 'Entry' column")
        if cols["entry_name"] == cols["accession"]:
            cols["entry_name"] = None
        for row in reader:

            def get(key: str, row=row) -> str:
                column = cols[key]
                return (row.get(column) or "").strip() if column else ""

            accession = get("accession")
            if not accession:
                continue
            score = re.match(r"\s*([0-9.]+)", get("annotation"))
            reviewed = get("reviewed").lower()
            sequence = re.sub(r"\s+", "", get("sequence")).upper() or None
            yield UniProtEntry(
                accession=accession,
                accessions=(accession,),
                entry_name=get("entry_name"),
                name=_protein_name(get("name")),
                sequence=sequence,
                function=_topic_text(get("function")),
                location=_topic_text(get("location")),
                similarity=_topic_text(get("similarity")),
                go=[GoRef(go_id) for go_id in dict.fromkeys(_GO_RE.findall(get("go")))],
                ec=valid_ec(re.split(r"[;,\s]+", get("ec"))),
                existence=existence_level(get("existence") or None),
                organism=re.sub(r"\s*\(.*$", "", get("organism")),
                taxon=get("taxon"),
                reviewed=True if reviewed == "reviewed" else False if reviewed == "unreviewed" else None,
                annotation_score=float(score.group(1)) if score else None,
            )


# ----------------------------------------------------------------------------- DeepFRI


@dataclass
class DeepFriRow:
    """One DeepFRI annotation row: ``pdb_id`` (upper case), ``chain``, ``ec`` and ``go`` [(id, aspect)]."""

    pdb_id: str
    chain: str
    ec: list[str] = field(default_factory=list)
    go: list[tuple[str, str]] = field(default_factory=list)


def iter_deepfri(path: str | Path) -> Iterator[DeepFriRow]:
    """Yield the chain rows of a DeepFRI ``*_annot.tsv`` (EC or GO flavour)."""
    path = Path(path)
    kind = None
    with open_text(path) as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.rstrip("\n")
            if line.startswith("### "):
                header = line[4:].lower()
                if header.startswith("pdb-chain"):
                    kind = "go" if "go" in header else "ec"
                continue
            if kind is None or not line.strip():
                continue  # vocabulary lines before the chain section
            cols = line.split("\t")
            chain_id, _, chain = cols[0].rpartition("-")
            if not chain_id or not chain:
                raise TableFormatError(f"{path}:{lineno}: expected 'PDBID-CHAIN', got {cols[0][:20]!r}")
            row = DeepFriRow(pdb_id=chain_id.upper(), chain=chain)
            if kind == "ec":
                row.ec = valid_ec(cols[1].split(",") if len(cols) > 1 else [])
            else:
                for column, aspect in zip(cols[1:4], "FPC"):
                    row.go.extend((go_id, aspect) for go_id in _GO_RE.findall(column))
            yield row


# ----------------------------------------------------------------------------- SIFTS


def load_sifts_uniprot(path: str | Path) -> dict[tuple[str, str], str]:
    """{(pdb_id lower case, chain): accession}; for chimeric chains the accession covering most residues."""
    covered: dict[tuple[str, str], dict[str, int]] = {}  # residues per accession (segments summed)
    with open_text(path) as handle:
        lines = (line for line in handle if not line.startswith("#"))
        for row in _reader(lines):
            try:
                key = (row["PDB"].lower(), row["CHAIN"])
                span = int(row.get("SP_END") or 0) - int(row.get("SP_BEG") or 0) + 1
            except (KeyError, ValueError, AttributeError):
                continue
            accession = row.get("SP_PRIMARY", "")
            if accession:
                per_acc = covered.setdefault(key, {})
                per_acc[accession] = per_acc.get(accession, 0) + max(span, 0)
    # most residues wins; ties go to the accession listed first (dicts keep insertion order)
    return {key: max(per_acc, key=per_acc.get) for key, per_acc in covered.items()}


def load_sifts_enzyme(path: str | Path) -> dict[tuple[str, str], list[str]]:
    """{(pdb_id lower case, chain): [EC numbers]} from SIFTS ``pdb_chain_enzyme``."""
    out: dict[tuple[str, str], list[str]] = {}
    with open_text(path) as handle:
        lines = (line for line in handle if not line.startswith("#"))
        for row in _reader(lines):
            try:
                key = (row["PDB"].lower(), row["CHAIN"])
            except (KeyError, AttributeError):
                continue
            numbers = out.setdefault(key, [])
            for number in valid_ec([row.get("EC_NUMBER") or ""]):
                if number not in numbers:
                    numbers.append(number)
    return out
