"""Benchmark input files: the proteins table, DeepFRI annotation files, id lists, class tables.

Proteins table (TSV with a header): ``id``, ``sequence`` and optionally ``structure_file``
(relative to the table's folder, PDB / mmCIF, plain or gzipped), ``chain`` (author chain id in that
file) and text columns. A table without ``id`` but with ``pdb_id`` and ``chain`` (the layout of
``../shared/data/annotations/pdb_chains.tsv``) gets ids ``<PDB_ID>-<chain>``, DeepFRI's chain ids;
its rows without a PDB id or chain id are skipped (counted).

DeepFRI annotation files (``nrPDB-EC_*_annot.tsv``, ``nrPDB-GO_*_annot.tsv``): sections opened by
``### `` lines. The EC file holds ``### EC-numbers`` (the vocabulary, one tab-separated line) and
``### PDB-chain<TAB>EC-numbers`` followed by ``<chain><TAB><comma-separated labels>`` rows; the GO
file holds ``### GO-terms (molecular_function)`` / ``### GO-names (molecular_function)`` (and the
same for biological_process, cellular_component), then ``### PDB-chain<TAB>GO-terms
(molecular_function)<TAB>GO-terms (biological_process)<TAB>GO-terms (cellular_component)`` and one row
per chain. The label vocabulary is the file's, as in DeepFRI and ProtST: labels are flat (the file
already lists every label a chain carries); labels outside the vocabulary are errors.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

GO_NAMESPACES = {
    "molecular_function": "GO-MF",
    "biological_process": "GO-BP",
    "cellular_component": "GO-CC",
}


class BenchmarkDataError(ValueError):
    """A benchmark input file is missing or malformed (the message names the file)."""


def _open_text(path: Path):
    path = Path(path)
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: file not found")
    return open(path, newline="")


@dataclass
class Proteins:
    """The proteins a suite embeds, in table order."""

    ids: list[str]
    sequences: list[str]
    structures: list[tuple[Path, str | None] | None]  # (file, chain) or None
    columns: dict[str, list[str]] = field(default_factory=dict)  # every other column, row-aligned
    source: Path | None = None
    skipped: int = 0  # rows left out: no pdb_id or chain to name them (pdb_id/chain tables only)

    def index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.ids)}


def read_proteins(path: str | Path) -> Proteins:
    """Read a proteins table (see the module docstring); duplicate ids keep their first row.

    Raises:
        BenchmarkDataError: the file is missing, lacks the id / sequence columns, or a row is empty.
    """
    path = Path(path)
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        if "sequence" not in header:
            raise BenchmarkDataError(f"{path}: no 'sequence' column (columns: {header})")
        if "id" not in header and not {"pdb_id", "chain"} <= set(header):
            raise BenchmarkDataError(f"{path}: needs an 'id' column, or 'pdb_id' and 'chain' (columns: {header})")
        out = Proteins([], [], [], {c: [] for c in header if c not in ("id", "sequence")}, path)
        seen: set[str] = set()
        for line, row in enumerate(reader, start=2):
            pid = (row.get("id") or "").strip() if "id" in header else ""
            if not pid:
                pdb, chain = (row.get("pdb_id") or "").strip(), (row.get("chain") or "").strip()
                if not pdb or not chain:  # e.g. a blank chain id: no DeepFRI id names it
                    out.skipped += 1
                    continue
                pid = f"{pdb.upper()}-{chain}"
            if pid in seen:
                continue
            seen.add(pid)
            seq = "".join((row.get("sequence") or "").split()).upper()
            if not seq:
                raise BenchmarkDataError(f"{path}:{line}: protein {pid} has no sequence")
            structure = None
            file = (row.get("structure_file") or "").strip()
            if file:
                chain = (row.get("chain") or "").strip() or None
                structure = ((path.parent / file).resolve(), chain)
            out.ids.append(pid)
            out.sequences.append(seq)
            out.structures.append(structure)
            for c in out.columns:
                out.columns[c].append(row.get(c) or "")
    return out


@dataclass
class LabelFile:
    """One task's labels from a DeepFRI annotation file."""

    task: str  # "EC", "GO-MF", "GO-BP" or "GO-CC"
    vocabulary: list[str]  # the file's label order
    names: dict[str, str]
    labels: dict[str, set[str]]  # chain id -> its labels (may be empty)
    source: Path


def _sections(path: Path) -> list[tuple[str, list[str]]]:
    """(header after '### ', following lines) in file order."""
    sections: list[tuple[str, list[str]]] = []
    with _open_text(path) as f:
        for raw in f:
            line = raw.rstrip("\r\n")
            if line.startswith("### "):
                sections.append((line[4:].strip(), []))
            elif line.strip():
                if not sections:
                    raise BenchmarkDataError(f"{path}: not a DeepFRI annotation file (no '### ' header first)")
                sections[-1][1].append(line)
    return sections


def read_deepfri_annotations(path: str | Path) -> dict[str, LabelFile]:
    """Parse a DeepFRI EC or GO annotation file into ``{"EC": ...}`` or ``{"GO-MF", "GO-BP", "GO-CC"}``.

    Raises:
        BenchmarkDataError: missing file, unknown layout, a row with the wrong number of fields,
            or a label outside the vocabulary (the message names file and line).
    """
    path = Path(path)
    sections = _sections(path)
    vocab: dict[str, list[str]] = {}
    names: dict[str, list[str]] = {}
    table: tuple[list[str], list[str]] | None = None
    for header, lines in sections:
        if header == "EC-numbers":
            vocab["EC"] = [x.strip() for x in " ".join(lines).split("\t") if x.strip()] if lines else []
        elif header.startswith("GO-terms (") or header.startswith("GO-names ("):
            ns = header[header.index("(") + 1 : header.rindex(")")]
            if ns not in GO_NAMESPACES:
                raise BenchmarkDataError(f"{path}: unknown GO namespace {ns!r} in '### {header}'")
            items = [x.strip() for x in "\t".join(lines).split("\t")]
            (vocab if header.startswith("GO-terms") else names)[GO_NAMESPACES[ns]] = [x for x in items if x]
        elif header.startswith("PDB-chain"):
            columns = [c.strip() for c in header.split("\t")[1:]]
            table = (columns, lines)
        else:
            raise BenchmarkDataError(f"{path}: unknown section '### {header}'")
    if table is None or not vocab:
        raise BenchmarkDataError(f"{path}: not a DeepFRI annotation file (needs a vocabulary and a PDB-chain table)")
    columns, rows = table
    tasks = []
    for c in columns:
        if c == "EC-numbers":
            tasks.append("EC")
        elif c.startswith("GO-terms (") and c[10:-1] in GO_NAMESPACES:
            tasks.append(GO_NAMESPACES[c[10:-1]])
        else:
            raise BenchmarkDataError(f"{path}: unknown column {c!r} in the PDB-chain header")
    for t in tasks:
        if t not in vocab:
            raise BenchmarkDataError(f"{path}: column for {t} but no vocabulary section for it")
    out = {
        t: LabelFile(t, vocab[t], dict(zip(vocab[t], names.get(t, [])) if names.get(t) else {}), {}, path)
        for t in tasks
    }
    known = {t: set(vocab[t]) for t in tasks}
    for k, row in enumerate(rows):
        fields = row.split("\t")
        chain = fields[0].strip()
        if not chain or len(fields) > len(tasks) + 1:
            raise BenchmarkDataError(f"{path}: chain row {k + 1} is malformed: {row[:80]!r}")
        for j, t in enumerate(tasks):
            text = fields[j + 1] if j + 1 < len(fields) else ""
            labels = {x.strip() for x in text.split(",") if x.strip()}
            unknown = labels - known[t]
            if unknown:
                raise BenchmarkDataError(
                    f"{path}: chain {chain}: {t} labels not in the vocabulary: {sorted(unknown)[:5]}"
                )
            out[t].labels[chain] = labels
    return out


def read_id_list(path: str | Path) -> list[str]:
    """Chain ids, one per line (first whitespace- or comma-separated field; ``#`` lines skipped)."""
    path = Path(path)
    ids = []
    with _open_text(path) as f:
        for line in f:
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            ids.append(s.replace(",", " ").split()[0])
    if not ids:
        raise BenchmarkDataError(f"{path}: no ids")
    return ids


def read_class_table(path: str | Path, levels: list[str]) -> dict[str, dict[str, str]]:
    """A labels table (TSV with header ``id`` + one column per level) -> id -> {level: class}.

    Empty cells are left out (that protein has no class at that level).

    Raises:
        BenchmarkDataError: missing file or column.
    """
    path = Path(path)
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        missing = [c for c in ["id", *levels] if c not in header]
        if missing:
            raise BenchmarkDataError(f"{path}: missing column(s) {missing} (columns: {header})")
        out: dict[str, dict[str, str]] = {}
        for row in reader:
            pid = (row["id"] or "").strip()
            if pid:
                out[pid] = {lv: row[lv].strip() for lv in levels if (row[lv] or "").strip()}
    return out
