"""Throughput of the data pipeline: shard build (samples/s) and decode + featurise + collate.

Stage 1 builds shards with ``data_shards.build`` from the real shared data when it is present
(``../shared/data``: structures + ``pdb_chains.tsv`` + the GO OBO), else from the demo corpus
generator, once per worker count. Stage 2 reads the built shards through
``pretrain.data.stream.BatchSource`` in one process (what one Ray reader actor does: decode,
featurise structure graphs, tokenise text, collate) with the demo recipe's settings.
A markdown table is appended to BENCHMARKS.md with the machine's CPU model.

    python benchmarks/data_pipeline.py                       # workers 1 and 2, 512 samples read
    python benchmarks/data_pipeline.py --workers 1,4 --read-samples 1024 --no-append

``--ray`` measures the grouped build (:mod:`data_shards.ray_build`) as Ray tasks instead: on a
generated Swiss-Prot flat file (``--sprot-entries``, gzipped, one stream) and a generated
AlphaFold-DB-style tar (``--af-models`` gzipped PDB models with pLDDT in the B-factor column,
copies of ``../shared/data/alphafold`` under new accessions, or synthetic backbones without it),
with a local Ray instance of 1 and 2 CPUs (``--ray-workers``) and, with ``--two-node``, a
2-node cluster on loopback (``ray start`` head + worker, one CPU each). It reports samples/s,
the peak resident memory of a Ray worker, and projects wall times from the per-core rate.

    python benchmarks/data_pipeline.py --ray --sprot-entries 20000 --af-models 5000 --two-node --no-append
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHARED = REPO.parent / "shared" / "data"

from _common import cpu_name, markdown_section, publish  # noqa: E402


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


# ----------------------------------------------------------------------------- Ray build

AMINO = "ACDEFGHIKLMNPQRSTVWY"
THREE = dict(zip(AMINO, "ALA CYS ASP GLU PHE GLY HIS ILE LYS LEU MET ASN PRO GLN ARG SER THR VAL TRP TYR".split()))


def _accession(i: int) -> str:
    """A UniProt-shaped accession that no real entry of the shared data uses."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return f"X{letters[i // 26**2 % 26]}{letters[i // 26 % 26]}{letters[i % 26]}{i // 26**3 % 10}{i % 10}"


def _sequence(i: int, length: int) -> str:
    import random

    rng = random.Random(i)
    return "".join(rng.choice(AMINO) for _ in range(length))


def make_sprot_flat(path: Path, entries: int) -> Path:
    """A gzipped UniProtKB flat file of ``entries`` reviewed entries (name, function, GO, sequence)."""
    import gzip

    with gzip.open(path, "wt") as out:
        for i in range(entries):
            seq = _sequence(i, 80 + i % 300)
            lines = [
                f"ID   GEN{i}_HUMAN              Reviewed;         {len(seq)} AA.",
                f"AC   {_accession(i)};",
                f"DE   RecName: Full=Generated protein {i};",
                "OS   Homo sapiens (Human).",
                "OX   NCBI_TaxID=9606;",
                f"CC   -!- FUNCTION: Catalyzes reaction {i % 97} of the generated pathway.",
                "DR   GO; GO:0005737; C:cytoplasm; IDA:UniProtKB.",
                "PE   1: Evidence at protein level;",
                f"SQ   SEQUENCE   {len(seq)} AA;  0 MW;  0 CRC64;",
                *(
                    "     " + " ".join(seq[j : j + 10] for j in range(k, min(k + 60, len(seq)), 10))
                    for k in range(0, len(seq), 60)
                ),
                "//",
            ]
            out.write("\n".join(lines) + "\n")
    return path


def _synthetic_model(i: int) -> bytes:
    """A gzipped AlphaFold-style PDB model: title, one chain, pLDDT in the B-factor column."""
    import gzip
    import math

    seq = _sequence(i, 100 + i % 200)
    lines = [f"TITLE     ALPHAFOLD MONOMER V2.0 PREDICTION FOR GENERATED PROTEIN {i}"]
    serial = 1
    for r, letter in enumerate(seq, 1):
        for name, dx in (("N", 0.0), ("CA", 1.46), ("C", 2.0), ("O", 2.6)):
            x, y = 3.8 * r * math.cos(r / 10) + dx, 3.8 * r * math.sin(r / 10)
            plddt = 50 + (r * 7 + i) % 50
            lines.append(
                f"ATOM  {serial:>5}  {name:<3} {THREE[letter]} A{r:>4}    {x:8.3f}{y:8.3f}{r * 1.5:8.3f}"
                f"  1.00{plddt:6.2f}           {name[0]}"
            )
            serial += 1
    return gzip.compress(("\n".join(lines) + "\nEND\n").encode())


def make_af_tar(path: Path, models: int) -> tuple[Path, str]:
    """An AlphaFold-DB-style tar of ``models`` gzipped PDB models; returns (path, what the models are)."""
    import io
    import tarfile

    real = sorted((SHARED / "alphafold").glob("AF-*.pdb.gz"))
    with tarfile.open(path, "w") as tar:
        for i in range(models):
            data = real[i % len(real)].read_bytes() if real else _synthetic_model(i)
            info = tarfile.TarInfo(f"AF-{_accession(i)}-F1-model_v4.pdb.gz")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    what = f"copies of the {len(real)} shared AlphaFold models" if real else "synthetic backbones"
    return path, what


def ray_build_stage(inputs: dict, out: Path, cpus: int, address: str | None, group_size: int) -> dict:
    """One grouped build as Ray tasks; ``address`` None starts a local Ray with ``cpus`` CPUs."""
    import ray

    from data_shards.build import BuildConfig
    from data_shards.ray_build import GroupedOptions, build_grouped

    if address is None:
        ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
        _wait_for_nodes(2)
    try:
        # warm the workers (start + imports), as a long build amortises them
        warm = ray.remote(num_cpus=1)(lambda: __import__("data_shards.ray_build") and __import__("webdataset"))
        ray.get([warm.remote() for _ in range(cpus)])
        start = time.perf_counter()
        summary = build_grouped(
            BuildConfig(out=out, **inputs), GroupedOptions(group_size=group_size, ray="auto", stall_timeout_s=600)
        )
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {"samples": summary["num_samples"], "seconds": seconds, "peak_mb": summary["build"]["worker_peak_rss_mb"]}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_node_cluster() -> tuple[str, list, Path]:
    """A head and a second node (1 CPU each) on loopback, each a ``ray start --block`` process in its
    own process group (stopped by :func:`_stop_nodes`, never ``ray stop``, which would stop other
    Ray instances on the machine); returns (address, processes, Ray's temporary folder)."""
    import subprocess

    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp = Path(tempfile.mkdtemp(prefix="ap-ray-"))  # short: Ray's socket paths have a length limit
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    common = ["--num-cpus", "1", "--object-store-memory", str(200 << 20), "--block", "--disable-usage-stats"]
    head = [ray_bin, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1"]
    head += ["--include-dashboard", "false", "--temp-dir", str(temp / "ray"), *common]
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    procs = [subprocess.Popen(head, **quiet)]
    deadline = time.monotonic() + 120
    while not (temp / "ray" / "session_latest").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    address = f"127.0.0.1:{port}"
    node = [ray_bin, "start", "--address", address, *common]
    procs.append(subprocess.Popen(node, **quiet))
    return address, procs, temp


def _stop_nodes(procs: list) -> None:
    """SIGTERM each node's process group, SIGKILL it after 5 s."""
    import signal
    import subprocess

    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _wait_for_nodes(count: int) -> None:
    import ray

    deadline = time.monotonic() + 180
    while sum(n["Alive"] for n in ray.nodes()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray cluster did not reach {count} nodes in 180 s")
        time.sleep(1)


def ray_main(args) -> list[str]:
    """The ``--ray`` benchmark: rows of the markdown table (and the projection lines)."""
    rows, rates = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        sprot = make_sprot_flat(Path(tmp) / "uniprot_sprot.dat.gz", args.sprot_entries)
        tar, what = make_af_tar(Path(tmp) / "proteome.tar", args.af_models)
        cases = {
            f"Swiss-Prot flat file, {args.sprot_entries} generated entries (one gzip stream)": {
                "uniprot": [str(sprot)]
            },
            f"AlphaFold-style tar, {args.af_models} models ({what})": {"structures": [str(tar)]},
        }
        if args.only:
            cases = {k: v for k, v in cases.items() if k.lower().startswith(args.only)}
        for label, inputs in cases.items():
            for cpus in [int(w) for w in args.ray_workers.split(",")]:
                got = ray_build_stage(inputs, Path(tmp) / f"out-{len(rows)}", cpus, None, args.group_size)
                rate = got["samples"] / got["seconds"]
                rates[(label, cpus)] = rate
                rows.append(
                    f"| {label} | local Ray, {cpus} CPU | {got['samples']} | {got['seconds']:.1f} | {rate:.1f} "
                    f"| {got['peak_mb']:.0f} |"
                )
                print(rows[-1], flush=True)
            if args.two_node:
                address, procs, temp = _two_node_cluster()
                try:
                    got = ray_build_stage(inputs, Path(tmp) / f"out-{len(rows)}", 2, address, args.group_size)
                finally:
                    _stop_nodes(procs)
                    shutil.rmtree(temp, ignore_errors=True)
                rows.append(
                    f"| {label} | 2 Ray nodes on loopback, 1 CPU each | {got['samples']} | {got['seconds']:.1f} "
                    f"| {got['samples'] / got['seconds']:.1f} | {got['peak_mb']:.0f} |"
                )
                print(rows[-1], flush=True)
    af_label = next((k for k in cases if k.startswith("AlphaFold")), None)
    if af_label is None or (af_label, 1) not in rates:
        return rows, []
    per_core = rates[(af_label, 1)]
    lines = ["", f"Per-core rate (1-CPU row): {per_core:.1f} AlphaFold models/s.", ""]
    lines += [
        "| corpus | records | 1 node x 2 cores | 10 nodes x 32 cores | 100 nodes x 64 cores |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, count in (("Swiss-Prot + its AlphaFold models", 570_000), ("full AlphaFold DB", 214_000_000)):
        cells = [_hours(count / (per_core * cores)) for cores in (2, 320, 6400)]
        lines.append(f"| {name} | {count:,} | " + " | ".join(cells) + " |")
    return rows, lines


def _hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ray", action="store_true", help="benchmark the grouped build on Ray instead")
    parser.add_argument("--ray-workers", default="1,2", help="CPUs of the local Ray instance (--ray)")
    parser.add_argument("--sprot-entries", type=int, default=20000, help="generated Swiss-Prot entries (--ray)")
    parser.add_argument("--af-models", type=int, default=5000, help="models in the generated tar (--ray)")
    parser.add_argument("--group-size", type=int, default=256, help="inputs per Ray task (--ray)")
    parser.add_argument("--two-node", action="store_true", help="also a 2-node Ray cluster on loopback (--ray)")
    parser.add_argument("--only", choices=["swiss", "alphafold"], help="one of the two inputs only (--ray)")
    parser.add_argument("--workers", default="1,2", help="comma-separated build worker counts")
    parser.add_argument("--read-samples", type=int, default=512, help="samples read in stage 2")
    parser.add_argument("--no-append", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    target = None if args.no_append else REPO / "BENCHMARKS.md"  # where the section is appended
    if args.ray:
        rows, projection = ray_main(args)
        intro = [
            f"Device: **{cpu_name()}**; command: `python benchmarks/data_pipeline.py --ray --ray-workers "
            f"{args.ray_workers} --sprot-entries {args.sprot_entries} --af-models {args.af_models} "
            f"--group-size {args.group_size}{' --two-node' if args.two_node else ''}"
            f"{' --only ' + args.only if args.only else ''}`. Time from plan to "
            "manifest, workers already started; peak memory is the largest resident set of a Ray worker."
        ]
        table = [
            "| input | cluster | samples | seconds | samples/s | worker peak MiB |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
            *rows,
        ]
        publish(markdown_section("Shard build on Ray", intro, table, projection), target)
        return
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
    intro = [
        f"Device: **{cpu_name()}**; command: `python benchmarks/data_pipeline.py --workers {args.workers} "
        f"--read-samples {args.read_samples}`. Build time includes loading the GO OBO (~2 s) and the "
        "spawn of the worker pool; reading uses the shards of the last build, in shuffled order, "
        f"bad samples skipped: {bad}."
    ]
    table = ["| stage | parallelism | samples | seconds | samples/s |", "| --- | --- | ---: | ---: | ---: |", *rows]
    publish(markdown_section("Data pipeline throughput", intro, table), target)


if __name__ == "__main__":
    main()
