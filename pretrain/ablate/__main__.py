"""Ablation switchboard: train each recipe variant over N seeds, evaluate, write a table with statistics.

    python -m pretrain.ablate --run-root runs/ablate \\
        --recipes configs/recipes/demo.yaml configs/recipes/ablations/demo_*.yaml \\
        --set train.max_steps=60 --readme README.md [--seeds 3] [--tasks retrieval,go,ec,fold]

Every variant is trained once per seed (``--seeds N``, default 3: ``train.seed`` = ``--first-seed``,
+1, ...) with the DeepSpeed launcher exactly as a user would (``deepspeed --num_gpus N
launch/pretrain.py --config ... --recipe VARIANT --run-dir RUN_ROOT/<variant>/seed<S>``, ``--ranks
1`` by default): each run directory is a normal, resumable one. Running the command again reuses
finished runs and evaluations. ``--set`` overrides apply to every variant (on CPU set
``DS_ACCELERATOR=cpu``). Each run's export is then evaluated in this process as ``python -m pretrain.eval`` does it
(:func:`pretrain.eval.__main__.evaluate_export`, ``--tasks``: retrieval on the held-out shards,
probes for GO-MF/BP/CC and EC Fmax and fold accuracy trained on the training shards) into
``RUN/ablate_eval.json``, with every held-out protein's outcome in ``RUN/ablate_eval.npz``. The
**base row** (``base``; ``--no-base`` drops it) is the reference recipe's model before any
training step: built per seed exactly as the trainer builds it (``seed_everything``, the recipe's
pretrained encoder weights, freshly initialised projection heads), exported to
``RUN_ROOT/base/seed<S>/export`` and evaluated the same way.

**Statistics.** Each cell is the mean ± sample standard deviation over the seeds. A variant's cell
is marked ``*`` when it differs from the reference variant (``--reference``, default the first
recipe) at p < ``--alpha`` (0.05) by a two-sided **seed × protein paired test**
(:mod:`pretrain.ablate.stats`): seed S of the variant is paired with seed S of the reference (same
initialisation and data order), both are scored on the same held-out proteins, and the variance
of the mean difference combines a paired bootstrap over the proteins (``--bootstrap`` draws, one
draw for both rows and every seed; each metric recomputed from the per-protein outcomes) with the
seed-to-seed spread of the differences, as the paired t-test has it (Student's t, Satterthwaite d.f.). A second table
gives each difference with its p-value and 1 - alpha interval; ``ablation.json`` also keeps the
seed-only paired t-test.

Outputs: ``RUN_ROOT/ablation.md``, ``RUN_ROOT/ablation.json`` (every run's metrics, means, s.d.,
test results) and, with ``--readme``, the README between the ``ablation-table`` markers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pretrain.ablate.outcomes import column_parts
from pretrain.ablate.runs import BASE, OUTCOMES_FILE, EvalSettings, recipe_description, run_variant
from pretrain.ablate.stats import summarise
from pretrain.ablate.table import (
    README_BEGIN,
    README_END,
    TEST_NAME,
    caption,
    differences_table,
    machine_description,
    markdown_table,
    write_readme,
)
from pretrain.cli_types import positive_int
from pretrain.config import ConfigError


def _check_outputs(args) -> None:
    """Everything the command reads or writes besides the recipes, checked before any variant trains.

    Raises ConfigError (the DeepSpeed JSON, --tasks), NotADirectoryError / FileNotFoundError
    (--run-root, --readme, --go-obo) or ValueError (a README with a begin marker and no end marker).
    """
    from pretrain.engine.ds_config import load_deepspeed_config
    from pretrain.eval.__main__ import parse_tasks

    load_deepspeed_config(args.config)
    parse_tasks(args.tasks)
    if args.go_obo is not None and not Path(args.go_obo).is_file():
        raise FileNotFoundError(f"--go-obo {args.go_obo}: no such file")
    if args.run_root.exists() and not args.run_root.is_dir():
        raise NotADirectoryError(f"--run-root {args.run_root} exists and is not a directory")
    if args.readme is not None:
        if not args.readme.is_file():
            raise FileNotFoundError(f"--readme {args.readme}: no such file")
        try:
            text = args.readme.read_text()
        except UnicodeDecodeError as e:
            raise ValueError(f"--readme {args.readme}: not UTF-8 text ({e})") from None
        if README_BEGIN in text and README_END not in text[text.index(README_BEGIN) :]:
            raise ValueError(f"--readme {args.readme}: '{README_BEGIN}' without '{README_END}'")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recipes", nargs="+", required=True, help="variant recipes (their file stems name the rows)")
    p.add_argument("--run-root", required=True, type=Path, help="RUN_ROOT/<variant>/seed<S> per run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--ranks", type=positive_int, default=1, help="DeepSpeed ranks per variant (--num_gpus)")
    p.add_argument("--config", default="zero3.json", help="DeepSpeed JSON (bare names resolve against configs/)")
    p.add_argument("--readme", type=Path, default=None, help="also write the table into this README")
    p.add_argument("--seeds", type=positive_int, default=3, help="training seeds per variant (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="train.seed of the first seed (then +1, ...)")
    p.add_argument("--reference", default=None, help="variant the significance tests compare with (default: first)")
    p.add_argument("--no-base", action="store_true", help="leave out the base-encoder row")
    p.add_argument("--tasks", default=EvalSettings.tasks, help="pretrain.eval tasks evaluated on every run")
    p.add_argument("--method", default=EvalSettings.method, help="method whose Fmax / fold accuracy fills the table")
    p.add_argument("--probe-steps", type=positive_int, default=EvalSettings.probe_steps)
    p.add_argument("--go-obo", default=None, help="GO ontology for propagating GO labels (as pretrain.eval)")
    p.add_argument("--fold-key", default=EvalSettings.fold_key, help="meta key of the fold / family class")
    p.add_argument("--max-train-samples", type=positive_int, default=None, help="cap of probe training proteins")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the tests (and 1 - interval)")
    p.add_argument("--bootstrap", type=positive_int, default=2000, help="protein bootstrap draws of the test")
    return p


def _problem(args, stems: list[str], reference: str) -> str | None:
    """What is wrong with the arguments the parser cannot check (None: nothing)."""
    if len(set(stems)) != len(stems) or BASE in stems:
        return f"variant names (file stems) repeat or use the reserved name {BASE!r}: {stems}"
    if reference not in stems + ([] if args.no_base else [BASE]):
        return f"--reference {reference!r} is not one of the variants {stems}"
    if not 0.0 < args.alpha < 1.0 or not 0 <= args.first_seed < 2**32 - args.seeds:
        return f"--alpha must lie in (0, 1) and --first-seed in [0, 2**32 - seeds), got {args.alpha}, {args.first_seed}"
    if args.bootstrap < 2:
        return f"--bootstrap must be at least 2 draws, got {args.bootstrap}"
    return None


def _same_proteins(results, outcomes: dict[str, list], run_root: Path) -> None:
    """Every run must have been scored on the same held-out proteins, in the same order (else the test is void).

    Raises:
        ValueError: naming the first run whose ids differ from the first run's.
    """
    first = None
    for r in results:
        for run, out in zip(r.runs, outcomes[r.variant]):
            where = run_root / r.variant / f"seed{run['seed']}" / OUTCOMES_FILE
            if first is None:
                first = (where, out["ids"])
            elif not np.array_equal(out["ids"], first[1]):
                raise ValueError(f"{where}: its held-out proteins differ from those of {first[0]}: not comparable")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stems = [Path(r).stem for r in args.recipes]
    reference = args.reference or stems[0]
    problem = _problem(args, stems, reference)
    if problem:
        print(f"align-pro ablate: error: {problem}", file=sys.stderr)
        return 2
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    settings = EvalSettings(
        args.tasks, args.method, args.probe_steps, args.go_obo, args.fold_key, args.max_train_samples
    )
    try:
        plans = {r: recipe_description(r, args.overrides) for r in args.recipes}
        _check_outputs(args)
    except (ConfigError, OSError, ValueError) as e:
        print(f"align-pro ablate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    variants = list(zip(stems, args.recipes))
    if not args.no_base:  # the reference recipe's model before training (the first recipe's if base is the reference)
        ref_recipe = dict(variants).get(reference, args.recipes[0])
        variants.append((BASE, ref_recipe))
        plans = {**plans, BASE: ("untrained: " + plans[ref_recipe][0], 0)}
    results, outcomes, parts = [], {}, {}
    for stem, recipe in variants:
        try:
            result, outcomes[stem] = run_variant(
                stem, recipe, args, settings, seeds, plans[BASE if stem == BASE else recipe]
            )
            results.append(result)
            parts[stem] = [
                column_parts(o, settings.method, str(args.run_root / stem / f"seed{s}" / OUTCOMES_FILE))
                for s, o in zip(seeds, outcomes[stem])
            ]
        except ValueError as e:  # a damaged eval.json / ablate.json / npz of a finished variant, a bad input
            print(f"align-pro ablate: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        except (RuntimeError, OSError) as e:
            print(f"align-pro ablate: error: {e}", file=sys.stderr)
            return 1
    try:
        _same_proteins(results, outcomes, args.run_root)
    except ValueError as e:
        print(f"align-pro ablate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    ref = next(r for r in results if r.variant == reference)
    for r in results:
        summarise(r, ref, args.alpha, parts[r.variant], parts[reference], n_boot=args.bootstrap)

    table = markdown_table(results)
    if len(seeds) > 1:
        table += "\n\n" + differences_table(results, reference, args.alpha)
    text = caption(
        machine=machine_description(),
        ranks=args.ranks,
        seeds=seeds,
        overrides=args.overrides,
        reference=reference,
        alpha=args.alpha,
        n_boot=args.bootstrap,
        method=args.method,
        base_recipe=None if args.no_base else dict(variants)[BASE],
    )
    args.run_root.mkdir(parents=True, exist_ok=True)
    (args.run_root / "ablation.md").write_text(text + "\n\n" + table + "\n")
    payload = {
        "machine": machine_description(),
        "overrides": args.overrides,
        "seeds": seeds,
        "reference": reference,
        "test": f"{TEST_NAME.format(n_boot=args.bootstrap)}, alpha {args.alpha:g}",
        "eval": asdict(settings),
        "results": [asdict(r) for r in results],
    }
    (args.run_root / "ablation.json").write_text(json.dumps(payload, indent=2))
    print(table)
    if args.readme is not None:
        write_readme(f"{README_BEGIN}\n{text}\n\n{table}\n{README_END}", args.readme)
        print(f"wrote the table into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
