"""``python -m pretrain.eval --run-dir DIR | --model EXPORT_DIR [--shards DIR]``: prints JSON.

Evaluates cross-modal retrieval (R@1/5/10 and median rank, six directions) of an exported
model on a held-out shard set; with ``--run-dir`` the result is also written to
``RUN/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pretrain.eval.embed import embed_shards
from pretrain.eval.retrieval import retrieval_metrics
from pretrain.export import load_exported


def evaluate_export(export_dir: Path, shards: str | None = None, max_samples: int | None = None) -> dict:
    """Load an export and evaluate retrieval on ``shards`` (default: the recipe's eval shards)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, cfg = load_exported(export_dir)
    shard_dir = shards or cfg.data.eval_shards
    emb = embed_shards(model, cfg, shard_dir, cfg.eval.batch_size, max_samples or cfg.eval.max_samples)
    return {
        "shards": str(shard_dir),
        "num_proteins": len(emb["ids"]),
        "retrieval": retrieval_metrics(emb, cfg.eval.ks),
    }


def evaluate_run(run_dir: Path, shards: str | None = None) -> dict:
    """Evaluate ``RUN/export`` and write ``RUN/eval.json``."""
    run_dir = Path(run_dir)
    result = evaluate_export(run_dir / "export", shards)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.eval", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="a training run directory (uses RUN/export)")
    src.add_argument("--model", help="an export directory (model.safetensors + config.yaml)")
    p.add_argument("--shards", help="held-out shard directory (default: the recipe's data.eval_shards)")
    p.add_argument("--max-samples", type=int, default=None)
    args = p.parse_args(argv)
    try:
        if args.run_dir:
            if not (Path(args.run_dir) / "export").is_dir():
                raise FileNotFoundError(f"no export in {args.run_dir}: train first (or the run did not finish)")
            result = evaluate_run(Path(args.run_dir), args.shards)
        else:
            result = evaluate_export(Path(args.model), args.shards, args.max_samples)
    except (FileNotFoundError, ValueError) as e:
        print(f"align-pro eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
