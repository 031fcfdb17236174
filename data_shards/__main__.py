"""Command line: ``python -m data_shards {demo,build,rewrite,inspect,fasta,validate} ...``; every command prints JSON.

    python -m data_shards demo --out data/demo [--num-train 3200 --num-heldout 800
                                                --samples-per-shard 400 --seed 0]
    python -m data_shards build --out DIR [--structures DIR_OR_GLOB ...] [--annotations FILE ...]
                                [--uniprot FILE ...] [--fasta FILE ...] [--go-obo FILE] [--sifts FILE ...]
                                [--samples-per-shard N] [--workers N]
                                [--split-heldout FRACTION --split-seed S [--split-clusters TSV]]
                                [--resumable | --ray [auto|ADDRESS]] [--group-size N] [--append] [--progress]
    python -m data_shards rewrite --shards DIR --out DIR --backend {hf,openai} --model PATH_OR_NAME
                                  [--endpoint URL --api {chat,completions} --api-key-env VAR]
                                  [--cache FILE] [--variants N] [--temperature T] [--max-new-tokens N]
    python -m data_shards inspect data/demo/train [--samples 3] [--limit N]
    python -m data_shards fasta data/all --out all.fasta  # sequences, named by record id (for clustering)
    python -m data_shards validate data/demo/train     # exit 0 only when everything is sound

``build --resumable`` / ``build --ray [auto|ADDRESS]`` run the grouped build
(:mod:`data_shards.ray_build`): groups of inputs written as whole shards, on this machine or as Ray
tasks, resumed by rerunning the same command, grown with ``--append``; with a URL ``--out`` the
groups write there directly.

``--out`` of ``demo`` and ``build`` may be an object-storage URL (``s3://bucket/shards``): the
shards are written to a local temporary directory and uploaded, every ``manifest.json`` last, so a
reader never finds a manifest whose shards are not there yet. ``inspect`` and ``validate`` read
URLs directly.

Exit codes: 0 success, 1 validation found problems (inspect: some samples could not be read, listed
in ``problems``; build, rewrite: nothing usable was written), 2 the input could not be read at all
(rewrite: also the model or endpoint failed); with 2 the JSON is one line whose "error" names the
file.

Adding a command: write a ``_cmd_<name>(args) -> (dict, exit_code)`` function and register its
parser in ``_parser``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator

from data_shards import storage
from data_shards.manifest import MANIFEST_NAME, ManifestError
from data_shards.scratch import owned_tempdir


@contextlib.contextmanager
def _local_out(out: str) -> Iterator[str]:
    """``out`` itself when local; else a temporary directory published to the URL ``out`` on success."""
    if not storage.is_url(out):
        yield out
        return
    with owned_tempdir("align-pro-build-") as tmp:  # a killed build's copy is swept by the next one
        yield str(tmp)
        storage.upload_dir(tmp, out, last=(MANIFEST_NAME,))


def _point_at(summary, local: str, out: str):
    """Replace the temporary directory in a JSON summary by the URL it was published to."""
    if isinstance(summary, dict):
        return {k: _point_at(v, local, out) for k, v in summary.items()}
    if isinstance(summary, list):
        return [_point_at(v, local, out) for v in summary]
    if isinstance(summary, str) and local != out and summary.startswith(local):
        return out.rstrip("/") + summary[len(local) :]
    return summary


def _cmd_demo(args) -> tuple[dict, int]:
    from data_shards.demo_corpus import build_demo_corpus

    start = time.perf_counter()
    try:
        with _local_out(args.out) as out:
            summary = _point_at(_demo(build_demo_corpus, args, out), out, args.out)
    except storage.StorageError as exc:
        return {"ok": False, "error": str(exc)}, 2
    except OSError as exc:  # e.g. --out names a file
        return {"ok": False, "error": _os_error(exc, args.out, "cannot write the corpus")}, 2
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary, 0


def _demo(build_demo_corpus, args, out: str) -> dict:
    return build_demo_corpus(
        out,
        num_train=args.num_train,
        num_heldout=args.num_heldout,
        samples_per_shard=args.samples_per_shard,
        num_families=args.num_families,
        seed=args.seed,
        missing_rate=args.missing_rate,
    )


def _cmd_build(args) -> tuple[dict, int]:
    from data_shards.build import BuildConfig, BuildInputError, build_shards

    if args.ray is not None or args.resumable or args.append:  # writes to the URL itself, resumably
        try:
            summary, code = _build(BuildConfig, BuildInputError, build_shards, args, args.out)
        except storage.StorageError as exc:
            return {"ok": False, "error": str(exc)}, 2
        return summary, code
    try:
        with _local_out(args.out) as out:
            summary, code = _build(BuildConfig, BuildInputError, build_shards, args, out)
            if code != 0:  # nothing is published when the build failed
                raise _BuildFailed(summary, code)
    except _BuildFailed as failed:
        return failed.summary, failed.code
    except storage.StorageError as exc:
        return {"ok": False, "error": str(exc)}, 2
    return _point_at(summary, out, args.out), 0


class _BuildFailed(Exception):
    def __init__(self, summary: dict, code: int):
        super().__init__(code)
        self.summary, self.code = summary, code


def _build(BuildConfig, BuildInputError, build_shards, args, out: str) -> tuple[dict, int]:
    config = BuildConfig(
        out=out,
        structures=args.structures,
        annotations=args.annotations,
        annotations_format=args.annotations_format,
        uniprot=args.uniprot,
        fasta=args.fasta,
        go_obo=args.go_obo,
        sifts=args.sifts,
        data_roots=args.data_root,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        split_heldout=args.split_heldout,
        split_seed=args.split_seed,
        split_clusters=args.split_clusters,
        prefix=args.prefix,
        plddt=args.plddt,
        standalone_sequences=not args.no_standalone_sequences,
        overwrite=args.overwrite,
    )
    try:
        if args.ray is not None or args.resumable or args.append:
            from data_shards.ray_build import GroupedOptions, build_grouped

            options = GroupedOptions(
                group_size=args.group_size, ray=args.ray, append=args.append, progress=args.progress or None
            )
            summary = build_grouped(config, options)
        else:
            summary = build_shards(config)
    except BuildInputError as exc:
        return {"ok": False, "error": str(exc)}, 2
    return summary, 0 if summary["ok"] else 1


def _cmd_rewrite(args) -> tuple[dict, int]:
    import os

    from data_shards.llm_backends import BackendError, GenerationParams, make_backend
    from data_shards.rewrite import RewriteConfig, RewriteError, rewrite_shards

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            return {"ok": False, "error": f"environment variable {args.api_key_env} is not set"}, 2
    try:
        params = GenerationParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        )
        config = RewriteConfig(
            shards=args.shards,
            out=args.out,
            variants=args.variants,
            params=params,
            cache=args.cache,
            min_chars=args.min_chars,
            max_chars=args.max_chars,
            batch_size=args.batch_size,
            fallback=args.fallback,
            overwrite=args.overwrite,
        )
        backend = make_backend(
            args.backend,
            args.model,
            endpoint=args.endpoint,
            api=args.api,
            api_key=api_key,
            device=args.device,
            batch_size=args.batch_size,
            timeout_s=args.timeout,
            retries=args.retries,
            concurrency=args.concurrency,
        )
        progress = (lambda line: print(line, file=sys.stderr, flush=True)) if args.progress else None
        summary = rewrite_shards(config, backend, progress=progress)
    except (BackendError, RewriteError, ManifestError, ValueError) as exc:
        return {"ok": False, "error": str(exc)}, 2
    return summary, 0 if summary["ok"] else 1


def _cmd_inspect(args) -> tuple[dict, int]:
    from data_shards.validate import inspect_dir

    try:
        report = inspect_dir(args.dir, samples=args.samples, limit=args.limit)
        return report, 1 if report["bad_samples"] else 0
    except ManifestError as exc:
        return {"ok": False, "error": str(exc)}, 2


def _cmd_fasta(args) -> tuple[dict, int]:
    from data_shards.validate import write_fasta

    try:
        report = write_fasta(args.dir, args.out)
    except ManifestError as exc:
        return {"ok": False, "error": str(exc)}, 2
    except OSError as exc:
        return {"ok": False, "error": _os_error(exc, args.out, "cannot write the FASTA file")}, 2
    return report, 0 if report["ok"] else 1


def _os_error(exc: OSError, path: str, what: str) -> str:
    """One line naming ``path`` (the file the user gave) and the system's reason."""
    return f"{path}: {what} ({exc.strerror or exc})"


def _cmd_validate(args) -> tuple[dict, int]:
    from data_shards.validate import validate_dir

    report = validate_dir(args.dir)
    if report["error"] is not None:
        return report, 2
    return report, 0 if report["ok"] else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_shards", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="write the deterministic linked demo corpus (train + heldout)")
    demo.add_argument("--out", required=True, help="output root; writes OUT/train and OUT/heldout")
    demo.add_argument("--num-train", type=int, default=3200)
    demo.add_argument("--num-heldout", type=int, default=800)
    demo.add_argument("--samples-per-shard", type=int, default=400)
    demo.add_argument("--num-families", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--missing-rate", type=float, default=0.05, help="train samples lacking structure or text")
    demo.set_defaults(run=_cmd_demo)

    build = sub.add_parser("build", help="build shards from structures, UniProt, GAF, OBO and tables")
    build.add_argument("--out", required=True, help="output dir (OUT/train + OUT/heldout with --split-heldout)")
    build.add_argument("--structures", nargs="+", default=[], metavar="DIR_OR_GLOB", help="PDB/mmCIF files")
    build.add_argument(
        "--annotations",
        nargs="+",
        default=[],
        metavar="FILE",
        help="chain table, UniProt TSV, GAF, DeepFRI or SIFTS file (format auto-detected)",
    )
    build.add_argument(
        "--annotations-format",
        choices=["chains", "uniprot_tsv", "deepfri", "gaf", "sifts_uniprot", "sifts_enzyme"],
        help="force the format of every --annotations file",
    )
    build.add_argument("--uniprot", nargs="+", default=[], metavar="FILE", help="UniProt flat (.dat/.txt) or XML")
    build.add_argument("--fasta", nargs="+", default=[], metavar="FILE")
    build.add_argument("--go-obo", metavar="FILE", help="GO ontology (.obo or .obo.gz)")
    build.add_argument("--sifts", nargs="+", default=[], metavar="FILE", help="SIFTS pdb_chain_uniprot/enzyme")
    build.add_argument(
        "--data-root",
        nargs="+",
        default=[],
        metavar="DIR",
        help="extra folders that chain-table paths may point into",
    )
    build.add_argument("--samples-per-shard", type=int, default=1000)
    build.add_argument("--workers", type=int, default=1, help="structure-parsing processes")
    build.add_argument("--split-heldout", type=float, default=None, metavar="FRACTION")
    build.add_argument("--split-seed", type=int, default=0)
    build.add_argument(
        "--split-clusters",
        metavar="TSV",
        help="sequence clusters (MMseqs2 representative<TAB>member, ids = record ids) kept on one side",
    )
    build.add_argument("--prefix", default="shard", help="shard file prefix")
    build.add_argument("--plddt", choices=["auto", "always", "never"], default="auto")
    build.add_argument(
        "--no-standalone-sequences",
        action="store_true",
        help="do not write UniProt/FASTA entries that no structure used",
    )
    build.add_argument("--overwrite", action="store_true", help="replace existing shards")
    build.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="auto|ADDRESS",
        help="run the grouped build as Ray tasks (no value: a local Ray; auto: the running cluster)",
    )
    build.add_argument(
        "--resumable",
        action="store_true",
        help="grouped build on this machine: a rerun of the same command finishes a killed build",
    )
    build.add_argument("--group-size", type=int, default=64, help="inputs per group (grouped build)")
    build.add_argument(
        "--append", action="store_true", help="add the inputs as a new revision of the finished build in OUT"
    )
    build.add_argument("--progress", action="store_true", help="progress bar on stderr (default: on a terminal)")
    build.set_defaults(run=_cmd_build)

    rewrite = sub.add_parser("rewrite", help="add language-model rewrites of the function text to shards")
    rewrite.add_argument("--shards", required=True, help="input shard directory")
    rewrite.add_argument("--out", required=True, help="output shard directory")
    rewrite.add_argument("--backend", choices=["hf", "openai"], required=True)
    rewrite.add_argument("--model", required=True, help="local model directory (hf) or model name (openai)")
    rewrite.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000")
    rewrite.add_argument("--api", choices=["chat", "completions"], default="chat", help="endpoint flavour")
    rewrite.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key")
    rewrite.add_argument("--cache", metavar="FILE", help="sqlite cache (default OUT/rewrite-cache.sqlite)")
    rewrite.add_argument("--variants", type=int, default=2, help="rewrites per record")
    rewrite.add_argument("--max-new-tokens", type=int, default=160)
    rewrite.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    rewrite.add_argument("--top-p", type=float, default=0.95)
    rewrite.add_argument("--seed", type=int, default=0)
    rewrite.add_argument("--min-chars", type=int, default=20, help="shortest accepted rewrite")
    rewrite.add_argument("--max-chars", type=int, default=1200, help="longest accepted rewrite")
    rewrite.add_argument("--fallback", choices=["rule", "none"], default="rule", help="for rejected outputs")
    rewrite.add_argument("--batch-size", type=int, default=16, help="prompts per model call / cache commit")
    rewrite.add_argument("--concurrency", type=int, default=4, help="HTTP requests in flight (openai)")
    rewrite.add_argument("--timeout", type=float, default=60.0, help="HTTP request timeout in seconds")
    rewrite.add_argument("--retries", type=int, default=4, help="HTTP retries with exponential backoff")
    rewrite.add_argument("--device", default="cpu", help="torch device of the hf backend")
    rewrite.add_argument("--progress", action="store_true", help="progress lines on stderr")
    rewrite.add_argument("--overwrite", action="store_true", help="replace existing shards in OUT")
    rewrite.set_defaults(run=_cmd_rewrite)

    inspect = sub.add_parser("inspect", help="summarise a shard directory")
    inspect.add_argument("dir")
    inspect.add_argument("--samples", type=int, default=3, help="samples to show")
    inspect.add_argument("--limit", type=int, default=None, help="read at most this many samples")
    inspect.set_defaults(run=_cmd_inspect)

    fasta = sub.add_parser("fasta", help="write a shard directory's sequences as FASTA (for clustering)")
    fasta.add_argument("dir")
    fasta.add_argument("--out", required=True, help="FASTA file to write")
    fasta.set_defaults(run=_cmd_fasta)

    validate = sub.add_parser("validate", help="check a shard directory against its manifest")
    validate.add_argument("dir")
    validate.set_defaults(run=_cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; prints its JSON result and returns the exit code.

    With exit code 2 (an input that cannot be read at all) the JSON is printed on one line, its
    "error" naming the file and the problem: no traceback, nothing else to scroll through.
    """
    args = _parser().parse_args(argv)
    result, code = args.run(args)
    print(json.dumps(result, indent=None if code == 2 else 2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
