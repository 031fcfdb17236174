"""DeepSpeed entry point: ``deepspeed [--num_gpus N] launch/pretrain.py --config zero3.json``.

Wiring only: parse, validate everything that can be validated before a process group
exists, start the group, train, evaluate (see :mod:`pretrain.run`). Running the same
command again in the same ``--run-dir`` resumes from its latest complete checkpoint (or
reports that the run is finished).
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from pathlib import Path

# This file is named like the package it drives: drop its own folder from the import path
# so that ``import pretrain`` finds the library, not this script.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

# Ray reads its auth mode at import. Local Ray clusters use token auth (Ray >= 2.59); ranks that
# join rank 0's instance by address must be in token mode too or they are refused.
os.environ.setdefault("RAY_AUTH_MODE", "token")

from pretrain.config import ConfigError  # noqa: E402
from pretrain.engine.launcher_watch import forward_sigint_once, watch_launcher  # noqa: E402
from pretrain.engine.run_lock import RunDirBusy, agree_refused  # noqa: E402
from pretrain.errors import RunStopped  # noqa: E402
from pretrain.run import (  # noqa: E402
    claim_run_dir,
    close_process_group,
    init_process_group,
    prepare,
    train_and_evaluate,
    write_run_config,
)

# Whether this process started the process group (set by main): only then does it leave by os._exit.
_STATE = {"process_group": False}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="zero3.json", help="DeepSpeed JSON (bare names resolve against configs/)")
    p.add_argument("--recipe", default=None, help="recipe YAML (default: configs/recipes/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--run-dir", default="runs/demo", help="everything the run writes goes here")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _report_config_error(error: ConfigError, rank: int, local_rank: int) -> None:
    """One line per node: the ranks of a node see the same files and environment, so their errors are
    the same; another node's (a missing mount, other credentials) may differ and is printed by its first
    rank, tagged with the rank."""
    if rank == 0:
        print(f"align-pro: error: {error}", file=sys.stderr, flush=True)
    elif local_rank == 0:
        print(f"align-pro: error (rank {rank}): {error}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    # Ctrl-C: the first SIGINT stops like SIGTERM (checkpoint after this step, exit 0). A SIGTERM or
    # SIGINT to the `deepspeed` launcher, which passes nothing on, reaches the ranks through the watch.
    forward_sigint_once()
    watch_launcher()
    try:
        plan = prepare(args.recipe, args.overrides, args.config, args.run_dir, int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as e:
        _report_config_error(e, rank, args.local_rank)
        return 2
    if plan.finished_step is not None:
        if rank == 0:
            print(
                f"run in {plan.run_dir} already finished at step {plan.finished_step}; export in {plan.run_dir}/export"
            )
        return 0
    # One live run per run directory: rank 0 takes the owner lock before anything is written and every
    # rank learns the verdict in the first collective, so a refused launch exits 2 on all of them.
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = claim_run_dir(plan)
        except (RunDirBusy, ConfigError) as e:
            refusal = str(e)
    try:
        if lock is not None:
            write_run_config(plan)
        init_process_group()
        _STATE["process_group"] = True
        if agree_refused(refusal is not None):
            if refusal is not None:
                print(f"align-pro: error: {refusal}", file=sys.stderr, flush=True)
            return _close(2)
        return _train(plan, rank, args.local_rank)
    finally:
        if lock is not None:
            lock.release()


def _train(plan, rank: int, local_rank: int) -> int:
    try:
        train_and_evaluate(plan, rank)
    except RunStopped as e:  # raised on every rank together
        if rank == 0:
            print(f"align-pro: stopped: {e}", file=sys.stderr, flush=True)
        return _close(3)
    except ConfigError as e:  # found in the checkpoint every rank reads (a resume the run cannot take)
        _report_config_error(e, rank, local_rank)
        return _close(2)
    # Only on these orderly exits: after an unexpected error, peers may still be inside a collective.
    return _close(0)


# How long a non-zero end waits for the other ranks (:func:`_close`) before it leaves without them.
CLOSE_WAIT_S = 120.0


def _close(code: int, wait_s: float = CLOSE_WAIT_S) -> int:
    """Destroy the process group at an orderly end reached by every rank, and return ``code``.

    A non-zero end (a refusal, a stop) first waits at a barrier, at most ``wait_s`` seconds: the launcher
    kills the other ranks as soon as one exits non-zero, so no rank may leave before the reporting rank
    has printed. Should a rank not come (it did not share the error and is inside a training collective),
    this one leaves without it after ``wait_s`` and the group is left to the exit, as after a crash. A
    finished run does not wait (rank 0 alone evaluates the export after training, which may outlast the
    group's timeout); ranks that exit 0 are left alone by the launcher.
    """
    from datetime import timedelta

    import torch.distributed as dist

    if code != 0 and dist.is_available() and dist.is_initialized():
        try:
            dist.barrier(async_op=True).wait(timeout=timedelta(seconds=wait_s))
        except RuntimeError as e:  # gloo / NCCL report a timed-out wait as a RuntimeError (or a subclass)
            print(f"align-pro: not every rank reached the end within {wait_s:g} s ({e}); leaving", file=sys.stderr)
            return code
    close_process_group()
    return code


def leave(code: int) -> None:
    """Exit with ``code`` after :func:`main` returned; after a process group, without the interpreter's
    C++ teardown.

    The DeepSpeed engine outlives the run and holds its process groups (measured: still alive after
    ``gc.collect()``, with no Python-visible referrer), so their C++ objects are freed only at
    interpreter shutdown. There, once in a while under load, a rank aborted after a clean end ("terminate
    called without an active exception"; seen once in CI after a clean refusal) and the launcher
    reported the run as crashed (exit 250). So once the group has been used and closed on every rank
    together (:func:`_close`), the Python exit handlers run (logging, Ray, temporary folders)
    and the process leaves with ``os._exit``. Before a group exists there is nothing to synchronise the
    ranks' messages with and no gloo thread to abort: the ordinary exit keeps the reporting rank's
    message from being cut short by a silent rank's faster exit.
    """
    if not _STATE["process_group"]:
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter would run first: logging.shutdown, ray.shutdown, ...
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    leave(main())  # an unexpected error propagates: traceback and the usual exit
