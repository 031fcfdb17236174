"""DeepSpeed entry point: ``deepspeed [--num_gpus N] launch/pretrain.py --config zero3.json``.

Wiring only: parse, validate everything that can be validated before a process group
exists, start the group, hand over to :class:`pretrain.trainer.Trainer`, evaluate.
Running the same command again in the same ``--run-dir`` resumes from its latest
complete checkpoint (or reports that the run is finished).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# This file is named like the package it drives: drop its own folder from the import path
# so that ``import pretrain`` finds the library, not this script.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from pretrain.config import ConfigError, load_config, load_run_config, save_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="zero3.json", help="DeepSpeed JSON (bare names resolve against configs/)")
    p.add_argument("--recipe", default=None, help="recipe YAML (default: configs/recipes/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--run-dir", default="runs/demo", help="everything the run writes goes here")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _fail(msg: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"align-pro: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    # ---- everything checkable before any process group starts
    try:
        import torch

        from pretrain.checkpoint import finished_step
        from pretrain.data.stream import check_plan
        from pretrain.ds_config import load_deepspeed_config, resolve_deepspeed_config

        cfg = load_config(args.recipe, args.overrides)
        ds = resolve_deepspeed_config(
            load_deepspeed_config(args.config), cfg, world_size, use_cuda=torch.cuda.is_available()
        )
        check_plan(cfg, world_size)
        if cfg.train.eval_at_end and not Path(cfg.data.eval_shards).is_dir():
            raise ConfigError(f"data.eval_shards: directory not found: {cfg.data.eval_shards}")
        if (run_dir / "config.yaml").is_file():
            previous, _ = load_run_config(run_dir)
            if previous.fingerprint() != cfg.fingerprint():
                raise ConfigError(
                    f"{run_dir} holds a run of a different model (model section differs); use a new --run-dir"
                )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    done = finished_step(run_dir / "checkpoints")
    if done is not None and done >= cfg.train.max_steps and (run_dir / "export").is_dir():
        if rank == 0:
            print(f"run in {run_dir} already finished at step {done}; export in {run_dir / 'export'}")
        return 0
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml", deepspeed_config=ds)

    # ---- distributed training
    import deepspeed
    import torch.distributed as dist

    from pretrain.trainer import Trainer

    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op at start-up
        # (a minute of C++ on 2 cores, repeated whenever its build flags flip). Gloo is all
        # we need on CPU: mark the op unavailable so it is never built.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    trainer = Trainer(cfg, ds, run_dir)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()
    if dist.is_initialized():
        dist.barrier()
    if trainer.preempted:
        return 0
    if rank == 0 and cfg.train.eval_at_end:
        from pretrain.eval.__main__ import evaluate_run

        result = evaluate_run(run_dir)
        print(json.dumps({"eval": result["retrieval"]["summary"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
