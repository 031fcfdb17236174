"""``python -m pretrain.summary --run-dir DIR``: a short human summary of a run.

Steps, first and final loss, retrieval R@1/5/10 per direction next to chance level, and
where the checkpoint and the export are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.engine.checkpoint_tags import latest_tag
from pretrain.engine.logging_backends import read_metrics


def summarize(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    lines = [f"run: {run_dir}"]
    train_rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    if train_rows:
        last = train_rows[-1]
        first = next((r for r in train_rows if r["loss"] is not None), last)  # a non-finite loss is logged as null
        loss = "non-finite" if last["loss"] is None else f"{last['loss']:.3f}"
        start = f"{first['loss']:.3f} (step {first['step']}) -> " if first["loss"] is not None else ""
        rate = last.get("samples_per_s")
        lines.append(
            f"steps: {last['step']}  loss: {start}{loss} (step {last['step']})"
            + (f"  throughput: {rate:.1f} samples/s" if rate is not None else "")
        )
    eval_path = run_dir / "eval.json"
    if eval_path.is_file():
        ev = json.loads(eval_path.read_text())
        lines.append(f"retrieval on {ev['shards']} ({ev['num_proteins']} proteins): R@k (chance)")
        for name, d in ev["retrieval"]["directions"].items():
            if not d.get("n"):
                continue
            cells = [f"R@{k}={d[f'R@{k}']:.3f} ({d[f'chance_R@{k}']:.3f})" for k in (1, 5, 10) if f"R@{k}" in d]
            lines.append(f"  {name:<14} " + "  ".join(cells) + f"  median rank {d['median_rank']:.0f}")
    tag = latest_tag(run_dir / "checkpoints")
    lines.append(f"checkpoint: {run_dir / 'checkpoints' / tag if tag else 'none'}")
    if (run_dir / "export").is_dir():
        lines.append(f"export: {run_dir / 'export'} (python -m pretrain.eval --model {run_dir / 'export'})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.summary", description=__doc__)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        print(f"align-pro summary: error: no run directory {args.run_dir}", file=sys.stderr)
        return 2
    print(summarize(Path(args.run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
