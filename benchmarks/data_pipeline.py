"""Throughput of the data pipeline: shard build (samples/s) and decode + featurise + collate.

Stage 1 builds shards with ``data_shards.build`` from the real shared data when it is present
(``../shared/data``: structures + ``pdb_chains.tsv`` + the GO OBO), else from the demo corpus
generator, once per worker count. Stage 2 reads the built shards through
``pretrain.data.stream.BatchSource`` in one process (what one Ray reader actor does: decode,
featurise structure graphs, tokenise text, collate) with the demo recipe's settings.
A markdown table is appended to BENCHMARKS.md with the machine's CPU model.

    python benchmarks/data_pipeline.py                       # workers 1 and 2, 512 samples read
    python benchmarks/data_pipeline.py --workers 1,4 --read-samples 1024 --no-append
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo and the number of usable cores."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model} ({len(os.sched_getaffinity(0))} cores)"


def build_stage(out: Path, workers: int) -> tuple[str, int, float]:
    """Build shards into ``out``; returns (source description, samples, seconds)."""
    if (SHARED / "annotations" / "pdb_chains.tsv").exists():
        from data_shards.build import BuildConfig, build_shards

        start = time.perf_counter()
        summary = build_shards(
            BuildConfig(
                out=out,
                structures=[str(SHARED / "structures")],
                annotations=[str(SHARED / "annotations" / "pdb_chains.tsv")],
                go_obo=str(SHARED / "annotations" / "go-basic_2021-12-15.obo.gz"),
                samples_per_shard=256,
                workers=workers,
            )
        )
        return "real: structures + pdb_chains.tsv + GO OBO", summary["num_samples"], time.perf_counter() - start
    from data_shards.demo_corpus import build_demo_corpus

    start = time.perf_counter()
    summary = build_demo_corpus(out, num_train=1600, num_heldout=0, samples_per_shard=256, seed=0)
    return "demo corpus (no shared data)", int(summary.get("num_train", 1600)), time.perf_counter() - start


def read_stage(shard_dir: Path, max_samples: int) -> tuple[int, float, int]:
    """Decode + featurise + collate through BatchSource; returns (samples, seconds, bad samples)."""
    import numpy as np

    from data_shards.manifest import load_manifest
    from pretrain.config import load_config
    from pretrain.data.stream import BatchSource

    cfg = load_config()
    manifest = load_manifest(shard_dir)
    refs = [(str(s.path), i) for s in manifest.shards for i in range(s.num_samples)][:max_samples]
    rng = np.random.default_rng(0)
    refs = [refs[i] for i in rng.permutation(len(refs))]  # training order is shuffled too
    source = BatchSource(cfg, views=None, train=True)
    batch_size = cfg.data.batch_size
    source.build(refs[:batch_size], [0, 0])  # warm-up: tokenizer and featuriser caches
    bad = 0
    start = time.perf_counter()
    for i in range(0, len(refs), batch_size):
        _, skipped = source.build(refs[i : i + batch_size], [0, i])
        bad += len(skipped)
    return len(refs), time.perf_counter() - start, bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated build worker counts")
    parser.add_argument("--read-samples", type=int, default=512, help="samples read in stage 2")
    parser.add_argument("--no-append", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # one reader actor = one process, one thread
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        last = None
        for workers in [int(w) for w in args.workers.split(",")]:
            out = Path(tmp) / f"w{workers}"
            source, samples, seconds = build_stage(out, workers)
            rows.append(
                f"| build ({source}) | {workers} workers | {samples} | {seconds:.1f} | {samples / seconds:.1f} |"
            )
            print(rows[-1], flush=True)
            last = out if (out / "manifest.json").exists() else out / "train"
        samples, seconds, bad = read_stage(last, args.read_samples)
        rows.append(
            f"| decode + featurise + collate (BatchSource, demo recipe, batch {32}) | 1 process, 1 thread "
            f"| {samples} | {seconds:.1f} | {samples / seconds:.1f} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"## Data pipeline throughput ({datetime.date.today().isoformat()})",
            "",
            f"Device: **{cpu_name()}**; command: `python benchmarks/data_pipeline.py --workers {args.workers} "
            f"--read-samples {args.read_samples}`. Build time includes loading the GO OBO (~2 s) and the "
            "spawn of the worker pool; reading uses the shards of the last build, in shuffled order, "
            f"bad samples skipped: {bad}.",
            "",
            "| stage | parallelism | samples | seconds | samples/s |",
            "| --- | --- | ---: | ---: | ---: |",
            *rows,
            "",
        ]
    )
    print(table)
    if not args.no_append:
        with open(REPO / "BENCHMARKS.md", "a") as handle:
            handle.write("\n" + table)


if __name__ == "__main__":
    main()
