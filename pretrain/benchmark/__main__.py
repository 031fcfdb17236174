"""``python -m pretrain.benchmark --export RUN/export --suite SUITE.yaml --out DIR [--base]``.

Loads the model once, embeds every protein the suite's tasks need once (sequence, structure where
the proteins table names a file, text when a task uses it), runs each task on the frozen
embeddings and writes ``DIR/results.json``, ``DIR/results.md`` and ``DIR/results.png``; task files
(splits, CAFA predictions) go under ``DIR/<row>/<task>/``. ``--base`` (or ``base: true`` in the
suite) adds the row of the same encoders before alignment (:func:`pretrain.benchmark.embedding.load_base`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from pretrain.benchmark.context import BenchmarkContext
from pretrain.benchmark.data import BenchmarkDataError, Proteins, read_proteins
from pretrain.benchmark.embedding import load_base, load_trained
from pretrain.benchmark.mmseqs import MMseqsError
from pretrain.benchmark.registry import TASKS
from pretrain.benchmark.results import write_results
from pretrain.benchmark.suite import from_dict, load_suite
from pretrain.errors import ConfigError

log = logging.getLogger("pretrain.benchmark")


def run_benchmark(
    export: str | Path,
    suite_path: str | Path,
    out: str | Path,
    base: bool | None = None,
    device: str = "cpu",
    data_root: str | Path | None = None,
) -> dict:
    """Run a suite on an export (and its base encoders); returns the result written to ``out``.

    Raises:
        ConfigError: a bad suite (unknown key, missing file). BenchmarkDataError: a malformed data
        file. MMseqsError: MMseqs2 missing or failing. FileNotFoundError / ValueError: a bad export.
    """
    suite = load_suite(suite_path, set(TASKS), data_root)
    configs = [
        from_dict(TASKS[t.type].config, t.options, f"{suite.path}: tasks[{i}] ({t.name})")
        for i, t in enumerate(suite.tasks)
    ]
    proteins = read_proteins(suite.proteins)
    table_rows = len(proteins.ids)
    for spec, cfg in zip(suite.tasks, configs):
        if TASKS[spec.type].extra is not None:
            add_rows(proteins, TASKS[spec.type].extra(suite, cfg, proteins, spec.name))
    wanted: set[str] = set()
    for spec, cfg in zip(suite.tasks, configs):
        wanted |= TASKS[spec.type].needs(suite, cfg, proteins, spec.name)
    added = len(proteins.ids) - table_rows
    index = proteins.index()
    rows = np.asarray(sorted(index[p] for p in wanted), dtype=np.int64)
    text_column = suite.text_column if any(TASKS[t.type].uses_text for t in suite.tasks) else None
    out = Path(out)
    result = {
        "suite": suite.name,
        "suite_file": str(suite.path),
        "export": str(export),
        "proteins": {
            "table": str(suite.proteins),
            "rows": len(proteins.ids) - added,
            "added_by_tasks": added,
            "embedded": len(rows),
        },
        "bootstrap": vars(suite.bootstrap),
        "models": {},
        "timings_s": {},
    }
    loaders = [("trained", load_trained)]
    if base if base is not None else suite.base:
        loaders.append(("base", load_base))
    for row, loader in loaders:
        t0 = time.perf_counter()
        embedder = loader(export, device=device)
        embeddings = embedder.embed(proteins, rows, text_column, batch_size=suite.batch_size)
        result["timings_s"][f"{row}/embed"] = round(time.perf_counter() - t0, 2)
        result["proteins"][f"{row}_structure_failures"] = len(embeddings.failures)
        ctx = BenchmarkContext(suite, embeddings, out / row, row, sequence_model=embedder.sequence_model)
        result["models"][row] = {}
        for spec, cfg in zip(suite.tasks, configs):
            t0 = time.perf_counter()
            task_out = TASKS[spec.type].run(ctx, spec.name, cfg)
            result["models"][row][spec.name] = {"type": spec.type, **task_out}
            result["timings_s"][f"{row}/{spec.name}"] = round(time.perf_counter() - t0, 2)
            log.info("%s / %s: %d figures", row, spec.name, len(task_out["rows"]))
    result["files"] = {k: str(v) for k, v in write_results(result, out).items()}
    return result


def add_rows(proteins: Proteins, rows) -> None:
    """Append a task's extra proteins ``(id, sequence, (file, chain) | None)`` (ids already present are kept)."""
    have = set(proteins.ids)
    for pid, sequence, structure in rows:
        if pid in have:
            continue
        have.add(pid)
        proteins.ids.append(pid)
        proteins.sequences.append(sequence)
        proteins.structures.append(structure)
        for column in proteins.columns.values():
            column.append("")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="export directory (or run directory) of the model")
    p.add_argument("--suite", required=True, help="suite YAML (configs/benchmarks/*.yaml)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base", action="store_true", default=None, help="also run the encoders before alignment")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--data-root", default=None, help="folder the suite's relative data paths start from")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run_benchmark(args.export, args.suite, args.out, args.base, args.device, args.data_root)
    except (ConfigError, BenchmarkDataError, MMseqsError, FileNotFoundError, ValueError) as e:
        print(f"benchmark: {e}", file=sys.stderr)
        return 2
    print(Path(result["files"]["markdown"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
