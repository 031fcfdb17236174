"""``python -m pretrain.export --run-dir RUN``: consolidate a run's checkpoint into ``RUN/export``.

The command only; the export itself is :mod:`pretrain.engine.export`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.engine.export import export_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.export", description="Consolidate a run's checkpoint into safetensors."
    )
    p.add_argument("--run-dir", required=True)
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--out", default=None, help="output directory (default: RUN/export)")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(Path(args.run_dir), args.tag, args.out)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"align-pro export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
