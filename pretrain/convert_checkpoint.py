"""``python -m pretrain.convert_checkpoint RUN_DIR``: prepare an elastic resume offline.

Relaunching a run with another number of ranks loads its latest checkpoint through DeepSpeed's
universal format. Without this command rank 0 converts it at start-up while every other rank
waits; for a large model that takes long enough to hit a collective timeout. Run this first, on
one machine that sees ``RUN_DIR/checkpoints`` (no GPU, no process group), then relaunch: the
finished ``<tag>_universal/`` is reused. Prints JSON; exit 0 on success, 2 on an error (with the
error also as one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.convert_checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, help="the run directory (its checkpoints/ is converted)")
    p.add_argument("--tag", default=None, help="checkpoint to convert (default: the latest complete one)")
    p.add_argument("--workers", type=int, default=1, help="DeepSpeed extract / merge processes (large models: more)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.tag is not None and (not args.tag or args.tag != Path(args.tag).name or args.tag.startswith(".")):
        p.error(f"--tag {args.tag!r}: expected the name of a directory in {args.run_dir / 'checkpoints'}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the conversion itself runs on the CPU
    from pretrain.engine import checkpoint_universal

    ckpt_dir = args.run_dir / "checkpoints"
    start = time.monotonic()
    try:
        if not args.run_dir.is_dir():
            raise FileNotFoundError(f"run directory {args.run_dir} does not exist")
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's progress lines; stdout is the JSON report
            out = checkpoint_universal.convert_to_universal(ckpt_dir, args.tag, workers=args.workers)
    except (OSError, ValueError, RuntimeError) as e:
        message = " ".join(str(e).split())
        print(json.dumps({"ok": False, "error": message}), flush=True)  # the report, as on success
        print(f"align-pro convert_checkpoint: error: {message}", file=sys.stderr)  # and the one line for people
        return 2
    marker = json.loads((out / checkpoint_universal.UNIVERSAL_COMPLETE).read_text())
    report = {
        "ok": True,
        "universal": str(out),
        "source": marker["source"],
        "step": marker["step"],
        "written_by_ranks": marker["world_size"],
        "seconds": round(time.monotonic() - start, 1),
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
