"""Read the GPU check's runs back: throughput, time split, MFU and memory of a run; losses of a resumed run.

``check``: what the run layer validates before any process group (recipe + ``--set`` overrides, the
DeepSpeed JSON against them, the shard directories), for a launch the GPU check is about to make;
the dry run calls it for every launch.

``train RUN_DIR``: from the run's own ``metrics.jsonl`` (lines written by the trainer,
``pretrain/engine/step_timing.py``) after ``--skip`` warm-up steps (Triton autotuning, allocator
growth): mean samples/s, the time split (data wait, forward, loss, backward, optimizer; seconds and
share of the step), encoder TFLOP/s and MFU, the peak of ``torch.cuda.max_memory_allocated``; and
``benchmarks/memory.py``'s prediction for this very run (its ``config.yaml``: recipe, batch, ZeRO
stage, activation checkpointing, one GPU) at the recipe's maximum lengths. ``--expect-backend
triton`` fails unless the run's first metrics line names the Triton loss as the one that ran.

``resume REFERENCE RESUMED``: the losses of the steps both runs logged must agree within ``--rtol``
(an uninterrupted run against one SIGKILLed and relaunched from its checkpoint).

Each subcommand appends a Markdown section to ``--out`` and writes ``--json`` when given; the exit
code is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PHASES = ("data", "forward", "loss", "backward", "optimizer")


def _rows(run_dir: Path) -> list[dict]:
    from pretrain.engine.logging_backends import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def predicted_memory_gb(run_dir: Path) -> dict[str, float]:
    """``benchmarks/memory.py``'s figures for the run in ``run_dir`` on one GPU (GB = 1e9 bytes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import memory

    from pretrain.config import load_run_config

    cfg, ds = load_run_config(run_dir)
    stage = int((ds or {}).get("zero_optimization", {}).get("stage", 0))
    counts = memory.parameter_counts(cfg)
    ckpt = {"sequence", "text"} <= set(cfg.train.activation_checkpointing)  # memory.py checkpoints both or none
    states = memory.model_state_bytes(counts["total"], stage, 1) / memory.GB
    act = memory.activation_bytes(memory.encoder_passes(cfg), cfg.data.batch_size, checkpointed=ckpt) / memory.GB
    return {"params": counts["total"], "states_gb": states, "activations_gb": act, "total_gb": states + act}


def train_report(run_dir: Path, name: str, skip: int, expect_backend: str | None) -> tuple[dict, list[str]]:
    """The figures of one run (module docstring) and the failed checks."""
    rows = _rows(run_dir)
    failures = []
    backend = next((r["loss_backend"] for r in rows if "loss_backend" in r), None)
    if expect_backend is not None and backend != expect_backend:
        failures.append(f"{name}: loss backend {backend!r} in {run_dir}/metrics.jsonl, expected {expect_backend!r}")
    steady = [r for r in rows if r["step"] > skip] or rows[-1:]
    if not steady:
        return {"name": name, "steps": 0}, [*failures, f"{name}: no training line in {run_dir}/metrics.jsonl"]

    def mean(key: str) -> float | None:
        vals = [r[key] for r in steady if isinstance(r.get(key), (int, float))]
        return statistics.fmean(vals) if vals else None

    step_s = mean("time_step_s")
    out = {
        "name": name,
        "steps": [r["step"] for r in steady],
        "loss_backend": backend,
        "samples_per_s": mean("samples_per_s"),
        "time_step_s": step_s,
        "encoder_tflops": mean("encoder_tflops"),
        "mfu_encoders": mean("mfu_encoders"),
        "peak_mem_gb": max((r["peak_mem_gb"] for r in rows if r.get("peak_mem_gb") is not None), default=None),
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
    }
    for p in PHASES:
        secs = mean(f"time_{p}_s")
        out[f"time_{p}_s"] = secs
        out[f"share_{p}"] = secs / step_s if secs is not None and step_s else None
    if any(out[f"time_{p}_s"] is None for p in PHASES):
        failures.append(f"{name}: metrics lines without the time split")
    try:
        out["predicted"] = predicted_memory_gb(run_dir)
    except Exception as e:  # noqa: BLE001 - the prediction is reported, not required
        out["predicted"] = {"error": str(e)}
    pred = out["predicted"].get("total_gb")
    if pred and out["peak_mem_gb"] is not None:
        out["peak_over_predicted"] = out["peak_mem_gb"] / pred
    if out["loss_last"] is None or not math.isfinite(out["loss_last"]):
        failures.append(f"{name}: non-finite loss {out['loss_last']}")
    return out, failures


def _fmt(v, spec: str = ".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def train_markdown(r: dict) -> str:
    pred = r.get("predicted", {})
    split = ", ".join(f"{p} {_fmt(r.get(f'time_{p}_s'))} s ({_fmt(r.get(f'share_{p}'), '.1%')})" for p in PHASES)
    return (
        f"### {r['name']}\n\n"
        f"- steps averaged: {r['steps']}; loss backend that ran: {r.get('loss_backend')}\n"
        f"- samples/s {_fmt(r.get('samples_per_s'))}; step {_fmt(r.get('time_step_s'))} s: {split}\n"
        f"- encoder TFLOP/s {_fmt(r.get('encoder_tflops'))}; MFU {_fmt(r.get('mfu_encoders'), '.1%')}\n"
        f"- peak memory {_fmt(r.get('peak_mem_gb'))} GB; benchmarks/memory.py predicts "
        f"{_fmt(pred.get('total_gb'))} GB (states {_fmt(pred.get('states_gb'))} + activations "
        f"{_fmt(pred.get('activations_gb'))}, at the recipe's maximum lengths); measured/predicted "
        f"{_fmt(r.get('peak_over_predicted'), '.2f')}\n"
        f"- loss {_fmt(r.get('loss_first'), '.4f')} -> {_fmt(r.get('loss_last'), '.4f')}\n"
    )


def resume_report(reference: Path, resumed: Path, rtol: float) -> tuple[dict, list[str]]:
    """Losses of the steps both runs logged, their largest relative difference, and the failed checks."""
    a = {r["step"]: r["loss"] for r in _rows(reference)}
    b = {r["step"]: r["loss"] for r in _rows(resumed)}
    common = sorted(set(a) & set(b))
    failures = [] if common else [f"no step logged by both {reference} and {resumed}"]
    diffs = {s: abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in common if a[s] is not None and b[s] is not None}
    if len(diffs) < len(common):
        failures.append("a non-finite loss among the compared steps")
    worst = max(diffs.values(), default=0.0)
    if worst > rtol:
        failures.append(f"resumed losses differ by up to {worst:.3g} (relative) > --rtol {rtol}")
    result = {"steps": common, "reference": [a[s] for s in common], "resumed": [b[s] for s in common]}
    return {**result, "max_rel": worst}, failures


def check_launch(recipe: str | None, config: str, overrides: list[str], world: int) -> None:
    """``pretrain.run.prepare`` on a scratch run directory: recipe, overrides, JSON and shards check out."""
    import tempfile

    from pretrain.run import prepare

    with tempfile.TemporaryDirectory() as tmp:
        plan = prepare(recipe, overrides, config, Path(tmp) / "run", world)
    c = plan.cfg
    print(
        f"ok: {recipe or 'demo'} + {len(overrides)} overrides with {config}: {c.model.sequence.preset}, "
        f"batch {c.data.batch_size}, {c.train.max_steps} steps, checkpointing {c.train.activation_checkpointing}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a launch's recipe, overrides, DeepSpeed JSON and shards")
    c.add_argument("--recipe", default=None)
    c.add_argument("--config", default="zero3.json")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    c.add_argument("--world", type=int, default=1)
    c.add_argument("--from", dest="launches", type=Path, default=None, help="a JSON list of launch arguments a line")
    t = sub.add_parser("train", help="throughput, time split, MFU and memory of one run")
    t.add_argument("run_dir", type=Path)
    t.add_argument("--name", default=None)
    t.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the means")
    t.add_argument("--expect-backend", default=None, help="fail unless this loss backend ran (e.g. triton)")
    r = sub.add_parser("resume", help="losses of a resumed run against an uninterrupted one")
    r.add_argument("reference", type=Path)
    r.add_argument("resumed", type=Path)
    r.add_argument("--rtol", type=float, default=1e-3)
    for s in (t, r):
        s.add_argument("--out", type=Path, default=None, help="append a Markdown section here")
        s.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.command == "check":
        from pretrain.config import ConfigError

        launches = [(args.recipe, args.config, args.overrides)]
        if args.launches is not None:
            parsed = [c.parse_args(json.loads(line)) for line in args.launches.read_text().splitlines() if line.strip()]
            launches = [(a.recipe, a.config, a.overrides) for a in parsed]
        failed = 0
        for recipe, config, overrides in launches:
            try:
                check_launch(recipe, config, overrides, args.world)
            except ConfigError as e:
                print(f"gpu_report check: {recipe} with {config}: {e}", file=sys.stderr)
                failed = 1
        return failed
    if args.command == "train":
        result, failures = train_report(args.run_dir, args.name or args.run_dir.name, args.skip, args.expect_backend)
        text = train_markdown(result)
    else:
        result, failures = resume_report(args.reference, args.resumed, args.rtol)
        text = (
            f"### resume: {args.resumed.name} against {args.reference.name}\n\n- steps {result['steps']}\n"
            f"- losses, uninterrupted: {result['reference']}\n- losses, resumed: {result['resumed']}\n"
            f"- largest relative difference {result['max_rel']:.3g} (allowed {args.rtol})\n"
        )
    text += "".join(f"- **FAILED**: {f}\n" for f in failures)
    print(text)
    if args.out is not None:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps({**result, "failures": failures}, indent=1, default=str) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
