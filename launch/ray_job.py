"""Ray Train entry point: the same training as ``launch/pretrain.py``, one DeepSpeed rank per worker.

    python launch/ray_job.py --num-workers 2 [--address HEAD_IP:6379 | ray://head:10001 | auto] \
        [--use-gpu] [--max-failures 3] [--placement-strategy SPREAD] [--storage-path s3://...] \
        --config zero3.json --run-dir runs/ray_demo [--set ...]

On a cluster, submit it as a Ray job (``ray job submit --address http://HEAD:8265 --working-dir .
-- python launch/ray_job.py --address auto ...``) or run it on the head node with ``--address auto``.

Without ``--address`` a local Ray is started (more logical CPUs than cores, so that reader
actors and training workers never wait on each other). Workers run
:func:`pretrain.run.train_and_evaluate` in the process group Ray Train sets up (gloo on CPU,
NCCL on GPU); each worker's Ray shard readers live in the same cluster. The run directory is the
same as with DeepSpeed's launcher (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``,
``export/``); Ray Train's own bookkeeping goes to ``RUN/ray_results/``. The run directory must
be on storage that the driver and every worker can reach.

Failures: when a worker dies or raises, Ray Train restarts the whole worker group
(``FailureConfig(max_failures)``) and every rank resumes from the run directory's latest complete
checkpoint, exactly as a relaunch would. A deliberate stop (:class:`pretrain.errors.RunStopped`:
too many bad samples or non-finite steps, failed checkpoints) is not a failure to retry: the
workers catch it, rank 0 writes ``RUN/stopped.json``, the workers return, and the job exits
with code 3 (2: configuration error or a run directory owned by another live run, 1: failures
beyond ``--max-failures``). The driver holds the run directory's owner lock
(:mod:`pretrain.engine.run_lock`) for the whole job. SIGTERM handling
(checkpoint, exit 0) is for ``launch/pretrain.py``: Ray runs the loop in a worker thread, where
Python cannot install signal handlers.

Testing aid (never for real runs): ``ALIGN_PRO_KILL_AT_STEP=N`` in the driver's environment
makes rank 0 SIGKILL its own worker process once per run directory right after step N (see
``pretrain.engine.run_files.maybe_inject_fault``); Ray Train sees a dead worker and restarts the group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

# Ray reads its auth mode at import: a local Ray uses token auth (Ray >= 2.59), and a driver
# joining a cluster by address must be in token mode too or it is refused.
os.environ.setdefault("RAY_AUTH_MODE", "token")

from pretrain.cli_types import non_negative_int, positive_int  # noqa: E402
from pretrain.config import ConfigError  # noqa: E402
from pretrain.engine.run_lock import RunDirBusy  # noqa: E402
from pretrain.run import claim_run_dir, prepare, write_run_config  # noqa: E402

# Passed on to every worker (a cluster's workers do not inherit the driver's environment).
_WORKER_ENV = (
    "DS_ACCELERATOR",
    "OMP_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "TRITON_INTERPRET",
    "PYTHONPATH",
    "ALIGN_PRO_KILL_AT_STEP",
    "ALIGN_PRO_RECORD_BATCHES",
)
STOPPED = "stopped.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="zero3.json", help="DeepSpeed JSON (bare names resolve against configs/)")
    p.add_argument("--recipe", default=None, help="recipe YAML (default: configs/recipes/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--run-dir", default="runs/ray_demo")
    p.add_argument("--num-workers", type=positive_int, default=2, help="training ranks (Ray Train workers)")
    p.add_argument("--address", default=None, help="an existing cluster (auto or HOST:PORT); default: a local Ray")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--max-failures", type=non_negative_int, default=3, help="worker-group restarts before giving up")
    p.add_argument(
        "--num-cpus", type=positive_int, default=None, help="logical CPUs of a local Ray (default: 2 x cores, >= 4)"
    )
    p.add_argument(
        "--placement-strategy",
        default="PACK",
        choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
        help="how Ray places the training workers (SPREAD: one per node where possible)",
    )
    p.add_argument(
        "--storage-path",
        default=None,
        help="Ray Train's result storage (default RUN/ray_results; on a cluster a bucket or shared path)",
    )
    return p.parse_args(argv)


def _worker(config: dict) -> None:
    """One training rank inside a Ray Train worker (Ray Train has started the process group)."""
    import ray
    import torch.distributed as dist

    from pretrain.errors import RunStopped
    from pretrain.run import init_process_group, train_and_evaluate

    if config.get("cwd") and os.path.isdir(config["cwd"]):
        # Ray Train starts workers in RAY_SESSION/artifacts/<name>: relative paths of the recipe
        # (--recipe, shards, weights) must mean what they meant to the driver, which validated them.
        os.chdir(config["cwd"])
    init_process_group()  # DeepSpeed adopts Ray's group (and skips its CPU shm op build)
    rank = dist.get_rank()
    node = ray.get_runtime_context().get_node_id()
    print(f"align-pro: rank {rank} of {dist.get_world_size()} on Ray node {node}", flush=True)
    plan = prepare(config["recipe"], config["overrides"], config["ds"], config["run_dir"], dist.get_world_size())
    try:
        train_and_evaluate(plan, rank)
    except RunStopped as e:
        # Raised on every rank together; returning (not raising) keeps FailureConfig from retrying.
        if rank == 0:
            (plan.run_dir / STOPPED).write_text(json.dumps({"error": type(e).__name__, "message": str(e)}))


def _ray_init(args: argparse.Namespace, env: dict) -> None:
    import ray

    if args.address:
        ray.init(address=args.address, runtime_env={"env_vars": env})
    else:
        ray.init(
            address="local",  # as documented: a new local Ray, not a `ray start` cluster found on the node
            num_cpus=args.num_cpus or max(4, 2 * (os.cpu_count() or 1)),
            include_dashboard=False,
            object_store_memory=256 * 1024**2,
            runtime_env={"env_vars": env},
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        plan = prepare(args.recipe, args.overrides, args.config, args.run_dir, args.num_workers)
    except ConfigError as e:
        print(f"align-pro: error: {e}", file=sys.stderr, flush=True)
        return 2
    if plan.finished_step is not None:
        print(f"run in {plan.run_dir} already finished at step {plan.finished_step}; export in {plan.run_dir}/export")
        return 0
    try:  # one live run per run directory: the driver owns it for the whole job (workers take nothing)
        lock = claim_run_dir(plan)
    except (RunDirBusy, ConfigError) as e:
        print(f"align-pro: error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        return _run(args, plan)
    finally:
        lock.release()


def _run(args: argparse.Namespace, plan) -> int:
    write_run_config(plan)
    run_dir = plan.run_dir.resolve()
    (run_dir / STOPPED).unlink(missing_ok=True)

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    if not args.use_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    _ray_init(args, env)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "recipe": args.recipe,
            "overrides": args.overrides,
            "ds": str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config,
            "run_dir": str(run_dir),
            "cwd": os.getcwd(),
        },
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            resources_per_worker={"CPU": 1},
            placement_strategy=args.placement_strategy,
        ),
        run_config=RunConfig(
            name="align-pro",
            storage_path=args.storage_path or str(run_dir / "ray_results"),
            failure_config=FailureConfig(max_failures=args.max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray Train's TrainingFailedError after the last retry
        print(f"align-pro: failed after {args.max_failures} restarts: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        ray.shutdown()
    if (run_dir / STOPPED).is_file():
        print(f"align-pro: stopped: {json.loads((run_dir / STOPPED).read_text())['message']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
