"""Trainer under faults, on 2 spawned gloo ranks with the real DeepSpeed ZeRO-3 engine.

Non-finite steps are injected by wrapping the trainer's loss on one rank: either the loss itself
becomes NaN, or the loss stays finite and only its gradient is NaN (``x + sqrt(0 * x)``). The
update must be skipped on every rank, counted, and the run stopped after
``train.max_nonfinite_steps`` such steps in a row, keeping the last good checkpoint.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch

from pretrain.run import close_process_group
from tests.conftest import free_port
from tests.spawn_ranks import join_group, run_ranks, trainer_overrides

pytestmark = pytest.mark.slow

WORLD = 2
TIMEOUT_S = 300.0


def _poison(kind: str, loss: torch.Tensor) -> torch.Tensor:
    if kind == "nan_loss":
        return loss * float("nan")
    # Same value, NaN gradient: d/dx sqrt(0 * x) = 0 * inf.
    return loss + torch.sqrt(loss * 0)


def _worker(
    rank: int, port: int, out: str, shards: str, run_dir: str, overrides: list, faults: dict, ds_json: str
) -> None:
    join_group(rank, WORLD, port)
    try:
        import deepspeed

        from pretrain.errors import RunStopped
        from pretrain.run import init_process_group, make_trainer, prepare

        over = [*trainer_overrides(shards), "train.stage1_steps=0", *overrides]
        plan = prepare(None, over, ds_json, run_dir, WORLD)
        init_process_group()
        trainer = make_trainer(plan)
        trainer.setup()
        real_loss = trainer.objective

        def loss_fn(*args, **kwargs):
            terms = real_loss(*args, **kwargs)
            kind = faults.get(str(trainer.step + 1))  # the step about to run
            # Training steps only: the no-grad check of the weights before a checkpoint is not a step.
            if kind is not None and rank == faults["rank"] and torch.is_grad_enabled():
                terms["loss"] = _poison(kind, terms["loss"])
            return terms

        trainer.objective = loss_fn
        sums = []
        real_step = trainer._optimizer_step

        def optimizer_step():
            applied = real_step()
            params = list(trainer.engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params):
                sums.append(float(sum(p.detach().double().sum() for p in params)))
            return applied

        trainer._optimizer_step = optimizer_step
        error = ""
        try:
            trainer.train()
        except RunStopped as e:
            error = str(e)
        finally:
            trainer.close()
        result = {
            "error": error,
            "step": trainer.step,
            "nonfinite_steps": trainer.nonfinite_steps,
            "skipped": trainer.engine.skipped_steps,
            "sums": sums,
            "groups": {g["name"]: (g["lr"], g["weight_decay"]) for g in trainer.engine.optimizer.param_groups},
        }
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except Exception:  # noqa: BLE001 - reported to the parent
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        close_process_group()  # else gloo threads can abort the exit (-6)


def _run(tmp_path: Path, shards: Path, overrides: list[str], faults: dict, ds_json: str = "zero3.json") -> list[dict]:
    port = free_port()
    run_dir = tmp_path / "run"
    return run_ranks(
        _worker,
        lambda r: (r, port, str(tmp_path), str(shards), str(run_dir), overrides, faults, ds_json),
        WORLD,
        tmp_path,
        TIMEOUT_S,
        "rank",
    )


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


@pytest.mark.parametrize("stage", [3, 0])
def test_non_finite_loss_and_gradients_skip_the_update_and_training_goes_on(tmp_path, small_demo, stage):
    """ZeRO-3: DeepSpeed's own overflow check skips; ZeRO-0 (plain data parallel): the trainer's."""
    ds_json = "zero3.json"
    if stage == 0:
        ds_json = str(tmp_path / "zero0.json")
        Path(ds_json).write_text(
            json.dumps(
                {"zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
            )
        )
    # On rank 1 only: step 3's loss is NaN; step 4's loss is finite but its gradient is NaN.
    faults = {"rank": 1, "3": "nan_loss", "4": "nan_grad"}
    results = _run(tmp_path, small_demo, ["train.max_steps=6", "train.checkpoint_every=3"], faults, ds_json)
    for res in results:
        assert res["error"] == ""
        assert res["step"] == 6
        assert res["nonfinite_steps"] == 2
        # ZeRO-3: DeepSpeed skipped exactly those updates; ZeRO-0: the trainer did, without calling step()
        assert res["skipped"] == (2 if stage == 3 else 0)
        sums = res["sums"]
        assert all(torch.isfinite(torch.tensor(sums)))
        assert sums[2] == sums[1] and sums[3] == sums[1], "a skipped step changed the weights"
        assert sums[4] != sums[3] and sums[1] != sums[0], "good steps must train"
    assert results[0]["sums"] == results[1]["sums"]
    groups = results[0]["groups"]  # stage 2: everything trains; AdamW decays matrices only
    assert set(groups) >= {"heads", "heads_no_decay", "encoder_text", "encoder_text_no_decay"}
    assert all((wd == 0.0) == name.endswith("_no_decay") and lr > 0 for name, (lr, wd) in groups.items())
    rows = [r for r in _metrics(tmp_path / "run") if "loss" in r]
    assert rows[2]["loss"] is None  # NaN is logged as null (strict JSON)
    assert rows[3]["loss"] is not None  # the gradient-only fault leaves the loss finite
    assert rows[-1]["nonfinite_steps"] == 2 and rows[-1]["step"] == 6


def test_consecutive_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, small_demo):
    faults = {"rank": 0, "4": "nan_loss", "5": "nan_grad", "6": "nan_loss"}
    over = ["train.max_steps=9", "train.checkpoint_every=3", "train.max_nonfinite_steps=3"]
    results = _run(tmp_path, small_demo, over, faults)
    ckpt = tmp_path / "run" / "checkpoints"
    for res in results:
        assert "3 consecutive steps (up to step 6)" in res["error"]
        assert f"the last good checkpoint is {ckpt / 'step00000003'}" in res["error"]
        assert res["step"] == 6
        assert res["sums"][5] == res["sums"][2]  # nothing moved the weights after step 3
    # The stop writes no checkpoint: step 6's was due, but the run stopped before saving it.
    assert (ckpt / "latest").read_text() == "step00000003"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step00000003"]


def test_weights_broken_by_an_update_are_never_checkpointed_and_the_good_one_resumes(tmp_path, small_demo):
    """A learning rate that overflows the weights: the update of step 3 is applied (its gradients
    were finite), every later loss is NaN. The checkpoints due at steps 4 and 6 must not be written
    (with keep_checkpoints=1 they would delete the good step-2 one), the stop names step 2, and a
    relaunch with a sane learning rate resumes from it and finishes."""
    ckpt = tmp_path / "run" / "checkpoints"
    base = ["train.checkpoint_every=2", "train.keep_checkpoints=1", "optim.warmup_steps=0"]
    first = _run(tmp_path, small_demo, [*base, "train.max_steps=2"], {"rank": -1})
    assert all(r["error"] == "" and r["step"] == 2 for r in first)
    assert (ckpt / "latest").read_text() == "step00000002"

    blown = _run(
        tmp_path,
        small_demo,
        [*base, "train.max_steps=8", "train.max_nonfinite_steps=3", "optim.lr=1e30", "optim.encoder_lr=1e30"],
        {"rank": -1},
    )
    for res in blown:
        assert "3 consecutive steps (up to step 6)" in res["error"], res["error"]
        assert f"the last good checkpoint is {ckpt / 'step00000002'}" in res["error"]
    assert (ckpt / "latest").read_text() == "step00000002"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step00000002"]
    skipped = [r for r in _metrics(tmp_path / "run") if r.get("checkpoint_skipped_nonfinite")]
    assert [r["step"] for r in skipped] == [4]  # step 6 stopped the run before its checkpoint

    again = _run(tmp_path, small_demo, [*base, "train.max_steps=8"], {"rank": -1})
    for res in again:
        assert res["error"] == "" and res["step"] == 8
        assert all(torch.isfinite(torch.tensor(res["sums"])))
    losses = [r["loss"] for r in _metrics(tmp_path / "run") if "loss" in r and r["step"] > 2]
    assert len(losses) == 6 and all(loss is not None for loss in losses)  # steps 3-8 redone, all finite
    assert (ckpt / "latest").read_text() == "step00000008"
