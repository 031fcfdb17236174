"""The inputs of a shard build: structure files, annotation files, chain tables, and the tally of
what was skipped and why (every skip is counted with its first examples in the manifest)."""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path

from data_shards import storage
from data_shards.annotations import AnnotationIndex
from data_shards.archives import ArchiveUnit, RemoteUnit, is_archive, list_members
from data_shards.clusters import ClusterTableError, load_clusters
from data_shards.readers.fasta import iter_fasta
from data_shards.readers.gaf import iter_gaf
from data_shards.readers.obo import load_obo
from data_shards.readers.structures import looks_like_structure_file
from data_shards.readers.tables import ChainRow, detect_table_format, iter_chain_table, iter_deepfri, iter_uniprot_tsv
from data_shards.readers.uniprot import iter_uniprot
from data_shards.records import StructureUnit
from data_shards.scratch import owned_dir

MAX_EXAMPLES = 5
ANNOTATION_FORMATS = ("chains", "uniprot_tsv", "deepfri", "gaf", "sifts_uniprot", "sifts_enzyme")


class BuildInputError(ValueError):
    """An input named on the command line is missing or unreadable as a whole."""


@dataclass
class BuildConfig:
    """What to build.

    Attributes:
        out: output directory (shards directly in it, or in ``out/train`` + ``out/heldout``).
        structures: structure files, directories (searched recursively) or glob patterns.
        annotations: chain tables, UniProt TSVs, GAF, DeepFRI or SIFTS files (auto-detected).
        annotations_format: force one format for every ``annotations`` file.
        uniprot: UniProt flat (.dat/.txt) or XML files.
        fasta: FASTA files.
        go_obo: GO ontology for canonical ids, aspects, names and definitions.
        sifts: SIFTS pdb_chain_uniprot / pdb_chain_enzyme files.
        data_roots: extra folders chain-table paths may point into (besides the table's own
            folder and the ``structures`` folders).
        samples_per_shard: samples per tar.
        workers: structure-parsing processes (1 = in this process).
        split_heldout: fraction of clusters for ``heldout/``; None writes one shard set.
        split_seed: seed of the split hash.
        split_clusters: optional sequence-cluster table (``data_shards.clusters``: MMseqs2's
            ``representative<TAB>member`` TSV, members named by record id); records of one cluster
            go to the same side. Needs ``split_heldout``.
        prefix: shard file prefix.
        plddt: "auto", "always" or "never" (pLDDT from B-factors).
        standalone_sequences: also write UniProt/FASTA entries that no structure used.
        overwrite: replace existing shards of the same prefix.
    """

    out: str | Path
    structures: list[str] = field(default_factory=list)
    annotations: list[str] = field(default_factory=list)
    annotations_format: str | None = None
    uniprot: list[str] = field(default_factory=list)
    fasta: list[str] = field(default_factory=list)
    go_obo: str | None = None
    sifts: list[str] = field(default_factory=list)
    data_roots: list[str] = field(default_factory=list)
    samples_per_shard: int = 1000
    workers: int = 1
    split_heldout: float | None = None
    split_seed: int = 0
    split_clusters: str | None = None
    prefix: str = "shard"
    plddt: str = "auto"
    standalone_sequences: bool = True
    overwrite: bool = False


class Tally:
    """Skip reasons with counts and the first examples."""

    def __init__(self):
        self.reasons: dict[str, dict] = {}

    def __call__(self, reason: str, example: str) -> None:
        entry = self.reasons.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append(example)

    def add_counts(self, counts: dict[str, int], example: str) -> None:
        for reason, count in counts.items():
            entry = self.reasons.setdefault(reason, {"count": 0, "examples": []})
            entry["count"] += count
            if len(entry["examples"]) < MAX_EXAMPLES:
                entry["examples"].append(example)

    def to_json(self) -> dict:
        return {reason: self.reasons[reason] for reason in sorted(self.reasons)}

    @property
    def total(self) -> int:
        return sum(entry["count"] for entry in self.reasons.values())


_FETCHED: dict[str, Path] = {}  # URL -> local copy for this process


def need_file(path: str, what: str) -> Path:
    """The local file ``path``; a URL (``s3://...``) is copied once into a temporary folder of this
    process (removed at exit) under its own name, since the readers of annotation, sequence and
    ontology files read local files. BuildInputError names a missing file or object."""
    if storage.is_url(path):
        return _fetch(str(path), what)
    resolved = Path(path)
    if not resolved.is_file():
        raise BuildInputError(f"{path}: {what} not found")
    return resolved


def _fetch(url: str, what: str) -> Path:
    if url in _FETCHED and _FETCHED[url].is_file():
        return _FETCHED[url]
    import atexit
    import shutil

    folder = owned_dir("align-pro-input-")  # atexit removes it; after a kill, the next build on the host
    atexit.register(shutil.rmtree, folder, True)
    local = folder / (url.rstrip("/").rsplit("/", 1)[-1] or "input")
    try:
        storage.download_file(url, local)  # streamed: never the whole file in memory
    except (OSError, storage.StorageError) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise BuildInputError(f"{url}: {what} not readable ({exc})") from None
    _FETCHED[url] = local
    return local


def _expand_structures(specs: list[str]) -> tuple[list[tuple[Path | str, str]], list[Path]]:
    """[(file or URL, display path)] in a stable order, and the folders they were found under."""
    files: list[tuple[Path | str, str]] = []
    urls: list[str] = []
    roots: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        if storage.is_url(spec):  # read where it is (data_shards.archives): no folder root to add
            if spec not in urls:
                urls.append(spec)
                files.append((spec, spec.rstrip("/").rsplit("/", 1)[-1]))
            continue
        path = Path(spec)
        if path.is_dir():
            roots.append(path.resolve())
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and (looks_like_structure_file(p) or is_archive(p))
            )
            if not found:
                raise BuildInputError(
                    f"{spec}: no structure file (.pdb/.ent/.cif, gzipped or not) or .tar archive in this folder"
                )
            pairs = [(p, p.relative_to(path).as_posix()) for p in found]
        elif path.is_file():
            roots.append(path.resolve().parent)
            pairs = [(path, path.name)]
        else:
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise BuildInputError(f"{spec}: no structure file or folder matches")
            base = Path(re.split(r"[*?\[]", spec, maxsplit=1)[0] or ".")
            base = base if base.is_dir() else base.parent
            roots.append(base.resolve())
            pairs = [(Path(m), Path(m).name) for m in matches if Path(m).is_file()]
        for file, display in pairs:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append((key, display))
    return files, roots


def check_build_config(config: BuildConfig) -> dict[str, str] | None:
    """Validate the split and pLDDT settings of ``config``; the cluster table ({record id:
    representative}) when ``split_clusters`` names one, else None. BuildInputError names the field."""
    if config.split_heldout is not None and not 0.0 <= config.split_heldout < 1.0:
        raise BuildInputError(f"split_heldout must be in [0, 1), got {config.split_heldout}")
    if config.split_clusters is not None and config.split_heldout is None:
        raise BuildInputError("split_clusters needs split_heldout (a cluster table only steers the split)")
    if config.plddt not in ("auto", "always", "never"):
        raise BuildInputError(f"plddt must be auto, always or never, got {config.plddt!r}")
    if config.split_clusters is None:
        return None
    try:
        return load_clusters(need_file(config.split_clusters, "cluster table"))
    except ClusterTableError as exc:
        raise BuildInputError(str(exc)) from None


def load_ontology_and_index(config: BuildConfig, skip: Tally, skip_term: Tally, inputs: dict):
    """The GO ontology (None without ``go_obo``), the :class:`AnnotationIndex` of every annotation and
    sequence file, and the chain tables; records each input file's name in ``inputs`` ({kind: [names]})."""
    ontology = None
    if config.go_obo:
        try:
            ontology = load_obo(need_file(config.go_obo, "GO ontology"))
        except ValueError as exc:
            raise BuildInputError(str(exc)) from None
        inputs["go_obo"] = [Path(config.go_obo).name]
    index = AnnotationIndex()
    tables = load_annotations(config, index, skip, skip_term, inputs)
    return ontology, index, tables


def load_annotations(
    config: BuildConfig, index: AnnotationIndex, skip: Tally, skip_term: Tally, inputs: dict
) -> list[Path]:
    """Index every annotation and sequence file; returns the chain tables (read by :func:`structure_units`)."""
    tables: list[Path] = []
    forced = config.annotations_format
    if forced is not None and forced not in ANNOTATION_FORMATS:
        raise BuildInputError(f"unknown annotations format {forced!r} (one of {', '.join(ANNOTATION_FORMATS)})")
    for name in config.annotations:
        path = need_file(name, "annotation file")
        try:
            kind = forced or detect_table_format(path)
        except (ValueError, OSError, EOFError) as exc:
            raise BuildInputError(_naming(path, "annotation file", exc)) from None
        if kind is None:
            raise BuildInputError(f"{path}: cannot tell the annotation format; pass --annotations-format")
        inputs.setdefault(kind, []).append(path.name)
        if kind == "chains":
            tables.append(path)
        elif kind == "uniprot_tsv":
            _read_entries(path, "UniProt TSV", iter_uniprot_tsv, lambda e: index.add_uniprot(e, "uniprot_tsv"), skip)
        elif kind == "gaf":
            counts: dict[str, int] = {}
            _read_entries(path, "GAF file", lambda p, c=counts: iter_gaf(p, c), index.add_gaf_annotation, skip)
            skip_term.add_counts({f"GAF annotation dropped: {k}": v for k, v in counts.items()}, path.name)
        elif kind == "deepfri":
            _read_entries(path, "DeepFRI table", iter_deepfri, index.add_deepfri_row, skip)
        else:
            _load_whole(path, "SIFTS table", lambda p, k=kind: index.add_sifts(p, k))
    for name in config.sifts:
        path = need_file(name, "SIFTS file")
        try:
            kind = detect_table_format(path)
        except (ValueError, OSError, EOFError) as exc:
            raise BuildInputError(_naming(path, "SIFTS table", exc)) from None
        if kind not in ("sifts_uniprot", "sifts_enzyme"):
            raise BuildInputError(f"{path}: not a SIFTS pdb_chain_uniprot / pdb_chain_enzyme table")
        inputs.setdefault(kind, []).append(path.name)
        _load_whole(path, "SIFTS table", lambda p, k=kind: index.add_sifts(p, k))
    sequence_sources = (
        ("uniprot", "UniProt file", config.uniprot, iter_uniprot, index.add_uniprot),
        ("fasta", "FASTA file", config.fasta, iter_fasta, index.add_fasta),
    )
    for kind, label, names, read, add in sequence_sources:
        for name in names:
            path = need_file(name, label)
            inputs.setdefault(kind, []).append(path.name)
            _read_entries(path, label, read, add, skip)
    return tables


def _naming(path: Path, label: str, exc: BaseException) -> str:
    """One line naming the file: the reader's message when it names the file already."""
    return str(exc) if str(path) in str(exc) else f"{path}: unreadable {label} ({type(exc).__name__}: {exc})"


def _load_whole(path: Path, label: str, load) -> None:
    """``load(path)`` for whole-file loaders (SIFTS; returns the entries loaded): an error or
    nothing loaded is a :class:`BuildInputError` naming the file."""
    try:
        count = load(path)
    except (ValueError, OSError, EOFError) as exc:
        raise BuildInputError(_naming(path, label, exc)) from None
    if not count:
        raise BuildInputError(f"{path}: no entries in this {label} (empty, or not a {label}?)")


def _read_entries(path: Path, label: str, read, add, skip: Tally) -> None:
    """``add`` every entry of ``read(path)``.

    A file that breaks after some entries keeps them and counts one skip ("unreadable <label>
    (rest of file ignored)"); a file without a single readable entry (empty, another format,
    damaged from the start) cannot be meant: :class:`BuildInputError` naming it.
    """
    count = 0
    try:
        for entry in read(path):
            add(entry)
            count += 1
    except (ValueError, OSError, EOFError) as exc:
        if count == 0:
            raise BuildInputError(_naming(path, label, exc)) from None
        skip(f"unreadable {label} (rest of file ignored)", f"{path.name}: {exc}")
        return
    if count == 0:
        raise BuildInputError(f"{path}: no entries in this {label} (empty, or not a {label}?)")


def structure_units(
    config: BuildConfig, tables: list[Path], skip: Tally, stats: dict | None = None, expand_archives: bool = True
) -> tuple[list[StructureUnit], list[tuple[ChainRow, str]]]:
    """Structure files to parse (chain-table files first, in table order) and the table rows
    without a structure file [(row, table name)] (records of sequence and text only).

    ``*.tar`` archives (in a folder, named, or as URLs) give one unit per structure member, in
    archive order (:func:`data_shards.archives.list_members`, which counts into ``stats``), or
    with ``expand_archives=False`` one :class:`~data_shards.archives.ArchiveUnit` each, listed later
    by whoever reads it; a URL of a single structure file is read from object storage when parsed."""
    files, roots = _expand_structures(config.structures)
    roots += [Path(r).resolve() for r in config.data_roots]
    by_path: dict[Path, StructureUnit] = {}
    seen_rows: set[tuple] = set()
    no_structure: list[tuple[ChainRow, str]] = []
    for table in tables:
        for row in _table_rows(table, roots, skip):
            where = f"{table.name}:{row.line} {row.structure_file} {row.chain}"
            if not row.structure_file:
                key = ("", row.pdb_id, row.chain, row.uniprot, row.sequence)
                if key in seen_rows:
                    skip("duplicate table row", where)
                else:
                    seen_rows.add(key)
                    no_structure.append((row, table.name))
                continue
            if row.path is None:
                invalid = "\x00" in row.structure_file
                reason = "invalid structure path" if invalid else "structure path escapes the allowed folders"
                skip(reason, f"{where} ({row.path_error})")
                continue
            if (row.path, row.chain) in seen_rows:
                skip("duplicate table row", where)
                continue
            seen_rows.add((row.path, row.chain))
            if not row.path.is_file():
                skip("structure file missing", where)
                continue
            unit = by_path.get(row.path)
            if unit is None:
                unit = by_path[row.path] = StructureUnit(row.path, row.structure_file, [])
            unit.rows.append(row)
    units = list(by_path.values())
    stats = {} if stats is None else stats
    for path, display in files:
        if path in by_path:
            continue
        if is_archive(path) and not looks_like_structure_file(path):
            if expand_archives:
                units += list_members(path, display, skip, stats)
            else:
                units.append(ArchiveUnit(Path(display), display, None, str(path)))
        elif isinstance(path, str):  # a URL of one structure file
            units.append(RemoteUnit(Path(display), path, None, path))
        else:
            units.append(StructureUnit(path, display, None))
    return units, no_structure


def _table_rows(table: Path, roots: list[Path], skip: Tally) -> list[ChainRow]:
    """The rows of a chain table; rows before a damaged part are kept (the rest is one counted
    skip), a table without any readable row is a :class:`BuildInputError`."""
    rows: list[ChainRow] = []
    try:
        for row in iter_chain_table(table, roots):
            rows.append(row)
    except (ValueError, OSError, EOFError) as exc:
        if not rows:
            raise BuildInputError(_naming(table, "chain table", exc)) from None
        skip("unreadable chain table (rest of file ignored)", f"{table.name}: {exc}")
    if not rows:
        raise BuildInputError(f"{table}: chain table has no rows")
    return rows
