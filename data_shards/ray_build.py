"""Grouped shard build: resumable, incremental, on one machine or as Ray tasks over a cluster.

``python -m data_shards build ... --resumable`` (one machine) and ``... --ray [auto|ADDRESS]``
(Ray tasks; a local Ray instance when no address is given) run the same plan and write
byte-identical output.

Plan: the inputs of :func:`data_shards.build.build_shards` (structure files, archive members,
chain-table rows without a structure file, then the UniProt/FASTA entries no structure used) are
cut, in that order, into groups of ``group_size`` inputs. Every ``*.tar`` archive is listed first by
a task of its own (the driver never reads an archive); its members are then inputs like any file,
so a large archive spans many groups. Group ``g`` writes the shards ``<prefix>-g<g:06d>-<n:06d>.tar``
(at most ``samples_per_shard`` samples each) of every split, so shard names sort in input order.
Two phases, each a task per group:

A. parse the group's inputs and make its records (:class:`~data_shards.records.RecordMaker`), spool
   them to ``OUT/_build/a-<g>.spool`` and write ``a-<g>.json`` (requested record ids, split keys,
   per-sample props, skip tallies, accessions used) last: the group's completion record.
B. after every group's phase A, the driver makes record ids unique and splits the clusters exactly
   as the single-pass build does (in input order, over the whole build); each group then rewrites
   its spool as shards and writes ``b-<g>.json`` (shard checksums, coverage) last.

The manifests are written from the completion records, in group order. The concatenated records
in manifest order, their ids and their train/held-out side equal those of
:func:`~data_shards.build.build_shards` on the same inputs (only the cut into shards differs); the
homology cluster table applies the same way.

Resume: ``OUT/_build/plan.json`` holds the fingerprint of the command (inputs, options, input
names); a rerun with the same command skips every group whose completion record exists and ends
with the same manifest as an uninterrupted build. Each file (spool, shard, record) appears whole:
local files by rename, object storage by single PUTs.

Append (``--append``): a build over new inputs into a finished OUT is a new revision: its groups
are numbered after the existing ones, the existing shards are not rewritten, record ids stay
unique over all revisions, and a new record that shares a split cluster with a built one goes to
that record's side (``extra["build"]["revisions"]`` lists them; the manifest lists the union).

Limits: the fingerprint covers input names and options, not file contents (do not edit inputs
between a kill and the rerun); the driver holds every record's id and split keys (about 200 bytes
a record: fine for Swiss-Prot, tens of GB for all of AlphaFold DB); on Ray a parser crash that
kills the worker process is retried twice, then stops the build (the single-machine build's
``--workers`` pool skips such a file instead).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from data_shards import storage
from data_shards.annotations import AnnotationIndex
from data_shards.archives import ArchiveUnit, list_members
from data_shards.build import _count, _coverage, _split_of, cluster_roots, read_spool, side_of, spool_writer
from data_shards.build_inputs import MAX_EXAMPLES, BuildConfig, BuildInputError, Tally, load_annotations, need_file
from data_shards.build_inputs import structure_units as list_structure_units
from data_shards.clusters import ClusterTableError, load_clusters
from data_shards.manifest import MANIFEST_NAME, load_manifest, write_manifest
from data_shards.parallel_parse import GroupRunner, parsed_units, progress_bar
from data_shards.readers.obo import load_obo
from data_shards.records import RecordMaker
from data_shards.writer import ShardWriter

STATE_DIR = "_build"
KINDS = ("structures", "rows", "standalone")


@dataclass
class GroupedOptions:
    """How the grouped build runs (not part of what it builds, except ``group_size``).

    Attributes:
        group_size: inputs per group (a group is one task and at least one shard per split).
        ray: None for this machine, else "local" (start a local Ray), "auto" or a cluster address.
        append: add a revision to a finished build in ``out`` instead of refusing.
        progress: show a progress bar on stderr (None: when stderr is a terminal).
        stall_timeout_s: on Ray, give up (RuntimeError) when no task ends for this long, e.g. while
            tasks wait for CPUs the cluster does not have; None waits.
    """

    group_size: int = 64
    ray: str | None = None
    append: bool = False
    progress: bool | None = None
    stall_timeout_s: float | None = None


@dataclass
class _Context:
    """What every group task needs (sent once to the Ray object store)."""

    index: AnnotationIndex
    ontology: object
    plddt: str
    workers: int
    out: str
    state: str
    prefix: str
    samples_per_shard: int
    split_names: list


class _GroupMaker(RecordMaker):
    """A RecordMaker that leaves ids as requested: the driver makes them unique over the build."""

    def _unique_id(self, record_id: str) -> str:
        return record_id


def _standalone(maker: RecordMaker, key: str):
    """The record of one UniProt/FASTA entry (as :meth:`RecordMaker.standalone` makes it)."""
    info = maker.index.proteins[key]
    source = "uniprot" if any(s.startswith("uniprot") for s in info.sources) else "fasta"
    return maker.make(
        record_id=key,
        sequence=info.sequence,
        backbone=None,
        accession=key,
        row=None,
        extras=None,
        base_meta={"source": source},
    )


def _name(ctx: _Context, gid: int, ext: str) -> str | Path:
    return storage.join(ctx.state, f"{ext[0]}-{gid:06d}{ext[1:]}")


def _read_json(location) -> dict | None:
    try:
        return json.loads(storage.read_bytes(location).decode("utf-8")) if storage.exists(location) else None
    except FileNotFoundError:
        return None


def _write_json(location, data: dict) -> None:
    storage.write_text(location, json.dumps(data, sort_keys=True, allow_nan=False))


def group_records(ctx: _Context, gid: int, kind: str, items: list, fingerprint: str) -> dict:
    """Phase A of one group: parse, make records, spool them; returns (and stores) its completion record."""
    skip, skip_term = Tally(), Tally()
    maker = _GroupMaker(ctx.index, ctx.ontology, skip, skip_term)

    def stream():
        if kind == "structures":
            for unit, parsed, error, reason in parsed_units(items, ctx.workers, ctx.plddt):
                yield from maker.from_structure(unit, parsed, error, reason)
        elif kind == "rows":
            for row, table in items:
                built = maker.from_row(row, table)
                if built is not None:
                    yield built
        else:
            for key in items:
                built = _standalone(maker, key)
                if built is not None:
                    yield built

    records = []
    with tempfile.TemporaryDirectory(prefix="align-pro-group-") as tmp:
        spool = Path(tmp) / "spool"
        with open(spool, "wb") as handle:
            for built in stream():
                spool_writer(handle, built.record)
                records.append([built.record.id, built.cluster_keys, built.props])
        storage.upload_file(spool, _name(ctx, gid, "a.spool"))
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
    _write_json(_name(ctx, gid, "a.json"), done)
    return {**done, "peak_rss_mb": _peak_rss_mb()}


def group_shards(ctx: _Context, gid: int, ids: list, splits: list, props: list, digest: str) -> dict:
    """Phase B of one group: its spooled records under their final ids, written as whole shards of
    each split; returns (and stores) its completion record."""
    coverage = {name: _coverage() for name in ctx.split_names}
    local_out = not storage.is_url(ctx.out)
    scratch = Path(tempfile.mkdtemp(prefix=f".g{gid:06d}-", dir=ctx.state if local_out else None))
    try:
        writers = {
            name: ShardWriter(
                scratch / (name or "all"), prefix=f"{ctx.prefix}-g{gid:06d}", samples_per_shard=ctx.samples_per_shard
            )
            for name in ctx.split_names
        }
        try:
            with storage.open_read(_name(ctx, gid, "a.spool")) as handle:
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
    _write_json(_name(ctx, gid, "b.json"), done)
    storage.remove_file(_name(ctx, gid, "a.spool"))  # the shards hold the records now
    return {**done, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (the Ray worker, or this process when local), MiB."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ----------------------------------------------------------------------------- driver


def _merge_tally(tally: Tally, reasons: dict) -> None:
    for reason, entry in reasons.items():
        mine = tally.reasons.setdefault(reason, {"count": 0, "examples": []})
        mine["count"] += entry["count"]
        mine["examples"] += entry["examples"][: MAX_EXAMPLES - len(mine["examples"])]


def _merge_coverage(total: dict, part: dict) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            for sub, count in value.items():
                total[key][sub] = total[key].get(sub, 0) + count
        else:
            total[key] += value


def _chunks(kind: str, items: list, size: int) -> list[tuple[str, list]]:
    return [(kind, items[i : i + size]) for i in range(0, len(items), size)]


def list_archive(ctx: _Context, unit: ArchiveUnit) -> dict:
    """Task: the structure members of one archive (its headers only), with the skips and counts of listing."""
    skip, stats = Tally(), {}
    members = list_members(unit.archive, unit.display, skip, stats)
    return {"members": members, "skipped": skip.reasons, "stats": stats, "inputs": 1}


def _expand_archives(executor, options, units: list, skip: Tally, stats: dict) -> list:
    """``units`` with every archive replaced by its members, listed by tasks (in parallel on Ray)."""
    archives = [(unit,) for unit in units if isinstance(unit, ArchiveUnit)]
    if not archives:
        return units
    bar = progress_bar(options.progress, len(archives), "listing archives", "archive")
    listed = iter(executor.map(list_archive, archives, bar))
    if bar is not None:
        bar.close()
    out = []
    for unit in units:
        if not isinstance(unit, ArchiveUnit):
            out.append(unit)
            continue
        result = next(listed)
        _merge_tally(skip, result["skipped"])
        for key, count in result["stats"].items():
            stats[key] = stats.get(key, 0) + count
        out += result["members"]
    return out


def _fingerprint(config: BuildConfig, options: GroupedOptions, groups: list, revision: int) -> str:
    described = {
        "config": {k: v for k, v in vars(config).items() if k not in ("out", "workers", "overwrite")},
        "group_size": options.group_size,
        "revision": revision,
        "groups": [[kind, [getattr(x, "display", None) or repr(x) for x in items]] for kind, items in groups],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _load_ontology_and_index(config: BuildConfig, skip: Tally, skip_term: Tally, inputs: dict):
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


def _sides(keys: list[list[str]], fraction: float, seed: int, history: dict) -> list[str]:
    """Train/held-out per new record; a cluster that holds records of earlier revisions keeps their side."""
    if not history["keys"]:
        return _split_of(keys, fraction, seed)  # exactly the single-pass build's split
    roots = cluster_roots(history["keys"] + keys)
    old = len(history["keys"])
    fixed: dict[str, str] = {}
    for root, side in zip(roots[:old], history["sides"]):
        fixed.setdefault(root, side)
    return [fixed.setdefault(root, side_of(root, fraction, seed)) for root in roots[old:]]


def _existing_manifests(out: str, split_names: list) -> list:
    found = []
    for name in ("train", "heldout", None):
        target = storage.join(out, name) if name else out
        if storage.exists(storage.join(target, MANIFEST_NAME)):
            found.append(target)
    return found


def _start_over(out: str, state: str, split_names: list) -> None:
    """--overwrite: remove the build state and every shard the existing manifests list."""
    for target in _existing_manifests(out, split_names):
        try:
            manifest = load_manifest(target)
        except ValueError:
            manifest = None
        for shard in manifest.shards if manifest else []:
            storage.remove_file(shard.path)
        storage.remove_file(storage.join(target, MANIFEST_NAME))
    storage.remove_tree(state)


def _history(state: str, upto_gid: int, with_split: bool) -> dict:
    """Ids, split keys, sides, accessions used and shard records of the groups before ``upto_gid``."""
    history = {"ids": [], "keys": [], "sides": [], "used_accessions": set(), "shards": {}}
    for gid in range(upto_gid):
        a = _read_json(storage.join(state, f"a-{gid:06d}.json"))
        b = _read_json(storage.join(state, f"b-{gid:06d}.json"))
        if a is None or b is None:
            raise BuildInputError(f"{state}: completion records of group {gid} are missing (damaged build state)")
        history["ids"] += b["ids"]
        history["keys"] += [keys for _, keys, _ in a["records"]]
        history["sides"] += b["sides"] if with_split else []
        history["used_accessions"] |= set(a["used_accessions"])
        history["shards"][gid] = b
    return history


def _revision(config, options, groups, out, state, split_names) -> tuple[int, int, str, dict | None]:
    """(revision, first group id, fingerprint, plan of the previous state) of this build.

    The same command as the build in ``out`` resumes it (or, finished, redoes nothing), with or
    without ``--overwrite``; another command needs ``--overwrite`` (start over) or, once the build
    in ``out`` is finished, ``--append`` (a new revision).
    """
    plan = _read_json(storage.join(state, "plan.json"))
    if plan is not None:
        same = _fingerprint(config, options, groups, plan["revision"])
        if same == plan["fingerprint"]:
            return plan["revision"], plan["first_gid"], same, plan
    if config.overwrite:
        _start_over(out, state, split_names)
        return 0, 0, _fingerprint(config, options, groups, 0), None
    if plan is None:
        if _existing_manifests(out, split_names):
            raise BuildInputError(f"{out}: holds shards of another build; pass --overwrite to replace them")
        return 0, 0, _fingerprint(config, options, groups, 0), None
    if not plan["finished"]:
        raise BuildInputError(
            f"{out}: holds an unfinished build of another command; rerun that command to finish it, "
            "or pass --overwrite to start over"
        )
    if not options.append:
        raise BuildInputError(f"{out}: holds a finished build; pass --append to add a revision, or --overwrite")
    layout = {"split_names": split_names, "prefix": config.prefix}
    if plan.get("layout", layout) != layout:
        raise BuildInputError(
            f"{out}: --append must keep the split and prefix of the build there ({plan['layout']}, not {layout})"
        )
    revision = plan["revision"] + 1
    return revision, plan["next_gid"], _fingerprint(config, options, groups, revision), plan


def _check(config: BuildConfig, options: GroupedOptions):
    if options.group_size < 1:
        raise BuildInputError(f"group_size must be >= 1, got {options.group_size}")
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


def build_grouped(config: BuildConfig, options: GroupedOptions | None = None) -> dict:
    """Build shards group by group, resumably, here or on Ray (see the module docstring).

    Args:
        config: what to build (as for :func:`data_shards.build.build_shards`; ``out`` may be a URL).
        options: how (group size, Ray address, append, progress).

    Returns:
        The summary of :func:`~data_shards.build.build_shards` plus ``"build"``: engine, revision,
        groups (run, reused) and, per kind of input, inputs, records and skips.

    Raises:
        BuildInputError: bad configuration or inputs, or an output holding another build.
    """
    options = options or GroupedOptions()
    start = time.perf_counter()
    clusters = _check(config, options)
    out = str(config.out)
    state = str(storage.join(out, STATE_DIR))
    skip, skip_term, inputs, archive_stats = Tally(), Tally(), {}, {}
    ontology, index, tables = _load_ontology_and_index(config, skip, skip_term, inputs)
    units, no_structure = list_structure_units(config, tables, skip, archive_stats, expand_archives=False)
    split_names = ["train", "heldout"] if config.split_heldout is not None else [None]
    ctx = _Context(
        index, ontology, config.plddt, config.workers, out, state, config.prefix, config.samples_per_shard, split_names
    )
    if options.ray is not None:
        ctx.workers = 1  # one CPU per Ray task: its inputs are parsed in the task's own process
    executor = GroupRunner(ctx, options.ray, options.stall_timeout_s)
    units = _expand_archives(executor, options, units, skip, archive_stats)
    inputs["structure_files"] = [str(len(units))]
    groups = _chunks("structures", units, options.group_size) + _chunks("rows", no_structure, options.group_size)
    revision, first_gid, fingerprint, plan = _revision(config, options, groups, out, state, split_names)
    history = _history(state, first_gid, config.split_heldout is not None)
    revisions = [r for r in (plan or {}).get("revisions", []) if r["revision"] < revision]
    if plan is None or plan["fingerprint"] != fingerprint:
        plan = {"fingerprint": fingerprint, "revision": revision, "first_gid": first_gid, "finished": False}
        _write_json(storage.join(state, "plan.json"), {**plan, "revisions": revisions})
    reused = [0]

    def run_phase_a(jobs: list[tuple[int, str, list]]) -> list[dict]:
        done, todo = [], []
        for gid, kind, items in jobs:
            record = _read_json(_name(ctx, gid, "a.json"))
            done.append(record if record and record["fingerprint"] == fingerprint else None)
            if done[-1] is None:
                todo.append((gid, kind, items, fingerprint))
        bar = progress_bar(options.progress, sum(len(job[2]) for job in todo), f"revision {revision}: inputs", "input")
        results = iter(executor.map(group_records, todo, bar))
        if bar is not None:
            bar.close()
        reused[0] += len(jobs) - len(todo)
        return [record if record is not None else next(results) for record in done]

    records_a = run_phase_a([(first_gid + i, kind, items) for i, (kind, items) in enumerate(groups)])
    if config.standalone_sequences:  # entries no structure (of any revision) used, in input order
        used = history["used_accessions"] | {acc for record in records_a for acc in record["used_accessions"]}
        keys = [k for k in index.sequence_entries if index.proteins[k].accession not in used]
        gid = first_gid + len(records_a)
        chunks = _chunks("standalone", keys, options.group_size)
        records_a += run_phase_a([(gid + i, kind, items) for i, (kind, items) in enumerate(chunks)])
    # record ids unique over every revision, in input order, then the split of the whole build
    used_ids = set(history["ids"])
    rows_meta = []
    for record in records_a:
        for requested, cluster_keys, props in record["records"]:
            final, n = requested, 1
            while final in used_ids:
                n += 1
                final = f"{requested}#{n}"
            used_ids.add(final)
            rep = clusters.get(final) if clusters else None
            keys = [*cluster_keys, f"cluster:{rep}"] if rep is not None else cluster_keys
            rows_meta.append((record["gid"], final, keys, props, rep is not None))
    all_keys = [row[2] for row in rows_meta]
    if config.split_heldout is not None:
        sides = _sides(all_keys, config.split_heldout, config.split_seed, history)
    else:
        sides = [None] * len(all_keys)
    peak = [max([r.get("peak_rss_mb", 0.0) for r in records_a], default=0.0)]
    done_b = _run_phase_b(ctx, executor, options, records_a, rows_meta, sides, fingerprint, revision, peak)
    for record in records_a:
        _merge_tally(skip, record["skipped"])
        _merge_tally(skip_term, record["skipped_terms"])
    listed = sum(row[4] for row in rows_meta)
    split_info = (
        {"split_clusters": {"records_listed": listed, "records_unlisted": len(rows_meta) - listed}} if clusters else {}
    )
    stats = {
        "structure_units": len(units),
        "table_sequence_mismatches": sum(r["table_mismatches"] for r in records_a),
        "skipped_samples": skip.total,
        "skipped_terms": skip_term.total,
        **archive_stats,
    }
    this_revision = {
        "revision": revision,
        "fingerprint": fingerprint,
        "first_gid": first_gid,
        "next_gid": first_gid + len(records_a),
        "num_samples": len(rows_meta),
        "inputs": inputs,
    }
    revisions.append(this_revision)
    total = sum(r["num_samples"] for r in revisions)
    extra = {
        "generator": "data_shards.ray_build",
        "inputs": inputs,
        "split_heldout": config.split_heldout,
        "split_seed": config.split_seed if config.split_heldout is not None else None,
        "split_key": "clusters of shared UniProt accession or identical sequence (union-find)"
        + (f" joined by the sequence clusters of {Path(config.split_clusters).name}" if clusters else ""),
        "build": {"group_size": options.group_size, "revisions": revisions},
        "skipped": skip.to_json(),
        "skipped_terms": skip_term.to_json(),
        "stats": stats,
        **split_info,
    }
    splits_summary = {}
    if total:
        all_b = {**history["shards"], **done_b}
        for name in split_names:
            splits_summary[name or "all"] = _publish_split(out, name, all_b, extra)
        layout = {"split_names": split_names, "prefix": config.prefix}
        finished = {**this_revision, "finished": True, "revisions": revisions, "layout": layout}
        _write_json(storage.join(state, "plan.json"), finished)
    by_input: dict[str, dict] = {}
    for record in records_a:
        entry = by_input.setdefault(record["kind"], {"groups": 0, "inputs": 0, "records": 0, "skipped": 0})
        entry["groups"] += 1
        entry["inputs"] += record["inputs"]
        entry["records"] += len(record["records"])
        entry["skipped"] += sum(e["count"] for e in record["skipped"].values())
    by_source: dict[str, int] = {}
    for split in splits_summary.values():
        for source, count in split["coverage"]["sources"].items():
            by_source[source] = by_source.get(source, 0) + count
    summary = {
        "ok": total > 0,
        "out": out,
        "num_samples": total,
        "splits": splits_summary,
        "skipped": skip.to_json(),
        "skipped_terms": skip_term.to_json(),
        "stats": stats,
        **split_info,
        "build": {
            "engine": "ray" if options.ray is not None else "local",
            "revision": revision,
            "groups": len(records_a),
            "groups_reused": reused[0],
            "by_input": by_input,
            "worker_peak_rss_mb": peak[0],
            "records_by_source": dict(sorted(by_source.items())),
        },
        "seconds": round(time.perf_counter() - start, 2),
    }
    if options.progress or (options.progress is None and sys.stderr.isatty()):
        print(summary_text(summary), file=sys.stderr)
    return summary


def summary_text(summary: dict) -> str:
    """A few lines for a person watching the build: records per source and split, skips by reason."""
    build = summary["build"]
    lines = [
        f"built {summary['num_samples']} records in {summary['seconds']:.1f} s "
        f"(revision {build['revision']}, {build['groups']} groups, {build['groups_reused']} reused, "
        f"{build['engine']} engine, worker peak {build['worker_peak_rss_mb']:.0f} MiB)",
        "  by source: " + ", ".join(f"{k} {v}" for k, v in build["records_by_source"].items()),
        "  by split: " + ", ".join(f"{k} {v['num_samples']}" for k, v in summary["splits"].items()),
        "  by input: "
        + ", ".join(
            f"{k} {v['inputs']} inputs -> {v['records']} records, {v['skipped']} skipped"
            for k, v in build["by_input"].items()
        ),
    ]
    skipped = sorted(summary["skipped"].items(), key=lambda kv: -kv[1]["count"])
    lines.append(f"  skipped {sum(e['count'] for _, e in skipped)}:" + ("" if skipped else " none"))
    lines += [f"    {entry['count']:>8}  {reason}" for reason, entry in skipped]
    return "\n".join(lines)


def _run_phase_b(ctx, executor, options, records_a, rows_meta, sides, fingerprint, revision, peak) -> dict[int, dict]:
    """Write every group's shards (reusing groups whose completion record matches); {gid: record};
    ``peak[0]`` is raised to the highest worker memory reported."""
    per_group: dict[int, list] = {}
    for (gid, final, _, props, _), side in zip(rows_meta, sides):
        per_group.setdefault(gid, []).append((final, side, props))
    jobs, done = [], {}
    for record in records_a:
        gid = record["gid"]
        members = per_group.get(gid, [])
        ids, group_sides, props = [m[0] for m in members], [m[1] for m in members], [m[2] for m in members]
        digest = hashlib.sha256(json.dumps([fingerprint, ids, group_sides, props], sort_keys=True).encode()).hexdigest()
        existing = _read_json(_name(ctx, gid, "b.json"))
        if existing and existing["fingerprint"] == digest:
            done[gid] = existing
        else:
            jobs.append((gid, ids, group_sides, props, digest))
    bar = progress_bar(options.progress, len(jobs), f"revision {revision}: shards", "group")
    for job, result in zip(jobs, executor.map(group_shards, jobs, bar)):
        peak[0] = max(peak[0], result.pop("peak_rss_mb"))
        done[job[0]] = result
    if bar is not None:
        bar.close()
    return done


def _publish_split(out: str, name: str | None, all_b: dict, extra: dict) -> dict:
    """Write one split's manifest over every group's shards (all revisions, in group order)."""
    label = name or "all"
    shards, coverage = [], _coverage()
    for gid in sorted(all_b):
        part = all_b[gid]["splits"].get(label)
        if part:
            shards += part["shards"]
            _merge_coverage(coverage, part["coverage"])
    target = storage.join(out, name) if name else out
    _publish_manifest(target, shards, {**extra, "split": label, "coverage": coverage})
    return {
        "dir": str(target),
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_shards": len(shards),
        "coverage": coverage,
    }


def _publish_manifest(target, shards: list[dict], extra: dict) -> None:
    """Write ``target/manifest.json`` (local: atomic rename; URL: one PUT after every shard)."""
    if not storage.is_url(target):
        Path(target).mkdir(parents=True, exist_ok=True)
        write_manifest(target, shards, extra)
        load_manifest(target)  # the union must be sound before anyone reads it
        return
    with tempfile.TemporaryDirectory(prefix="align-pro-manifest-") as tmp:
        write_manifest(tmp, shards, extra)
        storage.upload_file(Path(tmp) / MANIFEST_NAME, storage.join(target, MANIFEST_NAME))
