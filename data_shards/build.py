"""``python -m data_shards build``: real structures + annotations → WebDataset shards + manifest.

Pipeline (streaming, bounded memory, deterministic):

1. Annotations are indexed first (:class:`~data_shards.annotations.AnnotationIndex`): UniProt
   flat/XML/TSV, FASTA, GAF, DeepFRI, SIFTS, and chain tables (``pdb_chains.tsv``), whose rows say
   which chain of which structure file is a sample. Only annotations are held in memory.
2. Structure files become work units in a fixed order: chain-table files in table order, then every
   other file under ``--structures`` (sorted). A pool of ``--workers`` processes parses them with
   gemmi (:mod:`data_shards.readers.structures`); at most a few units per worker are in flight and
   results are consumed in unit order, so the output does not depend on the worker count.
3. Each chain is joined to its accession (table → SIFTS → AlphaFold file name), the accession to
   its annotations, and turned into a :class:`~data_shards.schema.ProteinRecord`: the sequence is
   the one observed in the structure (the UniProt sequence goes to ``meta["uniprot_sequence"]``).
   Chain-table rows with an empty ``structure_file`` give sequence(+text) records from the table's
   ``sequence``. UniProt / FASTA entries not attached to any structure become sequence(+text) samples.
4. Records are written by :class:`~data_shards.writer.ShardWriter` with per-sample
   ``sample_props`` (existence level, ProtCLIP property coverage). With ``split_heldout`` they are
   first spooled to a temporary file, clustered (shared accession or identical sequence, union-find)
   and every cluster goes whole to ``train/`` or ``heldout/`` by a seeded hash of its smallest key.

Bad input never stops the build: the sample (or GO term) is skipped and the reason counted in the
manifest's ``extra["skipped"]`` (``extra["skipped_terms"]`` for terms) with the first examples.
That includes a chain id used by two different chains in one structure file, and a structure
file whose parsing process died (see :func:`_parsed`). Only configuration errors raise
:class:`BuildInputError` before anything is written: an input file or the OBO that does not exist
or cannot be read at all (not a single entry readable: empty, another format, damaged from the
start; a file that breaks later keeps what was read and counts one skip).

``--overwrite`` never destroys a good shard set: new shards become visible only when the build is
complete (:class:`~data_shards.writer.ShardWriter`), and a build that raises or finds nothing
usable leaves the previous output as it was.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import multiprocessing
import os
import re
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from data_shards.annotations import AnnotationIndex
from data_shards.clusters import ClusterTableError, load_clusters
from data_shards.readers.fasta import iter_fasta
from data_shards.readers.gaf import iter_gaf
from data_shards.readers.obo import load_obo
from data_shards.readers.structures import StructureError, StructureFile, looks_like_structure_file, read_structure
from data_shards.readers.tables import ChainRow, detect_table_format, iter_chain_table, iter_deepfri, iter_uniprot_tsv
from data_shards.readers.uniprot import iter_uniprot
from data_shards.records import BuiltRecord, RecordMaker, StructureUnit
from data_shards.schema import ProteinRecord, decode_sample, encode_record
from data_shards.writer import ShardWriter

MAX_EXAMPLES = 5
UNREADABLE = "unreadable structure file"
WORKER_DIED = "worker process died while reading the structure file (e.g. out of memory)"
_ANNOTATION_FORMATS = ("chains", "uniprot_tsv", "deepfri", "gaf", "sifts_uniprot", "sifts_enzyme")


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


class _Tally:
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


# ----------------------------------------------------------------------------- inputs


def _need_file(path: str, what: str) -> Path:
    resolved = Path(path)
    if not resolved.is_file():
        raise BuildInputError(f"{path}: {what} not found")
    return resolved


def _expand_structures(specs: list[str]) -> tuple[list[tuple[Path, str]], list[Path]]:
    """[(file, display path)] in a stable order, and the folders they were found under."""
    files: list[tuple[Path, str]] = []
    roots: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            roots.append(path.resolve())
            found = sorted(p for p in path.rglob("*") if p.is_file() and looks_like_structure_file(p))
            if not found:
                raise BuildInputError(f"{spec}: no structure file (.pdb/.ent/.cif, gzipped or not) in this folder")
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


def _load_annotations(
    config: BuildConfig, index: AnnotationIndex, skip: _Tally, skip_term: _Tally, inputs: dict
) -> list[Path]:
    """Index every annotation and sequence file; returns the chain tables (read by :func:`_units`)."""
    tables: list[Path] = []
    forced = config.annotations_format
    if forced is not None and forced not in _ANNOTATION_FORMATS:
        raise BuildInputError(f"unknown annotations format {forced!r} (one of {', '.join(_ANNOTATION_FORMATS)})")
    for name in config.annotations:
        path = _need_file(name, "annotation file")
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
        path = _need_file(name, "SIFTS file")
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
            path = _need_file(name, label)
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


def _read_entries(path: Path, label: str, read, add, skip: _Tally) -> None:
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


def _units(
    config: BuildConfig, tables: list[Path], skip: _Tally
) -> tuple[list[StructureUnit], list[tuple[ChainRow, str]]]:
    """Structure files to parse (chain-table files first, in table order) and the table rows
    without a structure file [(row, table name)] (records of sequence and text only)."""
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
    units += [StructureUnit(path, display, None) for path, display in files if path not in by_path]
    return units, no_structure


def _table_rows(table: Path, roots: list[Path], skip: _Tally) -> list[ChainRow]:
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


# ----------------------------------------------------------------------------- parsing


def _parse_unit(job: tuple[str, str, tuple[str, ...] | None]) -> tuple[StructureFile | None, str | None]:
    """Worker: parse one structure file; never raises."""
    path, plddt, chains = job
    try:
        return read_structure(path, plddt=plddt, chains=set(chains) if chains is not None else None), None
    except StructureError as exc:
        return None, str(exc)
    except Exception as exc:  # a parser bug must cost one file, not the build
        return None, f"{path}: unexpected parser error ({type(exc).__name__}: {exc})"


def _job(unit: StructureUnit, plddt: str) -> tuple[str, str, tuple[str, ...] | None]:
    chains = tuple(sorted({row.chain for row in unit.rows})) if unit.rows is not None else None
    return str(unit.path), plddt, chains


# (unit, parsed file or None, error or None, skip reason when parsed is None)
Parsed = tuple[StructureUnit, StructureFile | None, str | None, str]


def _parsed(units: list[StructureUnit], workers: int, plddt: str) -> Iterator[Parsed]:
    """Parse ``units`` in order; a bounded window of jobs is in flight across ``workers`` processes.

    A worker process that dies (the OOM killer's SIGKILL, a crash in the C++ parser) breaks a
    ``ProcessPoolExecutor`` at once, failing every job in flight, instead of hanging as a
    ``multiprocessing.Pool`` would. The jobs in flight are then run again one at a time, each in a
    fresh process, so that only the file that kills its process is skipped (reason
    :data:`WORKER_DIED`); a new pool takes the rest. Results keep the unit order either way.
    """
    if workers <= 1:
        for unit in units:
            yield (unit, *_parse_unit(_job(unit, plddt)), UNREADABLE)
        return
    todo = collections.deque(units)
    while todo:
        in_flight = yield from _pool_pass(todo, workers, plddt)
        for unit, future in in_flight:  # the pool broke: find the file that kills its process
            done = future is not None and future.done() and not future.cancelled() and future.exception() is None
            if done:
                yield (unit, *future.result(), UNREADABLE)
            else:
                yield (unit, *_parse_alone(_parse_unit, _job(unit, plddt)))


def _pool_pass(todo: collections.deque, workers: int, plddt: str):
    """Yield parsed units from ``todo`` (consumed) until it is empty or the pool breaks.

    Returns:
        [(unit, future or None)] still to be reported when the pool broke (in unit order), else [].
    """
    window = 4 * workers
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    pending: collections.deque = collections.deque()
    try:
        while todo or pending:
            while todo and len(pending) < window:
                unit = todo.popleft()
                try:
                    pending.append((unit, pool.submit(_parse_unit, _job(unit, plddt))))
                except BrokenProcessPool:
                    pending.append((unit, None))
                    return list(pending)
            unit, future = pending[0]
            try:
                result = future.result()
            except BrokenProcessPool:
                return list(pending)
            pending.popleft()
            yield (unit, *result, UNREADABLE)
        return []
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _parse_alone(parse, job: tuple) -> tuple[StructureFile | None, str | None, str]:
    """Run ``parse(job)`` in a fresh process; (parsed, error, reason) with ``WORKER_DIED`` when it dies."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_parse_into, args=(parse, job, send), daemon=True)
    process.start()
    send.close()  # the child holds the only write end: EOF as soon as it is gone
    try:
        parsed, error = receive.recv()
    except EOFError:
        parsed = error = None
    finally:
        receive.close()
        process.join()
    if parsed is None and error is None:
        code = process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return None, f"worker died ({how}) while reading {job[0]}", WORKER_DIED
    return parsed, error, UNREADABLE


def _parse_into(parse, job: tuple, send) -> None:
    """Child of :func:`_parse_alone`: parse and send the result back."""
    send.send(parse(job))
    send.close()


# ----------------------------------------------------------------------------- split and writing


class _Spool:
    """Encoded records in a temporary file (length-prefixed members), read back in order."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = open(path, "wb")
        self.count = 0

    def add(self, record: ProteinRecord) -> None:
        members = encode_record(record)
        self._handle.write(struct.pack("<I", len(members)))
        for ext, data in sorted(members.items()):
            name = ext.encode()
            self._handle.write(struct.pack("<IQ", len(name), len(data)))
            self._handle.write(name)
            self._handle.write(data)
        self.count += 1

    def records(self) -> Iterator[ProteinRecord]:
        self._handle.close()
        with open(self.path, "rb") as handle:
            for _ in range(self.count):
                (num,) = struct.unpack("<I", handle.read(4))
                members = {}
                for _ in range(num):
                    name_len, data_len = struct.unpack("<IQ", handle.read(12))
                    name = handle.read(name_len).decode()  # read the name first, then its data
                    members[name] = handle.read(data_len)
                yield decode_sample(members)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self.path.unlink(missing_ok=True)


def _split_of(cluster_keys: list[list[str]], fraction: float, seed: int) -> list[str]:
    """ "train"/"heldout" per record: records sharing any key form one cluster; clusters are split whole."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        parent.setdefault(key, key)
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for keys in cluster_keys:
        first = find(keys[0])
        for other in keys[1:]:
            root = find(other)
            if root != first:
                low, high = sorted((first, root))  # the smallest key names the cluster
                parent[high] = low
                first = low
    out = []
    for keys in cluster_keys:
        digest = hashlib.sha256(f"{seed}:{find(keys[0])}".encode()).digest()
        value = int.from_bytes(digest[:8], "big") / 2**64
        out.append("heldout" if value < fraction else "train")
    return out


def _coverage() -> dict:
    return {
        "samples": 0,
        "sequence": 0,
        "structure": 0,
        "text": 0,
        "plddt": 0,
        "accession": 0,
        "go": 0,
        "ec": 0,
        "name": 0,
        "function": 0,
        "function_free_text": 0,
        "location": 0,
        "similarity": 0,
        "existence_known": 0,
        "property_coverage": {str(o): 0 for o in range(5)},
        "sources": {},
    }


def _count(coverage: dict, record: ProteinRecord) -> None:
    coverage["samples"] += 1
    for modality in record.modalities():
        coverage[modality] += 1
    meta, text = record.meta, record.text or {}
    coverage["plddt"] += record.backbone is not None and record.backbone.plddt is not None
    coverage["accession"] += bool(meta.get("accession"))
    coverage["go"] += bool(text.get("go"))
    coverage["ec"] += bool(text.get("ec"))
    for name in ("name", "function", "location", "similarity"):
        coverage[name] += bool(text.get(name))
    coverage["function_free_text"] += bool(text.get("function")) and "function" not in meta.get("text_derived", [])
    coverage["existence_known"] += meta.get("evidence") is not None
    coverage["property_coverage"][str(meta["property_coverage"])] += 1
    coverage["sources"][meta["source"]] = coverage["sources"].get(meta["source"], 0) + 1


def build_shards(config: BuildConfig) -> dict:
    """Build shards from real data (see the module docstring).

    Args:
        config: the :class:`BuildConfig`.

    Returns:
        A JSON-able summary: {"ok", "out", "num_samples", "splits": {name: {"dir", "num_samples",
        "num_shards", "coverage"}}, "skipped", "skipped_terms", "stats", "seconds"}; "ok" is False
        when nothing usable was found, and then nothing is written (a previous shard set in
        ``out`` stays as it was, as it does when the build raises).

    Raises:
        BuildInputError: an input named in ``config`` is missing or unreadable as a whole.
    """
    start = time.perf_counter()
    if config.split_heldout is not None and not 0.0 <= config.split_heldout < 1.0:
        raise BuildInputError(f"split_heldout must be in [0, 1), got {config.split_heldout}")
    clusters = None
    if config.split_clusters is not None:
        if config.split_heldout is None:
            raise BuildInputError("split_clusters needs split_heldout (a cluster table only steers the split)")
        try:
            clusters = load_clusters(_need_file(config.split_clusters, "cluster table"))
        except ClusterTableError as exc:
            raise BuildInputError(str(exc)) from None
    if config.plddt not in ("auto", "always", "never"):
        raise BuildInputError(f"plddt must be auto, always or never, got {config.plddt!r}")
    skip, skip_term = _Tally(), _Tally()
    inputs: dict[str, list[str]] = {}
    ontology = None
    if config.go_obo:
        try:
            ontology = load_obo(_need_file(config.go_obo, "GO ontology"))
        except ValueError as exc:
            raise BuildInputError(str(exc)) from None
        inputs["go_obo"] = [Path(config.go_obo).name]
    index = AnnotationIndex()
    tables = _load_annotations(config, index, skip, skip_term, inputs)
    units, no_structure = _units(config, tables, skip)
    inputs["structure_files"] = [str(len(units))]
    maker = RecordMaker(index, ontology, skip, skip_term)

    def stream() -> Iterator[BuiltRecord]:
        for unit, parsed, error, reason in _parsed(units, config.workers, config.plddt):
            yield from maker.from_structure(unit, parsed, error, reason)
        for row, table in no_structure:  # before standalone entries, which skip used accessions
            built = maker.from_row(row, table)
            if built is not None:
                yield built
        if config.standalone_sequences:
            yield from maker.standalone()

    out = Path(config.out)
    split_names = ["train", "heldout"] if config.split_heldout is not None else [None]
    coverage = {name: _coverage() for name in split_names}
    extra = {
        "generator": "data_shards.build",
        "inputs": inputs,
        "split_heldout": config.split_heldout,
        "split_seed": config.split_seed if config.split_heldout is not None else None,
        "split_key": "clusters of shared UniProt accession or identical sequence (union-find)"
        + (f" joined by the sequence clusters of {Path(config.split_clusters).name}" if clusters else ""),
    }
    try:
        writers = {
            name: ShardWriter(
                out / name if name else out,
                prefix=config.prefix,
                samples_per_shard=config.samples_per_shard,
                extra={**extra, "split": name or "all"},
                overwrite=config.overwrite,
            )
            for name in split_names
        }
    except FileExistsError as exc:  # existing shards (names them), or a file where a folder should be
        raise BuildInputError(str(exc) if exc.filename is None else f"{exc.filename}: not a folder") from None
    except OSError as exc:  # an output folder that cannot be made
        raise BuildInputError(f"{exc.filename or out}: cannot write the output ({exc.strerror or exc})") from None
    except ValueError as exc:  # bad prefix, unsound manifest
        raise BuildInputError(str(exc)) from None
    split_info: dict = {}
    try:
        if config.split_heldout is None:
            for built in stream():
                writers[None].write(built.record, built.props)
                _count(coverage[None], built.record)
        else:
            spool = _Spool(out / f".build-spool.{os.getpid()}.tmp")
            try:
                keys, props = [], []
                listed = 0
                for built in stream():
                    spool.add(built.record)
                    rep = clusters.get(built.record.id) if clusters else None
                    listed += rep is not None
                    keys.append([*built.cluster_keys, f"cluster:{rep}"] if rep is not None else built.cluster_keys)
                    props.append(built.props)
                if clusters:
                    split_info["split_clusters"] = {"records_listed": listed, "records_unlisted": len(keys) - listed}
                splits = _split_of(keys, config.split_heldout, config.split_seed)
                for record, split, prop in zip(spool.records(), splits, props):
                    writers[split].write(record, prop)
                    _count(coverage[split], record)
            finally:
                spool.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    total = sum(writer.num_samples for writer in writers.values())
    if total == 0:  # a failed build publishes nothing: a previous shard set stays as it was
        for writer in writers.values():
            writer.abort()
    stats = {
        "structure_units": len(units),
        "table_sequence_mismatches": maker.table_mismatches,
        "skipped_samples": skip.total,
        "skipped_terms": skip_term.total,
    }
    for name, writer in writers.items():
        writer.extra.update(
            {
                "coverage": coverage[name],
                "skipped": skip.to_json(),
                "skipped_terms": skip_term.to_json(),
                "stats": stats,
                **split_info,
            }
        )
        if total:
            writer.close()
    return {
        "ok": total > 0,
        "out": str(out),
        "num_samples": total,
        "splits": {
            (name or "all"): {
                "dir": str(writer.out_dir),
                "num_samples": writer.num_samples,
                "num_shards": len(writer.shard_infos),
                "coverage": coverage[name],
            }
            for name, writer in writers.items()
        },
        "skipped": skip.to_json(),
        "skipped_terms": skip_term.to_json(),
        "stats": stats,
        **split_info,
        "seconds": round(time.perf_counter() - start, 2),
    }
