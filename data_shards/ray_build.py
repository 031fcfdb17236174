"""Grouped shard build: resumable, incremental, on one machine or as Ray tasks over a cluster.

``python -m data_shards build ... --resumable`` (one machine) and ``... --ray [auto|ADDRESS]``
(Ray tasks; a local Ray instance when no address is given) run the same plan and write
byte-identical output. Three modules:

* this one: the driver :func:`build_grouped` (plan, the two phases, manifests) and the summary a
  person reads (:func:`summary_text`);
* :mod:`data_shards.build_groups`: the tasks (listing an archive, phase A and phase B of a group);
* :mod:`data_shards.build_resume`: the build state in ``OUT/_build``, the fingerprint, the resume
  and append rules, and record ids and the split over every revision.

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

Resume and append (``--append``, a new revision of a finished build): see
:mod:`data_shards.build_resume`.

Limits: the fingerprint covers input names and options, not file contents (do not edit inputs
between a kill and the rerun); the driver holds every record's id and split keys (about 200 bytes
a record: fine for Swiss-Prot, tens of GB for all of AlphaFold DB). On Ray a group task whose
worker process dies is run once more with each file parsed in a child process, so a file that kills
its parser is skipped and counted (as the ``--workers`` pool does); a task that dies there too stops
the build.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from data_shards import storage
from data_shards.archives import ArchiveUnit
from data_shards.build import _coverage, split_fields
from data_shards.build_groups import GroupContext, group_records, group_shards, list_archive
from data_shards.build_inputs import (
    MAX_EXAMPLES,
    BuildConfig,
    BuildInputError,
    Tally,
    check_build_config,
    load_ontology_and_index,
)
from data_shards.build_inputs import structure_units as list_structure_units
from data_shards.build_resume import (
    STATE_DIR,
    chunks,
    final_rows,
    load_history,
    read_json,
    resolve_revision,
    sides,
    state_file,
    write_json,
)
from data_shards.manifest import MANIFEST_NAME, load_manifest, write_manifest
from data_shards.parallel_parse import GroupRunner, progress_bar

__all__ = ["STATE_DIR", "GroupedOptions", "build_grouped", "group_records", "group_shards", "summary_text"]


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
    ontology, index, tables = load_ontology_and_index(config, skip, skip_term, inputs)
    units, no_structure = list_structure_units(config, tables, skip, archive_stats, expand_archives=False)
    split_names = ["train", "heldout"] if config.split_heldout is not None else [None]
    ctx = GroupContext(
        index, ontology, config.plddt, config.workers, out, state, config.prefix, config.samples_per_shard, split_names
    )
    if options.ray is not None:
        ctx.workers = 1  # one CPU per Ray task: its inputs are parsed in the task's own process
    executor = GroupRunner(ctx, options.ray, options.stall_timeout_s)
    units = _expand_archives(executor, options, units, skip, archive_stats)
    inputs["structure_files"] = [str(len(units))]
    groups = chunks("structures", units, options.group_size) + chunks("rows", no_structure, options.group_size)
    revision, first_gid, fingerprint, plan = resolve_revision(
        config, options.group_size, options.append, groups, out, state, split_names
    )
    history = load_history(state, first_gid, config.split_heldout is not None)
    revisions = [r for r in (plan or {}).get("revisions", []) if r["revision"] < revision]
    if plan is None or plan["fingerprint"] != fingerprint:
        plan = {"fingerprint": fingerprint, "revision": revision, "first_gid": first_gid, "finished": False}
        write_json(storage.join(state, "plan.json"), {**plan, "revisions": revisions})

    phase_a = _PhaseA(ctx, executor, options, fingerprint, revision)
    records_a = phase_a.run([(first_gid + i, kind, items) for i, (kind, items) in enumerate(groups)])
    if config.standalone_sequences:  # entries no structure (of any revision) used, in input order
        used = history["used_accessions"] | {acc for record in records_a for acc in record["used_accessions"]}
        keys = [k for k in index.sequence_entries if index.proteins[k].accession not in used]
        gid = first_gid + len(records_a)
        standalone = chunks("standalone", keys, options.group_size)
        records_a += phase_a.run([(gid + i, kind, items) for i, (kind, items) in enumerate(standalone)])
    # record ids unique over every revision, in input order, then the split of the whole build
    rows_meta = final_rows(records_a, set(history["ids"]), clusters)
    all_keys = [row[2] for row in rows_meta]
    if config.split_heldout is not None:
        row_sides = sides(all_keys, config.split_heldout, config.split_seed, history)
    else:
        row_sides = [None] * len(all_keys)
    peak = max([r.get("peak_rss_mb", 0.0) for r in records_a], default=0.0)
    done_b, peak = _run_phase_b(ctx, executor, options, records_a, rows_meta, row_sides, fingerprint, revision, peak)

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
        **split_fields(config, clusters),
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
        write_json(storage.join(state, "plan.json"), finished)
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
            "groups_reused": phase_a.reused,
            "by_input": _by_input(records_a),
            "worker_peak_rss_mb": peak,
            "records_by_source": _by_source(splits_summary),
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


def _by_input(records_a: list[dict]) -> dict[str, dict]:
    """Per kind of input: groups, inputs, records made and inputs skipped."""
    by_input: dict[str, dict] = {}
    for record in records_a:
        entry = by_input.setdefault(record["kind"], {"groups": 0, "inputs": 0, "records": 0, "skipped": 0})
        entry["groups"] += 1
        entry["inputs"] += record["inputs"]
        entry["records"] += len(record["records"])
        entry["skipped"] += sum(e["count"] for e in record["skipped"].values())
    return by_input


def _by_source(splits_summary: dict) -> dict[str, int]:
    """Records per source over every split, sorted by source."""
    by_source: dict[str, int] = {}
    for split in splits_summary.values():
        for source, count in split["coverage"]["sources"].items():
            by_source[source] = by_source.get(source, 0) + count
    return dict(sorted(by_source.items()))


# ----------------------------------------------------------------------------- driver steps


def _check(config: BuildConfig, options: GroupedOptions):
    """Validate the options; the cluster table ({record id: representative}) or None."""
    if options.group_size < 1:
        raise BuildInputError(f"group_size must be >= 1, got {options.group_size}")
    return check_build_config(config)


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


class _PhaseA:
    """Runs phase A over lists of group jobs, reusing groups whose completion record matches;
    ``reused`` counts the groups reused so far."""

    def __init__(
        self, ctx: GroupContext, executor: GroupRunner, options: GroupedOptions, fingerprint: str, revision: int
    ):
        self.ctx, self.executor, self.options = ctx, executor, options
        self.fingerprint, self.revision, self.reused = fingerprint, revision, 0

    def run(self, jobs: list[tuple[int, str, list]]) -> list[dict]:
        """The phase-A completion record of every (gid, kind, items) job, in job order."""
        done, todo = [], []
        for gid, kind, items in jobs:
            record = read_json(state_file(self.ctx.state, gid, "a.json"))
            done.append(record if record and record["fingerprint"] == self.fingerprint else None)
            if done[-1] is None:
                todo.append((gid, kind, items, self.fingerprint))
        total = sum(len(job[2]) for job in todo)
        bar = progress_bar(self.options.progress, total, f"revision {self.revision}: inputs", "input")
        results = iter(self.executor.map(group_records, todo, bar))
        if bar is not None:
            bar.close()
        self.reused += len(jobs) - len(todo)
        return [record if record is not None else next(results) for record in done]


def _run_phase_b(
    ctx, executor, options, records_a, rows_meta, row_sides, fingerprint, revision, peak: float
) -> tuple[dict[int, dict], float]:
    """Write every group's shards (reusing groups whose completion record matches): ({gid: record},
    ``peak`` raised to the highest worker memory reported)."""
    per_group: dict[int, list] = {}
    for (gid, final, _, props, _), side in zip(rows_meta, row_sides):
        per_group.setdefault(gid, []).append((final, side, props))
    jobs, done = [], {}
    for record in records_a:
        gid = record["gid"]
        members = per_group.get(gid, [])
        ids, group_sides, props = [m[0] for m in members], [m[1] for m in members], [m[2] for m in members]
        digest = hashlib.sha256(json.dumps([fingerprint, ids, group_sides, props], sort_keys=True).encode()).hexdigest()
        existing = read_json(state_file(ctx.state, gid, "b.json"))
        if existing and existing["fingerprint"] == digest:
            done[gid] = existing
        else:
            jobs.append((gid, ids, group_sides, props, digest))
    bar = progress_bar(options.progress, len(jobs), f"revision {revision}: shards", "group")
    for job, result in zip(jobs, executor.map(group_shards, jobs, bar)):
        peak = max(peak, result.pop("peak_rss_mb"))
        done[job[0]] = result
    if bar is not None:
        bar.close()
    return done, peak


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
