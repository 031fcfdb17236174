"""``python -m pretrain.eval --run-dir DIR | --model EXPORT_DIR [--shards DIR] [--tasks ...]``: prints JSON.

Tasks (``--tasks``, comma-separated, default ``all``):

* ``retrieval``: R@1/5/10 and median rank in the six directions between sequence, structure and
  text, exact-pair and multi-positive (identical canonical text), with chance levels;
* ``go``, ``ec``, ``fold``: probes on frozen embeddings (sequence, structure, concat) trained on
  ``--train-shards`` and scored on ``--shards``: CAFA Fmax + micro AUPR for GO-MF/BP/CC (labels
  propagated with ``--go-obo``) and EC (prefix-propagated), accuracy for the class in
  ``meta[--fold-key]``;
* ``zeroshot``: text-prompt scores per GO term / EC class (ProtST style), same Fmax;
* ``baseline``: nearest training protein by 3-mer similarity donates its labels.

``zeroshot`` / ``baseline`` add their method to the label tasks named; alone they apply to all of
go, ec (and fold for the baseline) without training probes. ``settings.train_test_shared_ids``
counts held-out proteins whose id is also in the training shards (a warning says so: their probe
and baseline scores are not predictions). Tasks whose labels are missing from
the shards report ``skipped``. With ``--run-dir`` the full result goes to ``RUN/eval.json`` and
the probes to ``RUN/probes/<task>/`` (``labels.json`` + ``<features>.safetensors``).
``--per-protein FILE.npz`` also writes every held-out protein's outcome (the rank of its true
partner per retrieval direction, each method's propagated GO / EC scores with the labels, fold
correctness; :func:`save_per_protein`), from which every figure can be recomputed on any subset.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pretrain.cli_types import positive_int
from pretrain.engine.export import check_device, load_exported
from pretrain.eval.embed import (
    Annotations,
    count_samples,
    embed_shards,
    embed_texts,
    read_annotations,
    resolve_device,
)
from pretrain.eval.function import FunctionSettings, evaluate_function
from pretrain.eval.probes import ProbeConfig
from pretrain.eval.retrieval import direction_ranks, retrieval_metrics, text_groups

log = logging.getLogger(__name__)

ALL_TASKS = ("retrieval", "go", "ec", "fold", "zeroshot", "baseline")
LABEL_TASKS = ("go", "ec", "fold")


def shared_ids(train_ids: list[str], test_ids: list[str]) -> int:
    """How many held-out rows carry an id that is also a training id ("" marks an unreadable row)."""
    train = set(train_ids) - {""}
    return sum(1 for i in test_ids if i and i in train)


def parse_tasks(text: str | list[str] | tuple[str, ...]) -> set[str]:
    """``"retrieval,go"`` / ``"all"`` -> the task set; unknown names raise ValueError."""
    items = text.split(",") if isinstance(text, str) else list(text)
    tasks = {t.strip() for t in items if t.strip()}
    if "all" in tasks:
        return set(ALL_TASKS)
    unknown = sorted(tasks - set(ALL_TASKS))
    if unknown or not tasks:
        raise ValueError(f"unknown eval task(s) {unknown or [text]}; choose from {', '.join(ALL_TASKS)} or all")
    return tasks


def evaluate_export(
    export_dir: Path | str,
    shards: str | None = None,
    max_samples: int | None = None,
    *,
    tasks=("retrieval",),
    train_shards: str | None = None,
    max_train_samples: int | None = None,
    go_obo: str | None = None,
    ec_names: str | None = None,
    probe: str = "linear",
    probe_steps: int = 300,
    fold_key: str = "family",
    baseline_metric: str = "jaccard",
    probes_dir: Path | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    device: str = "auto",
    per_protein: bool = False,
) -> dict:
    """Load an export and evaluate ``tasks`` on ``shards`` (default: the recipe's eval shards).

    Returns the result dict (see the module docstring); ``retrieval`` keeps the keys
    ``directions`` and ``summary`` that the trainer and ``pretrain.summary`` read. With
    ``per_protein`` the result also holds ``"per_protein"``: numpy arrays (not JSON; pop it
    before writing, or :func:`save_per_protein`) with the outcome of every held-out protein,
    ``{"ids": (N,) str, "retrieval": {direction: (N,) int64 rank of the true partner, -1
    where absent}, "function": {...}, "fold": {...}}`` (see
    :func:`pretrain.eval.function.evaluate_function`); every other entry is unchanged.
    """
    tasks = parse_tasks(tasks)
    label_tasks = tasks & set(LABEL_TASKS)
    methods = tasks & {"zeroshot", "baseline"}
    if label_tasks:
        methods |= {"probe"}
    elif methods:
        label_tasks = {"go", "ec", "fold"} if "baseline" in methods else {"go", "ec"}
    # Every input is read (or at least opened) before the model embeds anything: a wrong path fails in
    # seconds, not after the held-out set was embedded.
    ontology = _load_input("--go-obo", go_obo, _read_obo) if go_obo and "go" in label_tasks else None
    names = _load_input("--ec-names", ec_names, _read_ec_names) if ec_names and "ec" in label_tasks else None
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, cfg = load_exported(export_dir, device=resolve_device(device))
    shard_dir = shards or cfg.data.eval_shards
    train_dir = train_shards or cfg.data.train_shards
    count_samples(shard_dir)  # a missing or damaged manifest: ManifestError naming the directory
    if label_tasks and methods & {"probe", "baseline"}:
        count_samples(train_dir)
    bs = batch_size or cfg.eval.batch_size
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    emb = embed_shards(model, cfg, shard_dir, bs, max_samples or cfg.eval.max_samples, progress=progress)
    timing["embed_eval_s"] = time.perf_counter() - t0
    ann = emb["annotations"]
    result: dict = {"shards": str(shard_dir), "num_proteins": len(emb["ids"]), "tasks": sorted(tasks)}
    outcomes: dict = {"ids": np.array([str(i) for i in emb["ids"]], dtype=str)}
    if "retrieval" in tasks:
        t0 = time.perf_counter()
        result["retrieval"] = retrieval_metrics(emb, cfg.eval.ks, groups=text_groups(ann.texts))
        if per_protein:
            outcomes["retrieval"] = direction_ranks(emb)
        timing["retrieval_s"] = time.perf_counter() - t0

    if label_tasks:
        t0 = time.perf_counter()
        if "probe" in methods:
            train = embed_shards(model, cfg, train_dir, bs, max_train_samples, progress=progress)
        elif "baseline" in methods:  # the baseline needs the training sequences and labels only
            train = {"annotations": read_annotations(train_dir, max_train_samples)}
        else:  # zero-shot alone needs no training set
            train = {"annotations": Annotations()}
        timing["embed_train_s"] = time.perf_counter() - t0
        overlap = shared_ids(train["annotations"].ids, ann.ids)
        if overlap:
            log.warning(
                "%d of the %d held-out proteins in %s are also in the probe training shards %s: "
                "probe and baseline scores on them measure memorisation, not prediction",
                overlap,
                len(ann.ids),
                shard_dir,
                train_dir,
            )
        settings = FunctionSettings(
            methods=frozenset(methods),
            probe=ProbeConfig(kind=probe, steps=probe_steps, seed=cfg.train.seed),
            fold_key=fold_key,
            baseline_metric=baseline_metric,
            probes_dir=probes_dir,
        )
        embed_text = (lambda texts: embed_texts(model, cfg, texts, bs)) if "zeroshot" in methods else None
        t0 = time.perf_counter()
        function_outcomes = {} if per_protein else None
        scores = evaluate_function(
            train,
            emb,
            label_tasks,
            settings,
            ontology=ontology,
            embed_text=embed_text,
            ec_names=names,
            per_protein=function_outcomes,
        )
        timing["function_s"] = time.perf_counter() - t0
        if function_outcomes:
            if "fold" in function_outcomes:
                outcomes["fold"] = function_outcomes.pop("fold")
            outcomes["function"] = function_outcomes
        if "fold" in scores:
            result["fold"] = scores.pop("fold")
        if scores:
            result["function"] = scores
        result["settings"] = {
            "train_shards": str(train_dir),
            "num_train_proteins": len(train["annotations"]),
            "train_test_shared_ids": overlap,
            "methods": sorted(methods),
            "probe": asdict(settings.probe),
            "go_obo": str(go_obo) if go_obo else None,
            "fold_key": fold_key,
            "baseline_metric": baseline_metric,
        }
    result["timing"] = {k: round(v, 2) for k, v in timing.items()}
    if per_protein:
        result["per_protein"] = outcomes
    return result


def flatten_per_protein(outcomes: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """``result["per_protein"]`` as flat ``"a/b/c"`` keys (``"function/EC/methods/probe/concat"``)."""
    flat = {}
    for key, value in outcomes.items():
        if isinstance(value, dict):
            flat.update(flatten_per_protein(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = np.asarray(value)
    return flat


def save_per_protein(path: Path | str, outcomes: dict) -> Path:
    """Write ``result["per_protein"]`` to a compressed ``.npz`` (flat keys; loads with ``allow_pickle=False``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:  # a file object: numpy would otherwise append ".npz" to other names
        np.savez_compressed(fh, **flatten_per_protein(outcomes))
    return path


def _read_obo(path: str):
    from data_shards.readers.obo import load_obo

    return load_obo(path)


def _read_ec_names(path: str) -> dict[str, str]:
    from pretrain.eval.zeroshot import load_ec_names

    names = load_ec_names(path)
    if not names:
        raise ValueError("no EC_number rows with a name or hier1..3 columns (expected a tab-separated table)")
    return names


def _load_input(option: str, path: str, read):
    """``read(path)``; a missing, unreadable or malformed file is a ValueError naming the option and file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option} {path}: no such file")
    try:
        return read(path)
    except (OSError, ValueError) as e:  # UnicodeDecodeError included
        text = str(e)
        raise ValueError(text if str(path) in text else f"{option} {path}: {text}") from None


def evaluate_run(run_dir: Path, shards: str | None = None, **kwargs) -> dict:
    """Evaluate ``RUN/export``, save probes under ``RUN/probes`` and write ``RUN/eval.json``."""
    run_dir = Path(run_dir)
    kwargs.setdefault("probes_dir", run_dir / "probes")
    result = evaluate_export(run_dir / "export", shards, **kwargs)
    outcomes = result.pop("per_protein", None)  # numpy arrays: not JSON
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result if outcomes is None else {**result, "per_protein": outcomes}


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a YAML parser's message spans several)."""
    return " ".join(str(error).split()) or type(error).__name__


def strip_curves(obj):
    """The result without the ``curve`` entries (for printing)."""
    if isinstance(obj, dict):
        return {k: strip_curves(v) for k, v in obj.items() if k != "curve"}
    if isinstance(obj, list):
        return [strip_curves(v) for v in obj]
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="a training run directory (uses RUN/export)")
    src.add_argument("--model", help="an export directory or URL (model.safetensors + config.yaml)")
    p.add_argument("--shards", help="held-out shard directory (default: the recipe's data.eval_shards)")
    p.add_argument("--train-shards", help="probe training shards (default: the recipe's data.train_shards)")
    p.add_argument("--tasks", default="all", help=f"comma-separated subset of {','.join(ALL_TASKS)}, or all")
    p.add_argument("--go-obo", help="GO ontology (.obo / .obo.gz) used to propagate GO labels")
    p.add_argument("--ec-names", help="EC descriptions TSV (EC_number, name, hier1..3) for zero-shot prompts")
    p.add_argument("--probe", choices=("linear", "mlp"), default="linear")
    p.add_argument("--probe-steps", type=positive_int, default=300, help="full-batch optimizer steps per probe")
    p.add_argument("--fold-key", default="family", help="meta key of the fold / family class")
    p.add_argument("--baseline-metric", choices=("jaccard", "cosine"), default="jaccard")
    p.add_argument("--max-samples", type=positive_int, default=None, help="cap of held-out proteins")
    p.add_argument("--max-train-samples", type=positive_int, default=None, help="cap of training proteins")
    p.add_argument("--batch-size", type=positive_int, default=None, help="embedding batch (default: eval.batch_size)")
    p.add_argument("--probes-dir", help="save probes here (default with --run-dir: RUN/probes)")
    p.add_argument("--out", help="also write the full JSON (with curves) to this file")
    p.add_argument(
        "--per-protein", metavar="FILE.npz", help="also write every held-out protein's outcome (ranks, scores) here"
    )
    p.add_argument("--curves", action="store_true", help="print the recall@k / precision-recall curves too")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--device", default="auto", help="torch device for the encoders (auto: cuda if available)")
    args = p.parse_args(argv)
    kwargs = dict(
        max_samples=args.max_samples,
        tasks=args.tasks,
        train_shards=args.train_shards,
        max_train_samples=args.max_train_samples,
        go_obo=args.go_obo,
        ec_names=args.ec_names,
        probe=args.probe,
        probe_steps=args.probe_steps,
        fold_key=args.fold_key,
        baseline_metric=args.baseline_metric,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        device=args.device,
        per_protein=bool(args.per_protein),
    )
    if args.probes_dir:
        kwargs["probes_dir"] = Path(args.probes_dir)
    try:
        parse_tasks(args.tasks)
        check_device(resolve_device(args.device))
        for option, path in (("--out", args.out), ("--per-protein", args.per_protein)):
            if path and Path(path).is_dir():
                raise IsADirectoryError(f"{option} {path} is a directory; expected a file name")
        if args.run_dir:
            if not Path(args.run_dir).is_dir():
                raise FileNotFoundError(f"run directory {args.run_dir} does not exist")
            if not (Path(args.run_dir) / "export").is_dir():
                raise FileNotFoundError(f"no export in {args.run_dir}: train first (or the run did not finish)")
            result = evaluate_run(Path(args.run_dir), args.shards, **kwargs)
        else:
            result = evaluate_export(args.model, args.shards, **kwargs)  # a path or a URL
        if args.per_protein:
            save_per_protein(args.per_protein, result.pop("per_protein"))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
    except (OSError, ValueError) as e:  # FileNotFoundError, ConfigError, ExportError, ManifestError, ...
        print(f"align-pro eval: error: {_one_line(e)}", file=sys.stderr)
        return 2
    print(json.dumps(result if args.curves else strip_curves(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
