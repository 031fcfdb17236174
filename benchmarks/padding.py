"""Padding with and without length-aware batching, on real protein lengths.

Writes a shard set of sequence-only records (the chains of ``../shared/data/annotations/
pdb_chains.tsv`` by default, or any TSV with a ``sequence`` column), then walks one epoch of the
local loader for each ``data.length_grouping`` setting and reports the padding fraction of the
collated ``seq_tokens`` (pad positions / all positions, :func:`pretrain.data.batching.padding_fraction`),
the token positions the encoders see per epoch and the collation time.

    python benchmarks/padding.py --work /tmp/padding --windows 8 16 64 --batch 32
"""

from __future__ import annotations

import argparse
import csv
import itertools
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from data_shards.manifest import load_manifest
from data_shards.schema import ProteinRecord
from data_shards.writer import ShardWriter
from pretrain.config import load_config
from pretrain.data.batching import padding_fraction
from pretrain.data.stream import Cursor, local_stream, plan_for

DEFAULT_TABLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "annotations" / "pdb_chains.tsv"


def read_sequences(table: Path) -> list[str]:
    """The non-empty ``sequence`` column of a TSV (ValueError naming the file when it has none)."""
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "sequence" not in rows[0]:
        raise ValueError(f"{table}: expected a TSV with a 'sequence' column")
    return [r["sequence"] for r in rows if r["sequence"]]


def write_shards(seqs: list[str], out: Path) -> None:
    """Sequence-only records ``C<i>`` in shards of 256 under ``out`` (kept when already written)."""
    if (out / "manifest.json").is_file():
        return
    with ShardWriter(str(out), samples_per_shard=256) as w:
        for i, s in enumerate(seqs):
            w.write(ProteinRecord(id=f"C{i}", sequence=s, backbone=None, text=None, meta={"source": "pdb"}))


def one_rank_plan(shards: Path, cache: Path, batch: int, max_len: int, setting: list[str]):
    """(config, plan) of one rank over ``shards`` at ``batch`` with the recipe overrides ``setting``."""
    cfg = load_config(
        overrides=[
            f"data.train_shards={shards}",
            f"data.batch_size={batch}",
            f"model.sequence.max_length={max_len}",
            f"data.length_cache={cache}",
            "data.text_augment=false",
            *setting,
        ]
    )
    return cfg, plan_for(cfg, load_manifest(str(shards)), 1, 0)


def one_epoch(shards: Path, cache: Path, batch: int, max_len: int, setting: list[str]) -> dict:
    """Padding, token positions and collation seconds of one epoch of one rank under ``setting``."""
    cfg, plan = one_rank_plan(shards, cache, batch, max_len, setting)
    n = plan.batches_per_epoch(0)
    start, fractions, positions = time.perf_counter(), [], 0
    for b, _, _ in itertools.islice(local_stream(cfg, plan, Cursor(), {}), n):
        fractions.append(padding_fraction(b))
        positions += b["seq_tokens"].numel()
    return {
        "batches": n,
        "padding": float(np.mean(fractions)),
        "positions": positions,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="TSV with a 'sequence' column")
    p.add_argument("--work", type=Path, required=True, help="folder for the shards and the lengths cache")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=1022)
    p.add_argument("--windows", type=int, nargs="+", default=[8, 16, 64], help="data.length_window values")
    p.add_argument("--repeats", type=int, default=3, help="epochs timed per setting (padding is deterministic)")
    args = p.parse_args(argv)
    seqs = read_sequences(args.table)
    lengths = np.array([len(s) for s in seqs])
    write_shards(seqs, args.work / "train")
    print(
        f"# {platform.processor() or platform.machine()}; {len(seqs)} sequences from {args.table.name}: "
        f"length median {int(np.median(lengths))}, p90 {int(np.percentile(lengths, 90))}, max {lengths.max()}; "
        f"batch {args.batch}, crop {args.max_length}, one rank"
    )
    print(
        "| data.length_grouping | window (batches) | batches | padding | token positions per epoch "
        "| collate s (median [min, max]) |"
    )
    print("|---|---|---:|---:|---:|---|")
    settings = [("none", "–", ["data.length_grouping=none"])]
    settings += [("window", str(w), ["data.length_grouping=window", f"data.length_window={w}"]) for w in args.windows]
    for name, window, setting in settings:
        runs = [
            one_epoch(args.work / "train", args.work / "cache", args.batch, args.max_length, setting)
            for _ in range(args.repeats)
        ]
        secs = [r["seconds"] for r in runs]
        r = runs[0]
        print(
            f"| {name} | {window} | {r['batches']} | {100 * r['padding']:.1f} % | {r['positions']:,} "
            f"| {statistics.median(secs):.2f} [{min(secs):.2f}, {max(secs):.2f}] |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
