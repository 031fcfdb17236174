"""``python -m data_shards build``: real structures + annotations → WebDataset shards + manifest.

Pipeline (streaming, bounded memory, deterministic):

1. Annotations are indexed first (:class:`~data_shards.annotations.AnnotationIndex`): UniProt
   flat/XML/TSV, FASTA, GAF, DeepFRI, SIFTS, and chain tables (``pdb_chains.tsv``), whose rows say
   which chain of which structure file is a sample. Only annotations are held in memory.
2. Structure files become work units in a fixed order: chain-table files in table order, then every
   other file under ``--structures`` (sorted); a ``*.tar`` archive (AlphaFold DB) gives its
   structure members in archive order, read by offset without unpacking, and URLs are read from
   object storage (:mod:`data_shards.archives`). A pool of ``--workers`` processes parses them with
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
file whose parsing process died (see :func:`data_shards.parallel_parse.parsed_units`). Only configuration errors raise
:class:`BuildInputError` before anything is written: an input file or the OBO that does not exist
or cannot be read at all (not a single entry readable: empty, another format, damaged from the
start; a file that breaks later keeps what was read and counts one skip).

The same build cut into groups of inputs, resumable, appendable and runnable as Ray tasks is
:mod:`data_shards.ray_build` (``--resumable`` / ``--ray``): same records, order and split.

``--overwrite`` never destroys a good shard set: new shards become visible only when the build is
complete (:class:`~data_shards.writer.ShardWriter`), and a build that raises or finds nothing
usable leaves the previous output as it was.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

from data_shards.build_inputs import (
    BuildConfig,
    BuildInputError,
    Tally,
    check_build_config,
    load_ontology_and_index,
    structure_units,
)
from data_shards.parallel_parse import parsed_units
from data_shards.records import BuiltRecord, RecordMaker
from data_shards.schema import ProteinRecord, decode_sample, encode_record
from data_shards.writer import ShardWriter

# ----------------------------------------------------------------------------- split and writing


def spool_writer(handle, record: ProteinRecord) -> None:
    """Append one encoded record (length-prefixed members) to a binary spool ``handle``."""
    members = encode_record(record)
    handle.write(struct.pack("<I", len(members)))
    for ext, data in sorted(members.items()):
        name = ext.encode()
        handle.write(struct.pack("<IQ", len(name), len(data)))
        handle.write(name)
        handle.write(data)


def read_spool(handle, count: int) -> Iterator[ProteinRecord]:
    """The ``count`` records of a spool written by :func:`spool_writer`, in order."""
    for _ in range(count):
        (num,) = struct.unpack("<I", handle.read(4))
        members = {}
        for _ in range(num):
            name_len, data_len = struct.unpack("<IQ", handle.read(12))
            name = handle.read(name_len).decode()  # read the name first, then its data
            members[name] = handle.read(data_len)
        yield decode_sample(members)


class _Spool:
    """Encoded records in a temporary file (length-prefixed members), read back in order."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = open(path, "wb")
        self.count = 0

    def add(self, record: ProteinRecord) -> None:
        spool_writer(self._handle, record)
        self.count += 1

    def records(self) -> Iterator[ProteinRecord]:
        self._handle.close()
        with open(self.path, "rb") as handle:
            yield from read_spool(handle, self.count)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self.path.unlink(missing_ok=True)


def cluster_roots(cluster_keys: list[list[str]]) -> list[str]:
    """The cluster of each record, named by its smallest key: records sharing any key form one cluster."""
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
    return [find(keys[0]) for keys in cluster_keys]


def side_of(root: str, fraction: float, seed: int) -> str:
    """ "heldout" for a seeded-hash ``fraction`` of clusters, else "train"."""
    digest = hashlib.sha256(f"{seed}:{root}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < fraction else "train"


def _split_of(cluster_keys: list[list[str]], fraction: float, seed: int) -> list[str]:
    """ "train"/"heldout" per record: records sharing any key form one cluster; clusters are split whole."""
    return [side_of(root, fraction, seed) for root in cluster_roots(cluster_keys)]


def split_fields(config: BuildConfig, clusters: dict | None) -> dict:
    """The manifest's record of how records were split: {"split_heldout", "split_seed", "split_key"}."""
    return {
        "split_heldout": config.split_heldout,
        "split_seed": config.split_seed if config.split_heldout is not None else None,
        "split_key": "clusters of shared UniProt accession or identical sequence (union-find)"
        + (f" joined by the sequence clusters of {Path(config.split_clusters).name}" if clusters else ""),
    }


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
    clusters = check_build_config(config)
    skip, skip_term = Tally(), Tally()
    inputs: dict[str, list[str]] = {}
    ontology, index, tables = load_ontology_and_index(config, skip, skip_term, inputs)
    archive_stats: dict = {}
    units, no_structure = structure_units(config, tables, skip, archive_stats)
    inputs["structure_files"] = [str(len(units))]
    maker = RecordMaker(index, ontology, skip, skip_term)

    def stream() -> Iterator[BuiltRecord]:
        for unit, parsed, error, reason in parsed_units(units, config.workers, config.plddt):
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
        **split_fields(config, clusters),
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
        **archive_stats,
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
