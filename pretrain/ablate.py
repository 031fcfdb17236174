"""Ablation switchboard: train each recipe variant, evaluate retrieval, write a variant vs R@10 table.

    python -m pretrain.ablate --run-root runs/ablate \\
        --recipes configs/recipes/demo.yaml configs/recipes/ablations/demo_*.yaml \\
        --set train.max_steps=60 --readme README.md

Every variant is one ordinary training run, started with the DeepSpeed launcher exactly as a user
would (``deepspeed --num_gpus N launch/pretrain.py --config ... --recipe VARIANT --run-dir
RUN_ROOT/<variant>``, ``--ranks 1`` by default, which is what a 2-core CPU affords), so each run
directory is a normal one: resumable, with ``metrics.jsonl``, ``export/`` and the retrieval
evaluation on the held-out shards in ``eval.json`` (the recipe's ``eval_at_end``). Running the same
command again reuses finished runs and only trains what is missing. ``--set`` overrides apply to
every variant (fewer steps, other shards); the launcher's environment is this process's (on CPU set
``DS_ACCELERATOR=cpu``; a recipe with ``data.loader: ray`` starts Ray).

The table (``RUN_ROOT/ablation.md``, ``RUN_ROOT/ablation.json`` and, with ``--readme``, the README
between the ``ablation-table`` markers) has one row per variant: its cross-modal loss weights,
exact-pair R@10 of each modality pair on the held-out proteins (mean of both directions), the mean
over the six directions, the chance level, and the wall time of training + evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pretrain.cli_types import positive_int
from pretrain.config import ConfigError, load_config
from pretrain.readme_section import replace_section

REPO = Path(__file__).resolve().parent.parent
README_BEGIN = "<!-- ablation-table:begin (python -m pretrain.ablate writes this; do not edit by hand) -->"
README_END = "<!-- ablation-table:end -->"
PAIRS = (("seq<->struct", "seq->struct", "struct->seq"), ("seq<->text", "seq->text", "text->seq"))
PAIRS += (("struct<->text", "struct->text", "text->struct"),)


@dataclass
class Result:
    """One variant's outcome."""

    variant: str  # recipe file stem
    recipe: str  # recipe path as given
    weights: str  # "alpha/beta/gamma; intra seq/struct/text; text_augment"
    steps: int
    r10: dict[str, float]  # pair name or "mean" -> R@10 (exact pairs)
    chance_r10: float
    wall_s: float | None  # training + evaluation, when this command trained it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_description() -> str:
    """CPU model and core count (or the GPU name), for the table's caption."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model}), no GPU"


def _weights(recipe: str, overrides: list[str]) -> tuple[str, int]:
    cfg = load_config(recipe, overrides)
    lo = cfg.loss
    text = (
        f"{lo.alpha:g}/{lo.beta:g}/{lo.gamma:g}; {lo.intra_seq:g}/{lo.intra_struct:g}/{lo.intra_text:g}; "
        f"{'yes' if cfg.data.text_augment else 'no'}"
    )
    return text, cfg.train.max_steps


def train_variant(recipe: str, run_dir: Path, overrides: list[str], ranks: int, ds_config: str) -> float | None:
    """Run the launcher for one variant (train + evaluate); returns the wall seconds it took.

    A run that was already finished is not trained again; its wall time is the one recorded in
    ``RUN/ablate.json`` when it was trained (None when there is none).

    Raises:
        RuntimeError: the launcher failed; the message ends with its log tail (RUN/ablate.log).
    """
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(_free_port())]
    cmd += [str(REPO / "launch" / "pretrain.py"), "--config", ds_config, "--recipe", recipe]
    cmd += ["--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "ablate.log"
    started = time.time()
    t0 = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"variant {run_dir.name} failed (exit {proc.returncode}); end of {log}:\n{tail}")
    record = run_dir / "ablate.json"
    evaluated = run_dir / "eval.json"
    if evaluated.is_file() and evaluated.stat().st_mtime >= started:  # trained (or resumed) and evaluated now
        record.write_text(json.dumps({"wall_s": wall}))
        return wall
    if not record.is_file():
        return None
    try:
        return float(json.loads(record.read_text())["wall_s"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{record}: damaged ({type(e).__name__}: {e}); delete it to report the wall time as n/a"
        ) from None


def read_r10(run_dir: Path) -> tuple[dict[str, float], float]:
    """Exact-pair R@10 per modality pair and over the six directions from ``RUN/eval.json``."""
    path = run_dir / "eval.json"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: the variant must train with train.eval_at_end=true")
    try:
        directions = json.loads(path.read_text())["retrieval"]["directions"]
        missing = [d for _, *ds in PAIRS for d in ds if "R@10" not in directions.get(d, {})]
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not pretrain.eval's result
        raise ValueError(f"{path}: not a retrieval evaluation ({type(e).__name__}: {e})") from None
    if missing:
        raise RuntimeError(f"{path}: no R@10 for {missing} (eval.ks must include 10)")
    try:
        r10 = {pair: 0.5 * (directions[a]["R@10"] + directions[b]["R@10"]) for pair, a, b in PAIRS}
        r10["mean"] = sum(directions[d]["R@10"] for _, *ds in PAIRS for d in ds) / 6
        return r10, max(directions[d]["chance_R@10"] for _, *ds in PAIRS for d in ds)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a retrieval evaluation ({type(e).__name__}: {e})") from None


def _seconds(wall: float | None) -> str:
    return "n/a" if wall is None else f"{wall:.0f}"


def markdown_table(results: list[Result]) -> str:
    lines = [
        "| variant | weights α/β/γ; intra seq/struct/text; text augment | steps "
        "| seq↔struct R@10 | seq↔text R@10 | struct↔text R@10 | mean R@10 | chance | wall s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        cells = " | ".join(f"{r.r10[p]:.3f}" for p in ("seq<->struct", "seq<->text", "struct<->text", "mean"))
        lines.append(
            f"| `{r.variant}` | {r.weights} | {r.steps} | {cells} | {r.chance_r10:.4f} | {_seconds(r.wall_s)} |"
        )
    return "\n".join(lines)


def write_readme(section: str, readme: Path) -> None:
    """Replace the text between the ablation markers (append a section when there are none)."""
    replace_section(readme, section, README_BEGIN, README_END, "### Ablations (measured)")


def _check_outputs(args) -> None:
    """Everything the command reads or writes besides the recipes, checked before any variant trains.

    Raises ConfigError (the DeepSpeed JSON), NotADirectoryError / FileNotFoundError (--run-root,
    --readme) or ValueError (a README with a begin marker and no end marker).
    """
    from pretrain.engine.ds_config import load_deepspeed_config

    load_deepspeed_config(args.config)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recipes", nargs="+", required=True, help="variant recipes (their file stems name the rows)")
    p.add_argument("--run-root", required=True, type=Path, help="one run directory per variant goes here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--ranks", type=positive_int, default=1, help="DeepSpeed ranks per variant (--num_gpus)")
    p.add_argument("--config", default="zero3.json", help="DeepSpeed JSON (bare names resolve against configs/)")
    p.add_argument("--readme", type=Path, default=None, help="also write the table into this README")
    args = p.parse_args(argv)

    stems = [Path(r).stem for r in args.recipes]
    if len(set(stems)) != len(stems):
        print(f"align-pro ablate: error: variant names (file stems) repeat: {stems}", file=sys.stderr)
        return 2
    try:
        plans = {r: _weights(r, args.overrides) for r in args.recipes}
        _check_outputs(args)
    except (ConfigError, OSError, ValueError) as e:
        print(f"align-pro ablate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    results = []
    for recipe, stem in zip(args.recipes, stems):
        run_dir = args.run_root / stem
        print(f"[ablate] {stem}: training into {run_dir}", flush=True)
        try:
            wall = train_variant(recipe, run_dir, args.overrides, args.ranks, args.config)
            r10, chance = read_r10(run_dir)
        except ValueError as e:  # a damaged eval.json / ablate.json of a finished variant
            print(f"align-pro ablate: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            print(f"align-pro ablate: error: {e}", file=sys.stderr)
            return 1
        weights, steps = plans[recipe]
        results.append(Result(stem, recipe, weights, steps, r10, chance, wall))
        print(f"[ablate] {stem}: mean R@10 {r10['mean']:.3f} ({_seconds(wall)} s)", flush=True)

    table = markdown_table(results)
    caption = (
        f"Measured by `python -m pretrain.ablate` on a {machine_description()}, {args.ranks} rank(s) per "
        f"variant, overrides: {', '.join(f'`{o}`' for o in args.overrides) or 'none'}. R@10 is exact-pair "
        f"retrieval on the held-out proteins (mean of both directions per pair); wall s is training + "
        f"evaluation."
    )
    args.run_root.mkdir(parents=True, exist_ok=True)
    (args.run_root / "ablation.md").write_text(caption + "\n\n" + table + "\n")
    payload = {"machine": machine_description(), "overrides": args.overrides, "results": [asdict(r) for r in results]}
    (args.run_root / "ablation.json").write_text(json.dumps(payload, indent=2))
    print(table)
    if args.readme is not None:
        write_readme(f"{README_BEGIN}\n{caption}\n\n{table}\n{README_END}", args.readme)
        print(f"wrote the table into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
