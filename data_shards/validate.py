"""Validate and inspect shard directories.

``validate_dir`` re-reads a directory against its manifest (checksums, counts, every sample) and
never raises on bad data: it returns a JSON-able report whose "ok" is True only
when the manifest loads, every listed shard exists with the recorded size, sha256, key digest,
sample count and modality counts, and every sample decodes and passes schema validation.
Directories may be object-storage URLs or ``pipe:`` templates (:mod:`data_shards.storage`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_shards import storage
from data_shards.manifest import ManifestError, keys_digest, load_manifest
from data_shards.reader import BadSampleError, BadShardError, ShardReader
from data_shards.schema import MODALITIES, TEXT_REWRITES_FIELD

MAX_REPORTED_BAD_SAMPLES = 200


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file (or URL), read in chunks."""
    return _sha256_and_size(path, chunk)[0]


def _sha256_and_size(path: str | Path, chunk: int = 1 << 20) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with storage.open_read(path) as handle:
        while block := handle.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def validate_dir(dir: str | Path, check_samples: bool = True) -> dict:
    """Check a shard directory; returns the report (see module docstring).

    Args:
        dir: directory holding manifest.json and the shards.
        check_samples: decode and validate every sample (else only files, checksums and counts).

    Returns:
        {"ok": bool, "dir": str, "error": str | None, "num_samples": int, "num_bad_samples": int,
         "shards": [{"name", "ok", "num_samples", "errors": [...]}], "bad_samples": [{"shard", "key",
         "reason"}] (at most MAX_REPORTED_BAD_SAMPLES), "unlisted_files": [...], "duplicate_keys": int}
    """
    report = {
        "ok": False,
        "dir": str(dir),
        "error": None,
        "num_samples": 0,
        "num_bad_samples": 0,
        "shards": [],
        "bad_samples": [],
        "unlisted_files": [],
        "duplicate_keys": 0,
    }
    try:
        manifest = load_manifest(dir)
    except ManifestError as exc:
        report["error"] = str(exc)
        return report
    report["dir"] = str(manifest.dir)
    listed = {s.name for s in manifest.shards}
    names = [] if storage.is_pipe(manifest.dir) else storage.listdir(manifest.dir)
    report["unlisted_files"] = sorted(n for n in names if n.endswith(".tar") and n not in listed)
    all_keys: set[str] = set()
    for info in manifest.shards:
        entry = {"name": info.name, "ok": False, "num_samples": 0, "errors": []}
        report["shards"].append(entry)
        errors = entry["errors"]
        try:
            sha, size = _sha256_and_size(info.path)
        except (FileNotFoundError, IsADirectoryError):
            errors.append(f"{info.path}: listed in the manifest but missing")
            continue
        except storage.StorageError as exc:
            errors.append(f"{info.path}: listed in the manifest but unreadable ({exc.reason})")
            continue
        if size != info.bytes:
            errors.append(f"size {size} differs from the manifest's {info.bytes}")
        if sha != info.sha256:
            errors.append("sha256 differs from the manifest")
        try:
            reader = ShardReader(info.path)
        except BadShardError as exc:
            errors.append(str(exc))
            continue
        with reader:
            keys = reader.keys()
            entry["num_samples"] = len(keys)
            report["num_samples"] += len(keys)
            if len(keys) != info.num_samples:
                errors.append(f"{len(keys)} samples, the manifest says {info.num_samples}")
            if info.keys_sha256 is not None and keys_digest(keys) != info.keys_sha256:
                errors.append("sample keys differ from the manifest's keys_sha256")
            report["duplicate_keys"] += len(set(keys) & all_keys)
            all_keys.update(keys)
            if check_samples:
                counts = {m: 0 for m in MODALITIES}
                shard_bad = 0
                for i in range(len(reader)):
                    try:
                        record = reader.read(i)
                    except BadSampleError as exc:
                        shard_bad += 1
                        report["num_bad_samples"] += 1
                        if len(report["bad_samples"]) < MAX_REPORTED_BAD_SAMPLES:
                            report["bad_samples"].append({"shard": info.name, "key": exc.key, "reason": exc.reason})
                        continue
                    for modality in record.modalities():
                        counts[modality] += 1
                if shard_bad:
                    errors.append(f"{shard_bad} bad sample(s)")
                elif counts != info.modalities:
                    errors.append(f"modality counts {counts} differ from the manifest's {info.modalities}")
        entry["ok"] = not errors
    report["ok"] = all(s["ok"] for s in report["shards"]) and report["num_bad_samples"] == 0
    return report


def _stats(values: list[int]) -> dict | None:
    if not values:
        return None
    arr = np.asarray(values)
    return {
        "min": int(arr.min()),
        "mean": round(float(arr.mean()), 2),
        "median": float(np.median(arr)),
        "max": int(arr.max()),
    }


def _readable_records(manifest, on_bad: Callable[[int, dict], None], stop: Callable[[], bool] = lambda: False):
    """(shard info, sample key, record) of every readable sample in manifest order.

    An unreadable shard reports all its listed samples to ``on_bad(count, problem)``, an unreadable
    sample one; ``problem`` is {"shard", "reason"} (+ "key" for a sample). Both are skipped.
    ``stop()`` is asked before each read (a sample limit).
    """
    for info in manifest.shards:
        if stop():
            return
        try:
            reader = ShardReader(info.path)
        except BadShardError as exc:
            on_bad(info.num_samples, {"shard": info.name, "reason": str(exc)})
            continue
        with reader:
            keys = reader.keys()
            for i in range(len(reader)):
                if stop():
                    return
                try:
                    record = reader.read(i)
                except BadSampleError as exc:
                    on_bad(1, {"shard": info.name, "key": exc.key, "reason": exc.reason})
                    continue
                yield info, keys[i], record


def inspect_dir(dir: str | Path, samples: int = 3, limit: int | None = None) -> dict:
    """Summarise a shard directory: counts, modality coverage, lengths, a few samples.

    Args:
        dir: directory holding manifest.json and the shards.
        samples: how many samples to summarise (the first ones in manifest order).
        limit: read at most this many samples for the statistics (default: all).

    Returns:
        A JSON-able dict; bad samples are counted, not raised.

    Raises:
        ManifestError: the manifest cannot be loaded.
    """
    manifest = load_manifest(dir)
    seq_lengths, struct_lengths, go_counts, rewrite_counts = [], [], [], []
    counts = {"read": 0, "bad": 0, "plddt": 0, "missing_atoms": 0, "ec": 0, "definitions": 0}
    sources: dict[str, int] = {}
    shown = []

    problems: list[dict] = []  # every unreadable shard, and the first MAX_REPORTED_BAD_SAMPLES bad samples

    def bad(count: int, problem: dict) -> None:
        counts["bad"] += count
        if "key" not in problem or len(problems) < MAX_REPORTED_BAD_SAMPLES:
            problems.append(problem)

    def full() -> bool:
        return limit is not None and counts["read"] >= limit

    for info, key, record in _readable_records(manifest, bad, stop=full):
        counts["read"] += 1
        sources[str(record.meta.get("source"))] = sources.get(str(record.meta.get("source")), 0) + 1
        if record.sequence is not None:
            seq_lengths.append(len(record.sequence))
        if record.backbone is not None:
            struct_lengths.append(len(record.backbone))
            counts["plddt"] += record.backbone.plddt is not None
            counts["missing_atoms"] += not record.backbone.atom_mask.all()
        if record.text is not None:
            go_counts.append(len(record.text["go"]))
            rewrite_counts.append(len(record.text.get(TEXT_REWRITES_FIELD, [])))
            counts["ec"] += bool(record.text["ec"])
            counts["definitions"] += any("definition" in t for t in record.text["go"])
        if len(shown) < samples:
            shown.append(_summary(record, key, info.name))
    total = manifest.num_samples
    return {
        "dir": str(manifest.dir),
        "num_samples": total,
        "num_shards": len(manifest.shards),
        "coverage": {m: round(manifest.modalities[m] / total, 4) if total else 0.0 for m in MODALITIES},
        "modalities": manifest.modalities,
        "extra": manifest.extra,
        "read": counts["read"],
        "bad_samples": counts["bad"],
        "problems": problems,  # which shard / sample is bad and why
        "sequence_length": _stats(seq_lengths),
        "structure_length": _stats(struct_lengths),
        "structures_with_plddt": counts["plddt"],
        "structures_with_missing_atoms": counts["missing_atoms"],
        "go_terms_per_text": _stats(go_counts),
        "texts_with_ec": counts["ec"],
        "texts_with_go_definitions": counts["definitions"],
        "texts_with_rewrites": sum(n > 0 for n in rewrite_counts),
        "rewrites_per_text": _stats(rewrite_counts),
        "sources": dict(sorted(sources.items())),
        "samples": shown,
    }


def _summary(record, key: str, shard: str) -> dict:
    out = {"shard": shard, "key": key, "id": record.id, "modalities": sorted(record.modalities())}
    if record.sequence is not None:
        out["sequence"] = record.sequence[:40] + ("..." if len(record.sequence) > 40 else "")
        out["length"] = len(record.sequence)
    if record.backbone is not None:
        out["structure_length"] = len(record.backbone)
        out["has_plddt"] = record.backbone.plddt is not None
    if record.text is not None:
        out["name"] = record.text["name"]
        out["function"] = record.text["function"][:120]
        out["go"] = [t["id"] for t in record.text["go"]]
        out["ec"] = record.text["ec"]
        if record.text.get(TEXT_REWRITES_FIELD):
            out["rewrites"] = [r[:120] for r in record.text[TEXT_REWRITES_FIELD]]
    out["meta"] = record.meta
    return out


def write_fasta(dir: str | Path, out: str | Path, width: int = 60) -> dict:
    """Write the sequences of a shard directory as FASTA, one ``>record_id`` entry per protein.

    The ids are what ``build --split-clusters`` matches a cluster table against (see
    ``data_shards.clusters``). Records without a sequence are counted, bad samples skipped and
    counted; the file is written to a temporary name and renamed when complete.

    Returns:
        {"ok", "out", "sequences", "without_sequence", "bad_samples"}.

    Raises:
        ManifestError: the manifest cannot be loaded. OSError: ``out`` cannot be written.
    """
    manifest = load_manifest(dir)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    counts = {"sequences": 0, "without_sequence": 0, "bad_samples": 0}

    def bad(count: int, problem: dict) -> None:
        counts["bad_samples"] += count

    with open(tmp, "w", encoding="utf-8") as f:
        for _, _, record in _readable_records(manifest, bad):
            if not record.sequence:
                counts["without_sequence"] += 1
                continue
            lines = [record.sequence[j : j + width] for j in range(0, len(record.sequence), width)]
            f.write(f">{record.id}\n" + "\n".join(lines) + "\n")
            counts["sequences"] += 1
    tmp.replace(out)
    return {"ok": counts["bad_samples"] == 0, "out": str(out), **counts}
