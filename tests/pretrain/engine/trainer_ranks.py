"""One spawned rank of a real Trainer run on a demo corpus: the worker the engine tests give to ``run_ranks``."""

from __future__ import annotations

from collections.abc import Callable

from tests.spawn_ranks import launched_rank, trainer_overrides


def train_rank(
    rank: int,
    world: int,
    port: int,
    out: str,
    shards: str,
    run_dir: str,
    ds_json: str,
    overrides: list[str],
    probe: Callable | None = None,
    write_config: bool = False,
    recipe: str | None = None,
) -> None:
    """Train ``rank`` of ``world`` through :func:`pretrain.run.run_trainer` and save what it saw.

    Args:
        rank, world, port: the gloo group (:func:`tests.spawn_ranks.join_group`).
        out: folder of the result ``rank<r>.pt`` ({"step": the trainer's last step, **probe's}) or,
            on failure, the traceback ``rank<r>.err`` (what :func:`tests.spawn_ranks.run_ranks` reads).
        shards, run_dir, ds_json: the demo corpus, the run folder and the DeepSpeed JSON (a name under
            configs/deepspeed or a path).
        overrides: recipe overrides after :func:`tests.spawn_ranks.trainer_overrides`.
        probe: ``probe(trainer)`` after setup, before training; returns ``finish(trainer) -> dict``,
            called after the trainer is closed, whose entries join the saved result.
        write_config: rank 0 writes RUN/config.yaml first (what export and consolidation read).
        recipe: the recipe file (default: the demo recipe).
    """

    def results() -> dict:
        from pretrain.run import init_process_group, prepare, run_trainer, write_run_config

        plan = prepare(recipe, [*trainer_overrides(shards), *overrides], ds_json, run_dir, world)
        if write_config and rank == 0:
            write_run_config(plan)
        init_process_group()
        finish: list[Callable] = []
        trainer = run_trainer(plan, None if probe is None else lambda t: finish.append(probe(t)))
        extra = finish[0](trainer) if finish else {}
        return {"step": trainer.step, **extra}

    launched_rank(rank, world, port, out, results)
