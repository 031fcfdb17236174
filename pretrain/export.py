"""``python -m pretrain.export --run-dir RUN [--format hf [--which last|best|both]]``: consolidate a run's
checkpoint into ``RUN/export``.

The command only; the export itself is :mod:`pretrain.engine.export`. It reads the sharded ZeRO files
itself (:mod:`pretrain.engine.zero_consolidate`): DeepSpeed need not be installed. When the run pinned a
best checkpoint (``RUN/best_checkpoint.json``: by ``eval.select_metric``, default ``val/mean_R@10``), it
is written as ``RUN/export/best`` too. ``--format hf`` also writes the Hugging Face directories and
model card of the exports beside them (:mod:`pretrain.hf_export`): the last in ``RUN/export_hf``, the
best in ``RUN/export_best_hf`` (its card names its step, metric and score); ``--which`` picks one
(default: both when there is a best).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.config import load_run_config
from pretrain.engine.export import export_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.export", description="Consolidate a run's checkpoint into safetensors."
    )
    p.add_argument("--run-dir", required=True)
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    p.add_argument(
        "--out", default=None, help="output directory (default: RUN/export, with the pinned best in RUN/export/best)"
    )
    p.add_argument(
        "--format",
        choices=("safetensors", "hf"),
        default="safetensors",
        help="hf: also write transformers EsmModel / BertModel directories, the structure encoder and a "
        "model card to RUN/export_hf (python -m pretrain.hf_export)",
    )
    p.add_argument(
        "--which",
        choices=("last", "best", "both"),
        default=None,
        help="with --format hf: convert the last export (RUN/export_hf), the best by validation "
        "(RUN/export/best -> RUN/export_best_hf) or both (default: both when the run has a best)",
    )
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        # The cheap checks first: a wrong argument or a damaged config.yaml is named before DeepSpeed
        # reads gigabytes of partitions.
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
        if args.tag is not None and (not args.tag or args.tag != Path(args.tag).name or args.tag.startswith(".")):
            raise ValueError(f"--tag {args.tag!r}: expected the name of a directory in {run_dir / 'checkpoints'}")
        if args.tag is not None and not (run_dir / "checkpoints" / args.tag).is_dir():
            raise FileNotFoundError(f"--tag {args.tag}: no checkpoint {run_dir / 'checkpoints' / args.tag}")
        if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
            raise NotADirectoryError(f"--out {args.out} exists and is not a directory")
        if args.which is not None and args.format != "hf":
            raise ValueError("--which applies to --format hf")
        if args.which not in (None, "last") and args.out is not None:
            raise ValueError(f"--which {args.which}: the best is exported to RUN/export/best only (leave out --out)")
        load_run_config(run_dir)  # ConfigError naming RUN/config.yaml: the export carries it
        out = export_checkpoint(run_dir, args.tag, args.out)
        print(f"exported {out}")
        if args.out is None and (out / "best" / "config.yaml").is_file():
            print(f"exported {out / 'best'} (the best checkpoint by validation)")
        if args.format == "hf":
            from pretrain.hf_export import export_hf, run_exports

            jobs = [("last", out)] if args.out is not None else run_exports(run_dir, args.which)
            for _, export_dir in jobs:
                print(f"exported {export_hf(export_dir, run_dir=run_dir)}")
    except (OSError, RuntimeError, ValueError) as e:
        print(f"align-pro export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
