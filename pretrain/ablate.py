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
``RUN/ablate_eval.json``. The **base row** (``base``; ``--no-base`` drops it) is the reference
recipe's model before any training step: built per seed exactly as the trainer builds it
(``seed_everything``, the recipe's pretrained encoder weights, freshly initialised projection
heads), exported to ``RUN_ROOT/base/seed<S>/export`` and evaluated the same way.

**Statistics.** Each cell is the mean ± sample standard deviation over the seeds. A variant's cell
is marked ``*`` when it differs from the reference variant (``--reference``, default the first
recipe) by a two-sided **paired t-test** over seed-matched runs (seed S of the variant against
seed S of the reference: same initialisation and data order) at p < ``--alpha`` (0.05). With 3
seeds the test has 2 degrees of freedom, so only large, consistent differences pass; a sign-flip
permutation test could not pass at 0.05 with fewer than 6 seeds (its smallest p is 2 / 2^N).

Outputs: ``RUN_ROOT/ablation.md``, ``RUN_ROOT/ablation.json`` (every run's metrics, means, s.d.,
test results) and, with ``--readme``, the README between the ``ablation-table`` markers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pretrain.cli_types import positive_int
from pretrain.config import ConfigError, load_config
from pretrain.readme_section import replace_section

REPO = Path(__file__).resolve().parent.parent
README_BEGIN = "<!-- ablation-table:begin (python -m pretrain.ablate writes this; do not edit by hand) -->"
README_END = "<!-- ablation-table:end -->"
PAIRS = (("seq<->struct", "seq->struct", "struct->seq"), ("seq<->text", "seq->text", "text->seq"))
PAIRS += (("struct<->text", "struct->text", "text->struct"),)
FUNCTION_TASKS = ("GO-MF", "GO-BP", "GO-CC", "EC")
# metric key -> column header, in table order
COLUMNS = {
    "seq<->struct": "seq↔struct R@10",
    "seq<->text": "seq↔text R@10",
    "struct<->text": "struct↔text R@10",
    "mean": "mean R@10",
    **{f"{t} Fmax": f"{t} Fmax" for t in FUNCTION_TASKS},
    "fold accuracy": "fold acc",
}
BASE = "base"
EVAL_FILE = "ablate_eval.json"


@dataclass
class EvalSettings:
    """How every run (and the base row) is evaluated; a change re-evaluates cached runs."""

    tasks: str = "retrieval,go,ec,fold"  # pretrain.eval tasks
    method: str = "probe/concat"  # which method's Fmax / accuracy fills the columns
    probe_steps: int = 300
    go_obo: str | None = None
    fold_key: str = "family"
    max_train_samples: int | None = None  # cap of probe training proteins (None: all)


@dataclass
class Result:
    """One variant's outcome over its seeds."""

    variant: str  # recipe file stem, or "base"
    recipe: str  # recipe path as given
    weights: str  # "alpha/beta/gamma; intra seq/struct/text; text_augment"
    steps: int  # 0 for the base row
    seeds: list[int]
    runs: list[dict]  # per seed: {"seed", "metrics": {key: value | None}, "wall_s"}
    mean: dict[str, float | None] = field(default_factory=dict)
    sd: dict[str, float | None] = field(default_factory=dict)
    tests: dict[str, dict] = field(default_factory=dict)  # key -> paired t-test against the reference
    chance_r10: float | None = None
    wall_s: float | None = None  # mean over the seeds trained by this command


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
    return text + "".join(f"; {s}" for s in _switches(cfg)), cfg.train.max_steps


def _switches(cfg) -> list[str]:
    """The objective switches a recipe sets away from their defaults, so overlays that differ only
    there (temperatures, learning-rate ratios, ProtCLIP's PDA) are told apart in the table."""
    lo, out = cfg.loss, []
    if lo.objective != "align_pro":
        out.append(f"objective {lo.objective}")
        if lo.protclip.pda_assign != "vq":
            out.append(f"PDA {lo.protclip.pda_assign}")
        if lo.protclip.pda_text != "joint":
            out.append(f"PDA text {lo.protclip.pda_text}")
    if lo.kind != "infonce":
        out.append(f"loss {lo.kind}")
    if lo.temperature != "shared":
        out.append(f"temperature {lo.temperature}")
    mult = cfg.optim.encoder_lr_mult
    ratios = {m: getattr(mult, m) for m in ("sequence", "structure", "text") if getattr(mult, m) != 1.0}
    if ratios:
        out.append("lr × " + ", ".join(f"{m} {v:g}" for m, v in ratios.items()))
    return out


def train_variant(recipe: str, run_dir: Path, overrides: list[str], ranks: int, ds_config: str) -> float | None:
    """Run the launcher for one variant and seed (train + evaluate); returns the wall seconds it took.

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


def build_base_export(recipe: str, overrides: list[str], out_dir: Path) -> Path:
    """Export the recipe's model before any training step, as the trainer builds it (base row).

    ``overrides`` include ``train.seed``: ``seed_everything`` then ``build_model`` with the
    recipe's pretrained encoder weights, as :class:`pretrain.engine.trainer.Trainer` starts.
    An existing export is kept.
    """
    from pretrain.engine.builder import build_model
    from pretrain.engine.export import MODEL_FILE, write_export
    from pretrain.engine.schedule import seed_everything

    if (out_dir / MODEL_FILE).is_file() and (out_dir / "config.yaml").is_file():
        return out_dir
    cfg = load_config(recipe, overrides)
    seed_everything(cfg.train.seed)
    model = build_model(cfg)
    return write_export(model.state_dict(), cfg, out_dir, step=0)


def evaluate_run_dir(run_dir: Path, settings: EvalSettings) -> dict:
    """``RUN/export`` evaluated with ``settings`` (``RUN/ablate_eval.json``, reused while export and settings match)."""
    from pretrain.eval.__main__ import evaluate_export

    weights = run_dir / "export" / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"{weights} is missing: the run did not export")
    stamp = {"settings": asdict(settings), "export_mtime_ns": weights.stat().st_mtime_ns}
    cache = run_dir / EVAL_FILE
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if {k: saved.get(k) for k in stamp} == stamp:
                return saved["result"]
        except (ValueError, KeyError, TypeError):
            pass  # damaged: evaluate again
    t0 = time.perf_counter()
    result = evaluate_export(
        run_dir / "export",
        tasks=settings.tasks,
        go_obo=settings.go_obo,
        probe_steps=settings.probe_steps,
        fold_key=settings.fold_key,
        max_train_samples=settings.max_train_samples,
        progress=False,
    )
    result["ablate_eval_s"] = round(time.perf_counter() - t0, 2)
    cache.write_text(json.dumps({**stamp, "result": result}, indent=1))
    return result


def r10_of(result: dict, where: str) -> tuple[dict[str, float], float]:
    """Exact-pair R@10 per modality pair and over the six directions, and the chance level, from an eval result."""
    try:
        directions = result["retrieval"]["directions"]
        missing = [d for _, *ds in PAIRS for d in ds if "R@10" not in directions.get(d, {})]
    except (KeyError, TypeError, AttributeError) as e:  # not pretrain.eval's result
        raise ValueError(f"{where}: not a retrieval evaluation ({type(e).__name__}: {e})") from None
    if missing:
        raise RuntimeError(f"{where}: no R@10 for {missing} (eval.ks must include 10)")
    try:
        r10 = {pair: 0.5 * (directions[a]["R@10"] + directions[b]["R@10"]) for pair, a, b in PAIRS}
        r10["mean"] = sum(directions[d]["R@10"] for _, *ds in PAIRS for d in ds) / 6
        return r10, max(directions[d]["chance_R@10"] for _, *ds in PAIRS for d in ds)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a retrieval evaluation ({type(e).__name__}: {e})") from None


def run_metrics(result: dict, method: str, where: str) -> tuple[dict[str, float | None], float | None]:
    """Every table metric of one evaluation (None where a task was not run or was skipped), and the R@10 chance."""
    metrics: dict[str, float | None] = dict.fromkeys(COLUMNS)
    chance = None
    if "retrieval" in result:
        r10, chance = r10_of(result, where)
        metrics.update(r10)
    for task in FUNCTION_TASKS:
        entry = (result.get("function") or {}).get(task) or {}
        metrics[f"{task} Fmax"] = ((entry.get("methods") or {}).get(method) or {}).get("fmax")
    fold = result.get("fold") or {}
    metrics["fold accuracy"] = ((fold.get("methods") or {}).get(method) or {}).get("accuracy")
    return metrics, chance


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (continued fraction, modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * h / a


def paired_t_test(values: list[float | None], reference: list[float | None]) -> dict:
    """Two-sided paired t-test of seed-matched values against the reference's.

    Pairs where either value is None are left out. Returns ``{"n", "mean_diff", "t", "p"}``;
    ``p`` is None with fewer than 2 pairs. Equal differences with zero spread give p = 0 (a
    constant non-zero shift) or 1 (no difference).
    """
    diffs = [v - r for v, r in zip(values, reference) if v is not None and r is not None]
    n = len(diffs)
    if n < 2:
        return {"n": n, "mean_diff": diffs[0] if diffs else None, "t": None, "p": None}
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0.0:
        return {"n": n, "mean_diff": mean, "t": None, "p": 0.0 if mean != 0.0 else 1.0}
    t = mean / (sd / math.sqrt(n))
    df = n - 1
    return {"n": n, "mean_diff": mean, "t": t, "p": _betainc(df / 2.0, 0.5, df / (df + t * t))}


def summarise(result: Result, reference: Result | None, alpha: float) -> None:
    """Fill ``mean``, ``sd`` and (against ``reference``, matched by seed) ``tests`` of ``result``."""
    for key in COLUMNS:
        vals = [run["metrics"].get(key) for run in result.runs]
        got = [v for v in vals if v is not None]
        result.mean[key] = sum(got) / len(got) if got else None
        mean = result.mean[key]
        result.sd[key] = math.sqrt(sum((v - mean) ** 2 for v in got) / (len(got) - 1)) if len(got) > 1 else None
        if reference is not None and reference is not result:
            ref = {run["seed"]: run["metrics"].get(key) for run in reference.runs}
            test = paired_t_test(vals, [ref.get(run["seed"]) for run in result.runs])
            test["significant"] = test["p"] is not None and test["p"] < alpha
            result.tests[key] = test


def _cell(r: Result, key: str) -> str:
    mean, sd = r.mean.get(key), r.sd.get(key)
    if mean is None:
        return "n/a"
    text = f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
    return text + ("*" if r.tests.get(key, {}).get("significant") else "")


def markdown_table(results: list[Result]) -> str:
    """One row per variant: weights, steps, seeds, mean ± s.d. of every metric (``*``: significant), chance, wall s."""
    keys = [k for k in COLUMNS if any(r.mean.get(k) is not None for r in results)]
    lines = [
        "| variant | weights α/β/γ; intra seq/struct/text; text augment | steps | seeds | "
        + " | ".join(COLUMNS[k] for k in keys)
        + " | chance R@10 | wall s |",
        "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " | ---: | ---: |",
    ]
    for r in results:
        chance = "n/a" if r.chance_r10 is None else f"{r.chance_r10:.4f}"
        cells = " | ".join([_cell(r, k) for k in keys] + [chance, "n/a" if r.wall_s is None else f"{r.wall_s:.0f}"])
        lines.append(f"| `{r.variant}` | {r.weights} | {r.steps} | {len(r.seeds)} | {cells} |")
    return "\n".join(lines)


def write_readme(section: str, readme: Path) -> None:
    """Replace the text between the ablation markers (append a section when there are none)."""
    replace_section(readme, section, README_BEGIN, README_END, "### Ablations (measured)")


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


def _run_variant(stem, recipe, args, settings, seeds, plan) -> Result:
    """Train (or reuse) and evaluate every seed of one variant; ``stem == "base"`` builds untrained exports."""
    runs, walls, chance = [], [], None
    for seed in seeds:
        run_dir = args.run_root / stem / f"seed{seed}"
        overrides = [*args.overrides, f"train.seed={seed}"]
        print(f"[ablate] {stem} seed {seed}: {'building' if stem == BASE else 'training'} into {run_dir}", flush=True)
        t0 = time.perf_counter()
        if stem == BASE:
            build_base_export(recipe, overrides, run_dir / "export")
            wall = None
        else:
            wall = train_variant(recipe, run_dir, overrides, args.ranks, args.config)
        metrics, chance = run_metrics(evaluate_run_dir(run_dir, settings), settings.method, str(run_dir / EVAL_FILE))
        if wall is not None:
            walls.append(wall)
        runs.append({"seed": seed, "metrics": metrics, "wall_s": wall})
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None)
        print(f"[ablate] {stem} seed {seed}: {shown} ({time.perf_counter() - t0:.0f} s)", flush=True)
    weights, steps = plan
    wall_s = sum(walls) / len(walls) if walls else None
    return Result(stem, recipe, weights, steps, list(seeds), runs, chance_r10=chance, wall_s=wall_s)


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the paired t-tests")
    args = p.parse_args(argv)

    stems = [Path(r).stem for r in args.recipes]
    reference = args.reference or stems[0]
    problem = None
    if len(set(stems)) != len(stems) or BASE in stems:
        problem = f"variant names (file stems) repeat or use the reserved name {BASE!r}: {stems}"
    elif reference not in stems + ([] if args.no_base else [BASE]):
        problem = f"--reference {reference!r} is not one of the variants {stems}"
    elif not 0.0 < args.alpha < 1.0 or not 0 <= args.first_seed < 2**32 - args.seeds:
        problem = (
            f"--alpha must lie in (0, 1) and --first-seed in [0, 2**32 - seeds), got {args.alpha}, {args.first_seed}"
        )
    if problem:
        print(f"align-pro ablate: error: {problem}", file=sys.stderr)
        return 2
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    settings = EvalSettings(
        args.tasks, args.method, args.probe_steps, args.go_obo, args.fold_key, args.max_train_samples
    )
    try:
        plans = {r: _weights(r, args.overrides) for r in args.recipes}
        _check_outputs(args)
    except (ConfigError, OSError, ValueError) as e:
        print(f"align-pro ablate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    variants = list(zip(stems, args.recipes))
    if not args.no_base:  # the reference recipe's model before training (the first recipe's if base is the reference)
        ref_recipe = dict(variants).get(reference, args.recipes[0])
        variants.append((BASE, ref_recipe))
        plans = {**plans, BASE: ("untrained: " + plans[ref_recipe][0], 0)}
    results = []
    for stem, recipe in variants:
        try:
            results.append(_run_variant(stem, recipe, args, settings, seeds, plans[BASE if stem == BASE else recipe]))
        except ValueError as e:  # a damaged eval.json / ablate.json of a finished variant, a bad evaluation input
            print(f"align-pro ablate: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        except (RuntimeError, OSError) as e:
            print(f"align-pro ablate: error: {e}", file=sys.stderr)
            return 1
    ref = next(r for r in results if r.variant == reference)
    for r in results:
        summarise(r, ref, args.alpha)

    table = markdown_table(results)
    caption = (
        f"Measured by `python -m pretrain.ablate` on a {machine_description()}, {args.ranks} rank(s) per "
        f"run, seeds {seeds[0]}..{seeds[-1]} per variant, overrides: "
        f"{', '.join(f'`{o}`' for o in args.overrides) or 'none'}. "
        + (
            f"Cells are mean ± s.d. over the seeds; `*` marks a difference from `{reference}` significant at "
            f"p < {args.alpha:g} (two-sided paired t-test over seed-matched runs, {len(seeds) - 1} d.f.); "
            "unmarked differences are not significant. "
            if len(seeds) > 1
            else "One seed: no spread and no significance test (a paired test needs two seeds or more). "
        )
        + "R@10 is "
        f"exact-pair retrieval on the held-out proteins (mean of both directions per pair); Fmax and fold "
        f"accuracy are `{args.method}` probes trained on the training shards"
        + (
            f"; `base` is `{dict(variants)[BASE]}` before training (its encoders, random heads)"
            if not args.no_base
            else ""
        )
        + "; wall s is training + evaluation by the launcher."
    )
    args.run_root.mkdir(parents=True, exist_ok=True)
    (args.run_root / "ablation.md").write_text(caption + "\n\n" + table + "\n")
    payload = {
        "machine": machine_description(),
        "overrides": args.overrides,
        "seeds": seeds,
        "reference": reference,
        "test": f"two-sided paired t-test over seed-matched runs, alpha {args.alpha:g}",
        "eval": asdict(settings),
        "results": [asdict(r) for r in results],
    }
    (args.run_root / "ablation.json").write_text(json.dumps(payload, indent=2))
    print(table)
    if args.readme is not None:
        write_readme(f"{README_BEGIN}\n{caption}\n\n{table}\n{README_END}", args.readme)
        print(f"wrote the table into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
