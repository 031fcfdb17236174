"""Runs of the ablation: train (or reuse) each variant per seed, build the base row, evaluate with a cache.

A run's evaluation is cached in ``RUN/ablate_eval.json`` (the :func:`pretrain.eval.__main__.evaluate_export`
result, stamped with the settings and the export's mtime) next to ``RUN/ablate_eval.npz``, the
per-protein outcomes behind the table's columns (ranks of the true partner per retrieval direction,
the probe's propagated GO / EC scores and labels, fold correctness; numpy arrays only, read with
``allow_pickle=False``). Either file missing, damaged or stale: the run is evaluated again.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pretrain.ablate.outcomes import keep_for_table, run_metrics
from pretrain.config import load_config

REPO = Path(__file__).resolve().parents[2]
BASE = "base"
EVAL_FILE = "ablate_eval.json"
OUTCOMES_FILE = "ablate_eval.npz"


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
    tests: dict[str, dict] = field(default_factory=dict)  # key -> tests against the reference
    chance_r10: float | None = None
    wall_s: float | None = None  # mean over the seeds trained by this command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_description(recipe: str, overrides: list[str]) -> tuple[str, int]:
    """The table's weights cell ("α/β/γ; intra seq/struct/text; augment[; switches]") and the recipe's steps."""
    cfg = load_config(recipe, overrides)
    lo = cfg.loss
    text = (
        f"{lo.alpha:g}/{lo.beta:g}/{lo.gamma:g}; {lo.intra_seq:g}/{lo.intra_struct:g}/{lo.intra_text:g}; "
        f"{'yes' if cfg.data.text_augment else 'no'}"
    )
    return text + "".join(f"; {s}" for s in _switches(cfg)), cfg.train.max_steps


def _switches(cfg) -> list[str]:
    """The objective and batch-composition switches a recipe sets away from their defaults, so overlays
    that differ only there (temperatures, learning-rate ratios, ProtCLIP's PDA, hard negatives, length
    grouping, false negatives, the property sample) are told apart in the table."""
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
    if lo.false_negatives != "none":
        out.append(f"false negatives {lo.false_negatives}")
        if lo.kind == "sigmoid" and lo.sigmoid_groups != "exclude":
            out.append(f"same-group pairs {lo.sigmoid_groups}")
    d = cfg.data
    if d.hard_negatives is not None:
        source = "previous epoch" if d.hard_negatives == "previous_epoch" else "export"
        out.append(f"hard negatives {source} × {d.hard_negative_ratio:g}")
    if d.length_grouping != "none":
        out.append(f"length grouping {d.length_grouping}")
    if d.property_sampling and d.property_sampling_mode != "per_epoch":
        out.append(f"property sample {d.property_sampling_mode}")
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


def load_outcomes(path: Path) -> dict[str, np.ndarray]:
    """The per-protein arrays of ``path`` (``ablate_eval.npz``), never unpickled.

    Raises:
        ValueError: not a readable npz of plain arrays with ``ids`` (the message names the file).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: not a per-protein outcome file ({type(e).__name__}: {e})") from None
    if "ids" not in out:
        raise ValueError(f"{path}: no 'ids' array (not written by pretrain.ablate)")
    return out


def evaluate_run_dir(run_dir: Path, settings: EvalSettings) -> tuple[dict, dict[str, np.ndarray]]:
    """``RUN/export`` evaluated with ``settings``: the eval result and the per-protein outcomes.

    Both are cached (``RUN/ablate_eval.json`` + ``RUN/ablate_eval.npz``) and reused while the
    export and the settings match and both files read back.
    """
    from pretrain.eval.__main__ import evaluate_export, flatten_per_protein

    weights = run_dir / "export" / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"{weights} is missing: the run did not export")
    stamp = {"settings": asdict(settings), "export_mtime_ns": weights.stat().st_mtime_ns}
    cache, npz = run_dir / EVAL_FILE, run_dir / OUTCOMES_FILE
    if cache.is_file() and npz.is_file():
        try:
            saved = json.loads(cache.read_text())
            if {k: saved.get(k) for k in stamp} == stamp:
                return saved["result"], load_outcomes(npz)
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
        per_protein=True,
    )
    outcomes = keep_for_table(flatten_per_protein(result.pop("per_protein")), settings.method)
    result["ablate_eval_s"] = round(time.perf_counter() - t0, 2)
    with npz.open("wb") as fh:  # first the outcomes: a JSON cache always has its npz
        np.savez_compressed(fh, **outcomes)
    cache.write_text(json.dumps({**stamp, "result": result}, indent=1))
    return result, outcomes


def run_variant(stem, recipe, args, settings, seeds, plan) -> tuple[Result, list[dict[str, np.ndarray]]]:
    """Train (or reuse) and evaluate every seed of one variant; ``stem == "base"`` builds untrained exports.

    Returns the variant's result (metrics per seed, not yet summarised) and its runs' per-protein outcomes.
    """
    runs, walls, chance, outcomes = [], [], None, []
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
        result, per_protein = evaluate_run_dir(run_dir, settings)
        metrics, chance = run_metrics(result, settings.method, str(run_dir / EVAL_FILE))
        if wall is not None:
            walls.append(wall)
        runs.append({"seed": seed, "metrics": metrics, "wall_s": wall})
        outcomes.append(per_protein)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None)
        print(f"[ablate] {stem} seed {seed}: {shown} ({time.perf_counter() - t0:.0f} s)", flush=True)
    weights, steps = plan
    wall_s = sum(walls) / len(walls) if walls else None
    return Result(stem, recipe, weights, steps, list(seeds), runs, chance_r10=chance, wall_s=wall_s), outcomes
