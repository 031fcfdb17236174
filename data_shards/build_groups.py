"""The tasks of the grouped build (:mod:`data_shards.ray_build`): each runs here or as one Ray task.

* :func:`list_archive`: the structure members of one ``*.tar`` archive (its headers only), so that
  the driver never reads an archive;
* :func:`group_records` (phase A of a group): parse the group's inputs, make their records, spool
  them to ``OUT/_build/a-<g>.spool`` and write the completion record ``a-<g>.json`` last;
* :func:`group_shards` (phase B of a group): rewrite the spool under the record ids the driver made
  unique over the build, as whole shards of each split, and write ``b-<g>.json`` last.

Every task gets the :class:`GroupContext` (sent once to the Ray object store) and returns its
completion record (plus the worker's peak memory); where the state files live and how they are
read and written is :mod:`data_shards.build_resume`'s job.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from data_shards import storage
from data_shards.annotations import AnnotationIndex
from data_shards.archives import ArchiveUnit, list_members
from data_shards.build import _count, _coverage, read_spool, spool_writer
from data_shards.build_inputs import Tally
from data_shards.build_resume import state_file, write_json
from data_shards.parallel_parse import parsed_units
from data_shards.records import RecordMaker
from data_shards.scratch import owned_dir, owned_tempdir
from data_shards.writer import ShardWriter


@dataclass
class GroupContext:
    """What every group task needs (sent once to the Ray object store).

    Attributes:
        index: the annotations of every protein (UniProt, FASTA, GAF, chain tables).
        ontology: the GO ontology, or None.
        plddt: "auto", "always" or "never" (as for the structure reader).
        workers: parser processes per task (1 on Ray: one CPU per task).
        out: output folder or URL.
        state: the build state folder or URL (``OUT/_build``).
        prefix: shard name prefix.
        samples_per_shard: at most this many samples per shard.
        split_names: ``["train", "heldout"]``, or ``[None]`` for one unsplit set.
        isolate: parse structure files in child processes even with ``workers`` 1, so that a file
            that kills its parsing process is skipped, not the task (the re-run of a Ray task
            whose worker died: :class:`~data_shards.parallel_parse.GroupRunner`).
    """

    index: AnnotationIndex
    ontology: object
    plddt: str
    workers: int
    out: str
    state: str
    prefix: str
    samples_per_shard: int
    split_names: list
    isolate: bool = False

    def isolating(self) -> GroupContext:
        """This context with ``isolate`` set (a shallow copy: the index is shared)."""
        return replace(self, isolate=True)


class _GroupMaker(RecordMaker):
    """A RecordMaker that leaves ids as requested: the driver makes them unique over the build."""

    def _unique_id(self, record_id: str) -> str:
        return record_id


def list_archive(ctx: GroupContext, unit: ArchiveUnit) -> dict:
    """Task: the structure members of one archive (its headers only), with the skips and counts of listing."""
    skip, stats = Tally(), {}
    members = list_members(unit.archive, unit.display, skip, stats)
    return {"members": members, "skipped": skip.reasons, "stats": stats, "inputs": 1}


def group_records(ctx: GroupContext, gid: int, kind: str, items: list, fingerprint: str) -> dict:
    """Phase A of one group: parse, make records, spool them; returns (and stores) its completion record.

    Args:
        ctx: the build's context.
        gid: the group id.
        kind: "structures" (structure units), "rows" (chain-table rows without a structure file, as
            (row, table) pairs) or "standalone" (UniProt/FASTA entry keys).
        items: the group's inputs of that kind.
        fingerprint: the build's fingerprint (a rerun reuses the record only when it matches).

    Returns:
        The completion record (requested ids, split keys and props per record, skip tallies,
        accessions used) plus ``peak_rss_mb``.
    """
    skip, skip_term = Tally(), Tally()
    maker = _GroupMaker(ctx.index, ctx.ontology, skip, skip_term)

    def stream():
        if kind == "structures":
            for unit, parsed, error, reason in parsed_units(items, ctx.workers, ctx.plddt, ctx.isolate):
                yield from maker.from_structure(unit, parsed, error, reason)
        elif kind == "rows":
            for row, table in items:
                built = maker.from_row(row, table)
                if built is not None:
                    yield built
        else:
            for key in items:
                built = maker.standalone_record(key)
                if built is not None:
                    yield built

    records = []
    with owned_tempdir("align-pro-group-") as tmp:  # swept by the next task on the host if this one is killed
        spool = tmp / "spool"
        with open(spool, "wb") as handle:
            for built in stream():
                spool_writer(handle, built.record)
                records.append([built.record.id, built.cluster_keys, built.props])
        storage.upload_file(spool, state_file(ctx.state, gid, "a.spool"))
    done = {
        "fingerprint": fingerprint,
        "gid": gid,
        "kind": kind,
        "inputs": len(items),
        "records": records,
        "skipped": skip.reasons,
        "skipped_terms": skip_term.reasons,
        "used_accessions": sorted(maker.used_accessions),
        "table_mismatches": maker.table_mismatches,
    }
    write_json(state_file(ctx.state, gid, "a.json"), done)
    return {**done, "peak_rss_mb": _peak_rss_mb()}


def group_shards(ctx: GroupContext, gid: int, ids: list, splits: list, props: list, digest: str) -> dict:
    """Phase B of one group: its spooled records under their final ids, written as whole shards of
    each split; returns (and stores) its completion record.

    Args:
        ctx: the build's context.
        gid: the group id.
        ids: the final (build-unique) id of each spooled record, in spool order.
        splits: the side ("train"/"heldout", or None unsplit) of each record.
        props: the manifest props of each record.
        digest: what the completion record must match for a rerun to reuse it.

    Returns:
        The completion record (ids, sides, and per split the shards written and their coverage)
        plus ``peak_rss_mb``.
    """
    coverage = {name: _coverage() for name in ctx.split_names}
    local_out = not storage.is_url(ctx.out)
    scratch = owned_dir(f".g{gid:06d}-", ctx.state if local_out else None)
    try:
        writers = {
            name: ShardWriter(
                scratch / (name or "all"), prefix=f"{ctx.prefix}-g{gid:06d}", samples_per_shard=ctx.samples_per_shard
            )
            for name in ctx.split_names
        }
        try:
            with storage.open_read(state_file(ctx.state, gid, "a.spool")) as handle:
                for i, record in enumerate(read_spool(handle, len(ids))):
                    record.id = ids[i]  # the id made unique over the build
                    if "id" in record.meta:
                        record.meta["id"] = ids[i]
                    split = splits[i] if ctx.split_names != [None] else None
                    writers[split].write(record, props[i])
                    _count(coverage[split], record)
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        done = {"fingerprint": digest, "gid": gid, "ids": ids, "sides": splits, "splits": {}}
        for name, writer in writers.items():
            writer.close()
            target = storage.join(ctx.out, name) if name else ctx.out
            for info in writer.shard_infos:
                dest = storage.join(target, info.name)
                if local_out:
                    Path(dest).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(info.path, dest)
                else:
                    storage.upload_file(info.path, dest)
            done["splits"][name or "all"] = {
                "shards": [info.to_json() for info in writer.shard_infos],
                "coverage": coverage[name],
            }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_json(state_file(ctx.state, gid, "b.json"), done)
    storage.remove_file(state_file(ctx.state, gid, "a.spool"))  # the shards hold the records now
    return {**done, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (the Ray worker, or this process when local), MiB."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
