"""What both entry points do: validate a run before any process group, then train and evaluate.

``launch/pretrain.py`` (DeepSpeed launcher) and ``launch/ray_job.py`` (Ray Train workers) are
thin wrappers around :func:`prepare` and :func:`train_and_evaluate`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.config import Config, ConfigError, load_config, load_run_config, save_config


@dataclass
class RunPlan:
    cfg: Config
    deepspeed_config: dict
    run_dir: Path
    finished_step: int | None  # step of a finished run in run_dir (nothing left to train), else None


def prepare(recipe: str | None, overrides: list[str], ds_config: str, run_dir: str | Path, world_size: int) -> RunPlan:
    """Resolve and check everything that needs no process group.

    Raises:
        ConfigError: unknown keys, wrong types, missing shard directories, an impossible batch
            size for this world size, a DeepSpeed JSON contradicting the recipe, a run
            directory holding a different model, or a resume under another data sampling plan.
    """
    from data_shards.storage import join
    from pretrain.data.plan_checks import check_plan, check_resumable_plan
    from pretrain.data.sampling_plan import plan_settings
    from pretrain.engine.checkpoint import finished_step
    from pretrain.engine.ds_config import load_deepspeed_config, resolve_deepspeed_config
    from pretrain.engine.export import export_step

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: exists and is not a directory")
    try:
        cfg = load_config(recipe, overrides)
        ds = resolve_deepspeed_config(
            load_deepspeed_config(ds_config), cfg, world_size, use_cuda=torch.cuda.is_available()
        )
        check_plan(cfg, world_size)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if cfg.eval.select_metric is not None and not cfg.train.validate_every:
        raise ConfigError(
            f"eval.select_metric={cfg.eval.select_metric!r} selects by validation, but train.validate_every=0 "
            "(no validation): set train.validate_every (a multiple of train.checkpoint_every pins every validated step)"
        )
    if cfg.train.eval_at_end and not _shard_set_exists(cfg.data.eval_shards):
        raise ConfigError(f"data.eval_shards: directory not found: {cfg.data.eval_shards}")
    previous = load_run_config(run_dir)[0] if (run_dir / "config.yaml").is_file() else None
    if previous is not None and previous.fingerprint() != cfg.fingerprint():
        raise ConfigError(f"{run_dir} holds a run of a different model (model section differs); use a new --run-dir")
    remote = cfg.train.remote_dir
    try:
        done = finished_step(run_dir / "checkpoints", remote=remote)
        # The export must hold the weights of that very step: an export left by an earlier, shorter
        # run in this directory (max_steps raised since) does not make the longer run finished.
        exported = done is not None and (
            export_step(run_dir / "export") == done or bool(remote) and export_step(join(remote, "export")) == done
        )
    except OSError as e:  # data_shards.storage.StorageError: wrong credentials, missing bucket
        raise ConfigError(f"train.remote_dir: {e}") from None
    if previous is not None and done is not None:  # the trainer checks the checkpoint's own record too
        check_resumable_plan(plan_settings(previous), cfg, str(run_dir / "config.yaml"))
    finished = done if done is not None and done >= cfg.train.max_steps and exported else None
    return RunPlan(cfg, ds, run_dir, finished)


def _shard_set_exists(location: str) -> bool:
    """A local shard directory, or a URL whose manifest.json exists (pipe: templates are trusted)."""
    from data_shards import storage

    if storage.is_pipe(location):
        return True
    if not storage.is_url(location):
        return Path(location).is_dir()
    try:
        return storage.exists(storage.join(location, "manifest.json"))
    except storage.StorageError as e:
        raise ConfigError(f"data.eval_shards: {e}") from None


def claim_run_dir(plan: RunPlan):
    """Take the run directory's owner lock (one live run per directory: :mod:`pretrain.engine.run_lock`);
    returns the held :class:`~pretrain.engine.run_lock.RunLock` (``release()`` it on exit).

    Raises:
        RunDirBusy: another live run owns the directory (or its ``train.remote_dir``); the
            message names it. The launchers exit with code 2.
        ConfigError: ``ALIGN_PRO_LOCK_STALE_S`` is not a positive number, or the run directory
            cannot be written.
    """
    from pretrain.engine.run_lock import RunLock

    try:
        return RunLock(plan.run_dir, remote=plan.cfg.train.remote_dir).acquire()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"run directory {plan.run_dir}: {e}") from None


def write_run_config(plan: RunPlan) -> None:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(plan.cfg, plan.run_dir / "config.yaml", deepspeed_config=plan.deepspeed_config)


def init_process_group() -> None:
    """Start (or adopt) the process group DeepSpeed uses: gloo on CPU, NCCL on GPU."""
    import deepspeed

    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op at start-up
        # (a minute of C++ on 2 cores, repeated whenever its build flags flip). Gloo is all
        # we need on CPU: mark the op unavailable so it is never built.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def close_process_group() -> None:
    """Tear the process group down before exit.

    Left to interpreter shutdown, gloo's worker threads can be destroyed while still joinable,
    and the process then aborts ("terminate called without an active exception", exit -6)
    after all its work is done, which a launcher reports as a crashed rank.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def make_trainer(plan: RunPlan):
    """The :class:`~pretrain.engine.trainer.Trainer` of ``plan``, wired to the held-out validation
    (``train.validate_every``) that the engine does not import itself."""
    from pretrain.engine.trainer import Trainer
    from pretrain.eval.validation import validator_for

    validator = validator_for(plan.cfg) if plan.cfg.train.validate_every else None
    return Trainer(plan.cfg, plan.deepspeed_config, plan.run_dir, validator=validator)


def run_trainer(plan: RunPlan, before_train: Callable | None = None):
    """Build the trainer of ``plan`` (:func:`make_trainer`), set it up and train it (collective), closing
    it however training ends; ``before_train(trainer)`` runs between setup and training (a test's probe).

    Returns:
        The closed trainer (its ``step`` and ``preempted`` tell how the run ended).
    """
    trainer = make_trainer(plan)
    try:
        trainer.setup()
        if before_train is not None:
            before_train(trainer)
        trainer.train()
    finally:
        trainer.close()
    return trainer


def train_and_evaluate(plan: RunPlan, rank: int) -> bool:
    """Train on this rank (collective), then evaluate the export on rank 0.

    Returns False when the run stopped early on SIGTERM (a checkpoint was saved), True otherwise.
    """
    import torch.distributed as dist

    trainer = run_trainer(plan)
    if dist.is_initialized():
        dist.barrier()
    if trainer.preempted:
        return False
    if rank == 0 and plan.cfg.train.eval_at_end:
        from pretrain.eval.__main__ import evaluate_run

        result = evaluate_run(plan.run_dir)
        print(json.dumps({"eval": result["retrieval"]["summary"]}), flush=True)
    return True
